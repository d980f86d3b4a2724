// paged_tree_attention_kernel (+ combine_kernel) under the emulator, launched as
// csrc/cuda/paged_tree_attention.cu does (operand check and copy, split-K choice, grid, dynamic shared
// memory, the block table rows), against the attention of ops.h computed in double from the same
// fp16/bf16 inputs: row i of request b sees positions [0, ctx) and ctx + j for every j <= num_nodes whose
// bit is set in mask row i, position p read from block block_table[b, p / block_size] at offset
// p % block_size; a row that sees nothing outputs zeros. Tolerance per row from the dtype and the data
// (check_outputs in tree_attention_cases.h, which holds what this test shares with test_tree_attention.cpp).
#include "cuemu.h"
// clang-format off
#include "cuda/paged_tree_attention_kernel.cuh"
#include "check.h"
#include "tree_attention_cases.h"
// clang-format on

#include <algorithm>
#include <iterator>
#include <numeric>
#include <string>
#include <vector>

using namespace emu_test::tree_attention;
using emu_test::fmt;

enum Layout { kContig, kPadded, kKvPair, kMisaligned, kNumLayouts };
static const char* kLayoutName[] = {"contiguous", "padded", "kv-pair", "misaligned"};

// A paged K or V cache [num_blocks, block_size, H, D] in `layout`, random.
template <class T>
static Cache<T> make_cache(int NB, int bs, int H, int D, Layout layout, bool value, emu_test::Rng& rng, float sigma) {
  Cache<T> c;
  switch (layout) {
    case kContig:
      c.strides_in(bs, H, D);
      break;
    case kPadded:  // [NB, bs + 1, H, D + 8] storage, the view [:, :bs, :, :D]
      c.strides_in(bs + 1, H, D + 8);
      break;
    case kKvPair:  // vLLM's [2, NB, bs, H, D] allocation: K is [0], V is [1]
      c.strides_in(bs, H, D), c.offset = value ? c.stride[0] * NB : 0;
      break;
    case kMisaligned:  // contiguous, one element into its storage
      c.strides_in(bs, H, D), c.offset = 1;
      break;
    default:
      break;
  }
  c.fill(NB, rng, sigma);
  return c;
}

struct Shape {
  int B, Hq, Hkv, T, max_blocks, bs;
  int64_t slots;  // resident CTAs of the device (1 forces a single split)
};

// One call of the op. Blocks are handed out as a random permutation of the cache's blocks (plus spare
// ones nobody owns); `invalid` puts out-of-range contexts, node counts and block ids in.
template <class T, int D>
static void run(const char* dtype, const Shape& sh, Layout layout, MaskKind mk, bool invalid, emu_test::Rng& rng,
                emu_test::Tally& tally, Stats& st) {
  const int MB = sh.max_blocks, bs = sh.bs, S = MB * bs;
  const int NB = sh.B * MB + static_cast<int>(rng(0, 3));
  Call<T, D> c(sh.B, sh.Hq, sh.Hkv, sh.T, S, rng);
  const Cache<T> kc = make_cache<T>(NB, bs, c.Hkv, D, layout, false, rng, 1.0f);
  const Cache<T> vc = make_cache<T>(NB, bs, c.Hkv, D, layout, true, rng, c.sigma_v);
  std::vector<int32_t> perm(NB);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng.gen);
  std::vector<int32_t> table(perm.begin(), perm.begin() + int64_t{c.B} * MB);
  for (int b = 0; b < c.B; ++b) {
    if (c.draw_lengths(b, invalid, rng)) {  // out-of-range block ids too (the kernel clamps them)
      for (int i = 0; i < MB; ++i)
        if (rng.coin(3))
          table[int64_t{b} * MB + i] = static_cast<int32_t>(rng.coin(2) ? -rng(1, 9) : NB + rng(0, 9));
    } else {
      // Entries past the blocks a request reads are not looked at: garbage there must not matter.
      const int64_t used = (c.ctx[b] + c.nn[b]) / bs + 1;
      for (int64_t i = used; i < MB; ++i) table[int64_t{b} * MB + i] = static_cast<int32_t>(rng.gen());
    }
    c.draw_mask(b, mk, /*thin_garbage=*/false, rng);
  }

  // ---- the host wrapper ----
  const Cache<T> kuse = kv_operand(kc, NB, bs, c.Hkv, D, st), vuse = kv_operand(vc, NB, bs, c.Hkv, D, st);
  const Params p = c.params(kuse.data(), vuse.data(), sh.slots);
  const PagedRows k_rows{table.data(), MB, bs, NB, kuse.stride[0], kuse.stride[1], kuse.stride[2]};
  const PagedRows v_rows{table.data(), MB, bs, NB, vuse.stride[0], vuse.stride[1], vuse.stride[2]};
  const std::string what = fmt("%s D=%d B=%d Hq=%d Hkv=%d T=%d block_size=%d max_blocks=%d num_blocks=%d %s mask=%s "
                               "splits=%d%s",
                               dtype, D, c.B, c.Hq, c.Hkv, c.Tn, bs, MB, NB, kLayoutName[layout], kMaskName[mk],
                               p.num_splits, invalid ? " (out-of-range inputs)" : "");
  cuemu::set_case(what);
  launch_attention<T, D>(paged_tree_attention_kernel<T, D>, p, c.tiles(), st, k_rows, v_rows);

  // ---- reference (a port of the CPU op, in double), per output row ----
  // Position pos of request b lives in block table[b, pos / bs] (clamped into the cache, as the kernel
  // does with an out-of-range id) at slot pos % bs.
  std::vector<int32_t> blk(int64_t{c.B} * S);
  for (int b = 0; b < c.B; ++b)
    for (int64_t pos = 0; pos < c.keys(b); ++pos) {
      const int32_t id = table[int64_t{b} * MB + pos / bs];
      st.bad_blocks += id < 0 || id >= NB;
      blk[int64_t{b} * S + pos] = std::clamp<int32_t>(id, 0, NB - 1);
    }
  check_outputs(
      c, what,
      [&](int b, int h, int64_t pos, int d) -> const T& { return kc.at(blk[int64_t{b} * S + pos], pos % bs, h, d); },
      [&](int b, int h, int64_t pos, int d) -> const T& { return vc.at(blk[int64_t{b} * S + pos], pos % bs, h, d); },
      tally, st);
}

int main() {
  emu_test::Rng rng(7);
  emu_test::Tally tally("paged_tree_attention");
  Stats st;
  const int64_t kOneSplit = 1, kH100 = 132 * 4;
  // Block sizes 1, 16 and 32 (and an odd 5); GQA 1/4/8; head dims 64 and 128; fp16 and bf16; one and many
  // splits; every cache layout and mask kind; tables exactly as long as the tree (every context 0).
  const Shape shapes[] = {{1, 1, 1, 1, 64, 1, kOneSplit},  {2, 4, 1, 12, 20, 16, kOneSplit},
                          {1, 8, 1, 40, 7, 32, kOneSplit}, {2, 8, 2, 20, 44, 16, kH100},
                          {1, 16, 2, 9, 30, 32, kH100},    {3, 2, 2, 33, 27, 5, kOneSplit},
                          {1, 4, 4, 100, 75, 16, kH100},   {2, 8, 1, 17, 2100, 1, kH100},
                          {1, 1, 1, 64, 3, 32, kOneSplit}, {1, 32, 4, 5, 50, 32, 40},
                          {1, 1, 1, 1, 1, 1, kOneSplit},   {2, 4, 1, 40, 40, 1, kH100},
                          {2, 4, 2, 32, 2, 16, kOneSplit}, {4, 8, 2, 7, 9, 16, kH100}};
  for (int i = 0; i < static_cast<int>(std::size(shapes)); ++i)
    run_shape(i, kNumLayouts, i % 4 == 3, [&]<class T, int D>(const char* dtype, int layout, MaskKind mk, bool invalid) {
      run<T, D>(dtype, shapes[i], static_cast<Layout>(layout), mk, invalid, rng, tally, st);
    });
  return tally.finish(fmt(
      "%ld launches (%ld CTAs), %ld split-K calls (up to %ld splits), %ld operands copied by the wrapper, "
      "%ld out-of-range block ids read (clamped), %ld of %ld rows see no key, worst error %.2f of its tolerance",
      st.launches, st.ctas, st.split_calls, st.max_splits, st.copied_operands, st.bad_blocks, st.empty_rows, st.rows,
      st.worst_ratio));
}
