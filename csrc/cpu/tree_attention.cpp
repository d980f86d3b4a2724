// CPU tree_attention: each tree slot attends to the committed context and to its own ancestors.
//
// Row i of request b sees cache positions [0, ctx) and ctx + j for every tree slot j <= num_nodes[b]
// whose bit is set in tree_mask[b, i] (ops.h). The oracle streams over exactly those keys, so it never
// builds a dense [T, S] mask: per row, pass 1 writes the fp32 logits scale * <q, k> of the visible
// keys into a scratch buffer and takes their max, pass 2 accumulates exp(logit - max) and the weighted
// values in fp32 (the oracle favours plain code over speed: O(T * (ctx + T) * d) per head). A row
// that sees no key outputs zeros. GQA: query head h reads kv head h / (Hq / Hkv).
// Work is split over (request, query head) pairs with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "check_cpu.h"
#include "ops.h"

namespace ddtree::cpu {
namespace {

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

// One (request, query head): all T rows. The visible part of the kv head, positions [0, ctx + n], is
// converted to fp32 once, so the inner loops are plain fp32.
template <typename scalar_t>
void attend_head(const scalar_t* q, const scalar_t* k, const scalar_t* v, const int32_t* mask, int64_t T,
                 int64_t d, int64_t W, int64_t ctx, int64_t n, float scale, scalar_t* out) {
  const int64_t visible = ctx + n + 1;
  std::vector<float> kf(k, k + visible * d), vf(v, v + visible * d);
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

}  // namespace

at::Tensor tree_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                          const at::Tensor& context_lens_in, const at::Tensor& tree_mask_in,
                          const at::Tensor& num_nodes_in, double scale) {
  const char* op = "tree_attention";
  check_tree_attention(q_in, k_in, v_in, context_lens_in, tree_mask_in, num_nodes_in, scale);
  check_cpu(op, "q", q_in);
  check_cpu(op, "k_cache", k_in);
  check_cpu(op, "v_cache", v_in);
  check_cpu(op, "context_lens", context_lens_in);
  check_cpu(op, "tree_mask", tree_mask_in);
  check_cpu(op, "num_nodes", num_nodes_in);
  const at::Tensor q = q_in.contiguous(), k_cache = k_in.contiguous(), v_cache = v_in.contiguous();
  const at::Tensor context_lens = context_lens_in.contiguous(), tree_mask = tree_mask_in.contiguous();
  const at::Tensor num_nodes = num_nodes_in.contiguous();

  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), d = q.size(3);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2), W = tree_mask.size(2);
  const int64_t* ctx = context_lens.data_ptr<int64_t>();
  const int32_t* nn = num_nodes.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(ctx[b] >= 0, op, ": context_lens[", b, "] = ", ctx[b], " must be non-negative");
    TORCH_CHECK(ctx[b] + T <= S, op, ": context_lens[", b, "] = ", ctx[b],
                " does not fit the cache: context_len + tree slots (", T, ") exceeds k_cache.size(2) (", S,
                ")");
    TORCH_CHECK(nn[b] >= 0 && nn[b] <= T - 1, op, ": num_nodes[", b, "] = ", nn[b],
                " must be in [0, tree slots - 1] = [0, ", T - 1, "]");
  }

  at::Tensor out = at::empty_like(q);
  const int64_t group = Hq / Hkv;
  const float scale_f = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention_cpu", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    const int32_t* mp = tree_mask.data_ptr<int32_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / Hq, h = bh % Hq, kvh = b * Hkv + h / group;
        attend_head(qp + bh * T * d, kp + kvh * S * d, vp + kvh * S * d, mp + b * T * W, T, d, W, ctx[b],
                    nn[b], scale_f, op_ + bh * T * d);
      }
    });
  });
  return out;
}

}  // namespace ddtree::cpu
