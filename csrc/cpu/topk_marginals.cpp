// STUB: to be replaced by the real CPU kernel.
#include <ATen/ATen.h>
#include "ops.h"

namespace ddtree::cpu {

TopkResult topk_marginals(const at::Tensor& logits, int64_t k, double temperature) { TORCH_CHECK(false, "stub"); }

}  // namespace ddtree::cpu
