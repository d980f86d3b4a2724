// STUB: to be replaced by the real CPU kernel.
#include <ATen/ATen.h>
#include "ops.h"

namespace ddtree::cpu {

AcceptResult accept_tree(const at::Tensor& tokens, const at::Tensor& parents,
                         const at::Tensor& num_nodes, const at::Tensor& target_tokens,
                         int64_t max_depth) { TORCH_CHECK(false, "stub"); }

}  // namespace ddtree::cpu
