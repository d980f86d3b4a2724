// CUDA build_tree, the kernel: the best-first draft tree (DDTree fixed budget / CaDDTree cost-aware size) for the
// whole batch in one launch, one CTA per request.
//
// The pop sequence is inherently serial, so thread 0 of each CTA runs the heap of DESIGN.md literally
// (the same candidates and pushes as the CPU op, so the output is identical bit for bit), while the
// whole CTA stages the inputs into shared memory before and writes the outputs after:
//   * the heap is 4-ary (half the levels of a binary heap: each pop is a chain of dependent
//     shared-memory loads, so fewer levels is what makes it fast); entries are 16 bytes
//     {score, parent score, parent slot, depth << 20 | rank}, moved with one vector load/store;
//   * equal scores compare rank sequences lexicographically: the sequences are not stored, they are
//     read back through the parent chain of the already placed nodes (walk the deeper one up to the
//     common depth, then both up until they share a parent; the shallowest difference decides);
//   * the log-probs a pop can touch (ranks < min(K, max_nodes + 1) per depth, NaN -> -inf) are copied
//     to shared memory first, so the serial loop never waits on global memory;
//   * the heap loop always builds the fixed-budget tree (max_nodes nodes, or every candidate); phi and,
//     cost-aware, theta(n) are computed after it (the exps in parallel, then one serial scan of adds and
//     divides over the staged cost row) and the tree is cut to the first n maximising theta (ops.h);
//   * the heap never holds more than max_nodes + 1 entries (each pop adds at most one net entry and
//     the last pop pushes nothing), so it and the per-slot node arrays fit in shared memory up to a
//     few thousand nodes; beyond the device's shared-memory limit the same kernel runs on a
//     global-memory scratch buffer from the caching allocator (stream-ordered, no synchronisation).
// Arithmetic is the CPU's sequence of IEEE operations: scores are fp32 adds (__fadd_rn, nothing to
// contract), phi and theta double adds and divides (__dadd_rn / __ddiv_rn, no FMA contraction).
// exp(double) on the GPU and in glibc may differ in the last ulp; phi inherits that, so the
// cost-aware size can differ from the CPU only when the largest theta(n) ties another to within an ulp,
// and expected_tokens (rounded to fp32) practically never.
// No value checks that need the data (negative context lengths, non-positive costs): ops.h lets the
// CUDA kernel skip them, and it never indexes with input values.
//
// ATen-free: the .cu host wrapper includes it, and so do the tests that run this same source on
// the CPU under the emulator in tests/emu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/tree_common.cuh"

namespace ddtree::cuda::build {

using namespace ddtree::cuda::tree;

constexpr int kThreads = 256;
constexpr int kRankBits = 20;  // rank < 2^20, depth < 2^12 in Cand::dr
constexpr uint32_t kRankMask = (1u << kRankBits) - 1;
constexpr int kArity = 4;

struct alignas(16) Cand {
  float score;     // path log-probability, fp32
  float pscore;    // the parent's score (0 for the root), for pushing the next sibling
  int32_t pslot;   // the parent's tree slot (0 = root)
  uint32_t dr;     // depth << kRankBits | rank
};

__device__ __forceinline__ uint32_t depth_of(uint32_t dr) { return dr >> kRankBits; }
__device__ __forceinline__ int rank_of(uint32_t dr) { return static_cast<int>(dr & kRankMask); }

// Per-request working memory, carved from one buffer (shared memory or global scratch).
struct Work {
  Cand* heap;        // [max_nodes + 2]
  int32_t* parent;   // [T] parent slot of each placed node (root: -1)
  uint32_t* dr;      // [T] depth << kRankBits | rank of each placed node
  float* score;      // [T]
  float* lp;         // [D, Kc] sanitized log-probs
  float* vc;         // [T] cost row (cost-aware only)
};

__host__ __device__ inline int64_t align16(int64_t x) { return (x + 15) & ~int64_t{15}; }

struct Layout {
  int64_t heap, parent, dr, score, lp, vc, total;
};

__host__ __device__ inline Layout make_layout(int64_t max_nodes, int64_t D, int64_t Kc, bool cost) {
  Layout l;
  const int64_t T = max_nodes + 1;
  l.heap = 0;
  l.parent = l.heap + align16((max_nodes + 2) * static_cast<int64_t>(sizeof(Cand)));
  l.dr = l.parent + align16(T * 4);
  l.score = l.dr + align16(T * 4);
  l.lp = l.score + align16(T * 4);
  l.vc = l.lp + align16(D * Kc * 4);
  l.total = l.vc + (cost ? align16(T * 4) : 0);
  return l;
}

// The dynamic shared memory a launch may use on a device whose opt-in limit is `optin_bytes`
// (cudaDevAttrMaxSharedMemoryPerBlockOptin; 48 KiB without opt-in), keeping 1 KiB for the static
// shared variables. A layout larger than this runs on the global scratch buffer instead.
__host__ inline int64_t dynamic_smem_limit(int64_t optin_bytes) {
  return (optin_bytes > 48 * 1024 ? optin_bytes : 48 * 1024) - 1024;
}

// Lexicographic "seq(a) < seq(b)" of two heap candidates (a proper prefix ranks first), read through
// the parent chains of the placed nodes.
__device__ inline bool seq_less(const Cand& a, const Cand& b, const Work& w) {
  const uint32_t da = depth_of(a.dr), db = depth_of(b.dr);
  uint32_t ea = da, eb = db;  // depth of the cursor
  int ra = rank_of(a.dr), rb = rank_of(b.dr);
  int pa = a.pslot, pb = b.pslot;
  while (ea > eb) {  // the cursor moves to its parent node, a placed node at depth ea - 1 >= 1
    ra = rank_of(w.dr[pa]);
    pa = w.parent[pa];
    --ea;
  }
  while (eb > ea) {
    rb = rank_of(w.dr[pb]);
    pb = w.parent[pb];
    --eb;
  }
  int decide = 0;  // the shallowest difference seen so far
  while (true) {
    if (ra != rb) decide = ra < rb ? -1 : 1;
    if (pa == pb) break;  // same parent: everything above is equal (at depth 1 both parents are 0)
    ra = rank_of(w.dr[pa]);
    pa = w.parent[pa];
    rb = rank_of(w.dr[pb]);
    pb = w.parent[pb];
  }
  return decide != 0 ? decide < 0 : da < db;
}

// Heap order: larger score first, equal scores by the smaller rank sequence. Scores are never NaN.
__device__ __forceinline__ bool before(const Cand& a, const Cand& b, const Work& w) {
  if (a.score != b.score) return a.score > b.score;
  return seq_less(a, b, w);
}

// Puts x at the root of a heap of `size` entries whose root slot is free, and sifts it down.
__device__ inline void sift_down(Cand x, int size, const Work& w) {
  int i = 0;
  while (true) {
    const int first = kArity * i + 1;
    if (first >= size) break;
    const int cnt = min(kArity, size - first);
    Cand kids[kArity];
#pragma unroll
    for (int j = 0; j < kArity; ++j) {
      if (j < cnt) kids[j] = w.heap[first + j];
    }
    int best = 0;
    Cand bc = kids[0];  // by value: a dynamic index into kids would put it in local memory
#pragma unroll
    for (int j = 1; j < kArity; ++j) {
      if (j < cnt && before(kids[j], bc, w)) {
        best = j;
        bc = kids[j];
      }
    }
    if (!before(bc, x, w)) break;
    w.heap[i] = bc;
    i = first + best;
  }
  w.heap[i] = x;
}

// Puts x at index i (the new last entry) and sifts it up.
__device__ inline void sift_up(Cand x, int i, const Work& w) {
  while (i > 0) {
    const int p = (i - 1) / kArity;
    const Cand hp = w.heap[p];
    if (!before(x, hp, w)) break;
    w.heap[i] = hp;
    i = p;
  }
  w.heap[i] = x;
}

__global__ void __launch_bounds__(kThreads)
    build_tree_kernel(const float* __restrict__ logprobs, const int64_t* __restrict__ token_ids,
                      const int64_t* __restrict__ root_tokens, const int64_t* __restrict__ context_lens,
                      const float* __restrict__ verify_cost, int64_t vc_stride, int D, int K, int Kc,
                      int max_nodes, double draft_cost, char* __restrict__ global_scratch, int64_t scratch_bytes,
                      int32_t* __restrict__ out_num, int64_t* __restrict__ out_tokens,
                      int32_t* __restrict__ out_parents, int32_t* __restrict__ out_depths,
                      int64_t* __restrict__ out_positions, float* __restrict__ out_scores,
                      int32_t* __restrict__ out_mask, float* __restrict__ out_expected) {
  DDTREE_DYNAMIC_SMEM(char, smem);
  __shared__ int s_n;
  __shared__ double s_phi;

  const int64_t b = blockIdx.x;
  const bool cost = verify_cost != nullptr;
  const Layout l = make_layout(max_nodes, D, Kc, cost);
  char* base = global_scratch != nullptr ? global_scratch + b * scratch_bytes : smem;
  Work w;
  w.heap = reinterpret_cast<Cand*>(base + l.heap);
  w.parent = reinterpret_cast<int32_t*>(base + l.parent);
  w.dr = reinterpret_cast<uint32_t*>(base + l.dr);
  w.score = reinterpret_cast<float*>(base + l.score);
  w.lp = reinterpret_cast<float*>(base + l.lp);
  w.vc = reinterpret_cast<float*>(base + l.vc);

  const int T = max_nodes + 1;
  const int64_t W = (T + 31) / 32;
  const float* lp_b = logprobs + b * D * static_cast<int64_t>(K);

  // Stage the inputs the serial loop reads.
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(D) * Kc; i += kThreads) {
    const int64_t d = i / Kc, r = i % Kc;
    w.lp[i] = sanitize(lp_b[d * K + r]);
  }
  if (cost) {
    for (int i = threadIdx.x; i < T; i += kThreads) w.vc[i] = verify_cost[b * vc_stride + i];
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    w.parent[0] = -1;
    w.dr[0] = 0;
    w.score[0] = 0.0f;
    const int cap = max_nodes + 2;
    w.heap[0] = Cand{sanitize(__fadd_rn(0.0f, w.lp[0])), 0.0f, 0, (1u << kRankBits) | 0u};
    int size = 1;
    int n = 0;
    while (n < max_nodes && size > 0) {
      const Cand c = w.heap[0];
      const int slot = ++n;
      w.parent[slot] = c.pslot;
      w.dr[slot] = c.dr;
      w.score[slot] = c.score;
      if (n == max_nodes) break;  // the CPU still pushes here, but nothing is popped any more

      const int depth = static_cast<int>(depth_of(c.dr)), rank = rank_of(c.dr);
      // rank + 1 < Kc always holds when rank + 1 < K (rank r + 1 is pushed after r + 1 pops, and
      // n < max_nodes here); it is tested anyway so that no index can leave the staged table.
      const bool has_sib = rank + 1 < K && rank + 1 < Kc;
      const bool has_child = depth < D;
      Cand sib, child;
      if (has_sib) {
        const float lp = w.lp[static_cast<int64_t>(depth - 1) * Kc + rank + 1];
        sib = Cand{sanitize(__fadd_rn(c.pscore, lp)), c.pscore, c.pslot, c.dr + 1u};
      }
      if (has_child) {
        const float lp = w.lp[static_cast<int64_t>(depth) * Kc];
        child = Cand{sanitize(__fadd_rn(c.score, lp)), c.score, slot,
                     static_cast<uint32_t>(depth + 1) << kRankBits};
      }
      if (has_sib) {
        sift_down(sib, size, w);  // replaces the popped root
        if (has_child && size < cap) sift_up(child, size++, w);
      } else if (has_child) {
        sift_down(child, size, w);
      } else {
        --size;
        if (size > 0) sift_down(w.heap[size], size, w);
      }
    }
    s_n = n;
  }
  __syncthreads();
  const int built = s_n;
  // phi off the serial heap loop: the exps in parallel into the heap's space (free now: 16 (max_nodes + 2)
  // bytes >= 8 built), then one thread adds them in the CPU's order (slot 1 first), so every phi(n) is the
  // CPU's bit for bit. Cost-aware, the same thread walks theta(n) over the whole fixed-budget tree and
  // keeps the first n with the largest theta (a later n only when strictly greater): a verify cost that
  // is not convex can make theta fall and rise again. The nodes past it are dropped below as unused slots.
  double* e = reinterpret_cast<double*>(w.heap);
  for (int k = threadIdx.x; k < built; k += kThreads) e[k] = exp(static_cast<double>(w.score[k + 1]));
  __syncthreads();
  if (threadIdx.x == 0) {
    double phi = 0.0;
    if (cost) {
      double best_theta = __ddiv_rn(1.0, __dadd_rn(draft_cost, static_cast<double>(w.vc[0])));
      double best_phi = 0.0;
      int best_n = 0;
      for (int k = 0; k < built; ++k) {
        phi = __dadd_rn(phi, e[k]);
        const double theta =
            __ddiv_rn(__dadd_rn(1.0, phi), __dadd_rn(draft_cost, static_cast<double>(w.vc[k + 1])));
        if (theta > best_theta) {
          best_theta = theta;
          best_phi = phi;
          best_n = k + 1;
        }
      }
      s_n = best_n;
      s_phi = best_phi;
    } else {
      for (int k = 0; k < built; ++k) phi = __dadd_rn(phi, e[k]);
      s_phi = phi;
    }
  }
  __syncthreads();
  const int n = s_n;  // the nodes kept: slots past it get the unused-slot values

  // Per-slot outputs; unused slots get the values of ops.h.
  const int64_t ctx = context_lens[b];
  const int64_t* ids_b = token_ids + b * D * static_cast<int64_t>(K);
  for (int s = threadIdx.x; s < T; s += kThreads) {
    int64_t tok = 0;
    int32_t par = -1, dep = 0;
    float sc = neg_inf();
    if (s == 0) {
      tok = root_tokens[b];
      sc = 0.0f;
    } else if (s <= n) {
      const uint32_t dr = w.dr[s];
      dep = static_cast<int32_t>(depth_of(dr));
      tok = ids_b[static_cast<int64_t>(dep - 1) * K + rank_of(dr)];
      par = w.parent[s];
      sc = w.score[s];
    }
    out_tokens[b * T + s] = tok;
    out_parents[b * T + s] = par;
    out_depths[b * T + s] = dep;
    out_positions[b * T + s] = ctx + dep;
    out_scores[b * T + s] = sc;
  }

  // Ancestor mask: zero everything, then each used row sets the bits of its chain.
  int32_t* mask_b = out_mask + b * T * W;
  for (int64_t i = threadIdx.x; i < T * W; i += kThreads) mask_b[i] = 0;
  __syncthreads();
  for (int s = threadIdx.x; s <= n; s += kThreads) {
    int32_t* row = mask_b + static_cast<int64_t>(s) * W;
    int cur = s, word = s >> 5;
    uint32_t acc = 0;
    while (cur >= 0) {  // slots strictly decrease along the chain, so words do too
      if ((cur >> 5) != word) {
        row[word] = static_cast<int32_t>(acc);
        word = cur >> 5;
        acc = 0;
      }
      acc |= 1u << (cur & 31);
      cur = cur == 0 ? -1 : w.parent[cur];
    }
    row[word] = static_cast<int32_t>(acc);
  }
  if (threadIdx.x == 0) {
    out_num[b] = n;
    out_expected[b] = static_cast<float>(__dadd_rn(1.0, s_phi));
  }
}

}  // namespace ddtree::cuda::build
