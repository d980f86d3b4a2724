// accept_tree on CUDA, the kernel: one warp walks one request's tree from the root.
//
// At slot c the walk moves to the smallest slot j in (c, num_nodes] with parents[j] == c and
// tokens[j] == target_tokens[c] (ops.h). The warp scans the candidate slots 32 at a time and takes the
// lowest lane that matches (ballot + ffs), so the result is exactly the sequential CPU walk. No value
// is checked on the host: num_nodes is clamped to [0, N], which keeps every read in bounds.
//
// ATen-free: the .cu host wrapper includes it, and so do the tests that run this same source on
// the CPU under the emulator in tests/emu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ddtree::cuda::accept {

constexpr int kWarpsPerBlock = 4;

__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    accept_tree_kernel(const int64_t* __restrict__ tokens,         // [B, slots]
                       const int32_t* __restrict__ parents,        // [B, slots]
                       const int32_t* __restrict__ num_nodes,      // [B]
                       const int64_t* __restrict__ target_tokens,  // [B, slots]
                       int64_t* __restrict__ accepted_slots,       // [B, width]
                       int32_t* __restrict__ accept_len,           // [B]
                       int64_t* __restrict__ next_token,           // [B]
                       int B, int slots, int width) {
  const int b = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (b >= B) return;  // whole warps only: the ballots below see all 32 lanes
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(b) * slots;
  const int nn_raw = num_nodes[b];
  const int n = nn_raw < 0 ? 0 : (nn_raw > slots - 1 ? slots - 1 : nn_raw);
  int64_t* out = accepted_slots + static_cast<int64_t>(b) * width;

  int c = 0, len = 1;
  if (lane == 0 && width > 0) out[0] = 0;
  while (len < width) {
    const int64_t want = target_tokens[row + c];
    int found = -1;
    for (int j0 = c + 1; j0 <= n; j0 += 32) {
      const int j = j0 + lane;
      const bool match = j <= n && parents[row + j] == c && tokens[row + j] == want;
      const unsigned hits = __ballot_sync(0xffffffffu, match);
      if (hits != 0u) {
        found = j0 + __ffs(hits) - 1;
        break;
      }
    }
    if (found < 0) break;
    if (lane == 0) out[len] = found;
    ++len;
    c = found;
  }
  for (int i = len + lane; i < width; i += 32) out[i] = -1;
  if (lane == 0) {
    accept_len[b] = len;
    next_token[b] = target_tokens[row + c];
  }
}

}  // namespace ddtree::cuda::accept
