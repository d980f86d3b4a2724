// tree_attention on CUDA, the host wrapper: checks, operand alignment and the launch (attention_launch.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/attention_launch.h"
#include "cuda/tree_attention_kernel.cuh"
#include "ops.h"

namespace ddtree::cuda {

using namespace attention;

at::Tensor tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& context_lens, const at::Tensor& tree_mask,
                          const at::Tensor& num_nodes, double scale) {
  const char* op = "tree_attention";
  check_tree_attention(q, k_cache, v_cache, context_lens, tree_mask, num_nodes, scale);
  check_kernel_q(op, q);
  const int64_t B = q.size(0), Hq = q.size(1);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2);
  TORCH_CHECK(S < (int64_t{1} << 30), op, ": k_cache.size(2) (", S, ") must be below 2^30");
  check_kernel_grid(op, q, Hkv);

  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous
  if (B == 0 || Hq == 0) return out;

  const Operands x = prepare_operands(q, k_cache, v_cache, context_lens, tree_mask, num_nodes);
  Params p = common_params(x, out, Hkv, S, scale);
  p.k_sb = x.k.stride(0), p.k_sh = x.k.stride(1), p.k_ss = x.k.stride(2);
  p.v_sb = x.v.stride(0), p.v_sh = x.v.stride(1), p.v_ss = x.v.stride(2);
  launch_for_dtype_and_dim(p, out, [](auto t, auto d) {
    return tree_attention_kernel<typename decltype(t)::type, decltype(d)::value>;
  });
  return out;
}

}  // namespace ddtree::cuda
