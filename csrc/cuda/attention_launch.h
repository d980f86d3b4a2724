// The host side shared by tree_attention and paged_tree_attention on CUDA: operand preparation, the
// Params fields they fill alike, the split-K choice and the launches of an attention kernel
// (tree_attention_kernel.cuh) and its combine. The two wrappers differ only in their checks, in how the
// kernel finds a key's row (k/v strides or PagedRows) and in the kernel itself.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <type_traits>

#include "cuda/tree_attention_kernel.cuh"
#include "ops.h"

namespace ddtree::cuda::attention {

// A K/V operand the kernel can read directly (kv_layout_ok), else a fresh copy (clone, not contiguous():
// a contiguous view at an odd storage offset would come back unchanged and still be misaligned).
inline at::Tensor kv_operand(const at::Tensor& t) {
  const int64_t stride[4] = {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  return kv_layout_ok(t.data_ptr(), stride) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Launches `kernel` (tree_attention_kernel<T, D> or a variant taking `rows...` after the Params) on
// a (tiles, splits, B * Hkv) grid, then the combine kernel when the keys are split.
template <typename T, int D, typename Kernel, typename... Rows>
void launch_attention(Kernel kernel, Params p, int64_t tiles, const at::Tensor& out, cudaStream_t stream,
                      const Rows&... rows) {
  const size_t smem = smem_bytes<T, D>();

  // Once per device and kernel (so that nothing but launches happens under CUDA-graph capture after a
  // warm-up call): allow > 48 KiB of dynamic shared memory and ask how many CTAs fit on one SM.
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
  kernel<<<grid, kThreads, smem, stream>>>(p, rows...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (p.num_splits > 1) {
    const int64_t blocks = (rows_total + kThreads / 32 - 1) / (kThreads / 32);
    combine_kernel<T, D><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p.o_part, p.m_part, p.l_part, static_cast<T*>(p.out), p.num_splits, rows_total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The limits of the kernel body both ops share (tree_attention_kernel.cuh), checked alike by both
// wrappers: first what q must be, before the wrapper's own cache checks ...
inline void check_kernel_q(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, q is on ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": the CUDA kernel supports float16 and bfloat16, got ", q.scalar_type(),
              " (the CPU kernel also takes float32)");
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 64 || D == 128, op, ": the CUDA kernel supports head dims 64 and 128, got ", D);
}
// ... then, after them, the sizes of the launch grid (launch_attention).
inline void check_kernel_grid(const char* op, const at::Tensor& q, int64_t Hkv) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2);
  TORCH_CHECK(T * Hq < (int64_t{1} << 30), op, ": tree slots * query heads (", T * Hq, ") must be below 2^30");
  TORCH_CHECK(B * Hkv <= 65535, op, ": batch * key/value heads (", B * Hkv, ") must be at most 65535");
}

// The operands of both kernels, prepared alike by both wrappers: q contiguous and 16-byte aligned (a copy
// where it is not), K/V as kv_operand gives them, the per-request tensors contiguous. The wrapper keeps
// them alive over the launch: Params points into them.
struct Operands {
  at::Tensor q, k, v, context_lens, tree_mask, num_nodes;
};
inline Operands prepare_operands(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& context_lens, const at::Tensor& tree_mask,
                                 const at::Tensor& num_nodes) {
  at::Tensor qc = q.contiguous();
  if (reinterpret_cast<uintptr_t>(qc.data_ptr()) % 16 != 0) qc = qc.clone();
  return Operands{qc,
                  kv_operand(k_cache),
                  kv_operand(v_cache),
                  context_lens.contiguous(),
                  tree_mask.contiguous(),
                  num_nodes.contiguous()};
}

// The Params fields that do not depend on the cache layout, the same for both kernels; S is the number of
// key positions a request can have (the paged kernel's block_table.size(1) * block_size).
inline Params common_params(const Operands& x, const at::Tensor& out, int64_t Hkv, int64_t S, double scale) {
  const int64_t B = x.q.size(0), Hq = x.q.size(1), T = x.q.size(2);
  Params p{};
  p.q = x.q.data_ptr();
  p.k = x.k.data_ptr();
  p.v = x.v.data_ptr();
  p.out = out.data_ptr();
  p.context_lens = x.context_lens.data_ptr<int64_t>();
  p.tree_mask = x.tree_mask.data_ptr<int32_t>();
  p.num_nodes = x.num_nodes.data_ptr<int32_t>();
  p.B = static_cast<int>(B), p.Hq = static_cast<int>(Hq), p.Hkv = static_cast<int>(Hkv);
  p.G = static_cast<int>(Hq / Hkv), p.T = static_cast<int>(T), p.S = static_cast<int>(S);
  p.W = static_cast<int>(mask_words(T));
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  return p;
}

// The launch both wrappers make, on the current stream: the kernel instance
// kernel_of(std::type_identity<T>{}, std::integral_constant<int, D>{}) for out's dtype T (half or
// bfloat16) and head dim D (64 or 128), over kBM-row tiles of the T * G query rows of a (request, K/V
// head), through launch_attention.
template <typename KernelOf, typename... Rows>
void launch_for_dtype_and_dim(const Params& p, const at::Tensor& out, const KernelOf& kernel_of,
                              const Rows&... rows) {
  const int64_t tiles = (static_cast<int64_t>(p.T) * p.G + kBM - 1) / kBM;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto t, auto d) {
    using T = typename decltype(t)::type;
    launch_attention<T, decltype(d)::value>(kernel_of(t, d), p, tiles, out, stream, rows...);
  };
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  if (out.size(3) == 64) {
    bf16 ? launch(std::type_identity<__nv_bfloat16>{}, std::integral_constant<int, 64>{})
         : launch(std::type_identity<__half>{}, std::integral_constant<int, 64>{});
  } else {
    bf16 ? launch(std::type_identity<__nv_bfloat16>{}, std::integral_constant<int, 128>{})
         : launch(std::type_identity<__half>{}, std::integral_constant<int, 128>{});
  }
}

}  // namespace ddtree::cuda::attention
