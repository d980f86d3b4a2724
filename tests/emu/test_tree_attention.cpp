// tree_attention_kernel (+ combine_kernel) under the emulator, launched as csrc/cuda/tree_attention.cu
// does (operand check and copy, split-K choice, grid, dynamic shared memory), against the attention of
// ops.h computed in double from the same fp16/bf16 inputs: row i of request b sees cache positions
// [0, ctx) and ctx + j for every j <= num_nodes whose bit is set in mask row i; a row that sees nothing
// outputs zeros. Tolerance per row from the dtype and the data (see check_outputs in
// tree_attention_cases.h, which holds what this test shares with test_paged_tree_attention.cpp).
#include "cuemu.h"
// clang-format off
#include "cuda/tree_attention_kernel.cuh"
#include "check.h"
#include "tree_attention_cases.h"
// clang-format on

#include <iterator>
#include <string>

using namespace emu_test::tree_attention;
using emu_test::fmt;

enum Layout { kContig, kPadded, kHeadsInner, kMisaligned, kNumLayouts };
static const char* kLayoutName[] = {"contiguous", "padded", "heads-inner", "misaligned"};

// A K or V cache [B, H, S, D] in `layout`, random.
template <class T>
static Cache<T> make_cache(int B, int H, int S, int D, Layout layout, emu_test::Rng& rng, float sigma) {
  Cache<T> c;
  switch (layout) {
    case kContig:
      c.strides_in(H, S, D);
      break;
    case kPadded:  // [B, H, S + 5, D + 8] storage, the view [:, :, :S, :D]
      c.strides_in(H, S + 5, D + 8);
      break;
    case kHeadsInner:  // [B, S, H, D].permute(0, 2, 1, 3)
      c.stride[0] = int64_t{S} * H * D, c.stride[1] = D, c.stride[2] = int64_t{H} * D;
      break;
    case kMisaligned:  // contiguous, one element into its storage
      c.strides_in(H, S, D), c.offset = 1;
      break;
    default:
      break;
  }
  c.fill(B, rng, sigma);
  return c;
}

struct Shape {
  int B, Hq, Hkv, T, S;
  int64_t slots;  // resident CTAs of the device (1 forces a single split)
};

// One call of the op.
template <class T, int D>
static void run(const char* dtype, const Shape& sh, Layout layout, MaskKind mk, bool invalid, emu_test::Rng& rng,
                emu_test::Tally& tally, Stats& st) {
  Call<T, D> c(sh.B, sh.Hq, sh.Hkv, sh.T, sh.S, rng);
  const Cache<T> kc = make_cache<T>(c.B, c.Hkv, c.S, D, layout, rng, 1.0f);
  const Cache<T> vc = make_cache<T>(c.B, c.Hkv, c.S, D, layout, rng, c.sigma_v);
  for (int b = 0; b < c.B; ++b) {
    c.draw_lengths(b, invalid, rng);
    c.draw_mask(b, mk, /*thin_garbage=*/true, rng);
  }

  // ---- the host wrapper ----
  const Cache<T> kuse = kv_operand(kc, c.B, c.Hkv, c.S, D, st), vuse = kv_operand(vc, c.B, c.Hkv, c.S, D, st);
  Params p = c.params(kuse.data(), vuse.data(), sh.slots);
  p.k_sb = kuse.stride[0], p.k_sh = kuse.stride[1], p.k_ss = kuse.stride[2];
  p.v_sb = vuse.stride[0], p.v_sh = vuse.stride[1], p.v_ss = vuse.stride[2];
  const std::string what =
      fmt("%s D=%d B=%d Hq=%d Hkv=%d T=%d S=%d %s mask=%s splits=%d%s", dtype, D, c.B, c.Hq, c.Hkv, c.Tn, c.S,
          kLayoutName[layout], kMaskName[mk], p.num_splits, invalid ? " (out-of-range inputs)" : "");
  cuemu::set_case(what);
  launch_attention<T, D>(tree_attention_kernel<T, D>, p, c.tiles(), st);

  // ---- reference, per output row ----
  check_outputs(
      c, what, [&](int b, int h, int64_t pos, int d) -> const T& { return kc.at(b, h, pos, d); },
      [&](int b, int h, int64_t pos, int d) -> const T& { return vc.at(b, h, pos, d); }, tally, st);
}

int main() {
  emu_test::Rng rng(3);
  emu_test::Tally tally("tree_attention");
  Stats st;
  const int64_t kOneSplit = 1, kH100 = 132 * 4;  // resident CTAs of the device: 1 forces a single split
  // GQA 1/4/8, head dims 64 and 128, fp16 and bf16, one and many splits, every cache layout and mask kind;
  // T * G from 1 row to several 64-row query tiles, trees spanning up to 4 mask words, caches holding
  // only the tree (S = T, so every context is 0).
  const Shape shapes[] = {{1, 1, 1, 1, 64, kOneSplit}, {2, 4, 1, 12, 300, kOneSplit}, {1, 8, 1, 40, 200, kOneSplit},
                          {2, 8, 2, 20, 700, kH100},   {1, 16, 2, 9, 900, kH100},     {3, 2, 2, 33, 130, kOneSplit},
                          {1, 4, 4, 100, 1200, kH100}, {2, 8, 1, 17, 2100, kH100},    {1, 1, 1, 64, 65, kOneSplit},
                          {1, 32, 4, 5, 1500, 40},     {1, 1, 1, 1, 1, kOneSplit},    {2, 4, 1, 40, 40, kH100}};
  for (int i = 0; i < static_cast<int>(std::size(shapes)); ++i)
    run_shape(i, kNumLayouts, i % 5 == 4, [&]<class T, int D>(const char* dtype, int layout, MaskKind mk, bool invalid) {
      run<T, D>(dtype, shapes[i], static_cast<Layout>(layout), mk, invalid, rng, tally, st);
    });
  return tally.finish(fmt(
      "%ld launches (%ld CTAs), %ld split-K calls (up to %ld splits), %ld operands copied by "
      "the wrapper, %ld of %ld rows see no key, worst error %.2f of its tolerance",
      st.launches, st.ctas, st.split_calls, st.max_splits, st.copied_operands, st.empty_rows, st.rows, st.worst_ratio));
}
