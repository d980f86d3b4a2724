// The op surface of ddtree: one declaration per (op, backend).
//
// The contracts are in docs/DESIGN.md ("The ops"); the points that contract leaves open are pinned down
// here, because the CPU and CUDA kernels must agree on them bit for bit:
//
// topk_marginals
//   * Values compared are v = float(logit) / float(temperature) (fp32 division). NaN counts as -inf.
//   * Row with a +inf: the +inf entries share the mass evenly (the limit of softmax), logprob
//     -log(count of +inf), every other entry -inf. Row of only -inf/NaN: every logprob is -inf.
//   * Top k by v, ties by smaller token id; the output is sorted the same way.
//   * The normaliser's terms are fp32: m = max v, sum = Σ exp(v - m) (each term in fp32; CPU sums them
//     in double), logprob = float(double(v) - (double(m) + log(double(sum)))). Kernels agree on
//     log-probs within a few fp32 eps of |v|max + |logprob| + log V, and on ids exactly.
//
// build_tree
//   * A NaN log-prob counts as -inf, and so does a NaN score (only -inf + +inf, from a +inf
//     log-prob). Scores are fp32, s(child) = s(parent) + logprob.
//   * The best-first heap order is (larger score, then lexicographically smaller rank sequence).
//   * Cost-aware size: phi and theta are computed in double; phi(n) = sum_{k<=n} exp(double(s_k)),
//     theta(n) = (1 + phi(n)) / (double(draft_cost) + double(verify_cost[b, n])), phi summed in slot
//     order; the tree keeps its first n* nodes, n* the smallest n in 0..built maximising theta (built =
//     the fixed-budget tree's node count), i.e. a later n replaces the best so far only when its theta is
//     strictly greater. (For a convex verify_cost and non-increasing node probabilities theta is
//     unimodal and n* is where it first stops growing; measured CPU costs need not be convex.) CPU raises
//     unless draft_cost + verify_cost[b, n] is finite and > 0 for every n <= max_nodes.
//   * Unused slots: tokens 0, parents -1, depths 0, positions context_len, scores -inf, mask 0.
//     expected_tokens = float(1 + phi(num_nodes)).
//   * budget_mode chooses how verify_cost prices the tree; p_b(i) = exp(double(score)) of request b's
//     i-th node in its own (fixed-budget) order, S_b(n) = sum_{i<=n} p_b(i), built_b = the node count
//     of its fixed-budget tree with max_nodes = N:
//     - "request" (CaDDTree): verify_cost [B, >= N+1], each request sized on its own as above.
//     - "batch" (one padded verify for the batch): verify_cost [1, >= N+1], cost of verifying every
//       request with n nodes. One n for all: the smallest n in 0..N maximising
//       Theta(n) = (B + sum_b S_b(min(n, built_b))) / (draft_cost + verify_cost[0, n]); each request
//       keeps its first min(n, built_b) nodes.
//     - "ragged" (one varlen verify): verify_cost [1, >= B*N+1], cost of B roots plus t nodes in all.
//       The requests' node sequences are merged by descending score, ties to the smaller request index
//       (for log-probs <= 0 this is "all nodes by descending p"; the merge keeps each request's share a
//       prefix of its own order otherwise); t is the smallest in 0..total maximising
//       Theta(t) = (B + sum of the first t p's) / (draft_cost + verify_cost[0, t]); each request keeps
//       its nodes among the first t.
//     Both are evaluated in double by budget_rule.h, the same code on CPU and CUDA; the batch numerator
//     adds the requests' p's step by step, so a rounding difference can only flip a near-tie.
//
// tree_attention
//   * Row i attends to cache positions [0, ctx) and to ctx + j for every j <= num_nodes whose bit is
//     set in mask row i. A row that sees no key at all outputs zeros.
//   * Logits and softmax in fp32. fp16/bf16: a kernel may round the softmax weights, and partial
//     outputs over parts of the keys, to the dtype; kernels agree within eps(dtype) (max|v| + |out|).
//
// accept_tree
//   * At slot c the walk moves to the smallest slot j in (c, num_nodes] with parents[j] == c and
//     tokens[j] == target_tokens[c]. accepted_slots has max_depth + 1 columns (N + 1 when
//     max_depth < 0); the walk also stops when they are full.
//
// compact_kv
//   * "As if every read happened before any write" holds on CPU for any slots. The CUDA kernel stages
//     reads in 32 KiB of shared memory per (cache, request, head): exact for any slots while
//     accept_len * row bytes <= 32 KiB (128 rows at d = 128 bf16); longer paths move in chunks, exact
//     when accepted_slots[b, i] >= i, which every path accept_tree returns satisfies.
//
// Paged ops (paged_tree_attention, paged_compact_kv): the caches use vLLM's flash-attention layout,
// [num_blocks, block_size, H, d] with the head dim contiguous; position p of request b lives in block
// block_table[b, p / block_size] (i32 [B, max_blocks]) at offset p % block_size. A request addresses
// max_blocks * block_size positions; only the blocks of the positions an op touches need valid ids.
//   * paged_tree_attention is tree_attention on that layout: ctx + T must fit the table row (as
//     ctx + T <= S does the dense cache), and the block ids of positions [0, ctx + num_nodes] must lie
//     in [0, num_blocks).
//     On CPU the caches may have any strides (read in place: vLLM CPU_ATTN's transposed keys are a
//     permuted view), and the output keeps q's memory layout.
//   * paged_compact_kv is compact_kv on that layout, per cache; the block ids of the positions it reads
//     and writes must lie in [0, num_blocks). Reads happen before writes within a request; the rows
//     different requests read or write must be distinct (in vLLM, the blocks past a request's context
//     are its own). The CUDA kernel stages reads like compact_kv's (same 32 KiB rule).
//
// Value checks that need the data (context lengths against the cache, slot indices against the tree)
// raise on CPU. On CUDA they would cost a host synchronisation, so the kernels instead clamp or skip
// such entries: they never read or write out of bounds, but the result for invalid input is unspecified.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <optional>
#include <tuple>
#include <vector>

#include "budget_rule.h"

namespace ddtree {

using TopkResult = std::tuple<at::Tensor, at::Tensor>;
// num_nodes, tokens, parents, depths, positions, scores, tree_mask, expected_tokens
using TreeResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor>;
// accepted_slots, accept_len, next_token
using AcceptResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Shape, dtype and device checks shared by both backends (validate.cpp). They raise a RuntimeError
// naming the argument. They never look at tensor values, so they never synchronise.
void check_topk_marginals(const at::Tensor& logits, int64_t k, double temperature);
// Returns the budget mode named by budget_mode ("request", "batch" or "ragged").
budget::Mode check_build_tree(const at::Tensor& logprobs, const at::Tensor& token_ids,
                              const at::Tensor& root_tokens, const at::Tensor& context_lens, int64_t max_nodes,
                              const std::optional<at::Tensor>& verify_cost, double draft_cost,
                              c10::string_view budget_mode);
void check_tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& context_lens, const at::Tensor& tree_mask,
                          const at::Tensor& num_nodes, double scale);
void check_paged_tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_table, const at::Tensor& context_lens,
                                const at::Tensor& tree_mask, const at::Tensor& num_nodes, double scale);
void check_accept_tree(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& num_nodes,
                       const at::Tensor& target_tokens, int64_t max_depth);
void check_compact_kv(const std::vector<at::Tensor>& caches, const at::Tensor& context_lens,
                      const at::Tensor& accepted_slots, const at::Tensor& accept_len);
void check_paged_compact_kv(const std::vector<at::Tensor>& caches, const at::Tensor& block_table,
                            const at::Tensor& context_lens, const at::Tensor& accepted_slots,
                            const at::Tensor& accept_len);

// Output width of the packed ancestor mask for n slots.
inline int64_t mask_words(int64_t slots) { return (slots + 31) / 32; }
// Output width of accepted_slots.
inline int64_t accept_width(int64_t slots, int64_t max_depth) {
  return max_depth < 0 ? slots : std::min<int64_t>(max_depth + 1, slots);
}

// Each op's kernel signature, written once and declared below for each backend: cpu:: always,
// cuda:: when the extension is built with CUDA (torch_bindings.cpp registers them per dispatch key).
#define DDTREE_KERNELS                                                                                  \
  TopkResult topk_marginals(const at::Tensor& logits, int64_t k, double temperature);                \
  TreeResult build_tree(const at::Tensor& logprobs, const at::Tensor& token_ids,                     \
                        const at::Tensor& root_tokens, const at::Tensor& context_lens,              \
                        int64_t max_nodes, const std::optional<at::Tensor>& verify_cost,            \
                        double draft_cost, c10::string_view budget_mode);                           \
  at::Tensor tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, \
                            const at::Tensor& context_lens, const at::Tensor& tree_mask,            \
                            const at::Tensor& num_nodes, double scale);                              \
  AcceptResult accept_tree(const at::Tensor& tokens, const at::Tensor& parents,                      \
                           const at::Tensor& num_nodes, const at::Tensor& target_tokens,            \
                           int64_t max_depth);                                                       \
  void compact_kv(const std::vector<at::Tensor>& caches, const at::Tensor& context_lens,             \
                  const at::Tensor& accepted_slots, const at::Tensor& accept_len);                   \
  at::Tensor paged_tree_attention(const at::Tensor& q, const at::Tensor& k_cache,                    \
                                  const at::Tensor& v_cache, const at::Tensor& block_table,          \
                                  const at::Tensor& context_lens, const at::Tensor& tree_mask,       \
                                  const at::Tensor& num_nodes, double scale);                        \
  void paged_compact_kv(const std::vector<at::Tensor>& caches, const at::Tensor& block_table,        \
                        const at::Tensor& context_lens, const at::Tensor& accepted_slots,            \
                        const at::Tensor& accept_len);

namespace cpu {
DDTREE_KERNELS
}  // namespace cpu

namespace cuda {
DDTREE_KERNELS
}  // namespace cuda

#undef DDTREE_KERNELS

}  // namespace ddtree
