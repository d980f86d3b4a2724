// The batch-coupled budget rules of build_tree ("batch" and "ragged" budget modes), written once for
// the CPU op and the CUDA kernel (compiled as host and as device code), so both take the same decision
// with the same sequence of IEEE double operations.
//
// Inputs are the fixed-budget trees of every request, built with N = max_nodes: request b has built[b]
// nodes whose fp32 path log-probabilities scores[b * stride + s], s = 1..built[b], are in its own
// best-first order. p = exp(double(score)). Both rules walk the nodes in that order and keep the prefix
// with the largest surrogate throughput, the first one on ties (ops.h, "build_tree"); a cost curve that
// is not convex may make Theta fall and rise again, so the walk goes to the end:
//   batch:  Theta(n) = (B + sum_b S_b(min(n, built[b]))) / (draft_cost + verify_cost[n]),  n = 0..N
//   ragged: Theta(t) = (B + first t p's of the merged order) / (draft_cost + verify_cost[t]),
//           t = 0..sum_b built[b].
// Header-only, no ATen: it is also compiled by the emulated-kernel tests.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DDTREE_HOST_DEVICE __host__ __device__
#else
#define DDTREE_HOST_DEVICE
#endif

namespace ddtree::budget {

// Budget mode codes, as passed to the kernels (the op takes the names "request", "batch", "ragged").
enum Mode : int { kRequest = 0, kBatch = 1, kRagged = 2 };

DDTREE_HOST_DEVICE inline double node_prob(float score) { return ::exp(static_cast<double>(score)); }

// "batch": the one node count n for every request. Returns n in [0, N].
DDTREE_HOST_DEVICE inline int64_t batch_cut(const float* scores, int64_t stride, const int32_t* built,
                                            int64_t B, int64_t N, const float* verify_cost,
                                            double draft_cost) {
  double mass = static_cast<double>(B);  // sum_b (1 + S_b(n))
  double best_theta = mass / (draft_cost + static_cast<double>(verify_cost[0]));
  int64_t best = 0;
  for (int64_t n = 0; n < N; ++n) {
    double added = 0.0;  // sum_b p_b(n + 1), over the requests that have an (n + 1)-th node
    for (int64_t b = 0; b < B; ++b) {
      if (n + 1 <= built[b]) added += node_prob(scores[b * stride + n + 1]);
    }
    mass = mass + added;
    const double theta = mass / (draft_cost + static_cast<double>(verify_cost[n + 1]));
    if (theta > best_theta) {
      best_theta = theta;
      best = n + 1;
    }
  }
  return best;
}

// "ragged": merges the requests' node sequences, each in its own order, by descending score (ties: the
// smaller request index), keeping the prefix of that merged order with the largest Theta. For the usual
// monotone trees (every
// topk_marginals output: log-probs <= 0) each request's own order is already descending, so this is
// the order "all nodes by descending p" of the contract; the merge also keeps every request's share a
// prefix of its own order (a valid tree) when it is not. Writes each request's node count to cut[b]
// and returns the total t. O(total * B).
DDTREE_HOST_DEVICE inline int64_t ragged_cut(const float* scores, int64_t stride, const int32_t* built,
                                             int64_t B, const float* verify_cost, double draft_cost,
                                             int32_t* cut) {
  // Two passes over the merged order: the first finds the best prefix length, the second replays the
  // merge up to it (cut[] doubles as the merge's cursor, so no buffer of the order is needed).
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += built[b];
  int64_t best_t = 0;
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t b = 0; b < B; ++b) cut[b] = 0;
    double mass = static_cast<double>(B);
    double best_theta = mass / (draft_cost + static_cast<double>(verify_cost[0]));
    const int64_t stop = pass == 0 ? total : best_t;
    for (int64_t t = 0; t < stop; ++t) {
      int64_t next = -1;
      float next_score = 0.0f;
      for (int64_t b = 0; b < B; ++b) {
        if (cut[b] >= built[b]) continue;
        const float s = scores[b * stride + cut[b] + 1];
        if (next < 0 || s > next_score) {  // strict: ties keep the smaller request index
          next = b;
          next_score = s;
        }
      }
      ++cut[next];
      if (pass == 0) {
        mass = mass + node_prob(next_score);
        const double theta = mass / (draft_cost + static_cast<double>(verify_cost[t + 1]));
        if (theta > best_theta) {
          best_theta = theta;
          best_t = t + 1;
        }
      }
    }
  }
  return best_t;
}

}  // namespace ddtree::budget
