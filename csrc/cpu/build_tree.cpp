// CPU build_tree: the best-first draft tree of DDTree (fixed budget) and CaDDTree (cost-aware size).
//
// This is the oracle for the CUDA kernel, so it runs the heap of docs/DESIGN.md literally. Candidates are
// rank sequences (r1..rd); the heap starts from (0), and each pop of (..., r) pushes its next sibling
// (..., r+1) when r+1 < K and its first child (..., r, 0) when d < D. Pop order: larger score first,
// equal scores by the lexicographically smaller rank sequence (a proper prefix ranks first). Every
// pushed candidate keeps its rank sequence in a flat pool, so ties compare the full sequences.
// Scores are fp32 in depth order, s(child) = s(parent) + logprob; a NaN logprob counts as -inf, and so
// does a NaN sum (only -inf + +inf, from a +inf logprob), so the heap never compares a NaN.
// The cost-aware rule (ops.h) is evaluated in double: the tree keeps the first n maximising theta(n).
// Requests are independent and each builds its tree serially; the batch is split with at::parallel_for.
// The batch-coupled budget modes build every request's fixed-budget tree first, then cut each tree to
// the prefix the batch rule of budget_rule.h grants it (a prefix of the selection order is a tree).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <queue>
#include <vector>

#include "budget_rule.h"
#include "check_cpu.h"
#include "ops.h"

namespace ddtree::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Candidate {
  float score;         // path log-probability, fp32
  float parent_score;  // score of the parent (0 for the root), for pushing the next sibling
  int32_t parent_slot; // tree slot of the parent (0 = root)
  int32_t depth;       // 1..D
  int32_t rank;        // r_depth
  int64_t seq;         // offset of (r1..r_depth) in the rank pool
};

inline float sanitize(float x) { return std::isnan(x) ? kNegInf : x; }

struct RequestView {
  const float* lp;      // [D, K]
  const int64_t* ids;   // [D, K]
  const float* vcost;   // [max_nodes + 1] or nullptr
  int64_t D, K;
};

void cut_tree(int64_t b, int32_t cut, int64_t T, int64_t W, int32_t* num_nodes, int64_t* tokens,
              int32_t* parents, int32_t* depths, int64_t* positions, float* scores, int32_t* mask,
              float* expected);

// Builds one request's tree into the output rows (already filled with the unused-slot values).
void build_one(const RequestView& in, int64_t root_token, int64_t ctx, int64_t max_nodes, double draft_cost,
               int64_t W, int32_t* num_nodes, int64_t* tokens, int32_t* parents, int32_t* depths,
               int64_t* positions, float* scores, int32_t* mask, float* expected) {
  std::vector<Candidate> pool;
  std::vector<int32_t> ranks;  // rank sequences of the pool's candidates, back to back
  auto seq_less = [&](const Candidate& a, const Candidate& b) {
    const int32_t n = std::min(a.depth, b.depth);
    for (int32_t i = 0; i < n; ++i) {
      const int32_t ra = ranks[a.seq + i], rb = ranks[b.seq + i];
      if (ra != rb) return ra < rb;
    }
    return a.depth < b.depth;
  };
  // std::priority_queue pops its "largest" element: "a < b" here means b pops first.
  auto pops_after = [&](int32_t ia, int32_t ib) {
    const Candidate &a = pool[ia], &b = pool[ib];
    if (a.score != b.score) return a.score < b.score;
    return seq_less(b, a);
  };
  std::priority_queue<int32_t, std::vector<int32_t>, decltype(pops_after)> heap(pops_after);

  // Adds candidate (prefix..., rank) at `depth` whose parent has `parent_seq` (depth - 1 ranks).
  auto push = [&](float parent_score, int32_t parent_slot, int32_t depth, int32_t rank, int64_t parent_seq) {
    const float lp = sanitize(in.lp[(depth - 1) * in.K + rank]);
    const int64_t seq = static_cast<int64_t>(ranks.size());
    for (int32_t i = 0; i < depth - 1; ++i) {
      const int32_t r = ranks[parent_seq + i];  // copied first: push_back may reallocate `ranks`
      ranks.push_back(r);
    }
    ranks.push_back(rank);
    pool.push_back({sanitize(parent_score + lp), parent_score, parent_slot, depth, rank, seq});
    heap.push(static_cast<int32_t>(pool.size() - 1));
  };

  tokens[0] = root_token;
  depths[0] = 0;
  positions[0] = ctx;
  scores[0] = 0.0f;
  mask[0] = 1;
  push(0.0f, 0, 1, 0, 0);

  double phi = 0.0;
  // Cost-aware: the first n maximising theta(n) (ops.h), so the whole fixed-budget tree is built and then
  // cut back to it: a verify cost that is not convex can make theta fall and rise again.
  double best_theta = in.vcost ? 1.0 / (draft_cost + static_cast<double>(in.vcost[0])) : 0.0;
  int64_t best_n = 0;
  int64_t n = 0;
  while (n < max_nodes && !heap.empty()) {
    const Candidate c = pool[heap.top()];
    heap.pop();
    phi = phi + std::exp(static_cast<double>(c.score));
    const int64_t slot = ++n;
    if (in.vcost) {
      const double theta = (1.0 + phi) / (draft_cost + static_cast<double>(in.vcost[n]));
      if (theta > best_theta) {
        best_theta = theta;
        best_n = n;
      }
    }
    tokens[slot] = in.ids[(c.depth - 1) * in.K + c.rank];
    parents[slot] = c.parent_slot;
    depths[slot] = c.depth;
    positions[slot] = ctx + c.depth;
    scores[slot] = c.score;
    for (int64_t w = 0; w < W; ++w) mask[slot * W + w] = mask[c.parent_slot * W + w];
    mask[slot * W + slot / 32] |= static_cast<int32_t>(1u << (slot % 32));
    // The parent's rank sequence is this candidate's without its last rank.
    if (c.rank + 1 < in.K) push(c.parent_score, c.parent_slot, c.depth, c.rank + 1, c.seq);
    if (c.depth < in.D) push(c.score, static_cast<int32_t>(slot), c.depth + 1, 0, c.seq);
  }
  *num_nodes = static_cast<int32_t>(n);
  *expected = static_cast<float>(1.0 + phi);
  if (in.vcost && best_n < n) {
    cut_tree(0, static_cast<int32_t>(best_n), max_nodes + 1, W, num_nodes, tokens, parents, depths, positions,
             scores, mask, expected);
  }
}

// Cuts request b's tree (built[b] nodes) to its first cut[b] nodes: the slots past the cut get the
// unused-slot values, and expected_tokens is recomputed with build_one's summation order.
void cut_tree(int64_t b, int32_t cut, int64_t T, int64_t W, int32_t* num_nodes, int64_t* tokens,
              int32_t* parents, int32_t* depths, int64_t* positions, float* scores, int32_t* mask,
              float* expected) {
  const int64_t built = num_nodes[b];
  const int64_t ctx = positions[b * T];  // the root's position is context_len
  for (int64_t s = cut + 1; s <= built; ++s) {
    tokens[b * T + s] = 0;
    parents[b * T + s] = -1;
    depths[b * T + s] = 0;
    positions[b * T + s] = ctx;
    scores[b * T + s] = kNegInf;
    for (int64_t w = 0; w < W; ++w) mask[(b * T + s) * W + w] = 0;
  }
  double phi = 0.0;
  for (int64_t s = 1; s <= cut; ++s) phi += std::exp(static_cast<double>(scores[b * T + s]));
  num_nodes[b] = cut;
  expected[b] = static_cast<float>(1.0 + phi);
}

}  // namespace

TreeResult build_tree(const at::Tensor& logprobs_in, const at::Tensor& token_ids_in,
                      const at::Tensor& root_tokens_in, const at::Tensor& context_lens_in, int64_t max_nodes,
                      const std::optional<at::Tensor>& verify_cost_in, double draft_cost,
                      c10::string_view budget_mode) {
  const char* op = "build_tree";
  const budget::Mode mode = check_build_tree(logprobs_in, token_ids_in, root_tokens_in, context_lens_in,
                                             max_nodes, verify_cost_in, draft_cost, budget_mode);
  check_cpu(op, "logprobs", logprobs_in);
  check_cpu(op, "token_ids", token_ids_in);
  check_cpu(op, "root_tokens", root_tokens_in);
  check_cpu(op, "context_lens", context_lens_in);
  if (verify_cost_in) check_cpu(op, "verify_cost", *verify_cost_in);
  const at::Tensor logprobs = logprobs_in.contiguous(), token_ids = token_ids_in.contiguous();
  const at::Tensor root_tokens = root_tokens_in.contiguous(), context_lens = context_lens_in.contiguous();
  at::Tensor verify_cost;
  if (verify_cost_in) verify_cost = verify_cost_in->contiguous();

  const int64_t B = logprobs.size(0), D = logprobs.size(1), K = logprobs.size(2);
  const int64_t T = max_nodes + 1, W = mask_words(T);
  TORCH_CHECK(T <= std::numeric_limits<int32_t>::max(), op, ": max_nodes (", max_nodes, ") is too large");
  const int64_t* ctx = context_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(ctx[b] >= 0, op, ": context_lens[", b, "] = ", ctx[b], " must be non-negative");
  }
  const float* vc = verify_cost.defined() ? verify_cost.data_ptr<float>() : nullptr;
  const int64_t vc_cols = verify_cost.defined() ? verify_cost.size(1) : 0;
  if (vc) {
    // The entries each mode can read: [B, N+1] (request), [1, N+1] (batch), [1, B*N+1] (ragged).
    const int64_t rows = mode == budget::kRequest ? B : 1;
    const int64_t last = mode == budget::kRagged ? B * max_nodes : max_nodes;
    for (int64_t b = 0; b < rows; ++b) {
      for (int64_t n = 0; n <= last; ++n) {
        const double total = draft_cost + static_cast<double>(vc[b * vc_cols + n]);
        TORCH_CHECK(std::isfinite(total) && total > 0.0, op, ": draft_cost + verify_cost[", b, ", ", n,
                    "] = ", total, " must be finite and positive");
      }
    }
  }

  const auto opt = logprobs.options();
  at::Tensor num_nodes = at::zeros({B}, opt.dtype(at::kInt));
  at::Tensor tokens = at::zeros({B, T}, opt.dtype(at::kLong));
  at::Tensor parents = at::full({B, T}, -1, opt.dtype(at::kInt));
  at::Tensor depths = at::zeros({B, T}, opt.dtype(at::kInt));
  // clone, not contiguous(): with T == 1 the expand is already contiguous and would alias context_lens.
  at::Tensor positions = context_lens.view({B, 1}).expand({B, T}).clone(at::MemoryFormat::Contiguous);
  at::Tensor scores = at::full({B, T}, kNegInf, opt.dtype(at::kFloat));
  at::Tensor tree_mask = at::zeros({B, T, W}, opt.dtype(at::kInt));
  at::Tensor expected = at::empty({B}, opt.dtype(at::kFloat));

  const float* lp = logprobs.data_ptr<float>();
  const int64_t* ids = token_ids.data_ptr<int64_t>();
  const int64_t* roots = root_tokens.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* vc_b = vc && mode == budget::kRequest ? vc + b * vc_cols : nullptr;
      const RequestView in{lp + b * D * K, ids + b * D * K, vc_b, D, K};
      build_one(in, roots[b], ctx[b], max_nodes, draft_cost, W, num_nodes.data_ptr<int32_t>() + b,
                tokens.data_ptr<int64_t>() + b * T, parents.data_ptr<int32_t>() + b * T,
                depths.data_ptr<int32_t>() + b * T, positions.data_ptr<int64_t>() + b * T,
                scores.data_ptr<float>() + b * T, tree_mask.data_ptr<int32_t>() + b * T * W,
                expected.data_ptr<float>() + b);
    }
  });
  if (mode != budget::kRequest && B > 0) {
    int32_t* nn = num_nodes.data_ptr<int32_t>();
    std::vector<int32_t> cut(B);
    if (mode == budget::kBatch) {
      const int64_t n = budget::batch_cut(scores.data_ptr<float>(), T, nn, B, max_nodes, vc, draft_cost);
      for (int64_t b = 0; b < B; ++b) cut[b] = static_cast<int32_t>(std::min<int64_t>(n, nn[b]));
    } else {
      budget::ragged_cut(scores.data_ptr<float>(), T, nn, B, vc, draft_cost, cut.data());
    }
    for (int64_t b = 0; b < B; ++b) {
      cut_tree(b, cut[b], T, W, nn, tokens.data_ptr<int64_t>(), parents.data_ptr<int32_t>(),
               depths.data_ptr<int32_t>(), positions.data_ptr<int64_t>(), scores.data_ptr<float>(),
               tree_mask.data_ptr<int32_t>(), expected.data_ptr<float>());
    }
  }
  return {num_nodes, tokens, parents, depths, positions, scores, tree_mask, expected};
}

}  // namespace ddtree::cpu
