// CPU topk_marginals: top k of log_softmax(logits / temperature) per (request, depth) row.
//
// This is the oracle the CUDA kernel is tested against, so it follows ops.h literally:
//   * v = float(logit) / float(temperature) in fp32; NaN counts as -inf.
//   * Normaliser: m = max v, sum = Σ exp(v - m) in fp32 (v - m rounded to fp32, torch's vectorised exp,
//     torch's cascade sum), lse = double(m) + log(double(sum)), logprob = float(double(v) - lse).
//   * A row with +inf: each +inf entry gets float(-log(double(count of +inf))), every other entry -inf.
//     A row of only -inf/NaN: every logprob is -inf (and the ids are 0..k-1 by the tie rule).
//   * Selection: top k by (v desc, token id asc), output sorted the same way.
//
// Per row, three passes over an fp32 copy of the row (one row of a real vocabulary fits in L2), the
// elementwise work through torch's vectorised ops:
//   1. v into the copy, the maxima of its blocks of 64, and its max;
//   2. the selection behind a threshold from the block maxima (a lower bound of the k-th best value),
//      which almost every chunk fails on one vectorised compare; the few survivors are ranked exactly;
//   3. the normaliser, exp and sum on the copy (overwritten).
// Rows are independent, so they are split across threads; a grain of about 64k logits keeps small
// calls (a small vocabulary, a few rows) on the calling thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
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

// One row: logits x [V] (any float dtype) -> out_lp, out_id [k]. v is an fp32 scratch row of V values.
void topk_row(const at::Tensor& x, float temp, bool divide, int64_t k, float* out_lp, int64_t* out_id,
              at::Tensor& v, std::vector<float>& block_max, std::vector<float>& scratch,
              std::vector<Entry>& kept) {
  // Pass 1. Half types are widened into v first (torch's vectorised conversion), then handled in place.
  const int64_t V = v.size(0), blocks = V / kBlock;
  float* vp = v.data_ptr<float>();
  const float* xp = vp;
  if (x.scalar_type() == at::kFloat) {
    xp = x.const_data_ptr<float>();
  } else {
    v.copy_(x);
  }
  block_max.resize(blocks);
  const float m = divide ? load_row<true>(xp, V, temp, vp, block_max.data())
                         : load_row<false>(xp, V, temp, vp, block_max.data());
  // Only a row whose max is +inf has +inf entries to count.
  const int64_t n_posinf = m == kPosInf ? std::count(vp, vp + V, kPosInf) : 0;
  // Pass 2: the selection.
  select_row(vp, V, k, block_max.data(), blocks, scratch, kept);
  // Pass 3 (finite max only): lse = m + log Σ exp(v - m), overwriting v.
  double lse = 0.0;
  if (std::isfinite(m)) {
    const float sum = v.sub_(m).exp_().sum().item<float>();
    lse = static_cast<double>(m) + std::log(static_cast<double>(sum));
  }
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
  const at::Tensor logits = logits_in.reshape({rows, V}).contiguous();
  const at::TensorOptions f32 = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({B, D, k}, f32);
  at::Tensor token_ids = at::empty({B, D, k}, logits.options().dtype(at::kLong));
  const float temp = static_cast<float>(temperature);
  const bool divide = temp != 1.0f;  // x / 1 == x exactly, NaN included
  float* lp = logprobs.data_ptr<float>();
  int64_t* ids = token_ids.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(V, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    at::Tensor v = at::empty({V}, f32);
    std::vector<float> block_max, scratch;
    std::vector<Entry> kept;
    for (int64_t r = begin; r < end; ++r)
      topk_row(logits[r], temp, divide, k, lp + r * k, ids + r * k, v, block_max, scratch, kept);
  });
  return {logprobs, token_ids};
}

}  // namespace ddtree::cpu
