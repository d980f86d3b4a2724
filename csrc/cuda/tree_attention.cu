// STUB: to be replaced by the real CUDA kernel.
#include <ATen/ATen.h>
#include "ops.h"

namespace ddtree::cuda {

at::Tensor tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& context_lens, const at::Tensor& tree_mask,
                          const at::Tensor& num_nodes, double scale) { TORCH_CHECK(false, "stub"); }

}  // namespace ddtree::cuda
