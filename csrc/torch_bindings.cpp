// The op surface of ddtree: every schema, and which kernel serves it on which backend.
// Schemas are written out in full so that this file is the one place to read what the ops take.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(ddtree, m) {
  // Draft expansion: top-k of log_softmax(logits / temperature) per (request, depth).
  m.def("topk_marginals(Tensor logits, int k, float temperature=1.0) -> (Tensor logprobs, Tensor token_ids)");

  // Draft tree: best-first selection of rank sequences; fixed budget (DDTree) or, with a cost
  // table, the cost-aware stopping rule (CaDDTree), per request or for the whole batch.
  m.def(
      "build_tree(Tensor logprobs, Tensor token_ids, Tensor root_tokens, Tensor context_lens, int max_nodes, "
      "Tensor? verify_cost=None, float draft_cost=0.0, str budget_mode='request') -> (Tensor num_nodes, "
      "Tensor tokens, Tensor parents, Tensor depths, Tensor positions, Tensor scores, Tensor tree_mask, "
      "Tensor expected_tokens)");

  // Verification: attention of the tree slots over the committed context plus their own ancestors.
  m.def(
      "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor context_lens, Tensor tree_mask, "
      "Tensor num_nodes, float scale) -> Tensor");

  // Acceptance: the longest root path the target agrees with, and the bonus token.
  m.def(
      "accept_tree(Tensor tokens, Tensor parents, Tensor num_nodes, Tensor target_tokens, "
      "int max_depth=-1) -> (Tensor accepted_slots, Tensor accept_len, Tensor next_token)");

  // Commit: move the accepted slots' K/V of every layer to the front of the tree region, in place.
  m.def("compact_kv(Tensor(a!)[] caches, Tensor context_lens, Tensor accepted_slots, Tensor accept_len) -> ()");

  // The same two steps over a paged KV cache ([num_blocks, block_size, Hkv, d] + block table, vLLM's
  // flash-attention layout; ops.h).
  m.def(
      "paged_tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor context_lens, "
      "Tensor tree_mask, Tensor num_nodes, float scale) -> Tensor");
  m.def(
      "paged_compact_kv(Tensor(a!)[] caches, Tensor block_table, Tensor context_lens, Tensor accepted_slots, "
      "Tensor accept_len) -> ()");
}

TORCH_LIBRARY_IMPL(ddtree, CPU, m) {
  m.impl("topk_marginals", &ddtree::cpu::topk_marginals);
  m.impl("build_tree", &ddtree::cpu::build_tree);
  m.impl("tree_attention", &ddtree::cpu::tree_attention);
  m.impl("accept_tree", &ddtree::cpu::accept_tree);
  m.impl("compact_kv", &ddtree::cpu::compact_kv);
  m.impl("paged_tree_attention", &ddtree::cpu::paged_tree_attention);
  m.impl("paged_compact_kv", &ddtree::cpu::paged_compact_kv);
}

#ifdef DDTREE_WITH_CUDA
TORCH_LIBRARY_IMPL(ddtree, CUDA, m) {
  m.impl("topk_marginals", &ddtree::cuda::topk_marginals);
  m.impl("build_tree", &ddtree::cuda::build_tree);
  m.impl("tree_attention", &ddtree::cuda::tree_attention);
  m.impl("accept_tree", &ddtree::cuda::accept_tree);
  m.impl("compact_kv", &ddtree::cuda::compact_kv);
  m.impl("paged_tree_attention", &ddtree::cuda::paged_tree_attention);
  m.impl("paged_compact_kv", &ddtree::cuda::paged_compact_kv);
}
#endif
