// CPU topk_marginals: top k of log_softmax(logits / temperature) per (request, depth) row.
//
// This is the oracle the CUDA kernel is tested against, so it follows ops.h literally:
//   * v = float(logit) / float(temperature) in fp32; NaN counts as -inf.
//   * Normaliser: m = max v, sum = Σ exp(v - m) with each term in fp32 (v - m rounded to fp32, an exp
//     within a few ulp) summed in double, lse = double(m) + log(sum), logprob = float(double(v) - lse).
//   * A row with +inf: each +inf entry gets float(-log(double(count of +inf))), every other entry -inf.
//     A row of only -inf/NaN: every logprob is -inf (and the ids are 0..k-1 by the tie rule).
//   * Selection: top k by (v desc, token id asc), output sorted the same way.
//
// Per row, three passes over an fp32 copy of the row (one row of a real vocabulary fits in L2), in
// SSE2 (part of x86-64; a scalar fallback elsewhere) and no torch op:
//   1. v into the copy, the maxima of its blocks of 64, and its max;
//   2. the selection behind a threshold from the block maxima (a lower bound of the k-th best value),
//      which almost every chunk fails on one vectorised compare; the few survivors are ranked exactly;
//   3. the normaliser: a polynomial exp, four terms at a time, summed in double.
// Rows are independent, so they are split across threads; a grain of about 64k logits keeps small
// calls (a small vocabulary, a few rows) on the calling thread. The parallel loop calls no torch op:
// torch ops nested in a parallel region left threads spinning in OpenMP barriers on a busy machine.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "check_cpu.h"
#include "ops.h"

namespace ddtree::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr int64_t kLanes = 16;  // chunk of the selection scan tested with one vectorised compare
constexpr int64_t kBlock = 64;  // values per block maximum that sets the selection threshold
constexpr int64_t kParallelGrain = 1 << 16;  // logits per thread below which a call stays serial

using Entry = std::pair<float, int64_t>;  // (v, token id)

// "a ranks before b": larger value first, equal values by smaller token id.
inline bool ranks_before(const Entry& a, const Entry& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// Pass 1 on fp32 input x (v may alias x): v = x / temp (kDivide) or x, NaN as -inf; block_max[b] = max
// of v over block b of kBlock values; returns max v. SSE2 is part of x86-64, so this needs no dispatch.
template <bool kDivide>
float load_row(const float* x, int64_t V, float temp, float* v, float* block_max) {
  const int64_t blocks = V / kBlock;
  float m = kNegInf;
  int64_t j = 0;
#if defined(__SSE2__)
  const __m128 neg_inf = _mm_set1_ps(kNegInf), t = _mm_set1_ps(temp);
  for (int64_t b = 0; b < blocks; ++b) {
    __m128 bm = neg_inf;
    for (int64_t q = 0; q < kBlock; q += 4, j += 4) {
      __m128 e = _mm_loadu_ps(x + j);
      if constexpr (kDivide) e = _mm_div_ps(e, t);
      e = _mm_max_ps(e, neg_inf);  // maxps returns its second operand when the first is NaN
      _mm_storeu_ps(v + j, e);
      bm = _mm_max_ps(bm, e);
    }
    float lanes[4];
    _mm_storeu_ps(lanes, bm);
    block_max[b] = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
    m = std::max(m, block_max[b]);
  }
#else
  for (int64_t b = 0; b < blocks; ++b) {
    float bm = kNegInf;
    for (int64_t q = 0; q < kBlock; ++q, ++j) {
      const float e = kDivide ? x[j] / temp : x[j];
      v[j] = e == e ? e : kNegInf;
      bm = std::max(bm, v[j]);
    }
    block_max[b] = bm;
    m = std::max(m, bm);
  }
#endif
  for (; j < V; ++j) {
    const float e = kDivide ? x[j] / temp : x[j];
    v[j] = e == e ? e : kNegInf;
    m = std::max(m, v[j]);
  }
  return m;
}

// Pass 3: Σ exp(v[j] - m) over the row, each term in fp32, summed in double. The exp is Cephes'
// polynomial (a few ulp on its range): 8 lanes with AVX2 + FMA where the CPU has them (chosen at run
// time; the build targets plain x86-64), else 4 lanes of SSE2 (part of x86-64), else scalar. Terms below e^-87
// (under 1e-38 next to the max's term of 1) count as 0, which also keeps 2^n a normal number.
constexpr float kExpLow = -87.0f, kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

#if defined(__SSE2__)
// Returns Σ exp(v[j] - m) over j in [0, *j_end) for the largest multiple of 4 that fits, sets *j_end.
double sum_exp_sse2(const float* v, int64_t V, float m, int64_t* j_end) {
  const __m128 mv = _mm_set1_ps(m), lo = _mm_set1_ps(kExpLow), log2e = _mm_set1_ps(kLog2e);
  const __m128 c1 = _mm_set1_ps(kLn2Hi), c2 = _mm_set1_ps(kLn2Lo), one = _mm_set1_ps(1.0f);
  const __m128 half = _mm_set1_ps(0.5f);
  __m128d acc0 = _mm_setzero_pd(), acc1 = _mm_setzero_pd();
  int64_t j = 0;
  for (; j + 4 <= V; j += 4) {
    const __m128 x0 = _mm_sub_ps(_mm_loadu_ps(v + j), mv);  // <= 0, or -inf
    const __m128 keep = _mm_cmpge_ps(x0, lo);
    const __m128 x = _mm_max_ps(x0, lo);
    // n = floor(x log2 e + 1/2), r = x - n ln 2 (in two parts), e^x = 2^n e^r.
    const __m128 fx = _mm_add_ps(_mm_mul_ps(x, log2e), half);
    __m128 n = _mm_cvtepi32_ps(_mm_cvttps_epi32(fx));
    n = _mm_sub_ps(n, _mm_and_ps(_mm_cmpgt_ps(n, fx), one));
    const __m128 r = _mm_sub_ps(_mm_sub_ps(x, _mm_mul_ps(n, c1)), _mm_mul_ps(n, c2));
    __m128 y = _mm_set1_ps(kExpPoly[0]);
    for (int t = 1; t < 6; ++t) y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(kExpPoly[t]));
    y = _mm_add_ps(_mm_add_ps(_mm_mul_ps(_mm_mul_ps(y, r), r), r), one);
    const __m128i e = _mm_slli_epi32(_mm_add_epi32(_mm_cvttps_epi32(n), _mm_set1_epi32(127)), 23);
    y = _mm_and_ps(_mm_mul_ps(y, _mm_castsi128_ps(e)), keep);
    acc0 = _mm_add_pd(acc0, _mm_cvtps_pd(y));
    acc1 = _mm_add_pd(acc1, _mm_cvtps_pd(_mm_movehl_ps(y, y)));
  }
  double lanes[2];
  _mm_storeu_pd(lanes, _mm_add_pd(acc0, acc1));
  *j_end = j;
  return lanes[0] + lanes[1];
}
#endif

#if defined(__GNUC__) && defined(__x86_64__)
// The same in AVX2 + FMA, 16 values per step in two independent chains.
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x0) {
  const __m256 lo = _mm256_set1_ps(kExpLow);
  const __m256 x = _mm256_max_ps(x0, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x));
  __m256 y = _mm256_set1_ps(kExpPoly[0]);
  for (int t = 1; t < 6; ++t) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpPoly[t]));
  y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(y, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), _mm256_cmp_ps(x0, lo, _CMP_GE_OQ));
}

__attribute__((target("avx2,fma"))) double sum_exp_avx2(const float* v, int64_t V, float m, int64_t* j_end) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t j = 0;
  for (; j + 16 <= V; j += 16) {
    const __m256 y0 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(v + j), mv));  // v - m <= 0, or -inf
    const __m256 y1 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(v + j + 8), mv));
    acc[0] = _mm256_add_pd(acc[0], _mm256_cvtps_pd(_mm256_castps256_ps128(y0)));
    acc[1] = _mm256_add_pd(acc[1], _mm256_cvtps_pd(_mm256_extractf128_ps(y0, 1)));
    acc[2] = _mm256_add_pd(acc[2], _mm256_cvtps_pd(_mm256_castps256_ps128(y1)));
    acc[3] = _mm256_add_pd(acc[3], _mm256_cvtps_pd(_mm256_extractf128_ps(y1, 1)));
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3])));
  *j_end = j;
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}
#endif

double sum_exp(const float* v, int64_t V, float m) {
  double sum = 0.0;
  int64_t j = 0;
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_avx2) {
    sum = sum_exp_avx2(v, V, m, &j);
  } else {
    sum = sum_exp_sse2(v, V, m, &j);
  }
#elif defined(__SSE2__)
  sum = sum_exp_sse2(v, V, m, &j);
#endif
  for (; j < V; ++j) sum += static_cast<double>(std::exp(v[j] - m));
  return sum;
}

// Whether any of v[0..kLanes) is at least t: one vectorised compare per chunk.
inline bool any_at_least(const float* v, float t) {
  int hit = 0;
  for (int64_t u = 0; u < kLanes; ++u) hit |= v[u] >= t;
  return hit != 0;
}

// Pass 2: the k best entries of v (k <= V), best first, in kept[0..k).
//
// threshold is the k-th largest of the block maxima: k blocks hold a value at least that large, so the
// k-th best value is at least threshold too and nothing below it can be selected (ties at it can, so
// the filter keeps them). For random values only a little more than k entries pass; the survivors are
// then ranked exactly by (v desc, token id asc). Fewer than k blocks: every entry passes.
void select_row(const float* v, int64_t V, int64_t k, const float* block_max, int64_t blocks,
                std::vector<float>& scratch, std::vector<Entry>& kept) {
  float threshold = kNegInf;
  if (blocks >= k) {
    scratch.assign(block_max, block_max + blocks);
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
    threshold = scratch[k - 1];
  }
  kept.clear();
  int64_t j = 0;
  for (; j + kLanes <= V; j += kLanes)
    if (any_at_least(v + j, threshold))
      for (int64_t u = 0; u < kLanes; ++u)
        if (v[j + u] >= threshold) kept.emplace_back(v[j + u], j + u);
  for (; j < V; ++j)
    if (v[j] >= threshold) kept.emplace_back(v[j], j);
  std::nth_element(kept.begin(), kept.begin() + (k - 1), kept.end(), ranks_before);
  std::sort(kept.begin(), kept.begin() + k, ranks_before);  // best first
  kept.resize(k);
}

// One row: logits x [V] (fp32) -> out_lp, out_id [k]. v is an fp32 scratch row of V values.
void topk_row(const float* x, int64_t V, float temp, bool divide, int64_t k, float* out_lp, int64_t* out_id,
              std::vector<float>& v, std::vector<float>& block_max, std::vector<float>& scratch,
              std::vector<Entry>& kept) {
  // Pass 1.
  const int64_t blocks = V / kBlock;
  float* vp = v.data();
  block_max.resize(blocks);
  const float m = divide ? load_row<true>(x, V, temp, vp, block_max.data())
                         : load_row<false>(x, V, temp, vp, block_max.data());
  // Only a row whose max is +inf has +inf entries to count.
  const int64_t n_posinf = m == kPosInf ? std::count(vp, vp + V, kPosInf) : 0;
  // Pass 2: the selection.
  select_row(vp, V, k, block_max.data(), blocks, scratch, kept);
  // Pass 3 (finite max only): lse = m + log Σ exp(v - m).
  const double lse = std::isfinite(m) ? static_cast<double>(m) + std::log(sum_exp(vp, V, m)) : 0.0;
  const float posinf_lp = static_cast<float>(-std::log(static_cast<double>(std::max<int64_t>(n_posinf, 1))));
  for (int64_t i = 0; i < k; ++i) {
    const float e = kept[i].first;
    float lp;
    if (n_posinf > 0) {
      lp = e == kPosInf ? posinf_lp : kNegInf;
    } else if (m == kNegInf) {
      lp = kNegInf;
    } else {
      lp = static_cast<float>(static_cast<double>(e) - lse);
    }
    out_lp[i] = lp;
    out_id[i] = kept[i].second;
  }
}

}  // namespace

TopkResult topk_marginals(const at::Tensor& logits_in, int64_t k, double temperature) {
  check_topk_marginals(logits_in, k, temperature);
  check_cpu("topk_marginals", "logits", logits_in);
  const int64_t B = logits_in.size(0), D = logits_in.size(1), V = logits_in.size(2);
  const int64_t rows = B * D;
  // Half types become fp32 first, through torch's vectorised conversion (before, not inside, the
  // parallel loop below, which calls no torch op).
  const at::Tensor logits = logits_in.reshape({rows, V}).to(at::kFloat).contiguous();
  const at::TensorOptions f32 = logits.options();
  at::Tensor logprobs = at::empty({B, D, k}, f32);
  at::Tensor token_ids = at::empty({B, D, k}, f32.dtype(at::kLong));
  const float temp = static_cast<float>(temperature);
  const bool divide = temp != 1.0f;  // x / 1 == x exactly, NaN included
  const float* x = logits.const_data_ptr<float>();
  float* lp = logprobs.data_ptr<float>();
  int64_t* ids = token_ids.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(V, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> v(V), block_max, scratch;
    std::vector<Entry> kept;
    for (int64_t r = begin; r < end; ++r)
      topk_row(x + r * V, V, temp, divide, k, lp + r * k, ids + r * k, v, block_max, scratch, kept);
  });
  return {logprobs, token_ids};
}

}  // namespace ddtree::cpu
