// topk_chunk_kernel + topk_merge_kernel under the emulator, launched as csrc/cuda/topk_marginals.cu does,
// against a port of csrc/cpu/topk_marginals.cpp (the CPU op, which sums the normaliser in double).
// Token ids must match exactly; +inf / -inf log-probs exactly; finite log-probs within the fp32 bound
// derived below.
#include "cuemu.h"
// clang-format off
#include "cuda/topk_marginals_kernel.cuh"
#include "check.h"
// clang-format on

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

using namespace ddtree::cuda::topk;
using emu_test::fmt;

constexpr float kInf = std::numeric_limits<float>::infinity();

// csrc/cpu/topk_marginals.cpp topk_row, literally (a full sort instead of its size-k heap: same order).
template <typename S>
static void ref_row(const S* x, int64_t V, int64_t k, float temp, float* lp, int64_t* id) {
  auto value = [&](int64_t j) {
    const float v = static_cast<float>(x[j]) / temp;
    return std::isnan(v) ? -kInf : v;
  };
  std::vector<std::pair<float, int64_t>> e(V);
  float m = -kInf;
  int64_t n_posinf = 0;
  for (int64_t j = 0; j < V; ++j) {
    e[j] = {value(j), j};
    m = std::max(m, e[j].first);
    n_posinf += e[j].first == kInf;
  }
  std::partial_sort(e.begin(), e.begin() + k, e.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  double lse = 0.0;
  if (std::isfinite(m)) {
    double sum = 0.0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(static_cast<double>(value(j) - m));
    lse = static_cast<double>(m) + std::log(sum);
  }
  const float posinf_lp = static_cast<float>(-std::log(static_cast<double>(std::max<int64_t>(n_posinf, 1))));
  for (int64_t i = 0; i < k; ++i) {
    const float v = e[i].first;
    lp[i] = n_posinf > 0 ? (v == kInf ? posinf_lp : -kInf)
                         : (m == -kInf ? -kInf : static_cast<float>(static_cast<double>(v) - lse));
    id[i] = e[i].second;
  }
}

// Row contents: Gaussian logits, few distinct values (ties broken by id), rows with NaN and -inf mixed
// in, rows with one or several +inf, rows of only -inf / NaN, signed zeros only, values that overflow to
// +inf when divided by a small temperature.
enum Kind { kGauss, kTies, kSpecial, kPosInf, kAllNegInf, kZeros, kHuge, kNumKinds };
static const char* kKindName[] = {"gauss", "ties", "nan/-inf", "+inf", "all -inf/nan", "signed zeros", "huge"};

template <typename S>
static void fill_row(S* x, int64_t V, Kind kind, emu_test::Rng& rng) {
  const float sigma = std::vector<float>{0.5f, 3.f, 20.f}[rng(0, 2)];
  for (int64_t j = 0; j < V; ++j) {
    float v = rng.normal(sigma);
    switch (kind) {
      case kTies:
        v = static_cast<float>(rng(-3, 3));
        break;
      case kSpecial:
        v = rng.coin(3) ? (rng.coin(2) ? NAN : -kInf) : v;
        break;
      case kPosInf:
        v = rng.coin(std::max<int64_t>(V / 3, 1)) ? kInf : (rng.coin(50) ? NAN : v);
        break;
      case kAllNegInf:
        v = rng.coin(2) ? NAN : -kInf;
        break;
      case kZeros:
        v = rng.coin(2) ? 0.0f : -0.0f;
        break;
      case kHuge:
        v = (rng.coin(2) ? 1.f : -1.f) *
            std::ldexp(1.f + static_cast<float>(rng.uniform()), static_cast<int>(rng(120, 127)));
        break;
      default:
        break;
    }
    x[j] = S(v);
  }
  if (kind == kPosInf && rng.coin(2)) x[rng(0, V - 1)] = S(kInf);  // at least one, often exactly one
}

struct Stats {
  long launches = 0, chunk_ctas = 0, rows = 0, selected_chunks = 0, whole_chunks = 0, unvectorized = 0;
  double worst_ratio = 0.0;  // max |error| / tolerance over finite log-probs
};

// One call of the op: `rows` rows of V logits (as [rows, V], contiguous, `offset` elements into the buffer
// so that the base can be misaligned), k, temperature.
template <typename S>
static void run(const char* dtype, int rows, int64_t V, int k, float temp, int64_t offset,
                const std::vector<Kind>& kinds, emu_test::Rng& rng, emu_test::Tally& tally, Stats& st) {
  const int64_t G = (V + kChunk - 1) / kChunk;
  if (k > kMaxK || G * k > kMaxCandidates || k > V) std::abort();  // the wrapper's checks: a test bug
  std::vector<S> buf(offset + rows * V + 8);
  S* x = buf.data() + offset;
  for (int r = 0; r < rows; ++r) fill_row(x + r * V, V, kinds[r % kinds.size()], rng);
  const bool divide = temp != 1.0f;
  const bool vec_ok = (V * static_cast<int64_t>(sizeof(S))) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  // at::empty workspace and outputs: garbage
  std::vector<uint64_t> cand(rows * G * k, 0x5A5A5A5A5A5A5A5Aull);
  std::vector<float2> stats(rows * G, make_float2(1234.5f, 1234.5f));
  std::vector<int> posinf(rows * G, 0x5A5A);
  std::vector<float> lp(rows * k, 1234.5f);
  std::vector<int64_t> id(rows * k, 0x5A5A);
  const std::string what = fmt("%s rows=%d V=%ld k=%d temp=%g offset=%ld", dtype, rows, (long)V, k, temp, (long)offset);
  cuemu::set_case(what);
  cuemu::launch(topk_chunk_kernel<S>, dim3(static_cast<unsigned>(rows * G)), dim3(kChunkThreads), 0, (const S*)x, V,
                static_cast<int>(G), k, temp, divide, vec_ok, cand.data(), stats.data(), posinf.data());
  cuemu::launch(topk_merge_kernel, dim3(static_cast<unsigned>(rows)), dim3(kMergeThreads), 0,
                (const uint64_t*)cand.data(), (const float2*)stats.data(), (const int*)posinf.data(),
                static_cast<int>(G), k, lp.data(), id.data());
  st.launches += 2;
  st.chunk_ctas += rows * G;
  st.unvectorized += vec_ok ? 0 : 1;
  for (int64_t g = 0; g < G; ++g)
    (std::min<int64_t>(kChunk, V - g * kChunk) > k ? st.selected_chunks : st.whole_chunks) += rows;

  std::vector<float> rlp(k);
  std::vector<int64_t> rid(k);
  for (int r = 0; r < rows; ++r) {
    ref_row(x + r * V, V, k, temp, rlp.data(), rid.data());
    ++st.rows;
    std::string why;
    for (int i = 0; i < k && why.empty(); ++i) {
      const float got = lp[r * k + i], want = rlp[i];
      if (id[r * k + i] != rid[i]) {
        why = fmt("id[%d] %ld want %ld", i, (long)id[r * k + i], (long)rid[i]);
      } else if (!std::isfinite(want)) {
        if (std::memcmp(&got, &want, sizeof got) != 0) why = fmt("logprob[%d] %g want %g", i, got, want);
      } else {
        // The CUDA normaliser sums exp in fp32 (16 terms per thread, 5 shuffle levels, 31 warp partials
        // with rescaling, each step within a few ulp) where the CPU sums in double: lse differs by a
        // relative sum error below 128 * 2^-24, and the result is rounded to fp32 (half an ulp of |lp|).
        const double tol = std::ldexp(1.0, -24) * (128.0 + std::fabs(static_cast<double>(want)));
        const double err = std::fabs(static_cast<double>(got) - static_cast<double>(want));
        st.worst_ratio = std::max(st.worst_ratio, err / tol);
        if (!(err <= tol)) why = fmt("logprob[%d] %.9g want %.9g (tolerance %.3g)", i, got, want, tol);
      }
    }
    tally.record(fmt("%s row %d (%s)", what.c_str(), r, kKindName[kinds[r % kinds.size()]]), why);
  }
}

int main() {
  emu_test::Rng rng(7);
  emu_test::Tally tally("topk_marginals");
  Stats st;
  const std::vector<Kind> all = {kGauss, kTies, kSpecial, kPosInf, kAllNegInf, kZeros, kGauss, kTies};
  // k from 1 to 1024 and V from 2 to 16385 (one chunk, or two with a 1-entry tail), every dtype and
  // row kind; odd V and an odd base offset take the unvectorized load.
  struct Shape {
    int rows;
    int64_t V;
    int k;
  };
  const Shape shapes[] = {{4, 2, 1},     {4, 2, 2},        {3, 3, 2},       {2, 17, 17},
                          {3, 100, 7},   {2, 1000, 64},    {2, 1024, 1024}, {1, 1500, 1024},
                          {2, 16383, 1}, {1, 16384, 1000}, {1, 16385, 33},  {2, 5000, 256}};
  int n = 0;
  for (const Shape& s : shapes) {
    const float temp = n % 3 == 0 ? 1.0f : (n % 3 == 1 ? 0.7f : 1.3f);
    const int64_t off = n % 4 == 3 ? 1 : 0;
    std::vector<Kind> kinds(all.begin() + n % 4, all.end());
    run<float>("f32", s.rows, s.V, s.k, temp, off, kinds, rng, tally, st);
    run<__half>("f16", s.rows, s.V, s.k, temp, (off + n) % 2, kinds, rng, tally, st);
    run<__nv_bfloat16>("bf16", s.rows, s.V, s.k, temp, 0, kinds, rng, tally, st);
    ++n;
  }
  // Several chunks: the merge selects among G * k candidates; k at the G * k <= 16384 limit.
  run<float>("f32", 2, 40000, 16, 1.0f, 0, {kGauss, kTies}, rng, tally, st);
  run<__nv_bfloat16>("bf16", 1, 50000, 128, 1.3f, 0, {kSpecial}, rng, tally, st);
  run<__half>("f16", 1, 65536, 1024, 1.0f, 0, {kTies}, rng, tally, st);
  run<float>("f32", 1, 70001, 3, 0.01f, 1, {kHuge}, rng, tally, st);
  // Full-size rows (Qwen vocabulary): 10 chunks, the last one partial.
  run<__nv_bfloat16>("bf16", 1, 151936, 1024, 1.0f, 0, {kGauss}, rng, tally, st);
  run<__half>("f16", 1, 151936, 8, 0.6f, 0, {kPosInf}, rng, tally, st);
  return tally.finish(
      fmt("%ld launches, %ld chunk CTAs (%ld with a radix select, %ld taken whole), %ld unvectorized "
          "calls, worst finite log-prob error %.2f of its tolerance",
          st.launches, st.chunk_ctas, st.selected_chunks, st.whole_chunks, st.unvectorized, st.worst_ratio));
}
