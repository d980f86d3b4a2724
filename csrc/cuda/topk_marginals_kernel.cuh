// CUDA topk_marginals, the kernels: top k of log_softmax(logits / temperature) per (request, depth) row, in one read
// of the vocabulary (no softmax tensor, no sort of the vocabulary).
//
// Two launches:
//   1. topk_chunk_kernel, one CTA per (row, chunk of kChunk = 16384 vocabulary entries): each of its
//      1024 threads loads 16 entries once into registers as order-preserving value keys, computes the chunk's
//      max / sum-exp / count of +inf from those registers, and a block radix select over the 64-bit
//      keys (value key, then smaller id) picks the chunk's top min(k, chunk) entries. Writes them
//      (unsorted) and the chunk's (max, sum-exp, +inf count).
//   2. topk_merge_kernel, one CTA per row: radix-selects the top k of the row's G * k candidates
//      (held in registers), bitonic-sorts them in shared memory, combines the chunks' normalisers in
//      double and writes log-probs and ids.
// Several CTAs per row keep the whole GPU busy when B * D is small (B = 1, D = 15: 150 CTAs).
//
// Semantics (ops.h), identical to the CPU op:
//   * v = float(x) / float(temperature) in IEEE fp32 (__fdiv_rn; skipped when temperature is 1, where
//     it is exact), NaN -> -inf, -0.0 ranked as +0.0 (they compare equal on the CPU).
//   * Selection by (v desc, id asc): the 64-bit keys are distinct, so "top k" is a set with no ties
//     left to break, and the ids equal the CPU's exactly.
//   * Normaliser: per-thread fp32 sums (exact max first, so no rescaling), combined across threads in
//     fp32 and across chunks in double; lse = double(max) + log(sum); logprob = float(double(v) - lse).
//     The CPU sums in double; the two agree within fp32 rounding.
//   * +inf in a row: those entries get float(-log(count)), all others -inf. No finite value and no
//     +inf: every logprob is -inf.
// Limits of this kernel: k <= 1024 and ceil(V / 16384) * k <= 16384 (V up to 262144 at k = 1024).
//
// ATen-free: the .cu host wrapper includes it, and so do the tests that run this same source on
// the CPU under the emulator in tests/emu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/tree_common.cuh"

namespace ddtree::cuda::topk {

using namespace ddtree::cuda::tree;

constexpr int kChunkThreads = 1024;
constexpr int kChunkItems = 16;                              // entries per thread, held in registers
constexpr int kChunk = kChunkThreads * kChunkItems;          // 16384 entries per CTA
constexpr int kMergeThreads = 1024;
constexpr int kMergeItems = 16;                              // candidates per thread in the merge
constexpr int kMaxCandidates = kMergeThreads * kMergeItems;  // G * k must fit
constexpr int kMaxK = 1024;
constexpr int kWarps1 = kChunkThreads / 32;

// (max, sum of exp(v - max)) of finite values; max = -inf means "none".
__device__ __forceinline__ void combine_lse(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == neg_inf()) {
    s = 0.0f;
  } else {
    s = s * expf(m - mn) + s2 * expf(m2 - mn);  // expf(-inf) = 0 covers an empty side
  }
  m = mn;
}

// Local index (within the chunk) of a thread's item i: items come in 16-byte vectors of VEC entries,
// vector j of thread t covering [(j * kChunkThreads + t) * VEC, ... + VEC), so loads are coalesced.
template <int VEC>
__device__ __forceinline__ int local_index(int i) {
  return ((i / VEC) * kChunkThreads + static_cast<int>(threadIdx.x)) * VEC + (i % VEC);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kChunkThreads)
    topk_chunk_kernel(const scalar_t* __restrict__ logits, int64_t V, int G, int k, float temp, bool divide,
                      bool vec_ok, uint64_t* __restrict__ cand, float2* __restrict__ stats,
                      int* __restrict__ posinf_count) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  static_assert(kChunkItems % VEC == 0, "items per thread must be whole vectors");
  __shared__ RadixShared rs;
  __shared__ float red_m[kWarps1], red_s[kWarps1];
  __shared__ int red_c[kWarps1];
  __shared__ int out_count;

  const int64_t cta = blockIdx.x;
  const int64_t row = cta / G;
  const int g = static_cast<int>(cta % G);
  const int64_t base = static_cast<int64_t>(g) * kChunk;
  const int n_valid = V - base < kChunk ? static_cast<int>(V - base) : kChunk;
  const scalar_t* x = logits + row * V + base;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  // Load once: value keys in registers, 0 for entries past the end of the row.
  uint32_t key32[kChunkItems];
#pragma unroll
  for (int j = 0; j < kChunkItems / VEC; ++j) {
    const int li0 = (j * kChunkThreads + static_cast<int>(threadIdx.x)) * VEC;
    alignas(16) scalar_t buf[VEC];
    if (vec_ok && li0 + VEC <= n_valid) {
      *reinterpret_cast<uint4*>(buf) = *reinterpret_cast<const uint4*>(x + li0);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) buf[e] = li0 + e < n_valid ? x[li0 + e] : scalar_t(0.0f);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float xf = static_cast<float>(buf[e]);
      const float v = sanitize(divide ? __fdiv_rn(xf, temp) : xf);
      key32[j * VEC + e] = li0 + e < n_valid ? float_to_key(v) : 0u;
    }
  }

  // Normaliser pieces from the registers: exact max of finite values first, then the sum.
  float m = neg_inf(), s = 0.0f;
  int n_posinf = 0;
#pragma unroll
  for (int i = 0; i < kChunkItems; ++i) {
    const float v = key_to_float(key32[i]);
    if (key32[i] != 0 && isfinite(v)) m = fmaxf(m, v);
    n_posinf += (key32[i] != 0 && v == pos_inf());
  }
  if (m != neg_inf()) {
#pragma unroll
    for (int i = 0; i < kChunkItems; ++i) {
      const float v = key_to_float(key32[i]);
      if (key32[i] != 0 && isfinite(v)) s += expf(v - m);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, m, off), s2 = __shfl_xor_sync(kFullMask, s, off);
    combine_lse(m, s, m2, s2);
    n_posinf += __shfl_xor_sync(kFullMask, n_posinf, off);
  }
  if (lane == 0) {
    red_m[warp] = m;
    red_s[warp] = s;
    red_c[warp] = n_posinf;
  }
  if (threadIdx.x == 0) out_count = 0;
  __syncthreads();
  if (threadIdx.x == 0) {
    float bm = red_m[0], bs = red_s[0];
    int bc = red_c[0];
    for (int w = 1; w < kWarps1; ++w) {
      combine_lse(bm, bs, red_m[w], red_s[w]);
      bc += red_c[w];
    }
    stats[cta] = make_float2(bm, bs);
    posinf_count[cta] = bc;
  }

  // Selection: the chunk's top r = min(k, n_valid) keys are those >= threshold.
  const uint32_t id_base = static_cast<uint32_t>(base);
  auto get = [&](int i) -> uint64_t {
    return key32[i] != 0 ? entry_key(key32[i], id_base + static_cast<uint32_t>(local_index<VEC>(i))) : 0ull;
  };
  const int r = min(k, n_valid);
  uint64_t threshold = 1;  // every non-zero key
  if (r < n_valid) threshold = radix_select<kChunkThreads, kChunkItems>(get, r, rs);

  uint64_t* out = cand + cta * k;
#pragma unroll
  for (int i = 0; i < kChunkItems; ++i) {
    const uint64_t key = get(i);
    const bool sel = key != 0 && key >= threshold;
    const unsigned ballot = __ballot_sync(kFullMask, sel);
    if (ballot != 0) {
      int pos0 = 0;
      if (lane == 0) pos0 = atomicAdd(&out_count, __popc(ballot));
      pos0 = __shfl_sync(kFullMask, pos0, 0);
      const int pos = pos0 + __popc(ballot & lanemask_lt());
      if (sel && pos < k) out[pos] = key;
    }
  }
  for (int p = r + static_cast<int>(threadIdx.x); p < k; p += kChunkThreads) out[p] = 0ull;  // padding
}

__global__ void __launch_bounds__(kMergeThreads)
    topk_merge_kernel(const uint64_t* __restrict__ cand, const float2* __restrict__ stats,
                      const int* __restrict__ posinf_count, int G, int k, float* __restrict__ out_lp,
                      int64_t* __restrict__ out_id) {
  __shared__ RadixShared rs;
  __shared__ uint64_t sel[kMaxK];
  __shared__ int sel_count;
  __shared__ double s_lse;
  __shared__ float s_max;
  __shared__ int s_posinf;

  const int64_t row = blockIdx.x;
  const int C = G * k;
  const uint64_t* c = cand + row * C;
  const int lane = threadIdx.x & 31;

  uint64_t keys[kMergeItems];
#pragma unroll
  for (int j = 0; j < kMergeItems; ++j) {
    const int idx = j * kMergeThreads + static_cast<int>(threadIdx.x);
    keys[j] = idx < C ? c[idx] : 0ull;
  }

  // The row's normaliser from its chunks, in double (warp 0).
  if (threadIdx.x < 32) {
    const float2* st = stats + row * G;
    float m = neg_inf();
    int cnt = 0;
    for (int g = lane; g < G; g += 32) {
      m = fmaxf(m, st[g].x);
      cnt += posinf_count[row * G + g];
    }
    for (int off = 16; off > 0; off >>= 1) {
      m = fmaxf(m, __shfl_xor_sync(kFullMask, m, off));
      cnt += __shfl_xor_sync(kFullMask, cnt, off);
    }
    double sum = 0.0;
    if (m != neg_inf()) {
      for (int g = lane; g < G; g += 32) {
        const float2 p = st[g];
        if (p.x != neg_inf()) sum += static_cast<double>(p.y) * exp(static_cast<double>(p.x) - static_cast<double>(m));
      }
    }
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFullMask, sum, off);
    if (lane == 0) {
      s_max = m;
      s_posinf = cnt;
      s_lse = m != neg_inf() ? static_cast<double>(m) + log(sum) : 0.0;
      sel_count = 0;
    }
  }
  __syncthreads();

  // Top k of the candidates (there are at least k non-zero ones: each chunk gave min(k, its size)).
  auto get = [&](int j) -> uint64_t { return keys[j]; };
  const uint64_t threshold = radix_select<kMergeThreads, kMergeItems>(get, k, rs);
#pragma unroll
  for (int j = 0; j < kMergeItems; ++j) {
    const bool take = keys[j] != 0 && keys[j] >= threshold;
    const unsigned ballot = __ballot_sync(kFullMask, take);
    if (ballot != 0) {
      int pos0 = 0;
      if (lane == 0) pos0 = atomicAdd(&sel_count, __popc(ballot));
      pos0 = __shfl_sync(kFullMask, pos0, 0);
      const int pos = pos0 + __popc(ballot & lanemask_lt());
      if (take && pos < k) sel[pos] = keys[j];
    }
  }
  int n2 = 1;
  while (n2 < k) n2 <<= 1;
  for (int p = k + static_cast<int>(threadIdx.x); p < n2; p += kMergeThreads) sel[p] = 0ull;

  // Bitonic sort of sel[0, n2), descending (n2 <= 1024, one compare-exchange per thread and step).
  for (int size = 2; size <= n2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      const int t = threadIdx.x;
      if (t < n2 / 2) {
        const int i = 2 * t - (t & (stride - 1));
        const int j = i + stride;
        const bool desc = (i & size) == 0;
        const uint64_t a = sel[i], b = sel[j];
        if ((a < b) == desc && a != b) {
          sel[i] = b;
          sel[j] = a;
        }
      }
    }
  }
  __syncthreads();

  const float m = s_max;
  const int n_posinf = s_posinf;
  const double lse = s_lse;
  const float posinf_lp = static_cast<float>(-log(static_cast<double>(max(n_posinf, 1))));
  for (int i = threadIdx.x; i < k; i += kMergeThreads) {
    const uint64_t key = sel[i];
    const float v = key_to_float(entry_value_key(key));
    float lp;
    if (n_posinf > 0) {
      lp = v == pos_inf() ? posinf_lp : neg_inf();
    } else if (m == neg_inf()) {
      lp = neg_inf();
    } else {
      lp = static_cast<float>(static_cast<double>(v) - lse);
    }
    out_lp[row * k + i] = lp;
    out_id[row * k + i] = static_cast<int64_t>(entry_id(key));
  }
}

}  // namespace ddtree::cuda::topk
