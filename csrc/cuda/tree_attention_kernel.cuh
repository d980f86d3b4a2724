// tree_attention on CUDA, the kernels: flash-decoding style attention of T tree slots over a long committed context
// plus their own ancestors, reading the bit-packed ancestor mask directly.
//
// Work split. For one request b and one key/value head h, the G = Hq / Hkv query heads that share h
// and the T tree slots form T * G query rows (row r = t * G + g), so every K/V tile brought into shared
// memory serves the whole GQA group. One CTA handles (64-row query tile, key split, b, h):
//   * keys of request b are positions [0, L) with L = ctx + num_nodes + 1: the context [0, ctx) is
//     visible to every row, the tree part [ctx, L) only where the mask bit is set;
//   * the keys are cut into `num_splits` contiguous chunks (split-K over the context) so that a small
//     tree over a long context still has enough CTAs to fill the GPU; each chunk keeps its own
//     (running max, running sum, unnormalised accumulator) and a small combine kernel merges them.
//     With one split the main kernel normalises and writes the output itself.
// Inside a CTA: 4 warps, 16 query rows each; K and V tiles of 64 keys stream through shared memory
// with cp.async (V of tile i loads while Q K^T of tile i runs, K of tile i+1 while softmax and P V
// run); both products use the m16n8k16 tensor-core mma with fp32 accumulation; softmax is the online
// softmax in fp32 in the log2 domain.
//
// Robustness without a host sync: ctx is clamped to [0, S - T] and num_nodes to [0, T - 1], so every
// key read lies inside the cache; loads past the chunk end are zero-filled and masked to -inf; a row
// that sees no key ends with sum 0 and is written as zeros.
//
// ATen-free: the .cu host wrapper includes it, and so do the tests that run this same source on
// the CPU under the emulator in tests/emu.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/attn_mma.cuh"

namespace ddtree::cuda::attention {

using namespace attn;

constexpr int kThreads = 128;           // 4 warps
constexpr int kBM = 64;                 // query rows per CTA (16 per warp)
constexpr int kBN = 64;                 // keys per tile
constexpr int kPad = 8;                 // 16 bytes of row padding: ldmatrix rows hit distinct banks
constexpr int kMaxSplits = 32;          // bound on split-K (and on the partial buffers)
constexpr int kMinKeysPerSplit = 256;   // no point splitting finer than this

struct Params {
  const void* q;      // [B, Hq, T, D] contiguous
  const void* k;      // [B, Hkv, S, D], last dim contiguous, strides below (elements)
  const void* v;
  void* out;          // [B, Hq, T, D] contiguous
  float* o_part;      // [num_splits, B, Hq, T, D] (split path only)
  float* m_part;      // [num_splits, B, Hq, T]  running max, log2 domain
  float* l_part;      // [num_splits, B, Hq, T]  running sum
  const int64_t* context_lens;  // [B]
  const int32_t* tree_mask;     // [B, T, W]
  const int32_t* num_nodes;     // [B]
  int64_t k_sb, k_sh, k_ss, v_sb, v_sh, v_ss;
  int B, Hq, Hkv, G, T, S, W, num_splits;
  float scale_log2;   // scale * log2(e)
};

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Dynamic shared memory of tree_attention_kernel<T, D>: the Q tile and one K and one V tile.
template <typename T, int D>
__host__ constexpr size_t smem_bytes() {
  return static_cast<size_t>(kBM + 2 * kBN) * (D + kPad) * sizeof(T);
}

// K/V operands are read with 16-byte cp.async: the base address and the strides of dims 0..2 (in
// elements of 2 bytes) must be multiples of 16 bytes, and the head dim contiguous.
__host__ inline bool kv_layout_ok(const void* data, const int64_t (&stride)[4]) {
  return stride[3] == 1 && stride[0] % 8 == 0 && stride[1] % 8 == 0 && stride[2] % 8 == 0 &&
         reinterpret_cast<uintptr_t>(data) % 16 == 0;
}

// Split-K: enough CTAs for the device's resident slots (SMs * CTAs per SM), never chunks shorter than
// kMinKeysPerSplit keys of the cache length S, at most kMaxSplits. Only shapes are used (the real
// context lengths live on the device), so choosing needs no synchronisation.
__host__ inline int choose_num_splits(int64_t resident_slots, int64_t B, int64_t Hkv, int64_t tiles, int64_t S) {
  const int64_t base = B * Hkv * tiles;
  const int64_t want = (resident_slots + base - 1) / base;
  const int64_t by_len = (S + kMinKeysPerSplit - 1) / kMinKeysPerSplit;
  const int64_t n = want < by_len ? want : by_len;
  return static_cast<int>(n < 1 ? 1 : (n > kMaxSplits ? kMaxSplits : n));
}

// Where the key or value row of (request b, kv head h, position pos) lives, in elements from the cache's
// base pointer. DenseRows: the cache [B, Hkv, S, D] with element strides (this op); the paged op
// (paged_tree_attention_kernel.cuh) brings its own, which looks the position up in a block table.
struct DenseRows {
  int64_t sb, sh, ss;
  __device__ __forceinline__ int64_t operator()(int b, int h, int pos) const { return b * sb + h * sh + pos * ss; }
};

// Loads `kBN` rows of one (b, h) K or V slice starting at key k0 into shared memory; rows at or past
// `k_end` are zero-filled (never read from global memory).
template <typename T, int D, class Rows>
__device__ __forceinline__ void load_kv_tile(T* dst, const T* base, const Rows& rows, int b, int h, int k0,
                                             int k_end) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < kBN * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const int pos = k0 + r;
    const bool valid = pos < k_end;
    const T* src = valid ? base + rows(b, h, pos) + c * 8 : base;
    cp_async_16(dst + r * (D + kPad) + c * 8, src, valid);
  }
}

// The attention of one CTA (see the file comment); k_rows / v_rows place the cache rows (DenseRows here).
// p.S is the number of positions a request can address: the cache length, or the block table's span.
template <typename T, int D, class Rows>
__device__ __forceinline__ void attend_tile(const Params& p, const Rows& k_rows, const Rows& v_rows) {
  constexpr int kStride = D + kPad;
  DDTREE_DYNAMIC_SMEM(unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * kStride;
  T* sV = sK + kBN * kStride;

  const int tile = blockIdx.x, split = blockIdx.y;
  const int b = blockIdx.z / p.Hkv, h = blockIdx.z % p.Hkv;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int rows = p.T * p.G;
  const int row0 = tile * kBM;

  // Key range of this request and of this split (clamped: see the file comment).
  const int64_t ctx_raw = p.context_lens[b];
  const int ctx = static_cast<int>(ctx_raw < 0 ? 0 : (ctx_raw > p.S - p.T ? p.S - p.T : ctx_raw));
  const int nn_raw = p.num_nodes[b];
  const int nn = nn_raw < 0 ? 0 : (nn_raw > p.T - 1 ? p.T - 1 : nn_raw);
  const int L = ctx + nn + 1;
  const int chunk = ceil_div(ceil_div(L, p.num_splits), kBN) * kBN;
  const int kb = min(split * chunk, L);
  const int ke = min(kb + chunk, L);
  const int n_tiles = ceil_div(ke - kb, kBN);

  const T* q = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.k);
  const T* vc = static_cast<const T*>(p.v);

  // Q tile: row r of the tile is (t, g) = divmod(row0 + r, G); rows past T * G are zero.
  {
    constexpr int kChunks = D / 8;
    for (int i = tid; i < kBM * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const int row = row0 + r;
      const bool valid = row < rows;
      const int t = row / p.G, g = row % p.G;
      const T* src = valid ? q + ((static_cast<int64_t>(b) * p.Hq + h * p.G + g) * p.T + t) * D + c * 8 : q;
      cp_async_16(sQ + r * kStride + c * 8, src, valid);
    }
  }
  if (n_tiles > 0) load_kv_tile<T, D>(sK, kc, k_rows, b, h, kb, ke);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // This warp's Q rows as mma A fragments, kept in registers for the whole key loop.
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kd = 0; kd < D / 16; ++kd) {
    ldmatrix_x4(qf[kd], sQ + (warp * 16 + (lane % 8) + ((lane / 8) & 1) * 8) * kStride + kd * 16 + (lane / 16) * 8);
  }

  // The two rows this thread owns in the C fragments: r_lo and r_lo + 8 (tile-relative + row0).
  const int quad = lane % 4;
  int row_t[2];
  bool row_ok[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = row0 + warp * 16 + lane / 4 + hr * 8;
    row_ok[hr] = row < rows;
    row_t[hr] = row_ok[hr] ? row / p.G : 0;
  }
  const int32_t* mask_b = p.tree_mask + static_cast<int64_t>(b) * p.T * p.W;

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};

  for (int it = 0; it < n_tiles; ++it) {
    const int k0 = kb + it * kBN;
    // K(it) is resident. Start V(it) while computing S = Q K^T.
    load_kv_tile<T, D>(sV, vc, v_rows, b, h, k0, ke);
    cp_async_commit();

    float s[kBN / 8][4];
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kd = 0; kd < D / 16; ++kd) {
#pragma unroll
      for (int n2 = 0; n2 < kBN / 16; ++n2) {
        uint32_t kf[4];
        ldmatrix_x4(kf, sK + (n2 * 16 + (lane % 8) + (lane / 16) * 8) * kStride + kd * 16 + ((lane / 8) & 1) * 8);
        mma_16816<T>(s[2 * n2], qf[kd], kf[0], kf[1]);
        mma_16816<T>(s[2 * n2 + 1], qf[kd], kf[2], kf[3]);
      }
    }

    cp_async_wait_all();
    __syncthreads();  // V(it) landed; every warp is done reading sK
    if (it + 1 < n_tiles) {
      load_kv_tile<T, D>(sK, kc, k_rows, b, h, k0 + kBN, ke);
      cp_async_commit();
    }

    // Scale into the log2 domain, then mask: keys past the chunk end, and tree keys whose bit is clear.
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] *= p.scale_log2;
    if (k0 + kBN > ctx || k0 + kBN > ke) {
      const int j_lo = max(k0 - ctx, 0);  // first tree slot this tile can touch
      const int w_lo = j_lo >> 5;         // the tile's slots span at most 3 mask words from here
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        uint32_t w[3];
#pragma unroll
        for (int i = 0; i < 3; ++i) {
          const bool ok = row_ok[hr] && w_lo + i < p.W;
          w[i] = ok ? static_cast<uint32_t>(__ldg(mask_b + static_cast<int64_t>(row_t[hr]) * p.W + w_lo + i)) : 0u;
        }
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int pos = k0 + nt * 8 + 2 * quad + e;
            bool visible;
            if (pos >= ke) {
              visible = false;
            } else if (pos < ctx) {
              visible = true;
            } else {
              const int j = pos - ctx;  // tree slot, 0 <= j <= nn < T
              const int sel = (j >> 5) - w_lo;
              const uint32_t word = sel == 0 ? w[0] : (sel == 1 ? w[1] : w[2]);
              visible = (word >> (j & 31)) & 1u;
            }
            if (!visible) s[nt][hr * 2 + e] = -INFINITY;
          }
        }
      }
    }

    // Online softmax per row (a row's 64 scores live in the 4 threads of a quad).
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][hr * 2], s[nt][hr * 2 + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[hr], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // all masked so far: avoid -inf - -inf
      const float alpha = exp2f(m_run[hr] - m_use);
      m_run[hr] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = exp2f(s[nt][hr * 2 + e] - m_use);
          s[nt][hr * 2 + e] = pv;
          sum += pv;
        }
      }
      l_run[hr] = l_run[hr] * alpha + sum;  // this thread's share; summed over the quad at the end
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        o[dn][hr * 2] *= alpha;
        o[dn][hr * 2 + 1] *= alpha;
      }
    }

    // O += P V: the S accumulators are re-packed as A fragments (16 keys per k-step).
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int n2 = 0; n2 < D / 16; ++n2) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, sV + (kk * 16 + (lane % 8) + ((lane / 8) & 1) * 8) * kStride + n2 * 16 + (lane / 16) * 8);
        mma_16816<T>(o[2 * n2], pa, vf[0], vf[1]);
        mma_16816<T>(o[2 * n2 + 1], pa, vf[2], vf[3]);
      }
    }

    cp_async_wait_all();
    __syncthreads();  // K(it+1) landed; every warp is done reading sV
  }

#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    l_run[hr] += __shfl_xor_sync(0xffffffffu, l_run[hr], 1);
    l_run[hr] += __shfl_xor_sync(0xffffffffu, l_run[hr], 2);
  }

#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    if (!row_ok[hr]) continue;
    const int row = row0 + warp * 16 + lane / 4 + hr * 8;
    const int t = row / p.G, hq = h * p.G + row % p.G;
    const int64_t out_row = (static_cast<int64_t>(b) * p.Hq + hq) * p.T + t;  // row of [B, Hq, T]
    if (p.num_splits == 1) {
      const float inv = l_run[hr] > 0.f ? 1.f / l_run[hr] : 0.f;
      T* dst = static_cast<T*>(p.out) + out_row * D;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        *reinterpret_cast<uint32_t*>(dst + dn * 8 + 2 * quad) =
            pack2<T>(o[dn][hr * 2] * inv, o[dn][hr * 2 + 1] * inv);
      }
    } else {
      const int64_t rows_total = static_cast<int64_t>(p.B) * p.Hq * p.T;
      const int64_t idx = split * rows_total + out_row;
      float* dst = p.o_part + idx * D;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        *reinterpret_cast<float2*>(dst + dn * 8 + 2 * quad) = make_float2(o[dn][hr * 2], o[dn][hr * 2 + 1]);
      }
      if (quad == 0) {
        p.m_part[idx] = m_run[hr];
        p.l_part[idx] = l_run[hr];
      }
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) tree_attention_kernel(const Params p) {
  attend_tile<T, D>(p, DenseRows{p.k_sb, p.k_sh, p.k_ss}, DenseRows{p.v_sb, p.v_sh, p.v_ss});
}

// Merges the per-split partials of one output row per warp: out = sum_s w_s o_s / sum_s w_s l_s with
// w_s = 2^(m_s - max m). Splits that saw no visible key (m_s = -inf) are skipped, so their
// accumulators are never read; a row with none at all is written as zeros.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) combine_kernel(const float* __restrict__ o_part,
                                                           const float* __restrict__ m_part,
                                                           const float* __restrict__ l_part, T* __restrict__ out,
                                                           int num_splits, int64_t rows) {
  constexpr int E = D / 32;  // elements per lane
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  float m_max = -INFINITY;
  for (int s = 0; s < num_splits; ++s) m_max = fmaxf(m_max, m_part[s * rows + row]);
  float acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.f;
  float l_sum = 0.f;
  if (m_max != -INFINITY) {
    for (int s = 0; s < num_splits; ++s) {
      const float m = m_part[s * rows + row];
      if (m == -INFINITY) continue;
      const float w = exp2f(m - m_max);
      l_sum += w * l_part[s * rows + row];
      const float* src = o_part + (s * rows + row) * D + lane * E;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += w * src[e];
    }
  }
  const float inv = l_sum > 0.f ? 1.f / l_sum : 0.f;
  T* dst = out + row * D + lane * E;
#pragma unroll
  for (int e = 0; e < E; ++e) dst[e] = from_float<T>(acc[e] * inv);
}

}  // namespace ddtree::cuda::attention
