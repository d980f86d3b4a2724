// compact_kv on CUDA, the kernel: every layer's K and V caches in one launch.
//
// One CTA per (cache, request b, head h). Position ctx + i receives position ctx + accepted_slots[b, i]
// for i < accept_len[b], "as if every read happened before any write": the CTA stages the source rows
// in shared memory, __syncthreads(), then writes them. When more rows are accepted than fit in the
// stage (kStageBytes / row bytes, e.g. 128 rows of d = 128 bf16), it proceeds in chunks of rows in
// order; that is still exact whenever accepted_slots[b, i] >= i, which holds for every root path
// accept_tree returns (slots strictly increase from 0), because a chunk's writes land below every
// later source.
//
// The caches are passed by value in a kernel-argument struct (no host->device copy, nothing to keep
// alive, safe under CUDA-graph capture), up to kMaxCaches per launch. Rows are moved as raw bytes in
// the widest unit (16/8/4/2/1 bytes) that the cache's base address, strides and row size allow, so
// caches of different dtypes share a launch; caches are grouped by that unit (one launch per unit,
// normally just one).
//
// Without a host sync, invalid values are skipped rather than raised: a context length outside
// [0, S), accept_len outside [0, width] (clamped) and slots that are negative or land at or past S.
//
// ATen-free: the .cu host wrapper includes it, and so do the tests that run this same source on
// the CPU under the emulator in tests/emu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace ddtree::cuda::compact {

constexpr int kThreads = 256;
constexpr int kStageBytes = 32 * 1024;
constexpr int kMaxCaches = 128;  // 48 bytes each: 6 KiB of kernel arguments (limit 32 KiB since CUDA 12.1)

struct CacheDesc {
  char* base;
  int64_t sb, sh, ss;  // byte strides of dims 0, 1, 2 (dim 3 is contiguous)
  int32_t H, S;
  int32_t row_bytes;   // d * element size
  int32_t cta_begin;   // first CTA of this cache in the launch; it owns B * H CTAs
};

struct Batch {
  CacheDesc caches[kMaxCaches];
  const int64_t* context_lens;    // [B]
  const int64_t* accepted_slots;  // [B, width]
  const int32_t* accept_len;      // [B]
  int32_t count, B, width;
};

// The staged moves of one (cache, request, head), shared with paged_compact_kv_kernel.cuh: position ctx + i
// receives position ctx + slots[i] for i < a, each chunk's reads before its writes. row_at(off) is the
// address of the row of position ctx + off, or nullptr where that position is out of range: a move whose
// source or destination is out of range is skipped, and so is slots[i] == i.
template <typename U, class RowAt>
__device__ __forceinline__ void move_rows(U* stage, const int64_t* slots, int a, int row_bytes, const RowAt& row_at) {
  const int units = row_bytes / static_cast<int>(sizeof(U));
  const int rows_per_chunk = kStageBytes / row_bytes;
  for (int i0 = 0; i0 < a; i0 += rows_per_chunk) {
    const int n = min(rows_per_chunk, a - i0);
    for (int u = threadIdx.x; u < n * units; u += kThreads) {
      const int i = i0 + u / units;
      const int64_t s = slots[i];
      const char* src = row_at(s);
      if (s != i && src != nullptr && row_at(i) != nullptr) {
        stage[u] = *reinterpret_cast<const U*>(src + (u % units) * sizeof(U));
      }
    }
    __syncthreads();  // every read of this chunk before any of its writes
    for (int u = threadIdx.x; u < n * units; u += kThreads) {
      const int i = i0 + u / units;
      const int64_t s = slots[i];
      char* dst = row_at(i);
      if (s != i && dst != nullptr && row_at(s) != nullptr) {
        *reinterpret_cast<U*>(dst + (u % units) * sizeof(U)) = stage[u];
      }
    }
    __syncthreads();  // the stage is reused by the next chunk
  }
}

// The (cache, request b, head h) of this CTA. Shared with paged_compact_kv_kernel.cuh because both ops lay
// out their CTAs the same way (launch_batches below): cache i owns the B * H CTAs from caches[i].cta_begin
// on, request-major.
template <class Desc>
struct CtaWork {
  const Desc& c;
  int b, h;
};
template <class BatchT>
__device__ __forceinline__ auto cta_work(const BatchT& batch) {
  const int cta = blockIdx.x;
  int ci = 0;
  while (ci + 1 < batch.count && batch.caches[ci + 1].cta_begin <= cta) ++ci;
  const auto& c = batch.caches[ci];
  const int local = cta - c.cta_begin;
  return CtaWork<std::remove_cvref_t<decltype(c)>>{c, local / c.H, local % c.H};
}

// accept_len[b] clamped to [0, width]; shared with paged_compact_kv_kernel.cuh (same Batch fields).
template <class BatchT>
__device__ __forceinline__ int accepted_rows(const BatchT& batch, int b) {
  int a = batch.accept_len[b];
  a = a < 0 ? 0 : (a > batch.width ? batch.width : a);
  return a;
}

template <typename U>
__global__ void __launch_bounds__(kThreads) compact_kv_kernel(const __grid_constant__ Batch batch) {
  __shared__ U stage[kStageBytes / sizeof(U)];
  const auto work = cta_work(batch);
  const CacheDesc& c = work.c;
  const int b = work.b, h = work.h;

  // Uniform across the CTA, so returning here keeps the __syncthreads in move_rows safe.
  const int64_t ctx = batch.context_lens[b];
  if (ctx < 0 || ctx >= c.S) return;
  const int a = accepted_rows(batch, b);

  char* slice = c.base + b * c.sb + h * c.sh;
  move_rows(stage, batch.accepted_slots + static_cast<int64_t>(b) * batch.width, a, c.row_bytes,
            [&](int64_t off) -> char* { return off < 0 || off >= c.S - ctx ? nullptr : slice + (ctx + off) * c.ss; });
}

// Widest copy unit (16/8/4/2/1 bytes) that divides the base address, every byte stride and the row size.
__host__ inline int copy_unit(const void* base, const int64_t (&byte_strides)[3], int64_t row_bytes) {
  int64_t bits = static_cast<int64_t>(reinterpret_cast<uintptr_t>(base)) | row_bytes;
  for (int64_t s : byte_strides) bits |= s;
  for (int unit : {16, 8, 4, 2}) {
    if (bits % unit == 0) return unit;
  }
  return 1;
}

// Calls f(U{}) with U the unsigned type of `unit` bytes (a copy_unit answer), which picks the kernel
// instance; shared by the compact_kv and paged_compact_kv host wrappers.
template <class F>
__host__ void with_unit_type(int unit, const F& f) {
  switch (unit) {
    case 16: f(uint4{}); break;
    case 8: f(uint2{}); break;
    case 4: f(uint32_t{}); break;
    case 2: f(uint16_t{}); break;
    default: f(uint8_t{}); break;
  }
}

// The host side of cta_work's layout, shared by the compact_kv and paged_compact_kv host wrappers (and
// free of ATen, as this header is): the caches of one copy unit, kMaxCaches at a time, each into a copy of
// `per_call` (a Batch or PagedBatch with every field but caches and count set), cache i's B * H CTAs
// following those of the cache before it; launch(batch, ctas) once per batch. Returns false, launching
// nothing more, before a batch that would need 2^31 CTAs or more.
template <class BatchT, class Desc, class Launch>
__host__ bool launch_batches(const std::vector<Desc>& descs, const BatchT& per_call, int64_t B, const Launch& launch) {
  for (size_t first = 0; first < descs.size(); first += kMaxCaches) {
    BatchT batch = per_call;
    int64_t ctas = 0;
    for (size_t i = first; i < descs.size() && i < first + kMaxCaches; ++i) {
      Desc d = descs[i];
      if (ctas + B * d.H >= (int64_t{1} << 31)) return false;
      d.cta_begin = static_cast<int32_t>(ctas);
      ctas += B * d.H;
      batch.caches[batch.count++] = d;
    }
    launch(batch, ctas);
  }
  return true;
}

}  // namespace ddtree::cuda::compact
