// paged_tree_attention on CUDA, the kernel: tree_attention's kernel (tree_attention_kernel.cuh) with its
// key/value rows looked up in a block table instead of a dense per-request cache.
//
// Cache layout (vLLM's flash-attention layout): k_cache / v_cache [num_blocks, block_size, Hkv, D], the
// head dim contiguous; position pos of request b lives in block block_table[b, pos / block_size] at
// offset pos % block_size. Everything else (work split, split-K, masking, online softmax, the combine
// kernel) is tree_attention's, with Params::S = max_blocks * block_size, the positions a request's
// table row can address.
//
// Robustness without a host sync: on top of tree_attention's clamping of ctx to [0, S - T] and of
// num_nodes to [0, T - 1] (so every position read has a table entry), a block id outside
// [0, num_blocks) is clamped into it: every read lies inside the cache, the result for such input is
// unspecified.
//
// ATen-free: the .cu host wrapper includes it, and so do the tests that run this same source on
// the CPU under the emulator in tests/emu.
#pragma once

#include "cuda/tree_attention_kernel.cuh"

namespace ddtree::cuda::attention {

// Rows of a paged cache: element offsets from the cache's base pointer.
struct PagedRows {
  const int32_t* block_table;  // [B, max_blocks]
  int64_t max_blocks;
  int block_size, num_blocks;
  int64_t s_block, s_slot, s_head;  // element strides of dims 0, 1, 2
  __device__ __forceinline__ int64_t operator()(int b, int h, int pos) const {
    int64_t block = block_table[b * max_blocks + pos / block_size];
    block = block < 0 ? 0 : (block >= num_blocks ? num_blocks - 1 : block);
    return block * s_block + (pos % block_size) * s_slot + h * s_head;
  }
};

// Params::k_sb/k_sh/k_ss and v_* are unused: k_rows / v_rows place the rows.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) paged_tree_attention_kernel(const Params p, const PagedRows k_rows,
                                                                        const PagedRows v_rows) {
  attend_tile<T, D>(p, k_rows, v_rows);
}

}  // namespace ddtree::cuda::attention
