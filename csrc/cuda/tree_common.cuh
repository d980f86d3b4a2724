// Device helpers shared by the draft-tree kernels (topk_marginals.cu, build_tree.cu).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "cuda/portability.cuh"

namespace ddtree::cuda::tree {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

// NaN counts as -inf everywhere (ops.h).
__device__ __forceinline__ float sanitize(float x) { return isnan(x) ? neg_inf() : x; }

// Order-preserving map float -> uint32 for non-NaN x: a > b  <=>  key(a) > key(b). -0.0 is mapped like
// +0.0 because the CPU compares floats, for which they are equal (the tie rule then decides by id).
// Every key is non-zero (0 would need the NaN pattern 0xffffffff), so 0 can mean "no entry".
__device__ __forceinline__ uint32_t float_to_key(float x) {
  const uint32_t u = (x == 0.0f) ? 0u : __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_to_float(uint32_t key) {
  const uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  return __uint_as_float(u);
}

// 64-bit selection key: value key above, (2^32 - 1 - id) below, so that a larger key ranks first
// (larger value, then smaller id) and keys of distinct ids are distinct. Needs id < 2^32.
__device__ __forceinline__ uint64_t entry_key(uint32_t value_key, uint32_t id) {
  return (static_cast<uint64_t>(value_key) << 32) | static_cast<uint64_t>(0xffffffffu - id);
}
__device__ __forceinline__ uint32_t entry_id(uint64_t key) { return 0xffffffffu - static_cast<uint32_t>(key); }
__device__ __forceinline__ uint32_t entry_value_key(uint64_t key) { return static_cast<uint32_t>(key >> 32); }

using ptx::lanemask_lt;

// Shared state of radix_select.
struct RadixShared {
  unsigned int hist[256];
  int digit;
  int above;
  int bin;
};

// Block-wide radix select over 64-bit keys held in registers (N per thread, accessed through get(j);
// key 0 means "no entry"). Returns the threshold P such that exactly r of the non-zero keys satisfy
// key >= P; needs 1 <= r <= number of non-zero keys, and the keys must be distinct.
//
// Eight passes of 8 bits, most significant first; a pass stops the search as soon as the digit bin
// holding the r-th key is taken whole, so random data usually needs 3 or 4 passes. Histogram updates
// are aggregated per warp over lanes with the same digit (__match_any_sync) because low-precision
// logits put most keys into a handful of bins.
// Every thread of the block must call it (it uses __syncthreads and full-warp ballots); BLOCK is a
// multiple of 32. The caller must __syncthreads() before reusing `sh`.
template <int BLOCK, int N, typename GetKey>
__device__ __forceinline__ uint64_t radix_select(GetKey get, int r, RadixShared& sh) {
  const int lane = threadIdx.x & 31;
  uint64_t prefix = 0, known = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += BLOCK) sh.hist[i] = 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const uint64_t key = get(j);
      const bool match = key != 0 && (key & known) == prefix;
      const unsigned ballot = __ballot_sync(kFullMask, match);
      if (match) {
        const unsigned digit = static_cast<unsigned>(key >> shift) & 255u;
        const unsigned peers = __match_any_sync(ballot, digit);
        if (lane == __ffs(peers) - 1) atomicAdd(&sh.hist[digit], static_cast<unsigned>(__popc(peers)));
      }
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l owns bins [8l, 8l + 8). Find the bin where the count from the top reaches r.
      unsigned h[8], sum = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        h[b] = sh.hist[8 * lane + b];
        sum += h[b];
      }
      unsigned suffix = sum;  // keys in bins >= 8 * lane
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned o = __shfl_down_sync(kFullMask, suffix, off);
        if (lane + off < 32) suffix += o;
      }
      unsigned above = suffix - sum;  // keys in bins >= 8 * (lane + 1)
      const unsigned want = static_cast<unsigned>(r);
      if (above < want && want <= suffix) {
        for (int b = 7; b >= 0; --b) {
          if (above + h[b] >= want) {
            sh.digit = 8 * lane + b;
            sh.above = static_cast<int>(above);
            sh.bin = static_cast<int>(h[b]);
            break;
          }
          above += h[b];
        }
      }
    }
    __syncthreads();
    const int digit = sh.digit, bin = sh.bin;
    r -= sh.above;
    prefix |= static_cast<uint64_t>(digit) << shift;
    known |= static_cast<uint64_t>(255u) << shift;
    if (r == bin) break;  // the whole bin is in: every key >= prefix is selected
  }
  return prefix;
}

}  // namespace ddtree::cuda::tree
