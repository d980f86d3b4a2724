// paged_compact_kv on CUDA, the kernel: compact_kv (compact_kv_kernel.cuh) over paged caches
// [num_blocks, block_size, H, d] (ops.h), every layer's K and V caches in one launch.
//
// One CTA per (cache, request b, head h), laid out as compact_kv's (cta_work, launch_batches), and the
// same staged moves (move_rows): position ctx + i receives position ctx + accepted_slots[b, i] for
// i < accept_len[b], reads staged in shared memory before any write, in chunks of kStageBytes (the same
// exactness rule: any slots within one chunk, slots[b, i] >= i beyond).
// A position's row of head h is found through the block table: block block_table[b, pos / block_size],
// offset pos % block_size. The heads of a position are distinct rows, so the CTAs never touch the same
// bytes (requests included, given ops.h's rule that requests touch distinct rows).
//
// Without a host sync, invalid values are skipped rather than raised: a context length outside
// [0, span) (span = max_blocks * block_size), accept_len outside [0, width] (clamped), and any move
// whose source or destination position lies outside [0, span) or in a block id outside
// [0, num_blocks) of that cache.
//
// ATen-free: the .cu host wrapper includes it, and so do the tests that run this same source on
// the CPU under the emulator in tests/emu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/compact_kv_kernel.cuh"

namespace ddtree::cuda::compact {

struct PagedCacheDesc {
  char* base;
  int64_t s_block, s_slot, s_head;  // byte strides of dims 0, 1, 2 (dim 3 is contiguous)
  int32_t H, num_blocks;
  int32_t row_bytes;  // d * element size
  int32_t cta_begin;  // first CTA of this cache in the launch; it owns B * H CTAs
};

struct PagedBatch {
  PagedCacheDesc caches[kMaxCaches];
  const int32_t* block_table;     // [B, max_blocks]
  const int64_t* context_lens;    // [B]
  const int64_t* accepted_slots;  // [B, width]
  const int32_t* accept_len;      // [B]
  int64_t max_blocks;
  int32_t block_size, count, B, width;
};

template <typename U>
__global__ void __launch_bounds__(kThreads) paged_compact_kv_kernel(const __grid_constant__ PagedBatch batch) {
  __shared__ U stage[kStageBytes / sizeof(U)];
  const auto work = cta_work(batch);
  const PagedCacheDesc& c = work.c;
  const int b = work.b, h = work.h;

  // Uniform across the CTA, so returning here keeps the __syncthreads in move_rows safe.
  const int64_t span = batch.max_blocks * batch.block_size;
  const int64_t ctx = batch.context_lens[b];
  if (ctx < 0 || ctx >= span) return;
  const int a = accepted_rows(batch, b);

  const int32_t* table = batch.block_table + static_cast<int64_t>(b) * batch.max_blocks;
  // Head h's row of position ctx + off, or nullptr where the position or its block id is out of range.
  move_rows(stage, batch.accepted_slots + static_cast<int64_t>(b) * batch.width, a, c.row_bytes,
            [&](int64_t off) -> char* {
              if (off < 0 || off >= span - ctx) return nullptr;
              const int64_t pos = ctx + off;
              const int32_t block = table[pos / batch.block_size];
              if (block < 0 || block >= c.num_blocks) return nullptr;
              return c.base + block * c.s_block + (pos % batch.block_size) * c.s_slot + h * c.s_head;
            });
}

}  // namespace ddtree::cuda::compact
