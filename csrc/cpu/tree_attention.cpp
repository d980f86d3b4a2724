// CPU tree_attention: each tree slot attends to the committed context and to its own ancestors.
//
// Row i of request b sees cache positions [0, ctx) and ctx + j for every tree slot j <= num_nodes[b]
// whose bit is set in tree_mask[b, i] (ops.h). The oracle streams over exactly those keys, so it never
// builds a dense [T, S] mask: per row, pass 1 writes the fp32 logits scale * <q, k> of the visible
// keys into a scratch buffer and takes their max, pass 2 accumulates exp(logit - max) and the weighted
// values in fp32 (the oracle favours plain code over speed: O(T * (ctx + T) * d) per head; attend_head.h,
// shared with paged_tree_attention). A row that sees no key outputs zeros. GQA: query head h reads kv
// head h / (Hq / Hkv). Work is split over (request, query head) pairs with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "attend_head.h"
#include "check_cpu.h"
#include "ops.h"

namespace ddtree::cpu {

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
        const scalar_t* k = kp + kvh * S * d;
        const scalar_t* v = vp + kvh * S * d;
        attend_head(qp + bh * T * d, [&](int64_t p) { return k + p * d; }, [&](int64_t p) { return v + p * d; },
                    mp + b * T * W, T, d, W, ctx[b], nn[b], scale_f, op_ + bh * T * d);
      }
    });
  });
  return out;
}

}  // namespace ddtree::cpu
