// paged_tree_attention_kernel (+ combine_kernel) under the emulator, launched as
// csrc/cuda/paged_tree_attention.cu does (operand check and copy, split-K choice, grid, dynamic shared
// memory, the block table rows), against the attention of ops.h computed in double from the same
// fp16/bf16 inputs: row i of request b sees positions [0, ctx) and ctx + j for every j <= num_nodes whose
// bit is set in mask row i, position p read from block block_table[b, p / block_size] at offset
// p % block_size; a row that sees nothing outputs zeros. Tolerance per row from the dtype and the data
// (the same bound as tests/emu/test_tree_attention.cpp).
#include "cuemu.h"
// clang-format off
#include "cuda/paged_tree_attention_kernel.cuh"
#include "check.h"
// clang-format on

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

using namespace ddtree::cuda::attention;
using emu_test::fmt;

template <class T>
static float f(T x) {
  return static_cast<float>(x);
}
template <class T>
constexpr double kEps = 0.0;  // distance from 1 to the next value: 2^-10 for fp16, 2^-7 for bf16
template <>
constexpr double kEps<__half> = 0x1p-10;
template <>
constexpr double kEps<__nv_bfloat16> = 0x1p-7;

// A paged K or V cache [num_blocks, block_size, H, D] as a view with element strides into a buffer.
template <class T>
struct Cache {
  std::vector<T> buf;
  int64_t offset = 0, stride[4] = {0, 0, 0, 1};
  const T* data() const { return buf.data() + offset; }
  const T& at(int64_t blk, int64_t slot, int64_t h, int64_t d) const {
    return buf[offset + blk * stride[0] + slot * stride[1] + h * stride[2] + d * stride[3]];
  }
};

enum Layout { kContig, kPadded, kKvPair, kMisaligned, kNumLayouts };
static const char* kLayoutName[] = {"contiguous", "padded", "kv-pair", "misaligned"};

template <class T>
static Cache<T> make_cache(int NB, int bs, int H, int D, Layout layout, bool value, emu_test::Rng& rng, float sigma) {
  Cache<T> c;
  switch (layout) {
    case kContig:
      c.stride[0] = int64_t{bs} * H * D, c.stride[1] = int64_t{H} * D, c.stride[2] = D;
      break;
    case kPadded:  // [NB, bs + 1, H, D + 8] storage, the view [:, :bs, :, :D]
      c.stride[0] = int64_t{bs + 1} * H * (D + 8), c.stride[1] = int64_t{H} * (D + 8), c.stride[2] = D + 8;
      break;
    case kKvPair:  // vLLM's [2, NB, bs, H, D] allocation: K is [0], V is [1]
      c.stride[0] = int64_t{bs} * H * D, c.stride[1] = int64_t{H} * D, c.stride[2] = D;
      c.offset = value ? c.stride[0] * NB : 0;
      break;
    case kMisaligned:  // contiguous, one element into its storage
      c.stride[0] = int64_t{bs} * H * D, c.stride[1] = int64_t{H} * D, c.stride[2] = D, c.offset = 1;
      break;
    default:
      break;
  }
  c.buf.resize(c.offset + c.stride[0] * NB + 16);
  for (auto& x : c.buf) x = T(rng.normal(sigma));
  return c;
}

// What the host wrapper does with an operand kv_layout_ok rejects: a contiguous copy.
template <class T>
static Cache<T> contiguous(const Cache<T>& c, int NB, int bs, int H, int D) {
  Cache<T> o;
  o.stride[0] = int64_t{bs} * H * D, o.stride[1] = int64_t{H} * D, o.stride[2] = D;
  o.buf.resize(o.stride[0] * NB);
  for (int n = 0; n < NB; ++n)
    for (int s = 0; s < bs; ++s)
      for (int h = 0; h < H; ++h)
        for (int d = 0; d < D; ++d) o.buf[n * o.stride[0] + s * o.stride[1] + h * o.stride[2] + d] = c.at(n, s, h, d);
  return o;
}

enum MaskKind { kAncestors, kRandomBits, kEmptyRows, kAllOnes };
static const char* kMaskName[] = {"ancestors", "random bits", "some empty rows", "all ones"};

struct Stats {
  long launches = 0, ctas = 0, split_calls = 0, max_splits = 0, copied_operands = 0, empty_rows = 0, rows = 0,
       bad_blocks = 0;
  double worst_ratio = 0.0;
};

struct Shape {
  int B, Hq, Hkv, T, max_blocks, bs;
  int64_t slots;  // resident CTAs of the device (1 forces a single split)
};

// One call of the op. Blocks are handed out as a random permutation of the cache's blocks (plus spare
// ones nobody owns); `invalid` puts out-of-range contexts, node counts and block ids in.
template <class T, int D>
static void run(const char* dtype, const Shape& sh, Layout layout, MaskKind mk, bool invalid, emu_test::Rng& rng,
                emu_test::Tally& tally, Stats& st) {
  const int B = sh.B, Hq = sh.Hq, Hkv = sh.Hkv, Tn = sh.T, MB = sh.max_blocks, bs = sh.bs;
  const int G = Hq / Hkv, W = (Tn + 31) / 32, S = MB * bs;
  const int NB = B * MB + static_cast<int>(rng(0, 3));
  const float sigma_v = std::vector<float>{0.5f, 1.f, 4.f}[rng(0, 2)];
  std::vector<T> q(int64_t{B} * Hq * Tn * D), out(q.size());
  for (auto& x : q) x = T(rng.normal(1.0f));
  for (auto& x : out) x = T(1234.5f);  // at::empty: garbage
  Cache<T> kc = make_cache<T>(NB, bs, Hkv, D, layout, false, rng, 1.0f);
  Cache<T> vc = make_cache<T>(NB, bs, Hkv, D, layout, true, rng, sigma_v);
  std::vector<int32_t> perm(NB);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng.gen);
  std::vector<int32_t> table(int64_t{B} * MB);
  for (int64_t i = 0; i < int64_t{B} * MB; ++i) table[i] = perm[i];
  std::vector<int64_t> ctx(B);
  std::vector<int32_t> nn(B), mask(int64_t{B} * Tn * W);
  for (int b = 0; b < B; ++b) {
    const int pick = static_cast<int>(rng(0, 5));
    ctx[b] = pick == 0 ? 0 : pick == 1 ? S - Tn : rng(0, S - Tn);  // ragged, including 0 and full
    nn[b] = rng.coin(3) ? Tn - 1 : static_cast<int>(rng(0, Tn - 1));
    if (invalid && rng.coin(2)) {  // out of range: the kernel clamps (ops.h: unspecified, in bounds)
      if (rng.coin(2)) ctx[b] = rng.coin(2) ? -rng(1, 50) : S + rng(0, 50);
      if (rng.coin(2)) nn[b] = rng.coin(2) ? -static_cast<int>(rng(1, 5)) : Tn + static_cast<int>(rng(0, 5));
      for (int i = 0; i < MB; ++i)
        if (rng.coin(3))
          table[int64_t{b} * MB + i] = static_cast<int32_t>(rng.coin(2) ? -rng(1, 9) : NB + rng(0, 9));
    } else {
      // Entries past the blocks a request reads are not looked at: garbage there must not matter.
      const int64_t used = (ctx[b] + nn[b]) / bs + 1;
      for (int64_t i = used; i < MB; ++i) table[int64_t{b} * MB + i] = static_cast<int32_t>(rng.gen());
    }
    std::vector<int> par(Tn, -1);
    for (int t = 1; t < Tn; ++t) par[t] = static_cast<int>(rng(0, t - 1));
    for (int t = 0; t < Tn; ++t) {
      int32_t* row = &mask[(int64_t{b} * Tn + t) * W];
      for (int w = 0; w < W; ++w) row[w] = static_cast<int32_t>(rng.gen());  // garbage past num_nodes too
      if (mk == kAncestors) {
        for (int j = 0; j < Tn; ++j) row[j / 32] &= ~(1 << (j % 32));
        for (int c = t; c >= 0; c = par[c]) row[c / 32] |= 1 << (c % 32);
      } else if (mk == kEmptyRows && rng.coin(2)) {
        for (int w = 0; w < W; ++w) row[w] = 0;
      } else if (mk == kAllOnes) {
        for (int w = 0; w < W; ++w) row[w] = -1;
      }
    }
  }

  // ---- the host wrapper ----
  int64_t ks[4], vs[4];
  std::copy(kc.stride, kc.stride + 4, ks);
  std::copy(vc.stride, vc.stride + 4, vs);
  const bool k_ok = kv_layout_ok(kc.data(), ks), v_ok = kv_layout_ok(vc.data(), vs);
  const Cache<T> kuse = k_ok ? kc : contiguous(kc, NB, bs, Hkv, D);
  const Cache<T> vuse = v_ok ? vc : contiguous(vc, NB, bs, Hkv, D);
  st.copied_operands += !k_ok + !v_ok;
  Params p{};
  p.q = q.data();
  p.k = kuse.data();
  p.v = vuse.data();
  p.out = out.data();
  p.context_lens = ctx.data();
  p.tree_mask = mask.data();
  p.num_nodes = nn.data();
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.G = G, p.T = Tn, p.S = S, p.W = W;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const PagedRows k_rows{table.data(), MB, bs, NB, kuse.stride[0], kuse.stride[1], kuse.stride[2]};
  const PagedRows v_rows{table.data(), MB, bs, NB, vuse.stride[0], vuse.stride[1], vuse.stride[2]};
  const int64_t tiles = (int64_t{Tn} * G + kBM - 1) / kBM;
  p.num_splits = choose_num_splits(sh.slots, B, Hkv, tiles, S);
  const int64_t rows_total = int64_t{B} * Hq * Tn;
  std::vector<float> o_part(p.num_splits > 1 ? p.num_splits * rows_total * D : 0, 1234.5f),
      ml(p.num_splits > 1 ? 2 * p.num_splits * rows_total : 0, 1234.5f);
  if (p.num_splits > 1)
    p.o_part = o_part.data(), p.m_part = ml.data(), p.l_part = ml.data() + p.num_splits * rows_total;
  const std::string what = fmt("%s D=%d B=%d Hq=%d Hkv=%d T=%d block_size=%d max_blocks=%d num_blocks=%d %s mask=%s "
                               "splits=%d%s",
                               dtype, D, B, Hq, Hkv, Tn, bs, MB, NB, kLayoutName[layout], kMaskName[mk], p.num_splits,
                               invalid ? " (out-of-range inputs)" : "");
  cuemu::set_case(what);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.num_splits), static_cast<unsigned>(B * Hkv));
  cuemu::launch(paged_tree_attention_kernel<T, D>, grid, dim3(kThreads), smem_bytes<T, D>(), p, k_rows, v_rows);
  ++st.launches;
  st.ctas += grid.x * grid.y * grid.z;
  if (p.num_splits > 1) {
    const int64_t blocks = (rows_total + kThreads / 32 - 1) / (kThreads / 32);
    cuemu::launch(combine_kernel<T, D>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, (const float*)p.o_part,
                  (const float*)p.m_part, (const float*)p.l_part, out.data(), p.num_splits, rows_total);
    ++st.launches;
    ++st.split_calls;
    st.max_splits = std::max<long>(st.max_splits, p.num_splits);
  }

  // ---- reference (a port of the CPU op, in double), per output row ----
  for (int b = 0; b < B; ++b) {
    // the kernel's clamping, which ops.h allows for out-of-range values
    const int64_t c0 = std::clamp<int64_t>(ctx[b], 0, S - Tn);
    const int n0 = std::clamp(nn[b], 0, Tn - 1);
    const int64_t L = c0 + n0 + 1;
    const auto block_of = [&](int64_t pos) {
      const int32_t id = table[int64_t{b} * MB + pos / bs];
      st.bad_blocks += id < 0 || id >= NB;
      return std::clamp<int32_t>(id, 0, NB - 1);
    };
    std::vector<int32_t> blk(L);
    for (int64_t j = 0; j < L; ++j) blk[j] = block_of(j);
    for (int hq = 0; hq < Hq; ++hq)
      for (int t = 0; t < Tn; ++t) {
        const int h = hq / G;
        const T* qrow = &q[((int64_t{b} * Hq + hq) * Tn + t) * D];
        std::vector<double> s(L, -INFINITY);
        double m = -INFINITY, vmax = 0.0, qk_abs = 0.0;
        for (int64_t j = 0; j < L; ++j) {
          if (j >= c0) {
            const int64_t slot = j - c0;
            if (!((mask[(int64_t{b} * Tn + t) * W + slot / 32] >> (slot % 32)) & 1)) continue;
          }
          double acc = 0, acc_abs = 0;
          for (int d = 0; d < D; ++d) {
            const double x = double(f(qrow[d])) * double(f(kc.at(blk[j], j % bs, h, d)));
            acc += x;
            acc_abs += std::fabs(x);
          }
          s[j] = acc * scale;
          m = std::max(m, s[j]);
          qk_abs = std::max(qk_abs, acc_abs * scale);
          for (int d = 0; d < D; ++d) vmax = std::max(vmax, std::fabs(double(f(vc.at(blk[j], j % bs, h, d)))));
        }
        std::vector<double> o(D, 0.0);
        double l = 0;
        for (int64_t j = 0; j < L; ++j) {
          if (!(s[j] > -INFINITY)) continue;
          const double w = std::exp(s[j] - m);
          l += w;
          for (int d = 0; d < D; ++d) o[d] += w * double(f(vc.at(blk[j], j % bs, h, d)));
        }
        ++st.rows;
        st.empty_rows += l == 0;
        // Tolerance (see test_tree_attention.cpp): rounding of P and of the output to T (u each, relative
        // to max|v|), the fp32 scores' relative error D * 2^-23 of sum |q k| * scale (twice it in the
        // output), and a few fp32 ulps of exp2f, sums and rescaling, bounded by 2^-18 * max|v|.
        const double u = kEps<T> / 2, delta = D * 0x1p-23 * qk_abs;
        const double tol = (2 * u + 2 * delta + 0x1p-18) * vmax;
        std::string why;
        for (int d = 0; d < D && why.empty(); ++d) {
          const double want = l > 0 ? o[d] / l : 0.0;
          const double got = f(out[((int64_t{b} * Hq + hq) * Tn + t) * D + d]);
          const double err = std::fabs(got - want);
          if (l > 0 && vmax > 0) st.worst_ratio = std::max(st.worst_ratio, err / tol);
          if (l == 0 ? got != 0.0 : !(err <= tol))
            why = fmt("out[%d] %.6g want %.6g (tolerance %.3g)", d, got, want, tol);
        }
        tally.record(fmt("%s b=%d hq=%d t=%d (ctx %ld, num_nodes %d)", what.c_str(), b, hq, t, (long)ctx[b], nn[b]),
                     why);
      }
  }
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
  int i = 0;
  for (const Shape& s : shapes) {
    const Layout layout = static_cast<Layout>(i % kNumLayouts);
    const MaskKind mk = static_cast<MaskKind>((i / 2) % 4);
    const bool invalid = i % 4 == 3;
    if (i % 2 == 0) {
      run<__half, 64>("fp16", s, layout, mk, invalid, rng, tally, st);
      run<__nv_bfloat16, 128>("bf16", s, static_cast<Layout>((i + 1) % kNumLayouts), mk, false, rng, tally, st);
    } else {
      run<__nv_bfloat16, 64>("bf16", s, layout, mk, invalid, rng, tally, st);
      run<__half, 128>("fp16", s, static_cast<Layout>((i + 1) % kNumLayouts), mk, false, rng, tally, st);
    }
    ++i;
  }
  return tally.finish(fmt(
      "%ld launches (%ld CTAs), %ld split-K calls (up to %ld splits), %ld operands copied by the wrapper, "
      "%ld out-of-range block ids read (clamped), %ld of %ld rows see no key, worst error %.2f of its tolerance",
      st.launches, st.ctas, st.split_calls, st.max_splits, st.copied_operands, st.bad_blocks, st.empty_rows, st.rows,
      st.worst_ratio));
}
