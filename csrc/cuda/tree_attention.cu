// tree_attention on CUDA, the host wrapper: operand alignment, split-K choice, launches (tree_attention_kernel.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <mutex>

#include "cuda/tree_attention_kernel.cuh"
#include "ops.h"

namespace ddtree::cuda {
namespace {

using namespace attention;

// A K/V operand the kernel can read directly (kv_layout_ok), else a fresh copy (clone, not contiguous():
// a contiguous view at an odd storage offset would come back unchanged and still be misaligned).
at::Tensor kv_operand(const at::Tensor& t) {
  const int64_t stride[4] = {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  return kv_layout_ok(t.data_ptr(), stride) ? t : t.clone(at::MemoryFormat::Contiguous);
}

template <typename T, int D>
void launch(Params p, int64_t tiles, const at::Tensor& out, cudaStream_t stream) {
  const size_t smem = smem_bytes<T, D>();
  auto kernel = tree_attention_kernel<T, D>;

  // Once per device (so that nothing but launches happens under CUDA-graph capture after a warm-up
  // call): allow > 48 KiB of dynamic shared memory and ask how many CTAs fit on one SM.
  constexpr int kMaxDevices = 64;
  static std::mutex mu;
  static int slots_cache[kMaxDevices] = {};  // SMs * resident CTAs per SM
  const int device = out.device().index();
  int slots = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (device >= 0 && device < kMaxDevices) slots = slots_cache[device];
    if (slots == 0) {
      int blocks_per_sm = 0, sms = 0;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, smem));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
      slots = std::max(blocks_per_sm, 1) * std::max(sms, 1);
      if (device >= 0 && device < kMaxDevices) slots_cache[device] = slots;
    }
  }

  p.num_splits = choose_num_splits(slots, p.B, p.Hkv, tiles, p.S);

  at::Tensor o_part, ml_part;
  const int64_t rows_total = static_cast<int64_t>(p.B) * p.Hq * p.T;
  if (p.num_splits > 1) {
    auto f32 = out.options().dtype(at::kFloat);
    o_part = at::empty({p.num_splits, rows_total, D}, f32);
    ml_part = at::empty({2, p.num_splits, rows_total}, f32);
    p.o_part = o_part.data_ptr<float>();
    p.m_part = ml_part.data_ptr<float>();
    p.l_part = p.m_part + p.num_splits * rows_total;
  }

  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.num_splits),
                  static_cast<unsigned>(p.B * p.Hkv));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (p.num_splits > 1) {
    const int64_t blocks = (rows_total + kThreads / 32 - 1) / (kThreads / 32);
    combine_kernel<T, D><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p.o_part, p.m_part, p.l_part, static_cast<T*>(p.out), p.num_splits, rows_total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

at::Tensor tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& context_lens, const at::Tensor& tree_mask,
                          const at::Tensor& num_nodes, double scale) {
  check_tree_attention(q, k_cache, v_cache, context_lens, tree_mask, num_nodes, scale);
  TORCH_CHECK(q.is_cuda(), "tree_attention: the CUDA kernel needs CUDA tensors, q is on ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "tree_attention: the CUDA kernel supports float16 and bfloat16, got ", q.scalar_type(),
              " (the CPU kernel also takes float32)");
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2);
  TORCH_CHECK(D == 64 || D == 128, "tree_attention: the CUDA kernel supports head dims 64 and 128, got ", D);
  TORCH_CHECK(S < (int64_t{1} << 30), "tree_attention: k_cache.size(2) (", S, ") must be below 2^30");
  TORCH_CHECK(T * Hq < (int64_t{1} << 30), "tree_attention: tree slots * query heads (", T * Hq,
              ") must be below 2^30");
  TORCH_CHECK(B * Hkv <= 65535, "tree_attention: batch * key/value heads (", B * Hkv, ") must be at most 65535");

  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous
  if (B == 0 || Hq == 0) return out;

  at::Tensor qc = q.contiguous();
  if (reinterpret_cast<uintptr_t>(qc.data_ptr()) % 16 != 0) qc = qc.clone();
  const at::Tensor kc = kv_operand(k_cache), vc = kv_operand(v_cache);
  const at::Tensor ctx = context_lens.contiguous(), mask = tree_mask.contiguous(), nn = num_nodes.contiguous();

  Params p{};
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.out = out.data_ptr();
  p.context_lens = ctx.data_ptr<int64_t>();
  p.tree_mask = mask.data_ptr<int32_t>();
  p.num_nodes = nn.data_ptr<int32_t>();
  p.k_sb = kc.stride(0), p.k_sh = kc.stride(1), p.k_ss = kc.stride(2);
  p.v_sb = vc.stride(0), p.v_sh = vc.stride(1), p.v_ss = vc.stride(2);
  p.B = static_cast<int>(B), p.Hq = static_cast<int>(Hq), p.Hkv = static_cast<int>(Hkv);
  p.G = static_cast<int>(Hq / Hkv), p.T = static_cast<int>(T), p.S = static_cast<int>(S);
  p.W = static_cast<int>(mask_words(T));
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  const int64_t tiles = (T * (Hq / Hkv) + kBM - 1) / kBM;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (D == 64) {
    bf16 ? launch<__nv_bfloat16, 64>(p, tiles, out, stream) : launch<__half, 64>(p, tiles, out, stream);
  } else {
    bf16 ? launch<__nv_bfloat16, 128>(p, tiles, out, stream) : launch<__half, 128>(p, tiles, out, stream);
  }
  return out;
}

}  // namespace ddtree::cuda
