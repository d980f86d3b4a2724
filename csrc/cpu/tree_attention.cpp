// CPU tree_attention: each tree slot attends to the committed context and to its own ancestors.
//
// Row i of request b sees cache positions [0, ctx) and ctx + j for every tree slot j <= num_nodes[b]
// whose bit is set in tree_mask[b, i] (ops.h). A row that sees no key outputs zeros.
//
// Tiled, as flash attention, on one of two paths; neither builds a dense mask over the context. The
// G = Hq / Hkv query heads of a kv head are stacked as its M = G * T rows, so each key and value is read
// once for G heads (GQA without copying K/V).
//   * Flash path, for real sizes (kFlashMacs multiply-adds and more) unless the blocked path wins (below):
//     torch's flash attention uses the bf16 matrix units of CPUs that have them and small blocks that
//     suit few rows per kv head. Per request, over all kv heads at once and parallel inside: on one
//     thread, one call over the context, unmasked, and one over the tree slots 0..num_nodes under the
//     packed bits as an additive 0 / -inf bias, the two normalised partial outputs combined by their
//     log-sum-exps in fp32; on more threads one call under a mask that is 0 over the context (one
//     parallel region instead of two).
//   * Blocked path, on the calling thread, for small calls, and on one thread for fp32/fp16 with many
//     rows per kv head and a long context: one (request, kv head) at a time. Keys are visited in
//     blocks; the logits of a block are one fp32 matrix product (torch's BLAS), folded into running row
//     maxima, row sums and output rows (the online softmax), and the weighted values are a second
//     product. The tree block gets the bias. fp16/bf16 keys and values are widened block by block; the
//     output is rounded to the input dtype once at the end.
// The blocked path opens no parallel region of its own, so small calls (a batch-1 step of a small
// model) stay on the calling thread. (A parallel region over its tasks, each calling torch's BLAS and
// elementwise ops, spent most of its time with threads spinning in OpenMP barriers on a busy 2-core
// machine; flash attention's own parallel loop does not.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "check_cpu.h"
#include "ops.h"

namespace ddtree::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kBlockLogits = 1 << 17;   // logits per block: 512 KiB of fp32, in L2 with its operands
constexpr int64_t kFlashMacs = 1 << 24;     // multiply-adds of a call from which flash attention pays
constexpr int64_t kFlashMaxRows = 128;      // fp32/fp16 rows per kv head below which flash beats blocked

// Running state of the online softmax for the M rows of one task, plus its scratch.
struct OnlineSoftmax {
  at::Tensor out;      // [M, d] fp32: sum of p * v under the running max
  at::Tensor row_max;  // [M] fp32: running max of the logits, -inf while a row has seen nothing
  at::Tensor row_sum;  // [M] fp32: sum of exp(logit - row_max)
  at::Tensor shift;    // [M] fp32: row_max, with 0 for rows that have seen nothing (exp(-inf - 0) = 0)
  at::Tensor rescale;  // [M] fp32: exp(old row_max - new row_max)
  at::Tensor block_max, block_sum;  // [M] fp32

  OnlineSoftmax(int64_t M, int64_t d) {
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    out = at::zeros({M, d}, f32);
    row_max = at::full({M}, kNegInf, f32);
    row_sum = at::zeros({M}, f32);
    shift = at::empty({M}, f32);
    rescale = at::empty({M}, f32);
    block_max = at::empty({M}, f32);
    block_sum = at::empty({M}, f32);
  }

  // Folds in one block: logits [M, n] (overwritten with the weights) and its values [n, d].
  void absorb(at::Tensor& logits, const at::Tensor& values) {
    at::amax_out(block_max, logits, 1);
    float* mx = row_max.data_ptr<float>();
    float* sh = shift.data_ptr<float>();
    float* rs = rescale.data_ptr<float>();
    const float* bm = block_max.const_data_ptr<float>();
    const int64_t M = row_max.size(0);
    for (int64_t r = 0; r < M; ++r) {
      const float next = std::max(mx[r], bm[r]);
      sh[r] = next == kNegInf ? 0.0f : next;
      rs[r] = std::exp(mx[r] - sh[r]);  // 0 for a row that had seen nothing
      mx[r] = next;
    }
    logits.sub_(shift.unsqueeze(1)).exp_();
    at::sum_out(block_sum, logits, 1);
    row_sum.mul_(rescale).add_(block_sum);
    out.mul_(rescale.unsqueeze(1)).addmm_(logits, values);
  }

  // out / row_sum, zeros where a row saw no key.
  at::Tensor result() {
    const float* s = row_sum.const_data_ptr<float>();
    float* inv = rescale.data_ptr<float>();
    for (int64_t r = 0; r < row_sum.size(0); ++r) inv[r] = s[r] > 0.0f ? 1.0f / s[r] : 0.0f;
    return out.mul_(rescale.unsqueeze(1));
  }
};

// Additive bias [T, n + 1] of one request's tree block: 0 where mask row i has bit j set, else -inf.
at::Tensor tree_bias(const int32_t* mask, int64_t T, int64_t W, int64_t n) {
  at::Tensor bias = at::empty({T, n + 1}, at::TensorOptions().dtype(at::kFloat));
  float* out = bias.data_ptr<float>();
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j <= n; ++j)
      out[i * (n + 1) + j] = (static_cast<uint32_t>(mask[i * W + j / 32]) >> (j % 32)) & 1u ? 0.0f : kNegInf;
  return bias;
}

// One task of the blocked path: q [M, d], k and v [S, d] of one kv head (input dtype), bias [T, n + 1];
// writes out [M, d].
void attend_group(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                  int64_t ctx, int64_t n, double scale, const at::Tensor& out) {
  const int64_t M = q.size(0), d = q.size(1), T = bias.size(0);
  const bool widen = k.scalar_type() != at::kFloat;
  const at::Tensor qs = at::mul(q.to(at::kFloat), scale);  // scaled once: logits = (scale * q) . k
  OnlineSoftmax state(M, d);
  const int64_t block = std::max<int64_t>(64, kBlockLogits / M);

  at::Tensor logits = at::empty({M, std::max(std::min(block, ctx), n + 1)}, qs.options());
  at::Tensor kf, vf;
  if (widen) {
    kf = at::empty({logits.size(1), d}, qs.options());
    vf = at::empty_like(kf);
  }
  auto keys = [&](const at::Tensor& src, at::Tensor& buf, int64_t start, int64_t len) {
    const at::Tensor part = src.narrow(0, start, len);
    return widen ? buf.narrow(0, 0, len).copy_(part) : part;
  };
  for (int64_t start = 0; start < ctx; start += block) {
    const int64_t len = std::min(block, ctx - start);
    at::Tensor lg = logits.narrow(1, 0, len);
    at::mm_out(lg, qs, keys(k, kf, start, len).t());
    state.absorb(lg, keys(v, vf, start, len));
  }
  // The tree block: slots 0..n, each row under its ancestor bits (the same for every query head).
  at::Tensor lg = logits.narrow(1, 0, n + 1);
  at::mm_out(lg, qs, keys(k, kf, ctx, n + 1).t());
  lg.view({M / T, T, n + 1}).add_(bias);
  state.absorb(lg, keys(v, vf, ctx, n + 1));
  out.copy_(state.result());
}

// Combines two normalised partial outputs by their log-sum-exps, in fp32: for each row,
// out = (o_c e^(lse_c - m) + o_t e^(lse_t - m)) / (e^(lse_c - m) + e^(lse_t - m)) with m the larger lse.
// A plain loop: as ATen ops these would be a handful of parallel regions of their own.
template <typename scalar_t>
void combine(const at::Tensor& o_c, const at::Tensor& lse_c, const at::Tensor& o_t, const at::Tensor& lse_t,
             const std::vector<uint8_t>& sees_tree, const at::Tensor& out) {
  const int64_t H = out.size(0), M = out.size(1), d = out.size(2);
  const at::Tensor oc = o_c.contiguous(), ot = o_t.contiguous(), lc = lse_c.contiguous(), lt = lse_t.contiguous();
  const scalar_t* pc = oc.const_data_ptr<scalar_t>();
  const scalar_t* pt = ot.const_data_ptr<scalar_t>();
  const float* plc = lc.const_data_ptr<float>();
  const float* plt = lt.const_data_ptr<float>();
  scalar_t* po = out.data_ptr<scalar_t>();
  for (int64_t r = 0; r < H * M; ++r) {
    // Flash attention gives a row that sees no key zeros and a log-sum-exp of 0: such a tree row has
    // weight 0 here. Every row sees the context, so lse_c is finite.
    const float a = plc[r], b = sees_tree[r % M] ? plt[r] : kNegInf, m = std::max(a, b);
    const float wc = std::exp(a - m), wt = std::exp(b - m), inv = 1.0f / (wc + wt);
    for (int64_t c = 0; c < d; ++c)
      po[r * d + c] = static_cast<scalar_t>((static_cast<float>(pc[r * d + c]) * wc +
                                             static_cast<float>(pt[r * d + c]) * wt) * inv);
  }
}

// The flash path for one request: q [Hkv, M, d], k and v [Hkv, S, d], bias [T, n + 1]; writes out
// [Hkv, M, d] (contiguous).
void attend_request_flash(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                          int64_t ctx, int64_t n, double scale, const at::Tensor& out) {
  const int64_t M = q.size(1), T = bias.size(0);
  const at::Tensor mask = bias.repeat({M / T, 1}).to(q.scalar_type()).view({1, 1, M, n + 1});
  auto [tree_out, tree_lse] = at::_scaled_dot_product_flash_attention_for_cpu(
      q.unsqueeze(0), k.narrow(1, ctx, n + 1).unsqueeze(0), v.narrow(1, ctx, n + 1).unsqueeze(0), 0.0, false,
      mask, scale);
  if (ctx == 0) {
    out.copy_(tree_out[0]);
    return;
  }
  auto [ctx_out, ctx_lse] = at::_scaled_dot_product_flash_attention_for_cpu(
      q.unsqueeze(0), k.narrow(1, 0, ctx).unsqueeze(0), v.narrow(1, 0, ctx).unsqueeze(0), 0.0, false,
      std::nullopt, scale);
  std::vector<uint8_t> sees_tree(M);  // whether row r sees any tree slot
  const float* pb = bias.const_data_ptr<float>();
  for (int64_t i = 0; i < T; ++i) {
    const bool any = std::any_of(pb + i * (n + 1), pb + (i + 1) * (n + 1), [](float x) { return x == 0.0f; });
    for (int64_t g = 0; g < M / T; ++g) sees_tree[g * T + i] = any;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "tree_attention_combine", [&] {
    combine<scalar_t>(ctx_out[0], ctx_lse[0], tree_out[0], tree_lse[0], sees_tree, out);
  });
}

// out.copy_(src) for [H, M, d] tensors of one dtype, out contiguous, as a plain loop: Tensor::copy_ of a
// large tensor opens a parallel region of its own.
void copy_rows(const at::Tensor& src, const at::Tensor& out) {
  const int64_t H = out.size(0), M = out.size(1), d = out.size(2), row_bytes = d * out.element_size();
  if (src.stride(2) != 1) {
    out.copy_(src);
    return;
  }
  const char* ps = static_cast<const char*>(src.const_data_ptr());
  char* po = static_cast<char*>(out.data_ptr());
  const int64_t s0 = src.stride(0) * src.element_size(), s1 = src.stride(1) * src.element_size();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t r = 0; r < M; ++r) std::memcpy(po + (h * M + r) * row_bytes, ps + h * s0 + r * s1, row_bytes);
}

// The flash path for one request in a single call (one parallel region): q [Hkv, M, d], k and v
// [Hkv, S, d], bias [T, n + 1]; writes out [Hkv, M, d]. The additive mask [M, ctx + n + 1] (0 over the
// context, the bias over the tree) is shared by all kv heads and filled in a plain loop.
void attend_request_flash_once(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& bias, int64_t ctx, int64_t n, double scale, const at::Tensor& out) {
  const int64_t M = q.size(1), T = bias.size(0), keys = ctx + n + 1;
  at::Tensor mask = at::empty({1, 1, M, keys}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention_mask", [&] {
    scalar_t* pm = mask.data_ptr<scalar_t>();
    const float* pb = bias.const_data_ptr<float>();
    for (int64_t r = 0; r < M; ++r) {
      std::fill(pm + r * keys, pm + r * keys + ctx, static_cast<scalar_t>(0.0f));
      std::transform(pb + (r % T) * (n + 1), pb + (r % T + 1) * (n + 1), pm + r * keys + ctx,
                     [](float x) { return static_cast<scalar_t>(x); });
    }
  });
  auto [o, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
      q.unsqueeze(0), k.narrow(1, 0, keys).unsqueeze(0), v.narrow(1, 0, keys).unsqueeze(0), 0.0, false, mask,
      scale);
  copy_rows(o[0], out);
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
  int64_t max_keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(ctx[b] >= 0, op, ": context_lens[", b, "] = ", ctx[b], " must be non-negative");
    TORCH_CHECK(ctx[b] + T <= S, op, ": context_lens[", b, "] = ", ctx[b],
                " does not fit the cache: context_len + tree slots (", T, ") exceeds k_cache.size(2) (", S,
                ")");
    TORCH_CHECK(nn[b] >= 0 && nn[b] <= T - 1, op, ": num_nodes[", b, "] = ", nn[b],
                " must be in [0, tree slots - 1] = [0, ", T - 1, "]");
    max_keys = std::max<int64_t>(max_keys, ctx[b] + nn[b] + 1);
  }

  at::Tensor out = at::empty_like(q);
  const int64_t G = Hq / Hkv, M = G * T;
  std::vector<at::Tensor> bias(B);
  for (int64_t b = 0; b < B; ++b) bias[b] = tree_bias(tree_mask.data_ptr<int32_t>() + b * T * W, T, W, nn[b]);
  // Row block kvh of q / out: the G query heads of kv head kvh, contiguous as [G * T, d].
  const at::Tensor q_rows = q.view({B, Hkv, M, d}), out_rows = out.view({B, Hkv, M, d});
  const int64_t task_macs = std::max<int64_t>(1, 2 * M * max_keys * d);
  const bool large = B * Hkv * task_macs >= kFlashMacs;
  // The blocked path only wins on one thread, in fp32/fp16, with many rows per kv head and a context
  // several times longer than that (measured on a 2-core AVX-512 machine).
  const bool blocked_wins = q.scalar_type() != at::kBFloat16 && at::get_num_threads() == 1 && M >= kFlashMaxRows &&
                            max_keys >= 4 * M;
  const bool flash = large && !blocked_wins;
  if (flash) {
    // On one thread, two calls (the context needs no mask); on more, one call: on a busy core every
    // parallel region costs a wait for a descheduled thread, more than the mask over the context.
    const bool one_call = at::get_num_threads() > 1;
    for (int64_t b = 0; b < B; ++b) {
      if (one_call) {
        attend_request_flash_once(q_rows[b], k_cache[b], v_cache[b], bias[b], ctx[b], nn[b], scale, out_rows[b]);
      } else {
        attend_request_flash(q_rows[b], k_cache[b], v_cache[b], bias[b], ctx[b], nn[b], scale, out_rows[b]);
      }
    }
    return out;
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      attend_group(q_rows[b][h], k_cache[b][h], v_cache[b][h], bias[b], ctx[b], nn[b], scale, out_rows[b][h]);
  return out;
}

}  // namespace ddtree::cpu
