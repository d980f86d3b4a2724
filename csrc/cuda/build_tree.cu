// STUB: to be replaced by the real CUDA kernel.
#include <ATen/ATen.h>
#include "ops.h"

namespace ddtree::cuda {

TreeResult build_tree(const at::Tensor& logprobs, const at::Tensor& token_ids,
                      const at::Tensor& root_tokens, const at::Tensor& context_lens, int64_t max_nodes,
                      const std::optional<at::Tensor>& verify_cost, double draft_cost) { TORCH_CHECK(false, "stub"); }

}  // namespace ddtree::cuda
