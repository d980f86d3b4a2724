// paged_tree_attention on CUDA, the host wrapper: checks, operand alignment and the launch
// (paged_tree_attention_kernel.cuh, attention_launch.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/attention_launch.h"
#include "cuda/paged_tree_attention_kernel.cuh"
#include "ops.h"

namespace ddtree::cuda {

using namespace attention;

at::Tensor paged_tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_table, const at::Tensor& context_lens,
                                const at::Tensor& tree_mask, const at::Tensor& num_nodes, double scale) {
  const char* op = "paged_tree_attention";
  check_paged_tree_attention(q, k_cache, v_cache, block_table, context_lens, tree_mask, num_nodes, scale);
  check_kernel_q(op, q);
  const int64_t B = q.size(0), Hq = q.size(1);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t max_blocks = block_table.size(1), span = max_blocks * block_size;
  TORCH_CHECK(span < (int64_t{1} << 30), op, ": block_table.size(1) * block_size (", span, ") must be below 2^30");
  TORCH_CHECK(num_blocks < (int64_t{1} << 31), op, ": k_cache.size(0) (", num_blocks, ") must be below 2^31");
  check_kernel_grid(op, q, Hkv);

  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous
  if (B == 0 || Hq == 0) return out;

  // A cache the kernel cannot read with 16-byte copies is copied whole (kv_operand): correct, but slow;
  // vLLM's caches (views of one contiguous [2, num_blocks, block_size, Hkv, d] allocation) never are.
  const Operands x = prepare_operands(q, k_cache, v_cache, context_lens, tree_mask, num_nodes);
  const at::Tensor table = block_table.contiguous();
  const Params p = common_params(x, out, Hkv, span, scale);
  const auto rows_of = [&](const at::Tensor& c) {
    return PagedRows{table.data_ptr<int32_t>(), max_blocks, static_cast<int>(block_size), static_cast<int>(num_blocks),
                     c.stride(0), c.stride(1), c.stride(2)};
  };
  launch_for_dtype_and_dim(
      p, out,
      [](auto t, auto d) { return paged_tree_attention_kernel<typename decltype(t)::type, decltype(d)::value>; },
      rows_of(x.k), rows_of(x.v));
  return out;
}

}  // namespace ddtree::cuda
