// STUB: to be replaced by the real CUDA kernel.
#include <ATen/ATen.h>
#include "ops.h"

namespace ddtree::cuda {

void compact_kv(const std::vector<at::Tensor>& caches, const at::Tensor& context_lens,
                const at::Tensor& accepted_slots, const at::Tensor& accept_len) { TORCH_CHECK(false, "stub"); }

}  // namespace ddtree::cuda
