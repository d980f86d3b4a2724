// CPU topk_marginals: top k of log_softmax(logits / temperature) per (request, depth) row.
//
// This is the oracle the CUDA kernel is tested against, so it follows ops.h literally:
//   * v = float(logit) / float(temperature) in fp32; NaN counts as -inf.
//   * Normaliser: m = max v, sum = Σ exp(double(v - m)) accumulated in DOUBLE,
//     lse = double(m) + log(sum), logprob = float(double(v) - lse). (CUDA may accumulate in fp32; the
//     two agree within fp32 rounding.)
//   * A row with +inf: each +inf entry gets float(-log(double(count of +inf))), every other entry -inf.
//     A row of only -inf/NaN: every logprob is -inf (and the ids are 0..k-1 by the tie rule).
//   * Selection: top k by (v desc, token id asc), output sorted the same way. A size-k heap whose front
//     is the worst kept entry gives O(V log k) per row instead of sorting the vocabulary.
// Rows are independent, so they are split across threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "check_cpu.h"
#include "ops.h"

namespace ddtree::cpu {
namespace {

using Entry = std::pair<float, int64_t>;  // (v, token id)

// "a ranks before b": larger value first, equal values by smaller token id.
inline bool ranks_before(const Entry& a, const Entry& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

template <typename scalar_t>
void topk_row(const scalar_t* x, int64_t V, int64_t k, float temp, float* out_lp, int64_t* out_id,
              std::vector<Entry>& heap) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  auto value = [&](int64_t j) {
    const float v = static_cast<float>(x[j]) / temp;
    return std::isnan(v) ? kNegInf : v;
  };

  // Pass 1: max, count of +inf, and top-k selection. With ranks_before as the heap's "less", the
  // front is the entry that ranks last among those kept.
  heap.clear();
  float m = kNegInf;
  int64_t n_posinf = 0;
  for (int64_t j = 0; j < V; ++j) {
    const Entry e{value(j), j};
    m = std::max(m, e.first);
    n_posinf += (e.first == std::numeric_limits<float>::infinity());
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.push_back(e);
      std::push_heap(heap.begin(), heap.end(), ranks_before);
    } else if (ranks_before(e, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), ranks_before);
      heap.back() = e;
      std::push_heap(heap.begin(), heap.end(), ranks_before);
    }
  }
  std::sort_heap(heap.begin(), heap.end(), ranks_before);  // best first

  // Pass 2 (finite max only): the normaliser.
  double lse = 0.0;
  if (std::isfinite(m)) {
    double sum = 0.0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(static_cast<double>(value(j) - m));
    lse = static_cast<double>(m) + std::log(sum);
  }
  const float posinf_lp = static_cast<float>(-std::log(static_cast<double>(std::max<int64_t>(n_posinf, 1))));

  for (int64_t i = 0; i < k; ++i) {
    const float v = heap[i].first;
    float lp;
    if (n_posinf > 0) {
      lp = std::isinf(v) && v > 0 ? posinf_lp : kNegInf;
    } else if (m == kNegInf) {
      lp = kNegInf;
    } else {
      lp = static_cast<float>(static_cast<double>(v) - lse);
    }
    out_lp[i] = lp;
    out_id[i] = heap[i].second;
  }
}

}  // namespace

TopkResult topk_marginals(const at::Tensor& logits_in, int64_t k, double temperature) {
  check_topk_marginals(logits_in, k, temperature);
  check_cpu("topk_marginals", "logits", logits_in);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), D = logits.size(1), V = logits.size(2);
  const int64_t rows = B * D;
  at::Tensor logprobs = at::empty({B, D, k}, logits.options().dtype(at::kFloat));
  at::Tensor token_ids = at::empty({B, D, k}, logits.options().dtype(at::kLong));
  const float temp = static_cast<float>(temperature);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_marginals_cpu", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    float* lp = logprobs.data_ptr<float>();
    int64_t* ids = token_ids.data_ptr<int64_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<Entry> heap;
      heap.reserve(k);
      for (int64_t r = begin; r < end; ++r) topk_row(x + r * V, V, k, temp, lp + r * k, ids + r * k, heap);
    });
  });
  return {logprobs, token_ids};
}

}  // namespace ddtree::cpu
