// The CPU attention of one (request, query head) over a tree, for paged_tree_attention: k_row / v_row say
// where a cache position's row lives.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace ddtree::cpu {

// Dot product with independent partial sums, so the compiler can vectorise it without -ffast-math.
inline float dot(const float* a, const float* b, int64_t d) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= d; c += 8)
    for (int u = 0; u < 8; ++u) part[u] += a[c + u] * b[c + u];
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; c < d; ++c) sum += a[c] * b[c];
  return sum;
}

// One (request, query head): all T rows. k_row(p) / v_row(p) point at the d contiguous elements of
// cache position p of the kv head (dense or paged); the visible positions [0, ctx + n] are converted to
// fp32 once, so the inner loops are plain fp32.
template <typename scalar_t, class KRow, class VRow>
void attend_head(const scalar_t* q, const KRow& k_row, const VRow& v_row, const int32_t* mask, int64_t T, int64_t d,
                 int64_t W, int64_t ctx, int64_t n, float scale, scalar_t* out) {
  const int64_t visible = ctx + n + 1;
  std::vector<float> kf(visible * d), vf(visible * d);
  for (int64_t p = 0; p < visible; ++p) {
    std::copy(k_row(p), k_row(p) + d, kf.begin() + p * d);
    std::copy(v_row(p), v_row(p) + d, vf.begin() + p * d);
  }
  std::vector<float> qf(d), acc(d), logits(visible);
  std::vector<int64_t> keys(visible);  // visible cache positions of the current row
  for (int64_t i = 0; i < T; ++i) {
    for (int64_t c = 0; c < d; ++c) qf[c] = static_cast<float>(q[i * d + c]);
    int64_t count = 0;
    for (int64_t p = 0; p < ctx; ++p) keys[count++] = p;
    for (int64_t j = 0; j <= n; ++j) {
      if ((static_cast<uint32_t>(mask[i * W + j / 32]) >> (j % 32)) & 1u) keys[count++] = ctx + j;
    }
    // Pass 1: logits and their max.
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < count; ++t) {
      logits[t] = dot(qf.data(), kf.data() + keys[t] * d, d) * scale;
      m = std::max(m, logits[t]);
    }
    // Pass 2: softmax-weighted sum of the values.
    std::fill(acc.begin(), acc.end(), 0.0f);
    float sum = 0.0f;
    for (int64_t t = 0; t < count; ++t) {
      const float p = std::exp(logits[t] - m);
      sum += p;
      const float* vr = vf.data() + keys[t] * d;
      for (int64_t c = 0; c < d; ++c) acc[c] += p * vr[c];
    }
    const float inv = count == 0 ? 0.0f : 1.0f / sum;
    for (int64_t c = 0; c < d; ++c) out[i * d + c] = static_cast<scalar_t>(acc[c] * inv);
  }
}

}  // namespace ddtree::cpu
