// What the emulated tests of tree_attention and paged_tree_attention share: the random queries, lengths
// and tree masks of one call, the host wrapper's operand copy, split-K buffers and launches (as
// csrc/cuda/attention_launch.h does them), the reference attention in double with its per-row
// tolerance, and the order in which a shape list is walked over dtypes, head dims, layouts and masks.
// Each test brings its own cache layouts and key/value addressing. Include after cuemu.h, the kernel
// header and check.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace emu_test::tree_attention {

using namespace ddtree::cuda::attention;

template <class T>
float f(T x) {
  return static_cast<float>(x);
}
template <class T>
constexpr double kEps = 0.0;  // distance from 1 to the next value: 2^-10 for fp16, 2^-7 for bf16
template <>
constexpr double kEps<__half> = 0x1p-10;
template <>
constexpr double kEps<__nv_bfloat16> = 0x1p-7;

// A K or V cache as a 4-D view with element strides into a buffer: [B, H, S, D] for the dense op,
// [num_blocks, block_size, H, D] for the paged one.
template <class T>
struct Cache {
  std::vector<T> buf;
  int64_t offset = 0, stride[4] = {0, 0, 0, 1};
  const T* data() const { return buf.data() + offset; }
  const T& at(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
    return buf[offset + i0 * stride[0] + i1 * stride[1] + i2 * stride[2] + i3 * stride[3]];
  }
  // The strides of a view into contiguous [*, n1, n2, n3] storage.
  void strides_in(int64_t n1, int64_t n2, int64_t n3) { stride[0] = n1 * n2 * n3, stride[1] = n2 * n3, stride[2] = n3; }
  // Storage for `n0` slices of dim 0 after the offset (and 16 elements more), every element random.
  void fill(int64_t n0, Rng& rng, float sigma) {
    buf.resize(offset + stride[0] * n0 + 16);
    for (auto& x : buf) x = T(rng.normal(sigma));
  }
};

struct Stats {
  long launches = 0, ctas = 0, split_calls = 0, max_splits = 0, copied_operands = 0, empty_rows = 0, rows = 0,
       bad_blocks = 0;
  double worst_ratio = 0.0;
};

// What the host wrapper does with the [n0, n1, n2, n3] view `c`: passes it on if kv_layout_ok accepts
// it, else a contiguous copy.
template <class T>
Cache<T> kv_operand(const Cache<T>& c, int n0, int n1, int n2, int n3, Stats& st) {
  int64_t stride[4];
  std::copy(c.stride, c.stride + 4, stride);
  if (kv_layout_ok(c.data(), stride)) return c;
  ++st.copied_operands;
  Cache<T> o;
  o.strides_in(n1, n2, n3);
  o.buf.resize(o.stride[0] * n0);
  for (int i0 = 0; i0 < n0; ++i0)
    for (int i1 = 0; i1 < n1; ++i1)
      for (int i2 = 0; i2 < n2; ++i2)
        for (int i3 = 0; i3 < n3; ++i3)
          o.buf[i0 * o.stride[0] + i1 * o.stride[1] + i2 * o.stride[2] + i3] = c.at(i0, i1, i2, i3);
  return o;
}

enum MaskKind { kAncestors, kRandomBits, kEmptyRows, kAllOnes };
inline const char* kMaskName[] = {"ancestors", "random bits", "some empty rows", "all ones"};

// One call's inputs but the caches: queries, output (garbage, as at::empty), context lengths, node
// counts and tree masks of B requests; S is the number of positions a request can address.
template <class T, int D>
struct Call {
  int B, Hq, Hkv, Tn, S, G, W;
  float sigma_v;  // spread of the values (the keys' is 1)
  std::vector<T> q, out;
  std::vector<int64_t> ctx;
  std::vector<int32_t> nn, mask;

  // Draws the value spread and the queries.
  Call(int B_, int Hq_, int Hkv_, int Tn_, int S_, Rng& rng)
      : B(B_), Hq(Hq_), Hkv(Hkv_), Tn(Tn_), S(S_), G(Hq_ / Hkv_), W((Tn_ + 31) / 32),
        sigma_v(std::vector<float>{0.5f, 1.f, 4.f}[rng(0, 2)]), q(int64_t{B_} * Hq_ * Tn_ * D), out(q.size()),
        ctx(B_), nn(B_), mask(int64_t{B_} * Tn_ * W) {
    for (auto& x : q) x = T(rng.normal(1.0f));
    for (auto& x : out) x = T(1234.5f);
  }

  // Request b's context length and node count: ragged (0 and S - T included), mostly a full tree. With
  // `invalid`, every other request (by a coin) gets an out-of-range context, node count or both, which
  // the kernel clamps (ops.h: unspecified result, in bounds); returns whether request b got them.
  bool draw_lengths(int b, bool invalid, Rng& rng) {
    const int pick = static_cast<int>(rng(0, 5));
    ctx[b] = pick == 0 ? 0 : pick == 1 ? S - Tn : rng(0, S - Tn);
    nn[b] = rng.coin(3) ? Tn - 1 : static_cast<int>(rng(0, Tn - 1));
    if (!(invalid && rng.coin(2))) return false;
    if (rng.coin(2)) ctx[b] = rng.coin(2) ? -rng(1, 50) : S + rng(0, 50);
    if (rng.coin(2)) nn[b] = rng.coin(2) ? -static_cast<int>(rng(1, 5)) : Tn + static_cast<int>(rng(0, 5));
    return true;
  }

  // Request b's mask rows, random bits to start with (past num_nodes too, where the kernel must not
  // look), then per `mk`: a random tree's ancestor rows, or half the rows empty, or all ones.
  // `thin_garbage` first clears about 3 in 4 of an ancestor row's random bits (only those past the
  // tree survive the tree's bits being written).
  void draw_mask(int b, MaskKind mk, bool thin_garbage, Rng& rng) {
    std::vector<int> par(Tn, -1);
    for (int t = 1; t < Tn; ++t) par[t] = static_cast<int>(rng(0, t - 1));
    for (int t = 0; t < Tn; ++t) {
      int32_t* row = &mask[(int64_t{b} * Tn + t) * W];
      for (int w = 0; w < W; ++w) row[w] = static_cast<int32_t>(rng.gen());
      if (mk == kAncestors) {
        if (thin_garbage)
          for (int w = 0; w < W; ++w) row[w] &= ~static_cast<int32_t>(rng.gen() | (rng.gen() << 1));
        for (int j = 0; j < Tn; ++j) row[j / 32] &= ~(1 << (j % 32));
        for (int c = t; c >= 0; c = par[c]) row[c / 32] |= 1 << (c % 32);
      } else if (mk == kEmptyRows && rng.coin(2)) {
        for (int w = 0; w < W; ++w) row[w] = 0;
      } else if (mk == kAllOnes) {
        for (int w = 0; w < W; ++w) row[w] = -1;
      }
    }
  }

  // The positions request b reads, [0, keys(b)), after the kernel's clamping (which ops.h allows for
  // out-of-range values); its tree starts at context(b).
  int64_t context(int b) const { return std::clamp<int64_t>(ctx[b], 0, S - Tn); }
  int64_t keys(int b) const { return context(b) + std::clamp(nn[b], 0, Tn - 1) + 1; }
  int64_t tiles() const { return (int64_t{Tn} * G + kBM - 1) / kBM; }

  // The Params both host wrappers fill alike, split-K chosen for `resident_slots` resident CTAs (1
  // forces a single split); the dense wrapper adds the cache strides.
  Params params(const T* k, const T* v, int64_t resident_slots) {
    Params p{};
    p.q = q.data();
    p.k = k;
    p.v = v;
    p.out = out.data();
    p.context_lens = ctx.data();
    p.tree_mask = mask.data();
    p.num_nodes = nn.data();
    p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.G = G, p.T = Tn, p.S = S, p.W = W;
    p.scale_log2 = static_cast<float>(scale() * 1.4426950408889634);
    p.num_splits = choose_num_splits(resident_slots, B, Hkv, tiles(), S);
    return p;
  }
  static double scale() { return 1.0 / std::sqrt(static_cast<double>(D)); }
};

// Launches `kernel` (the attention kernel, taking `rows...` after the Params) on a (tiles, splits,
// B * Hkv) grid, then the combine kernel when the keys are split, as attention_launch.h does; the split
// buffers start as garbage (at::empty).
template <class T, int D, class Kernel, class... Rows>
void launch_attention(Kernel kernel, Params p, int64_t tiles, Stats& st, const Rows&... rows) {
  const int64_t rows_total = int64_t{p.B} * p.Hq * p.T;
  std::vector<float> o_part(p.num_splits > 1 ? p.num_splits * rows_total * D : 0, 1234.5f),
      ml(p.num_splits > 1 ? 2 * p.num_splits * rows_total : 0, 1234.5f);
  if (p.num_splits > 1)
    p.o_part = o_part.data(), p.m_part = ml.data(), p.l_part = ml.data() + p.num_splits * rows_total;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.B * p.Hkv));
  cuemu::launch(kernel, grid, dim3(kThreads), smem_bytes<T, D>(), p, rows...);
  ++st.launches;
  st.ctas += grid.x * grid.y * grid.z;
  if (p.num_splits > 1) {
    const int64_t blocks = (rows_total + kThreads / 32 - 1) / (kThreads / 32);
    cuemu::launch(combine_kernel<T, D>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, (const float*)p.o_part,
                  (const float*)p.m_part, (const float*)p.l_part, static_cast<T*>(p.out), p.num_splits, rows_total);
    ++st.launches;
    ++st.split_calls;
    st.max_splits = std::max<long>(st.max_splits, p.num_splits);
  }
}

// Checks every output row of the call against the attention of ops.h in double: row t of request b,
// query head hq, sees positions [0, context(b)) and context(b) + j for every j < keys(b) - context(b)
// whose bit is set in its mask row; a row that sees nothing must be zeros. key(b, h, pos, d) and
// value(b, h, pos, d) read the caches (each test places the rows its own way).
template <class T, int D, class Key, class Value>
void check_outputs(const Call<T, D>& c, const std::string& what, Key key, Value value, Tally& tally, Stats& st) {
  const double scale = c.scale();
  for (int b = 0; b < c.B; ++b)
    for (int hq = 0; hq < c.Hq; ++hq)
      for (int t = 0; t < c.Tn; ++t) {
        const int h = hq / c.G;
        const int64_t c0 = c.context(b), L = c.keys(b);
        const T* qrow = &c.q[((int64_t{b} * c.Hq + hq) * c.Tn + t) * D];
        const int32_t* mrow = &c.mask[(int64_t{b} * c.Tn + t) * c.W];
        std::vector<double> s(L, -INFINITY);
        double m = -INFINITY, vmax = 0.0, qk_abs = 0.0;
        for (int64_t j = 0; j < L; ++j) {
          if (j >= c0 && !((mrow[(j - c0) / 32] >> ((j - c0) % 32)) & 1)) continue;
          double acc = 0, acc_abs = 0;
          for (int d = 0; d < D; ++d) {
            const double x = double(f(qrow[d])) * double(f(key(b, h, j, d)));
            acc += x;
            acc_abs += std::fabs(x);
          }
          s[j] = acc * scale;
          m = std::max(m, s[j]);
          qk_abs = std::max(qk_abs, acc_abs * scale);
          for (int d = 0; d < D; ++d) vmax = std::max(vmax, std::fabs(double(f(value(b, h, j, d)))));
        }
        std::vector<double> o(D, 0.0);
        double l = 0;
        for (int64_t j = 0; j < L; ++j) {
          if (!(s[j] > -INFINITY)) continue;
          const double w = std::exp(s[j] - m);
          l += w;
          for (int d = 0; d < D; ++d) o[d] += w * double(f(value(b, h, j, d)));
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
          const double got = f(c.out[((int64_t{b} * c.Hq + hq) * c.Tn + t) * D + d]);
          const double err = std::fabs(got - want);
          if (l > 0 && vmax > 0) st.worst_ratio = std::max(st.worst_ratio, err / tol);
          if (l == 0 ? got != 0.0 : !(err <= tol))
            why = fmt("out[%d] %.6g want %.6g (tolerance %.3g)", d, got, want, tol);
        }
        tally.record(
            fmt("%s b=%d hq=%d t=%d (ctx %ld, num_nodes %d)", what.c_str(), b, hq, t, (long)c.ctx[b], c.nn[b]), why);
      }
}

// Shape i of a test's list runs twice: fp16 at head dim 64 and bf16 at 128 (bf16 at 64 and fp16 at 128
// for odd i), the cache layout stepping with i (one further for the second run), the mask kind every
// two shapes; only the first run gets out-of-range inputs when `invalid`.
// run.operator()<T, D>(dtype, layout, mask kind, invalid) makes the call.
template <class Run>
void run_shape(int i, int num_layouts, bool invalid, Run&& run) {
  const int layout = i % num_layouts, next = (i + 1) % num_layouts;
  const MaskKind mk = static_cast<MaskKind>((i / 2) % 4);
  if (i % 2 == 0) {
    run.template operator()<__half, 64>("fp16", layout, mk, invalid);
    run.template operator()<__nv_bfloat16, 128>("bf16", next, mk, false);
  } else {
    run.template operator()<__nv_bfloat16, 64>("bf16", layout, mk, invalid);
    run.template operator()<__half, 128>("fp16", next, mk, false);
  }
}

}  // namespace emu_test::tree_attention
