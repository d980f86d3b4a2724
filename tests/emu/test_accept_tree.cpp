// accept_tree_kernel under the emulator, launched as csrc/cuda/accept_tree.cu does (one warp per request,
// 4 per block), against a port of csrc/cpu/accept_tree.cpp's walk. Every output is compared exactly.
#include "cuemu.h"
// clang-format off
#include "cuda/accept_tree_kernel.cuh"
#include "check.h"
// clang-format on

#include <algorithm>
#include <vector>

using ddtree::cuda::accept::accept_tree_kernel;
using ddtree::cuda::accept::kWarpsPerBlock;
using emu_test::fmt;

// csrc/cpu/accept_tree.cpp for one request; num_nodes is clamped as the CUDA kernel does (ops.h leaves
// out-of-range values unspecified; the CPU raises on them).
static void ref_walk(const int64_t* tok, const int32_t* par, int nn, const int64_t* tgt, int slots, int width,
                     int64_t* acc, int32_t* len, int64_t* next) {
  const int n = std::clamp(nn, 0, slots - 1);
  std::fill(acc, acc + width, -1);
  int c = 0, L = 1;
  if (width > 0) acc[0] = 0;
  while (L < width) {
    int f = -1;
    for (int j = c + 1; j <= n; ++j) {
      if (par[j] == c && tok[j] == tgt[c]) {
        f = j;
        break;
      }
    }
    if (f < 0) break;
    acc[L++] = f;
    c = f;
  }
  *len = L;
  *next = tgt[c];
}

int main() {
  emu_test::Rng rng(1);
  emu_test::Tally tally("accept_tree");
  long deepest = 0, far_hits = 0;
  for (int trial = 0; trial < 60; ++trial) {
    // shapes: one request up to 9 (a partial last block), trees of 1..300 slots (several 32-slot scans)
    const int B = trial < 5 ? 1 : static_cast<int>(rng(1, 9));
    const int slots = trial % 7 == 0 ? static_cast<int>(rng(1, 3)) : static_cast<int>(rng(2, trial % 3 ? 80 : 300));
    // every fourth trial: a chain (parents[j] = j - 1) of one token, so the walk goes as deep as width
    // and num_nodes allow; otherwise random parents and 1..4 tokens
    const bool deep = trial % 4 == 1;
    const int width = deep ? slots : static_cast<int>(rng(1, slots));
    const int alphabet = deep ? 1 : static_cast<int>(rng(1, 4));
    const bool chain = deep || rng.coin(4);
    std::vector<int64_t> tok(B * slots), tgt(B * slots), acc(B * width, 0x5A5A), next(B, 0x5A5A);
    std::vector<int32_t> par(B * slots), nn(B), len(B, 0x5A5A);
    for (int b = 0; b < B; ++b) {
      nn[b] = rng.coin(6) ? static_cast<int>(rng(-3, slots + 3)) : static_cast<int>(rng(0, slots - 1));
      for (int j = 0; j < slots; ++j) {
        par[b * slots + j] = j == 0 ? -1 : (chain ? j - 1 : static_cast<int>(rng(0, j - 1)));
        if (rng.coin(50)) par[b * slots + j] = static_cast<int>(rng(-2, slots + 2));  // garbage parents
        tok[b * slots + j] = rng(0, alphabet - 1);
        tgt[b * slots + j] = rng(0, alphabet - 1);
      }
    }
    const std::string what =
        fmt("trial %d B=%d slots=%d width=%d alphabet=%d%s", trial, B, slots, width, alphabet, chain ? " chain" : "");
    cuemu::set_case(what);
    const unsigned blocks = static_cast<unsigned>((B + kWarpsPerBlock - 1) / kWarpsPerBlock);
    cuemu::launch(accept_tree_kernel, dim3(blocks), dim3(kWarpsPerBlock * 32), 0, (const int64_t*)tok.data(),
                  (const int32_t*)par.data(), (const int32_t*)nn.data(), (const int64_t*)tgt.data(), acc.data(),
                  len.data(), next.data(), B, slots, width);
    for (int b = 0; b < B; ++b) {
      std::vector<int64_t> racc(width);
      int32_t rlen = 0;
      int64_t rnext = 0;
      ref_walk(&tok[b * slots], &par[b * slots], nn[b], &tgt[b * slots], slots, width, racc.data(), &rlen, &rnext);
      deepest = std::max<long>(deepest, rlen);
      for (int i = 1; i < rlen; ++i) far_hits += racc[i] - racc[i - 1] > 32;
      std::string why;
      if (len[b] != rlen) why = fmt("accept_len %d want %d", len[b], rlen);
      if (why.empty() && next[b] != rnext) why = fmt("next_token %ld want %ld", (long)next[b], (long)rnext);
      for (int i = 0; i < width && why.empty(); ++i)
        if (acc[b * width + i] != racc[i])
          why = fmt("accepted_slots[%d] %ld want %ld", i, (long)acc[b * width + i], (long)racc[i]);
      tally.record(fmt("%s request %d", what.c_str(), b), why);
    }
  }
  return tally.finish(fmt("deepest walk %ld, %ld steps past a 32-slot scan", deepest, far_hits));
}
