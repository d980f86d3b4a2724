// CPU paged_tree_attention: tree_attention over a paged cache (ops.h: [num_blocks, block_size, Hkv, d],
// position p of request b in block block_table[b, p / block_size] at offset p % block_size).
//
// A plain two-pass softmax per (request, query head) (attend_head.h: the visible rows converted to fp32,
// then two passes over exactly the visible keys; never a dense [T, S] mask), reading position p's row from
// its block. It is the oracle of the CUDA kernel, not yet tuned like the dense CPU op (which tiles the
// context through torch's flash attention), so the two agree to the contract's tolerance, not bit for bit.
// Only positions [0, ctx + num_nodes] are read, so only their blocks' table entries are checked.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "attend_head.h"
#include "check_cpu.h"
#include "ops.h"

namespace ddtree::cpu {

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
  const at::Tensor num_nodes = num_nodes_in.contiguous();

  const int64_t B = q.size(0), T = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), max_blocks = block_table.size(1);
  const int64_t span = max_blocks * block_size;
  const int64_t* ctx = context_lens.data_ptr<int64_t>();
  const int32_t* nn = num_nodes.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
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
  }

  // Rows are addressed through the strides; only the head dim must be contiguous.
  const auto rows_ready = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor k = rows_ready(k_cache), v = rows_ready(v_cache), qc = q.contiguous(), mask = tree_mask.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  const int64_t Hq = q.size(1), d = q.size(3), Hkv = k.size(2), W = mask.size(2), group = Hq / Hkv;
  const float scale_f = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_tree_attention_cpu", [&] {
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const int32_t* mp = mask.data_ptr<int32_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / Hq, h = (bh % Hq) / group;
        const int32_t* blocks = table + b * max_blocks;
        // Position p of request b, kv head h: block blocks[p / block_size], offset p % block_size.
        const auto row = [&](const scalar_t* base, const at::Tensor& t) {
          return [=, s0 = t.stride(0), s1 = t.stride(1), s2 = t.stride(2)](int64_t p) {
            return base + blocks[p / block_size] * s0 + (p % block_size) * s1 + h * s2;
          };
        };
        attend_head(qp + bh * T * d, row(kp, k), row(vp, v), mp + b * T * W, T, d, W, ctx[b], nn[b], scale_f,
                    op_ + bh * T * d);
      }
    });
  });
  return out;
}

}  // namespace ddtree::cpu
