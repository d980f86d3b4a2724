// tree_attention_kernel (+ combine_kernel) under the emulator, launched as csrc/cuda/tree_attention.cu
// does (operand check and copy, split-K choice, grid, dynamic shared memory), against the attention of
// ops.h computed in double from the same fp16/bf16 inputs: row i of request b sees cache positions
// [0, ctx) and ctx + j for every j <= num_nodes whose bit is set in mask row i; a row that sees nothing
// outputs zeros. Tolerance per row from the dtype and the data (see `tolerance`).
#include "cuemu.h"
// clang-format off
#include "cuda/tree_attention_kernel.cuh"
#include "check.h"
// clang-format on

#include <algorithm>
#include <cmath>
#include <cstring>
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

// A K or V cache [B, H, S, D] as a view with element strides into a buffer.
template <class T>
struct Cache {
  std::vector<T> buf;
  int64_t offset = 0, stride[4] = {0, 0, 0, 1};
  T* data() { return buf.data() + offset; }
  const T& at(int64_t b, int64_t h, int64_t s, int64_t d) const {
    return buf[offset + b * stride[0] + h * stride[1] + s * stride[2] + d * stride[3]];
  }
};

enum Layout { kContig, kPadded, kHeadsInner, kMisaligned, kNumLayouts };
static const char* kLayoutName[] = {"contiguous", "padded", "heads-inner", "misaligned"};

template <class T>
static Cache<T> make_cache(int B, int H, int S, int D, Layout layout, emu_test::Rng& rng, float sigma) {
  Cache<T> c;
  int64_t n = 0;
  switch (layout) {
    case kContig:
      c.stride[0] = int64_t{H} * S * D, c.stride[1] = int64_t{S} * D, c.stride[2] = D;
      break;
    case kPadded:  // [B, H, S + 5, D + 8] storage, the view [:, :, :S, :D]
      c.stride[0] = int64_t{H} * (S + 5) * (D + 8), c.stride[1] = int64_t{S + 5} * (D + 8), c.stride[2] = D + 8;
      break;
    case kHeadsInner:  // [B, S, H, D].permute(0, 2, 1, 3)
      c.stride[0] = int64_t{S} * H * D, c.stride[1] = D, c.stride[2] = int64_t{H} * D;
      break;
    case kMisaligned:  // contiguous, one element into its storage
      c.stride[0] = int64_t{H} * S * D, c.stride[1] = int64_t{S} * D, c.stride[2] = D, c.offset = 1;
      break;
    default:
      break;
  }
  n = c.offset + c.stride[0] * B + 16;
  c.buf.resize(n);
  for (auto& x : c.buf) x = T(rng.normal(sigma));
  return c;
}

// What the host wrapper does with an operand kv_layout_ok rejects: a contiguous copy.
template <class T>
static Cache<T> contiguous(const Cache<T>& c, int B, int H, int S, int D) {
  Cache<T> o;
  o.stride[0] = int64_t{H} * S * D, o.stride[1] = int64_t{S} * D, o.stride[2] = D;
  o.buf.resize(o.stride[0] * B);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int s = 0; s < S; ++s)
        for (int d = 0; d < D; ++d) o.buf[b * o.stride[0] + h * o.stride[1] + s * o.stride[2] + d] = c.at(b, h, s, d);
  return o;
}

enum MaskKind { kAncestors, kRandomBits, kEmptyRows, kAllOnes };
static const char* kMaskName[] = {"ancestors", "random bits", "some empty rows", "all ones"};

struct Stats {
  long launches = 0, ctas = 0, split_calls = 0, max_splits = 0, copied_operands = 0, empty_rows = 0, rows = 0;
  double worst_ratio = 0.0;
};

// One call of the op.
template <class T, int D>
static void run(const char* dtype, int B, int Hq, int Hkv, int Tn, int S, Layout layout, MaskKind mk,
                int64_t resident_slots, bool ragged_invalid, emu_test::Rng& rng, emu_test::Tally& tally, Stats& st) {
  const int G = Hq / Hkv, W = (Tn + 31) / 32;
  const float sigma_q = 1.0f, sigma_v = std::vector<float>{0.5f, 1.f, 4.f}[rng(0, 2)];
  std::vector<T> q(int64_t{B} * Hq * Tn * D), out(q.size());
  for (auto& x : q) x = T(rng.normal(sigma_q));
  for (auto& x : out) x = T(1234.5f);  // at::empty: garbage
  Cache<T> kc = make_cache<T>(B, Hkv, S, D, layout, rng, 1.0f), vc = make_cache<T>(B, Hkv, S, D, layout, rng, sigma_v);
  std::vector<int64_t> ctx(B);
  std::vector<int32_t> nn(B), mask(int64_t{B} * Tn * W);
  for (int b = 0; b < B; ++b) {
    const int pick = static_cast<int>(rng(0, 5));
    ctx[b] = pick == 0 ? 0 : pick == 1 ? S - Tn : rng(0, S - Tn);  // ragged, including 0 and full
    nn[b] = rng.coin(3) ? Tn - 1 : static_cast<int>(rng(0, Tn - 1));
    if (ragged_invalid && rng.coin(2)) {  // out of range: the kernel clamps (ops.h: unspecified, in bounds)
      if (rng.coin(2)) ctx[b] = rng.coin(2) ? -rng(1, 50) : S + rng(0, 50);
      if (rng.coin(2)) nn[b] = rng.coin(2) ? -static_cast<int>(rng(1, 5)) : Tn + static_cast<int>(rng(0, 5));
    }
    std::vector<int> par(Tn, -1);
    for (int t = 1; t < Tn; ++t) par[t] = static_cast<int>(rng(0, t - 1));
    for (int t = 0; t < Tn; ++t) {
      int32_t* row = &mask[(int64_t{b} * Tn + t) * W];
      for (int w = 0; w < W; ++w) row[w] = static_cast<int32_t>(rng.gen());  // garbage past num_nodes too
      if (mk == kAncestors) {
        for (int w = 0; w < W; ++w) row[w] &= ~static_cast<int32_t>(rng.gen() | (rng.gen() << 1));  // mostly clear
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
  Cache<T> kuse = k_ok ? kc : contiguous(kc, B, Hkv, S, D);
  Cache<T> vuse = v_ok ? vc : contiguous(vc, B, Hkv, S, D);
  st.copied_operands += !k_ok + !v_ok;
  Params p{};
  p.q = q.data();
  p.k = kuse.data();
  p.v = vuse.data();
  p.out = out.data();
  p.context_lens = ctx.data();
  p.tree_mask = mask.data();
  p.num_nodes = nn.data();
  p.k_sb = kuse.stride[0], p.k_sh = kuse.stride[1], p.k_ss = kuse.stride[2];
  p.v_sb = vuse.stride[0], p.v_sh = vuse.stride[1], p.v_ss = vuse.stride[2];
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.G = G, p.T = Tn, p.S = S, p.W = W;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const int64_t tiles = (int64_t{Tn} * G + kBM - 1) / kBM;
  p.num_splits = choose_num_splits(resident_slots, B, Hkv, tiles, S);
  const int64_t rows_total = int64_t{B} * Hq * Tn;
  std::vector<float> o_part(p.num_splits > 1 ? p.num_splits * rows_total * D : 0, 1234.5f),
      ml(p.num_splits > 1 ? 2 * p.num_splits * rows_total : 0, 1234.5f);
  if (p.num_splits > 1)
    p.o_part = o_part.data(), p.m_part = ml.data(), p.l_part = ml.data() + p.num_splits * rows_total;
  const std::string what =
      fmt("%s D=%d B=%d Hq=%d Hkv=%d T=%d S=%d %s mask=%s splits=%d%s", dtype, D, B, Hq, Hkv, Tn, S,
          kLayoutName[layout], kMaskName[mk], p.num_splits, ragged_invalid ? " (out-of-range inputs)" : "");
  cuemu::set_case(what);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.num_splits), static_cast<unsigned>(B * Hkv));
  cuemu::launch(tree_attention_kernel<T, D>, grid, dim3(kThreads), smem_bytes<T, D>(), p);
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

  // ---- reference, per output row ----
  for (int b = 0; b < B; ++b)
    for (int hq = 0; hq < Hq; ++hq)
      for (int t = 0; t < Tn; ++t) {
        const int h = hq / G;
        // the kernel's clamping, which ops.h allows for out-of-range values
        const int64_t c0 = std::clamp<int64_t>(ctx[b], 0, S - Tn);
        const int n0 = std::clamp(nn[b], 0, Tn - 1);
        const int64_t L = c0 + n0 + 1;
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
            const double x = double(f(qrow[d])) * double(f(kc.at(b, h, j, d)));
            acc += x;
            acc_abs += std::fabs(x);
          }
          s[j] = acc * scale;
          m = std::max(m, s[j]);
          qk_abs = std::max(qk_abs, acc_abs * scale);
          for (int d = 0; d < D; ++d) vmax = std::max(vmax, std::fabs(double(f(vc.at(b, h, j, d)))));
        }
        std::vector<double> o(D, 0.0);
        double l = 0;
        for (int64_t j = 0; j < L; ++j) {
          if (!(s[j] > -INFINITY)) continue;
          const double w = std::exp(s[j] - m);
          l += w;
          for (int d = 0; d < D; ++d) o[d] += w * double(f(vc.at(b, h, j, d)));
        }
        ++st.rows;
        st.empty_rows += l == 0;
        // Tolerance: the probabilities are rounded to T before P V (relative u = eps / 2 each, so at most
        // u * max|v| in the normalised output) and the output is rounded to T (u * |out| <= u * max|v|);
        // the fp32 scores carry a relative error below D * 2^-23 of sum |q k| * scale, which moves each
        // softmax weight by that much relative (twice it in the output); exp2f, the sums and the
        // rescaling add a few fp32 ulps, bounded by 2^-18 * max|v|.
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

int main() {
  emu_test::Rng rng(3);
  emu_test::Tally tally("tree_attention");
  Stats st;
  const int64_t kOneSplit = 1, kH100 = 132 * 4;  // resident CTAs of the device: 1 forces a single split
  int i = 0;
  // GQA 1/4/8, head dims 64 and 128, fp16 and bf16, one and many splits, every cache layout and mask kind;
  // T * G from 1 row to several 64-row query tiles, trees spanning up to 4 mask words, caches holding
  // only the tree (S = T, so every context is 0).
  struct Shape {
    int B, Hq, Hkv, T, S;
    int64_t slots;
  };
  const Shape shapes[] = {{1, 1, 1, 1, 64, kOneSplit}, {2, 4, 1, 12, 300, kOneSplit}, {1, 8, 1, 40, 200, kOneSplit},
                          {2, 8, 2, 20, 700, kH100},   {1, 16, 2, 9, 900, kH100},     {3, 2, 2, 33, 130, kOneSplit},
                          {1, 4, 4, 100, 1200, kH100}, {2, 8, 1, 17, 2100, kH100},    {1, 1, 1, 64, 65, kOneSplit},
                          {1, 32, 4, 5, 1500, 40},     {1, 1, 1, 1, 1, kOneSplit},    {2, 4, 1, 40, 40, kH100}};
  for (const Shape& s : shapes) {
    const Layout layout = static_cast<Layout>(i % kNumLayouts);
    const MaskKind mk = static_cast<MaskKind>((i / 2) % 4);
    const bool invalid = i % 5 == 4;
    if (i % 2 == 0) {
      run<__half, 64>("fp16", s.B, s.Hq, s.Hkv, s.T, s.S, layout, mk, s.slots, invalid, rng, tally, st);
      run<__nv_bfloat16, 128>("bf16", s.B, s.Hq, s.Hkv, s.T, s.S, static_cast<Layout>((i + 1) % kNumLayouts), mk,
                              s.slots, false, rng, tally, st);
    } else {
      run<__nv_bfloat16, 64>("bf16", s.B, s.Hq, s.Hkv, s.T, s.S, layout, mk, s.slots, invalid, rng, tally, st);
      run<__half, 128>("fp16", s.B, s.Hq, s.Hkv, s.T, s.S, static_cast<Layout>((i + 1) % kNumLayouts), mk, s.slots,
                       false, rng, tally, st);
    }
    ++i;
  }
  return tally.finish(fmt(
      "%ld launches (%ld CTAs), %ld split-K calls (up to %ld splits), %ld operands copied by "
      "the wrapper, %ld of %ld rows see no key, worst error %.2f of its tolerance",
      st.launches, st.ctas, st.split_calls, st.max_splits, st.copied_operands, st.empty_rows, st.rows, st.worst_ratio));
}
