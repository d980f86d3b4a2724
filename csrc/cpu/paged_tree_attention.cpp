// CPU paged_tree_attention: tree_attention over a paged cache (ops.h: [num_blocks, block_size, Hkv, d],
// position p of request b in block block_table[b, p / block_size] at offset p % block_size).
//
// The oracle gathers, per request, the rows of positions [0, ctx + T) from their blocks into a dense
// [1, Hkv, ctx + T, d] cache and runs the dense CPU kernel on it, so both ops share one attention
// (never a dense [T, S] mask). Positions past ctx + num_nodes are never read by that kernel; their
// rows are gathered from block 0 and their table entries are not checked.
#include <ATen/ATen.h>

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

  at::Tensor out = at::empty(q.sizes(), q.options());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t S = ctx[b] + T, read = ctx[b] + nn[b] + 1;
    const at::Tensor pos = at::arange(S, block_table.options().dtype(at::kLong));
    at::Tensor block = block_table[b].to(at::kLong).index_select(0, at::floor_divide(pos, block_size));
    block.masked_fill_(pos >= read, 0);  // unread positions: any valid block
    const at::Tensor offset = at::remainder(pos, block_size);
    // [S, Hkv, d] -> [1, Hkv, S, d]
    const at::Tensor k = k_cache.index({block, offset}).permute({1, 0, 2}).unsqueeze(0);
    const at::Tensor v = v_cache.index({block, offset}).permute({1, 0, 2}).unsqueeze(0);
    const auto one = [b](const at::Tensor& t) { return t.narrow(0, b, 1); };
    out.narrow(0, b, 1).copy_(tree_attention(one(q), k, v, one(context_lens), one(tree_mask), one(num_nodes), scale));
  }
  return out;
}

}  // namespace ddtree::cpu
