// tree_attention on CUDA, the host wrapper: checks, operand alignment and the launch (attention_launch.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

#include "cuda/attention_launch.h"
#include "cuda/tree_attention_kernel.cuh"
#include "ops.h"

namespace ddtree::cuda {

using namespace attention;

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
    bf16 ? launch_attention<__nv_bfloat16, 64>(tree_attention_kernel<__nv_bfloat16, 64>, p, tiles, out, stream)
         : launch_attention<__half, 64>(tree_attention_kernel<__half, 64>, p, tiles, out, stream);
  } else {
    bf16 ? launch_attention<__nv_bfloat16, 128>(tree_attention_kernel<__nv_bfloat16, 128>, p, tiles, out, stream)
         : launch_attention<__half, 128>(tree_attention_kernel<__half, 128>, p, tiles, out, stream);
  }
  return out;
}

}  // namespace ddtree::cuda
