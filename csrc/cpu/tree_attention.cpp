// CPU tree_attention: each tree slot attends to the committed context and to its own ancestors.
//
// Row i of request b sees cache positions [0, ctx) and ctx + j for every tree slot j <= num_nodes[b]
// whose bit is set in tree_mask[b, i] (ops.h). A row that sees no key outputs zeros.
//
// The context and the tree are attended separately and merged by their log-sum-exps; no dense mask over
// the context is built. The G = Hq / Hkv query heads of a kv head are stacked as its M = G * T rows, so
// each key and value is read once for G heads (GQA without copying K/V).
//   * The context, tiled as flash attention, on one of two paths:
//     - flash: torch's flash attention, unmasked. It uses the bf16 matrix units of CPUs that have them
//       and small blocks that suit few rows per kv head.
//     - blocked, for small calls and for fp32/fp16 with many rows per kv head and a long context (where
//       it beats flash): keys are visited in blocks; the logits of a block are one fp32 matrix product
//       (torch's BLAS), folded into running row maxima, row sums and output rows (the online softmax),
//       and the weighted values are a second product. fp16/bf16 keys and values are widened block by
//       block.
//   * The tree: a row of a draft tree sees its ancestors only (a handful of slots), so each row's seen
//     slots are folded one by one into the merge of its context output, in fp32 (the sparse tree). A
//     mask where rows see many slots (over kSparseSlots a row on average) is one more dense block, the
//     slots 0..num_nodes under the packed bits as an additive 0 / -inf bias (flash or blocked).
// Work is split into units, each on one thread: (request, kv head, part of the context), parts = 1
// unless the request x kv head count does not divide evenly among the threads. Real sizes (kFlashMacs
// multiply-adds and more) run the units in one parallel region, a thread's consecutive kv heads of one
// request in one flash call; flash attention, torch's BLAS and ATen ops run serially inside it. Small
// calls (a batch-1 step of a small model) run on the calling thread and open no parallel region at all:
// on a busy 2-core machine, every parallel region waits for a descheduled thread, and many small ones
// collapse a small model's speed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "check_cpu.h"
#include "ops.h"

namespace ddtree::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kBlockLogits = 1 << 17;   // logits per block: 512 KiB of fp32, in L2 with its operands
constexpr int64_t kFlashMacs = 1 << 24;     // multiply-adds of a call from which threads and flash pay
constexpr int64_t kFlashMaxRows = 128;      // fp32/fp16 rows per kv head below which flash beats blocked
constexpr int64_t kMinPart = 256;           // fewest context keys of a part when the context is split
constexpr int64_t kSparseSlots = 32;        // mean tree slots seen per row up to which the tree is folded in

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

// One task of the blocked path: q [M, d], k and v [S, d] of one kv head (input dtype); the context keys
// [begin, end) and, when bias [T, n + 1] is defined, the tree slots 0..n at ctx..ctx + n. Writes the
// normalised out [M, d] (input dtype) and each row's log-sum-exp to lse [M] (-inf for a row that saw no
// key).
void attend_group(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                  int64_t begin, int64_t end, int64_t ctx, int64_t n, double scale, const at::Tensor& out,
                  float* lse) {
  const int64_t M = q.size(0), d = q.size(1);
  const bool widen = k.scalar_type() != at::kFloat, with_tree = bias.defined();
  const at::Tensor qs = at::mul(q.to(at::kFloat), scale);  // scaled once: logits = (scale * q) . k
  OnlineSoftmax state(M, d);
  const int64_t block = std::max<int64_t>(64, kBlockLogits / M);

  at::Tensor logits = at::empty({M, std::max(std::min(block, end - begin), with_tree ? n + 1 : 1)}, qs.options());
  at::Tensor kf, vf;
  if (widen) {
    kf = at::empty({logits.size(1), d}, qs.options());
    vf = at::empty_like(kf);
  }
  auto keys = [&](const at::Tensor& src, at::Tensor& buf, int64_t start, int64_t len) {
    const at::Tensor part = src.narrow(0, start, len);
    return widen ? buf.narrow(0, 0, len).copy_(part) : part;
  };
  for (int64_t start = begin; start < end; start += block) {
    const int64_t len = std::min(block, end - start);
    at::Tensor lg = logits.narrow(1, 0, len);
    at::mm_out(lg, qs, keys(k, kf, start, len).t());
    state.absorb(lg, keys(v, vf, start, len));
  }
  if (with_tree) {
    // The tree block: slots 0..n, each row under its ancestor bits (the same for every query head).
    const int64_t T = bias.size(0);
    at::Tensor lg = logits.narrow(1, 0, n + 1);
    at::mm_out(lg, qs, keys(k, kf, ctx, n + 1).t());
    lg.view({M / T, T, n + 1}).add_(bias);
    state.absorb(lg, keys(v, vf, ctx, n + 1));
  }
  const float* mx = state.row_max.const_data_ptr<float>();
  const float* sum = state.row_sum.const_data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) lse[r] = sum[r] > 0.0f ? mx[r] + std::log(sum[r]) : kNegInf;
  out.copy_(state.result());
}

// Attention of some rows over one part of their keys: the normalised output and each row's log-sum-exp
// (-inf for a row that saw no key of the part).
struct Partial {
  at::Tensor out;  // [H, M, d], input dtype, contiguous
  at::Tensor lse;  // [H, M] fp32, contiguous
};

// The context keys [begin, end) of kv heads q [H, M, d], k and v [H, S, d], through flash attention.
Partial flash_context(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t begin, int64_t end,
                      double scale) {
  auto [o, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
      q.unsqueeze(0), k.narrow(1, begin, end - begin).unsqueeze(0), v.narrow(1, begin, end - begin).unsqueeze(0),
      0.0, false, std::nullopt, scale);
  return {o[0].contiguous(), lse[0].contiguous()};
}

// The context keys [begin, end) of kv heads q [H, M, d], k and v [H, S, d], one head at a time on the
// blocked path; with bias [T, n + 1] defined, also the tree slots 0..n at ctx..ctx + n.
Partial blocked_part(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                     int64_t begin, int64_t end, int64_t ctx, int64_t n, double scale) {
  Partial part{at::empty_like(q), at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat))};
  for (int64_t h = 0; h < q.size(0); ++h)
    attend_group(q[h], k[h], v[h], bias, begin, end, ctx, n, scale, part.out[h], part.lse[h].data_ptr<float>());
  return part;
}

// The tree slots 0..n (at ctx..ctx + n) under mask [1, 1, M, n + 1] (0 / -inf, input dtype), through flash
// attention. Flash attention gives a row that sees no key zeros and a log-sum-exp of 0: such rows get -inf.
Partial flash_tree(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                   const std::vector<uint8_t>& sees_tree, int64_t ctx, int64_t n, double scale) {
  auto [o, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
      q.unsqueeze(0), k.narrow(1, ctx, n + 1).unsqueeze(0), v.narrow(1, ctx, n + 1).unsqueeze(0), 0.0, false,
      mask, scale);
  Partial part{o[0].contiguous(), lse[0].contiguous()};
  float* pl = part.lse.data_ptr<float>();
  const int64_t M = static_cast<int64_t>(sees_tree.size());
  for (int64_t r = 0; r < part.lse.numel(); ++r)
    if (!sees_tree[r % M]) pl[r] = kNegInf;
  return part;
}

// The tree slots the M rows of one kv head see, folded in one by one (the sparse tree): a row of a draft
// tree sees its ancestors only, a handful of slots, so this costs a sliver of a dense [M, n + 1] block.
template <typename scalar_t>
struct TreeSlots {
  const scalar_t* q;     // [M, d]: the rows
  const float* k;        // [n + 1, d]: the slots' keys and values in fp32
  const float* v;
  const int32_t* mask;   // [T, W]: row i of the tree's packed ancestor bits (row r of q is tree row r % T)
  int64_t T, W, n;
  float scale;
};

// Combines partial outputs over disjoint parts of the keys by their log-sum-exps, in fp32, and with tree
// not null the tree slots each row sees: for each of the M rows, out = (sum_p o_p e^(lse_p - m) +
// sum_j v_j e^(l_j - m)) / (sum_p e^(lse_p - m) + sum_j e^(l_j - m)), l_j the logits of the seen slots
// and m the largest of all; zeros for a row that saw no key. A part of weight 0 is skipped, whatever
// its output holds. Plain loops (as ATen ops these would be a handful of parallel regions of their own),
// written so that the compiler vectorises them: the dot products with 16 independent partial sums.
template <typename scalar_t>
[[gnu::always_inline]] inline void merge_rows_body(const std::vector<const scalar_t*>& outs,
                                                   const std::vector<const float*>& lses, int64_t M, int64_t d,
                                                   const TreeSlots<scalar_t>* tree, scalar_t* out) {
  const size_t P = outs.size();
  std::vector<float> acc(d), qf(d), logits;
  std::vector<int64_t> seen;
  if (tree != nullptr) {
    logits.resize(tree->n + 1);
    seen.resize(tree->n + 1);
  }
  for (int64_t r = 0; r < M; ++r) {
    float m = kNegInf;
    for (size_t p = 0; p < P; ++p) m = std::max(m, lses[p][r]);
    int64_t count = 0;
    if (tree != nullptr) {
      const int32_t* bits = tree->mask + (r % tree->T) * tree->W;
      const scalar_t* qr = tree->q + r * d;
      for (int64_t c = 0; c < d; ++c) qf[c] = static_cast<float>(qr[c]);
      for (int64_t w = 0; w * 32 <= tree->n; ++w) {
        for (uint32_t word = static_cast<uint32_t>(bits[w]); word != 0; word &= word - 1) {
          const int64_t j = w * 32 + std::countr_zero(word);
          if (j > tree->n) break;
          const float* kr = tree->k + j * d;
          float part[16] = {};
          int64_t c = 0;
          for (; c + 16 <= d; c += 16)
            for (int u = 0; u < 16; ++u) part[u] += qf[c + u] * kr[c + u];
          for (; c < d; ++c) part[0] += qf[c] * kr[c];
          float sum = 0.0f;
          for (int u = 0; u < 16; ++u) sum += part[u];
          logits[count] = sum * tree->scale;
          m = std::max(m, logits[count]);
          seen[count++] = j;
        }
      }
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    float total = 0.0f;
    if (m != kNegInf) {
      for (size_t p = 0; p < P; ++p) {
        const float w = std::exp(lses[p][r] - m);
        if (w == 0.0f) continue;
        total += w;
        const scalar_t* o = outs[p] + r * d;
        for (int64_t c = 0; c < d; ++c) acc[c] += static_cast<float>(o[c]) * w;
      }
      for (int64_t t = 0; t < count; ++t) {
        const float w = std::exp(logits[t] - m);
        total += w;
        const float* vr = tree->v + seen[t] * d;
        for (int64_t c = 0; c < d; ++c) acc[c] += vr[c] * w;
      }
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int64_t c = 0; c < d; ++c) out[r * d + c] = static_cast<scalar_t>(acc[c] * inv);
  }
}

// merge_rows_body compiled for AVX-512 and for AVX2 + FMA (chosen at run time; the build targets plain
// x86-64), and as is. (AVX-512 folds a draft tree about 12% faster than AVX2 here.)
#if defined(__GNUC__) && defined(__x86_64__)
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void merge_rows_avx2(const std::vector<const scalar_t*>& outs,
                                                         const std::vector<const float*>& lses, int64_t M,
                                                         int64_t d, const TreeSlots<scalar_t>* tree, scalar_t* out) {
  merge_rows_body<scalar_t>(outs, lses, M, d, tree, out);
}

template <typename scalar_t>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void merge_rows_avx512(
    const std::vector<const scalar_t*>& outs, const std::vector<const float*>& lses, int64_t M, int64_t d,
    const TreeSlots<scalar_t>* tree, scalar_t* out) {
  merge_rows_body<scalar_t>(outs, lses, M, d, tree, out);
}
#endif

template <typename scalar_t>
void merge_rows(const std::vector<const scalar_t*>& outs, const std::vector<const float*>& lses, int64_t M, int64_t d,
                const TreeSlots<scalar_t>* tree, scalar_t* out) {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (has_avx512) return merge_rows_avx512<scalar_t>(outs, lses, M, d, tree, out);
  if (has_avx2) return merge_rows_avx2<scalar_t>(outs, lses, M, d, tree, out);
#endif
  merge_rows_body<scalar_t>(outs, lses, M, d, tree, out);
}

// One request's inputs and its tree, as the units of work read them.
struct Request {
  at::Tensor q, k, v;       // [Hkv, M, d], [Hkv, S, d], [Hkv, S, d]
  at::Tensor bias;          // [T, n + 1] fp32, 0 / -inf
  at::Tensor flash_mask;    // [1, 1, M, n + 1] input dtype, when the tree is dense and flash attention takes it
  std::vector<uint8_t> sees_tree;  // [M]: whether row r sees any tree slot
  const int32_t* mask;      // [T, W] packed bits
  int64_t ctx, n;
  bool sparse;
};

// The end of kv heads [h0, h0 + H) of one request: merges their context partials (each [H, M, d] / [H, M])
// and the tree into out [H, M, d]. A sparse tree's seen slots are folded in (TreeSlots); a dense one is one
// more partial under the mask (through flash attention, or the blocked path when flash is false).
void finish(const Request& req, int64_t h0, int64_t H, std::vector<Partial> parts, int64_t T, int64_t W,
            bool flash, double scale, const at::Tensor& out) {
  const at::Tensor q = req.q.narrow(0, h0, H), k = req.k.narrow(0, h0, H), v = req.v.narrow(0, h0, H);
  if (!req.sparse) {
    parts.push_back(flash ? flash_tree(q, k, v, req.flash_mask, req.sees_tree, req.ctx, req.n, scale)
                          : blocked_part(q, k, v, req.bias, req.ctx, req.ctx, req.ctx, req.n, scale));
  }
  const int64_t M = q.size(1), d = q.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "tree_attention_merge", [&] {
    std::vector<float> kf, vf;
    if (req.sparse) {
      kf.resize((req.n + 1) * d);
      vf.resize((req.n + 1) * d);
    }
    for (int64_t h = 0; h < H; ++h) {
      std::vector<const scalar_t*> outs;
      std::vector<const float*> lses;
      for (const Partial& p : parts) {
        outs.push_back(p.out.const_data_ptr<scalar_t>() + h * M * d);
        lses.push_back(p.lse.const_data_ptr<float>() + h * M);
      }
      if (!req.sparse) {
        merge_rows<scalar_t>(outs, lses, M, d, nullptr, out.data_ptr<scalar_t>() + h * M * d);
        continue;
      }
      const scalar_t* pk = k[h].const_data_ptr<scalar_t>() + req.ctx * d;  // k[h] is a contiguous row block
      const scalar_t* pv = v[h].const_data_ptr<scalar_t>() + req.ctx * d;
      for (int64_t i = 0; i < (req.n + 1) * d; ++i) {
        kf[i] = static_cast<float>(pk[i]);
        vf[i] = static_cast<float>(pv[i]);
      }
      const TreeSlots<scalar_t> tree{q[h].const_data_ptr<scalar_t>(), kf.data(), vf.data(), req.mask, T, W, req.n,
                                     static_cast<float>(scale)};
      merge_rows<scalar_t>(outs, lses, M, d, &tree, out.data_ptr<scalar_t>() + h * M * d);
    }
  });
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
  int64_t max_keys = 0, max_ctx = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(ctx[b] >= 0, op, ": context_lens[", b, "] = ", ctx[b], " must be non-negative");
    TORCH_CHECK(ctx[b] + T <= S, op, ": context_lens[", b, "] = ", ctx[b],
                " does not fit the cache: context_len + tree slots (", T, ") exceeds k_cache.size(2) (", S,
                ")");
    TORCH_CHECK(nn[b] >= 0 && nn[b] <= T - 1, op, ": num_nodes[", b, "] = ", nn[b],
                " must be in [0, tree slots - 1] = [0, ", T - 1, "]");
    max_keys = std::max<int64_t>(max_keys, ctx[b] + nn[b] + 1);
    max_ctx = std::max<int64_t>(max_ctx, ctx[b]);
  }

  at::Tensor out = at::empty_like(q);
  const int64_t G = Hq / Hkv, M = G * T;
  // Row block kvh of q / out: the G query heads of kv head kvh, contiguous as [G * T, d].
  const at::Tensor q_rows = q.view({B, Hkv, M, d}), out_rows = out.view({B, Hkv, M, d});
  const int64_t task_macs = std::max<int64_t>(1, 2 * M * max_keys * d);
  const bool large = B * Hkv * task_macs >= kFlashMacs;
  // The context on the blocked path for small calls, and for fp32/fp16 with many rows per kv head and a
  // context several times longer than that (measured on a 2-core AVX-512 machine, one thread per unit);
  // otherwise through flash attention.
  const bool flash = large && !(q.scalar_type() != at::kBFloat16 && M >= kFlashMaxRows && max_keys >= 4 * M);

  std::vector<Request> requests(B);
  for (int64_t b = 0; b < B; ++b) {
    Request& req = requests[b];
    req.q = q_rows[b];
    req.k = k_cache[b];
    req.v = v_cache[b];
    req.mask = tree_mask.data_ptr<int32_t>() + b * T * W;
    req.ctx = ctx[b];
    req.n = nn[b];
    int64_t seen = 0;  // tree slots seen, over all T rows
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j <= req.n; ++j) seen += (static_cast<uint32_t>(req.mask[i * W + j / 32]) >> (j % 32)) & 1u;
    req.sparse = seen <= kSparseSlots * T;
    if (req.sparse) continue;
    req.bias = tree_bias(req.mask, T, W, req.n);
    req.sees_tree.resize(M);
    const float* pb = req.bias.const_data_ptr<float>();
    for (int64_t i = 0; i < T; ++i) {
      const bool any = std::any_of(pb + i * (req.n + 1), pb + (i + 1) * (req.n + 1), [](float x) { return x == 0.0f; });
      for (int64_t g = 0; g < G; ++g) req.sees_tree[g * T + i] = any;
    }
    if (flash) req.flash_mask = req.bias.repeat({G, 1}).to(q.scalar_type()).view({1, 1, M, req.n + 1});
  }

  // Units of work, each on one thread (flash attention, torch's BLAS and ATen ops run serially inside a
  // parallel region). Unit (b, c, h) is kv head h of request b over part c of its context; parts = 1
  // unless the request x kv head count does not divide evenly among the threads. A thread's consecutive
  // kv heads of one (b, c) go to flash attention as one call.
  const int64_t threads = large ? at::get_num_threads() : 1;
  const int64_t parts = std::max<int64_t>(1, std::min(threads / std::gcd(B * Hkv, threads), max_ctx / kMinPart));
  // With several parts, unit (b, c, h) leaves its partial in part_out[b, c, h] / part_lse[b, c, h]; the
  // parts and the tree are merged after the parallel region.
  at::Tensor part_out, part_lse;
  if (parts > 1) {
    part_out = at::empty({B, parts, Hkv, M, d}, q.options());
    part_lse = at::empty({B, parts, Hkv, M}, q.options().dtype(at::kFloat));
  }
  auto run = [&](int64_t b, int64_t c, int64_t h0, int64_t hc) {
    const Request& req = requests[b];
    const int64_t begin = req.ctx * c / parts, end = req.ctx * (c + 1) / parts;
    const at::Tensor qh = req.q.narrow(0, h0, hc), kh = req.k.narrow(0, h0, hc), vh = req.v.narrow(0, h0, hc);
    std::vector<Partial> found;
    if (end > begin || parts > 1) {
      found.push_back(flash && end > begin ? flash_context(qh, kh, vh, begin, end, scale)
                                           : blocked_part(qh, kh, vh, at::Tensor(), begin, end, req.ctx, req.n, scale));
    }
    if (parts == 1) {
      finish(req, h0, hc, std::move(found), T, W, flash, scale, out_rows[b].narrow(0, h0, hc));
      return;
    }
    part_out[b][c].narrow(0, h0, hc).copy_(found.front().out);
    part_lse[b][c].narrow(0, h0, hc).copy_(found.front().lse);
  };
  auto run_units = [&](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi;) {
      const int64_t bc = u / Hkv, h0 = u % Hkv, hc = std::min(hi - u, Hkv - h0);
      run(bc / parts, bc % parts, h0, hc);
      u += hc;
    }
  };
  if (large) {
    at::parallel_for(0, B * parts * Hkv, 1, run_units);
  } else {
    c10::ParallelGuard serial(true);  // small: every op inside runs on the calling thread
    run_units(0, B * Hkv);
  }
  if (parts > 1) {
    for (int64_t b = 0; b < B; ++b) {
      std::vector<Partial> found;
      for (int64_t c = 0; c < parts; ++c) found.push_back({part_out[b][c], part_lse[b][c]});
      finish(requests[b], 0, Hkv, std::move(found), T, W, flash, scale, out_rows[b]);
    }
  }
  return out;
}

}  // namespace ddtree::cpu
