// CUDA kernels of build_tree's batch-coupled budget modes ("batch", "ragged"), run after the
// fixed-budget build of every request's tree (max_nodes = N):
//   1. batch_budget_kernel: one thread takes the decision of budget_rule.h (the CPU op's very code)
//      and writes each request's node count. The rule walks every built node once (the best prefix of a
//      cost curve that need not be convex); it is serial because each step depends on the previous
//      one, and it reads device memory only, so nothing waits on the host.
//   2. cut_tree_kernel: one CTA per request resets the slots past its cut to the unused-slot values of
//      ops.h and recomputes expected_tokens in the CPU's summation order (slot 1 first).
// ATen-free: included by build_tree.cu and by the emulated-kernel tests.
#pragma once

#include <cstdint>
#include <limits>

#include "budget_rule.h"

namespace ddtree::cuda {

__global__ void batch_budget_kernel(const float* __restrict__ scores, int64_t T, const int32_t* __restrict__ built,
                                    int64_t B, int64_t N, const float* __restrict__ verify_cost,
                                    double draft_cost, int mode, int32_t* __restrict__ cut) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  if (mode == budget::kBatch) {
    const int64_t n = budget::batch_cut(scores, T, built, B, N, verify_cost, draft_cost);
    for (int64_t b = 0; b < B; ++b) cut[b] = static_cast<int32_t>(n < built[b] ? n : built[b]);
  } else {
    budget::ragged_cut(scores, T, built, B, verify_cost, draft_cost, cut);
  }
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    cut_tree_kernel(const int32_t* __restrict__ cut, int64_t T, int64_t W, int32_t* __restrict__ num_nodes,
                    int64_t* __restrict__ tokens, int32_t* __restrict__ parents, int32_t* __restrict__ depths,
                    int64_t* __restrict__ positions, float* __restrict__ scores, int32_t* __restrict__ mask,
                    float* __restrict__ expected) {
  const int64_t b = blockIdx.x;
  const int64_t built = num_nodes[b];
  const int64_t keep = cut[b];
  const int64_t ctx = positions[b * T];  // the root's position is context_len
  for (int64_t s = keep + 1 + threadIdx.x; s <= built; s += kThreads) {
    tokens[b * T + s] = 0;
    parents[b * T + s] = -1;
    depths[b * T + s] = 0;
    positions[b * T + s] = ctx;
    scores[b * T + s] = -std::numeric_limits<float>::infinity();
  }
  int32_t* rows = mask + (b * T + keep + 1) * W;
  for (int64_t i = threadIdx.x; i < (built - keep) * W; i += kThreads) rows[i] = 0;
  __syncthreads();  // every thread has read num_nodes[b] before thread 0 overwrites it
  if (threadIdx.x == 0) {
    double phi = 0.0;
    for (int64_t s = 1; s <= keep; ++s) phi = __dadd_rn(phi, budget::node_prob(scores[b * T + s]));
    num_nodes[b] = static_cast<int32_t>(keep);
    expected[b] = static_cast<float>(__dadd_rn(1.0, phi));
  }
}

}  // namespace ddtree::cuda
