// CPU paged_tree_attention: tree_attention over a paged cache (ops.h), read in place through the caches'
// strides, so a CPU engine's cache is never copied: vLLM's flash layout ([num_blocks, block_size, Hkv, d],
// the head dim contiguous) and its CPU backend's (CPU_ATTN: per (block, head) the keys transposed, position
// stride 1) alike.
//
// One unit of work per (request, kv head): its G = Hq / Hkv query heads stacked as R = G * T fp32 rows, so
// each key and value is read once for G heads; the visible positions [0, ctx + num_nodes] walked block by
// block: logits = rows @ keys [d, positions] (small_gemm.h; in place when the cache holds the keys so in
// fp32, as CPU_ATTN does, widened into scratch otherwise); the tree slots a row does not see set to -inf;
// one exact softmax per row in fp32; outputs += weights @ values [positions, d] over the context, and each
// tree slot's value added to the rows that see it only. A row that sees no key outputs zeros. Small calls (a batch-1 step of a small model) run on the calling thread: on a busy
// 2-core machine every parallel region waits for a descheduled thread.
// Only positions [0, ctx + num_nodes] are read, so only their blocks' table entries are checked.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "check_cpu.h"
#include "ops.h"
#include "small_gemm.h"

namespace ddtree::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kParallelMacs = 1 << 18;  // multiply-adds of a call from which a parallel region pays (~15 us)

// Element (block, offset, head, channel) of a cache, through its strides.
template <typename scalar_t>
struct Strided {
  const scalar_t* base;
  int64_t s0, s1, s2, s3;
  const scalar_t* row(int64_t block, int64_t offset, int64_t head) const {
    return base + block * s0 + offset * s1 + head * s2;
  }
};

template <typename scalar_t>
Strided<scalar_t> strided(const at::Tensor& t) {
  return {t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Scratch of one thread, sized for the largest unit it meets.
struct Scratch {
  std::vector<float> q, logits, keys, values, acc;
};

// One (request, kv head). q / out index (head, slot, channel) through their strides from the request's base.
template <typename scalar_t>
void attend_unit(const scalar_t* q, const int64_t qs[3], const Strided<scalar_t>& k, const Strided<scalar_t>& v,
                 const int32_t* blocks, const int32_t* mask, int64_t h, int64_t G, int64_t T, int64_t d,
                 int64_t W, int64_t block_size, int64_t ctx, int64_t n, float scale, scalar_t* out,
                 const int64_t os[3], Scratch& s) {
  const int64_t R = G * T, visible = ctx + n + 1;
  s.q.resize(R * d);
  s.logits.assign(R * visible, 0.0f);
  s.acc.assign(R * d, 0.0f);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < T; ++i) {
      const scalar_t* src = q + (h * G + g) * qs[0] + i * qs[1];
      float* dst = s.q.data() + (g * T + i) * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<float>(src[c * qs[2]]) * scale;
    }

  // Logits, block by block: kc[c * kstride + j] is channel c of position p0 + j.
  constexpr bool kF32 = std::is_same_v<scalar_t, float>;
  for (int64_t p0 = 0; p0 < visible; p0 += block_size) {
    const int64_t cnt = std::min(block_size, visible - p0), block = blocks[p0 / block_size];
    const scalar_t* kb = k.row(block, 0, h);
    const float* kc;
    int64_t kstride;
    if (kF32 && k.s1 == 1) {  // CPU_ATTN: the block's keys are already [d, positions] in fp32
      kc = reinterpret_cast<const float*>(kb);
      kstride = k.s3;
    } else {
      s.keys.resize(d * cnt);
      for (int64_t j = 0; j < cnt; ++j)
        for (int64_t c = 0; c < d; ++c) s.keys[c * cnt + j] = static_cast<float>(kb[j * k.s1 + c * k.s3]);
      kc = s.keys.data();
      kstride = cnt;
    }
    gemm_acc(s.logits.data() + p0, visible, s.q.data(), d, kc, kstride, R, cnt, d);
  }

  // The tree slots a row does not see, then one softmax per row (weights in place, 1 / sum in inv).
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j <= n; ++j)
      if (!((static_cast<uint32_t>(mask[i * W + j / 32]) >> (j % 32)) & 1u))
        for (int64_t g = 0; g < G; ++g) s.logits[(g * T + i) * visible + ctx + j] = kNegInf;
  std::vector<float> inv(R);
  for (int64_t r = 0; r < R; ++r) {
    float* l = s.logits.data() + r * visible;
    float m = kNegInf;
    for (int64_t p = 0; p < visible; ++p) m = std::max(m, l[p]);
    if (m == kNegInf) {  // sees no key: weights 0, output 0
      std::fill(l, l + visible, 0.0f);
      inv[r] = 0.0f;
      continue;
    }
    float sum = 0.0f;
    for (int64_t p = 0; p < visible; ++p) sum += (l[p] = std::exp(l[p] - m));
    inv[r] = 1.0f / sum;
  }

  // Values of the context, block by block: acc += weights[:, block] @ values of the block ([positions, d]).
  for (int64_t p0 = 0; p0 < ctx; p0 += block_size) {
    const int64_t cnt = std::min(block_size, ctx - p0);
    const scalar_t* vb = v.row(blocks[p0 / block_size], 0, h);
    const float* vc;
    int64_t vstride;
    if (kF32 && v.s3 == 1) {  // both layouts: a value row is d contiguous floats
      vc = reinterpret_cast<const float*>(vb);
      vstride = v.s1;
    } else {
      s.values.resize(cnt * d);
      for (int64_t j = 0; j < cnt; ++j)
        for (int64_t c = 0; c < d; ++c) s.values[j * d + c] = static_cast<float>(vb[j * v.s1 + c * v.s3]);
      vc = s.values.data();
      vstride = d;
    }
    gemm_acc(s.acc.data(), d, s.logits.data() + p0, visible, vc, vstride, R, d, cnt);
  }
  // The tree slots' values, each into the rows that see it only: a slot a row does not see is never read
  // for it (its value may be anything, even non-finite, and leave the row unchanged).
  s.values.resize(d);
  for (int64_t j = 0; j <= n; ++j) {
    const int64_t p = ctx + j;
    const scalar_t* vr = v.row(blocks[p / block_size], p % block_size, h);
    for (int64_t c = 0; c < d; ++c) s.values[c] = static_cast<float>(vr[c * v.s3]);
    for (int64_t i = 0; i < T; ++i) {
      if (!((static_cast<uint32_t>(mask[i * W + j / 32]) >> (j % 32)) & 1u)) continue;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = g * T + i;
        const float w = s.logits[r * visible + p];
        float* a = s.acc.data() + r * d;
        for (int64_t c = 0; c < d; ++c) a[c] += w * s.values[c];
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < T; ++i) {
      const int64_t r = g * T + i;
      scalar_t* dst = out + (h * G + g) * os[0] + i * os[1];
      for (int64_t c = 0; c < d; ++c) dst[c * os[2]] = static_cast<scalar_t>(s.acc[r * d + c] * inv[r]);
    }
}

}  // namespace

at::Tensor paged_tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_table_in, const at::Tensor& context_lens_in,
                                const at::Tensor& tree_mask, const at::Tensor& num_nodes_in, double scale) {
  const char* op = "paged_tree_attention";
  check_paged_tree_attention(q, k_cache, v_cache, block_table_in, context_lens_in, tree_mask, num_nodes_in, scale);
  check_cpu(op, "q", q);
  check_cpu(op, "k_cache", k_cache);
  check_cpu(op, "v_cache", v_cache);
  check_cpu(op, "block_table", block_table_in);
  check_cpu(op, "context_lens", context_lens_in);
  check_cpu(op, "tree_mask", tree_mask);
  check_cpu(op, "num_nodes", num_nodes_in);
  const at::Tensor block_table = block_table_in.contiguous(), context_lens = context_lens_in.contiguous();
  const at::Tensor num_nodes = num_nodes_in.contiguous(), mask = tree_mask.contiguous();

  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), d = q.size(3);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t max_blocks = block_table.size(1), span = max_blocks * block_size, W = mask.size(2);
  const int64_t* ctx = context_lens.const_data_ptr<int64_t>();
  const int32_t* nn = num_nodes.const_data_ptr<int32_t>();
  const int32_t* table = block_table.const_data_ptr<int32_t>();
  int64_t macs = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(ctx[b] >= 0, op, ": context_lens[", b, "] = ", ctx[b], " must be non-negative");
    TORCH_CHECK(ctx[b] + T <= span, op, ": context_lens[", b, "] = ", ctx[b],
                " does not fit the block table: context_len + tree slots (", T,
                ") exceeds block_table.size(1) * block_size (", span, ")");
    TORCH_CHECK(nn[b] >= 0 && nn[b] <= T - 1, op, ": num_nodes[", b, "] = ", nn[b],
                " must be in [0, tree slots - 1] = [0, ", T - 1, "]");
    const int64_t used_blocks = (ctx[b] + nn[b]) / block_size + 1;  // blocks of positions [0, ctx + num_nodes]
    for (int64_t i = 0; i < used_blocks; ++i) {
      const int32_t id = table[b * max_blocks + i];
      TORCH_CHECK(id >= 0 && id < num_blocks, op, ": block_table[", b, ", ", i, "] = ", id,
                  " is not a block of k_cache (num_blocks = ", num_blocks, ")");
    }
    macs += 2 * (ctx[b] + nn[b] + 1) * Hq * T * d;
  }

  // The output keeps q's layout (a [B, T, Hq, d] buffer seen as [B, Hq, T, d] stays one), so a caller's
  // transpose back is a plain copy.
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Preserve);
  const int64_t group = Hq / Hkv, units = B * Hkv;
  const float scale_f = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_tree_attention_cpu", [&] {
    const auto k = strided<scalar_t>(k_cache), v = strided<scalar_t>(v_cache);
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    const int64_t qs[3] = {q.stride(1), q.stride(2), q.stride(3)};
    const int64_t os[3] = {out.stride(1), out.stride(2), out.stride(3)};
    const int32_t* mp = mask.const_data_ptr<int32_t>();
    at::parallel_for(0, units, macs < kParallelMacs ? units + 1 : 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / Hkv, h = u % Hkv;
        attend_unit(qp + b * q.stride(0), qs, k, v, table + b * max_blocks, mp + b * T * W, h, group, T, d, W,
                    block_size, ctx[b], nn[b], scale_f, outp + b * out.stride(0), os, scratch);
      }
    });
  });
  return out;
}

}  // namespace ddtree::cpu
