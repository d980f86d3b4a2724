// Argument checks shared by the CPU and CUDA kernels. Every message starts with the op and names the
// argument, so a user sees which of their tensors is wrong. None of these reads tensor values.
#include <ATen/ATen.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "ops.h"

namespace ddtree {
namespace {

void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank) {
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must have ", rank, " dimensions, got shape ", t.sizes());
}

void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim, int64_t expected,
                const char* what) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, ".size(", dim, ") must equal ", what, " (",
              expected, "), got ", t.size(dim), " (shape ", t.sizes(), ")");
}

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Bytes of physical memory on this machine (0 if unknown). An output larger than this cannot be
// allocated; with overcommit the allocation itself may even succeed and the process be killed while
// the memory is filled, so such a size is refused before anything is allocated.
double host_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGE_SIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? static_cast<double>(pages) * static_cast<double>(page) : 0.0;
#else
  return 0.0;
#endif
}

// A per-request vector: rank 1, the given dtype, one entry per request (B = the size of batch_source).
void check_batch_vector(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t B,
                        const char* batch_source) {
  check_rank(op, name, t, 1);
  check_dtype(op, name, t, dtype);
  check_size(op, name, t, 0, B, batch_source);
}

}  // namespace

void check_topk_marginals(const at::Tensor& logits, int64_t k, double temperature) {
  const char* op = "topk_marginals";
  check_rank(op, "logits", logits, 3);
  TORCH_CHECK(is_float_type(logits.scalar_type()), op, ": logits must be float32, float16 or bfloat16, got ",
              logits.scalar_type());
  TORCH_CHECK(k >= 1, op, ": k must be at least 1, got ", k);
  TORCH_CHECK(k <= logits.size(2), op, ": k (", k, ") must not exceed the vocabulary size logits.size(2) (",
              logits.size(2), ")");
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), op,
              ": temperature must be positive and finite, got ", temperature);
}

budget::Mode check_build_tree(const at::Tensor& logprobs, const at::Tensor& token_ids,
                              const at::Tensor& root_tokens, const at::Tensor& context_lens, int64_t max_nodes,
                              const std::optional<at::Tensor>& verify_cost, double draft_cost,
                              c10::string_view budget_mode) {
  const char* op = "build_tree";
  budget::Mode mode;
  if (budget_mode == "request") {
    mode = budget::kRequest;
  } else if (budget_mode == "batch") {
    mode = budget::kBatch;
  } else if (budget_mode == "ragged") {
    mode = budget::kRagged;
  } else {
    TORCH_CHECK(false, op, ": budget_mode must be 'request', 'batch' or 'ragged', got '", budget_mode, "'");
  }
  check_rank(op, "logprobs", logprobs, 3);
  check_dtype(op, "logprobs", logprobs, at::kFloat);
  check_rank(op, "token_ids", token_ids, 3);
  check_dtype(op, "token_ids", token_ids, at::kLong);
  TORCH_CHECK(token_ids.sizes() == logprobs.sizes(), op, ": token_ids shape ", token_ids.sizes(),
              " must equal logprobs shape ", logprobs.sizes());
  const int64_t B = logprobs.size(0);
  TORCH_CHECK(logprobs.size(1) >= 1, op, ": logprobs must have at least one depth (size(1) >= 1)");
  TORCH_CHECK(logprobs.size(2) >= 1, op, ": logprobs must have at least one candidate (size(2) >= 1)");
  check_batch_vector(op, "root_tokens", root_tokens, at::kLong, B, "the batch size logprobs.size(0)");
  check_batch_vector(op, "context_lens", context_lens, at::kLong, B, "the batch size logprobs.size(0)");
  check_same_device(op, "token_ids", token_ids, logprobs, "logprobs");
  check_same_device(op, "root_tokens", root_tokens, logprobs, "logprobs");
  check_same_device(op, "context_lens", context_lens, logprobs, "logprobs");
  TORCH_CHECK(max_nodes >= 0, op, ": max_nodes must be non-negative, got ", max_nodes);
  // The outputs grow with max_nodes: six [B, N+1] arrays (28 bytes a slot) and the [B, N+1, W] ancestor
  // mask, quadratic in N. An output larger than this machine's memory is refused before any of it is
  // allocated (computed in double: the exact product can overflow int64). On a GPU, a smaller size that
  // still exceeds the device's memory gets the CUDA allocator's out-of-memory error, also before any write.
  TORCH_CHECK(max_nodes < std::numeric_limits<int32_t>::max(), op, ": max_nodes must be below 2^31 - 1, got ",
              max_nodes);
  const double slots = static_cast<double>(max_nodes) + 1.0;
  const double out_bytes = static_cast<double>(B) * slots * (28.0 + 4.0 * std::ceil(slots / 32.0));
  const double memory = host_memory_bytes();
  TORCH_CHECK(memory == 0.0 || out_bytes <= memory, op, ": max_nodes = ", max_nodes, " needs ",
              out_bytes / 1e9, " GB of outputs for ", B, " request(s) (the [B, max_nodes + 1, ceil((max_nodes + 1) / 32)] "
              "tree mask grows with max_nodes squared), more than this machine's ", memory / 1e9, " GB of memory");
  TORCH_CHECK(std::isfinite(draft_cost) && draft_cost >= 0.0, op,
              ": draft_cost must be finite and non-negative, got ", draft_cost);
  TORCH_CHECK(mode == budget::kRequest || verify_cost.has_value(), op, ": budget_mode '", budget_mode,
              "' prices the whole batch and needs verify_cost");
  if (verify_cost.has_value()) {
    const at::Tensor& c = *verify_cost;
    check_rank(op, "verify_cost", c, 2);
    check_dtype(op, "verify_cost", c, at::kFloat);
    if (mode == budget::kRequest) {
      check_size(op, "verify_cost", c, 0, B, "the batch size logprobs.size(0)");
    } else {
      check_size(op, "verify_cost", c, 0, 1, "1 for a batch budget mode");
    }
    // ragged prices the total number of nodes: B roots plus up to B * max_nodes nodes.
    const int64_t columns = mode == budget::kRagged ? B * max_nodes + 1 : max_nodes + 1;
    const char* what = mode == budget::kRagged ? "B * max_nodes + 1" : "max_nodes + 1";
    TORCH_CHECK(c.size(1) >= columns, op, ": verify_cost must have at least ", what, " (", columns,
                ") columns for budget_mode '", budget_mode, "', got ", c.size(1));
    check_same_device(op, "verify_cost", c, logprobs, "logprobs");
  }
  return mode;
}

namespace {

// The query side shared by tree_attention and paged_tree_attention: q [B, Hq, T, d] (float type),
// context_lens [B] i64, tree_mask [B, T, W] i32, num_nodes [B] i32, all on q's device, a finite scale.
void check_tree_query(const char* op, const at::Tensor& q, const at::Tensor& context_lens,
                      const at::Tensor& tree_mask, const at::Tensor& num_nodes, double scale) {
  check_rank(op, "q", q, 4);
  TORCH_CHECK(is_float_type(q.scalar_type()), op, ": q must be float32, float16 or bfloat16, got ",
              q.scalar_type());
  const int64_t B = q.size(0), T = q.size(2), d = q.size(3);
  TORCH_CHECK(T >= 1, op, ": q must have at least one tree slot (q.size(2) >= 1)");
  TORCH_CHECK(d >= 1, op, ": q must have a non-empty head dimension");
  check_batch_vector(op, "context_lens", context_lens, at::kLong, B, "the batch size q.size(0)");
  check_rank(op, "tree_mask", tree_mask, 3);
  check_dtype(op, "tree_mask", tree_mask, at::kInt);
  check_size(op, "tree_mask", tree_mask, 0, B, "the batch size q.size(0)");
  check_size(op, "tree_mask", tree_mask, 1, T, "the tree slots q.size(2)");
  check_size(op, "tree_mask", tree_mask, 2, mask_words(T), "ceil(tree slots / 32)");
  check_batch_vector(op, "num_nodes", num_nodes, at::kInt, B, "the batch size q.size(0)");
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"context_lens", &context_lens},
                         {"tree_mask", &tree_mask},
                         {"num_nodes", &num_nodes}}) {
    check_same_device(op, name, *t, q, "q");
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

// K and V caches: rank 4, q's dtype and device, one shape, head dim q.size(3), key/value heads in dim
// `head_dim` dividing the query heads.
void check_kv_caches(const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     int64_t head_dim) {
  check_rank(op, "k_cache", k_cache, 4);
  check_rank(op, "v_cache", v_cache, 4);
  check_dtype(op, "k_cache", k_cache, q.scalar_type());
  check_dtype(op, "v_cache", v_cache, q.scalar_type());
  check_size(op, "k_cache", k_cache, 3, q.size(3), "the head dim q.size(3)");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache shape ", v_cache.sizes(),
              " must equal k_cache shape ", k_cache.sizes());
  const int64_t Hq = q.size(1), Hkv = k_cache.size(head_dim);
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, ": the query heads q.size(1) (", Hq,
              ") must be a multiple of the key/value heads k_cache.size(", head_dim, ") (", Hkv, ")");
  check_same_device(op, "k_cache", k_cache, q, "q");
  check_same_device(op, "v_cache", v_cache, q, "q");
}

}  // namespace

void check_tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& context_lens, const at::Tensor& tree_mask,
                          const at::Tensor& num_nodes, double scale) {
  const char* op = "tree_attention";
  check_tree_query(op, q, context_lens, tree_mask, num_nodes, scale);
  check_kv_caches(op, q, k_cache, v_cache, 1);
  const int64_t T = q.size(2);
  check_size(op, "k_cache", k_cache, 0, q.size(0), "the batch size q.size(0)");
  TORCH_CHECK(k_cache.size(2) >= T, op, ": k_cache holds ", k_cache.size(2),
              " positions, fewer than the tree slots q.size(2) (", T, ")");
}

void check_paged_tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_table, const at::Tensor& context_lens,
                                const at::Tensor& tree_mask, const at::Tensor& num_nodes, double scale) {
  const char* op = "paged_tree_attention";
  check_tree_query(op, q, context_lens, tree_mask, num_nodes, scale);
  check_kv_caches(op, q, k_cache, v_cache, 2);
  TORCH_CHECK(k_cache.size(0) >= 1 && k_cache.size(1) >= 1, op,
              ": k_cache [num_blocks, block_size, Hkv, d] must have at least one block of at least one slot,",
              " got shape ", k_cache.sizes());
  check_rank(op, "block_table", block_table, 2);
  check_dtype(op, "block_table", block_table, at::kInt);
  check_size(op, "block_table", block_table, 0, q.size(0), "the batch size q.size(0)");
  check_same_device(op, "block_table", block_table, q, "q");
  const int64_t T = q.size(2), span = block_table.size(1) * k_cache.size(1);
  TORCH_CHECK(span >= T, op, ": block_table addresses ", span, " positions (block_table.size(1) * block_size ",
              k_cache.size(1), "), fewer than the tree slots q.size(2) (", T, ")");
}

void check_accept_tree(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& num_nodes,
                       const at::Tensor& target_tokens, int64_t max_depth) {
  const char* op = "accept_tree";
  check_rank(op, "tokens", tokens, 2);
  check_dtype(op, "tokens", tokens, at::kLong);
  const int64_t B = tokens.size(0), slots = tokens.size(1);
  TORCH_CHECK(slots >= 1, op, ": tokens must hold at least the root slot (size(1) >= 1)");
  check_rank(op, "parents", parents, 2);
  check_dtype(op, "parents", parents, at::kInt);
  TORCH_CHECK(parents.sizes() == tokens.sizes(), op, ": parents shape ", parents.sizes(),
              " must equal tokens shape ", tokens.sizes());
  check_batch_vector(op, "num_nodes", num_nodes, at::kInt, B, "the batch size tokens.size(0)");
  check_rank(op, "target_tokens", target_tokens, 2);
  check_dtype(op, "target_tokens", target_tokens, at::kLong);
  TORCH_CHECK(target_tokens.sizes() == tokens.sizes(), op, ": target_tokens shape ", target_tokens.sizes(),
              " must equal tokens shape ", tokens.sizes());
  check_same_device(op, "parents", parents, tokens, "tokens");
  check_same_device(op, "num_nodes", num_nodes, tokens, "tokens");
  check_same_device(op, "target_tokens", target_tokens, tokens, "tokens");
  (void)max_depth;  // any value is meaningful: < 0 means "as many columns as slots"
}

void check_compact_kv(const std::vector<at::Tensor>& caches, const at::Tensor& context_lens,
                      const at::Tensor& accepted_slots, const at::Tensor& accept_len) {
  const char* op = "compact_kv";
  check_rank(op, "accepted_slots", accepted_slots, 2);
  check_dtype(op, "accepted_slots", accepted_slots, at::kLong);
  const int64_t B = accepted_slots.size(0);
  check_batch_vector(op, "context_lens", context_lens, at::kLong, B, "the batch size accepted_slots.size(0)");
  check_batch_vector(op, "accept_len", accept_len, at::kInt, B, "the batch size accepted_slots.size(0)");
  check_same_device(op, "context_lens", context_lens, accepted_slots, "accepted_slots");
  check_same_device(op, "accept_len", accept_len, accepted_slots, "accepted_slots");
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& c = caches[i];
    TORCH_CHECK(c.dim() == 4, op, ": caches[", i, "] must have 4 dimensions [B, H, S, d], got shape ",
                c.sizes());
    TORCH_CHECK(c.size(0) == B, op, ": caches[", i, "].size(0) (", c.size(0),
                ") must equal the batch size accepted_slots.size(0) (", B, ")");
    TORCH_CHECK(c.device() == accepted_slots.device(), op, ": caches[", i, "] is on ", c.device(),
                " but accepted_slots is on ", accepted_slots.device());
    TORCH_CHECK(c.stride(3) == 1, op, ": caches[", i, "] must be contiguous in its last dimension");
  }
}

void check_paged_compact_kv(const std::vector<at::Tensor>& caches, const at::Tensor& block_table,
                            const at::Tensor& context_lens, const at::Tensor& accepted_slots,
                            const at::Tensor& accept_len) {
  const char* op = "paged_compact_kv";
  check_rank(op, "accepted_slots", accepted_slots, 2);
  check_dtype(op, "accepted_slots", accepted_slots, at::kLong);
  const int64_t B = accepted_slots.size(0);
  check_batch_vector(op, "context_lens", context_lens, at::kLong, B, "the batch size accepted_slots.size(0)");
  check_batch_vector(op, "accept_len", accept_len, at::kInt, B, "the batch size accepted_slots.size(0)");
  check_rank(op, "block_table", block_table, 2);
  check_dtype(op, "block_table", block_table, at::kInt);
  check_size(op, "block_table", block_table, 0, B, "the batch size accepted_slots.size(0)");
  check_same_device(op, "context_lens", context_lens, accepted_slots, "accepted_slots");
  check_same_device(op, "accept_len", accept_len, accepted_slots, "accepted_slots");
  check_same_device(op, "block_table", block_table, accepted_slots, "accepted_slots");
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& c = caches[i];
    TORCH_CHECK(c.dim() == 4, op, ": caches[", i, "] must have 4 dimensions [num_blocks, block_size, H, d], got shape ",
                c.sizes());
    TORCH_CHECK(c.size(1) == caches[0].size(1), op, ": caches[", i, "] has block size c.size(1) = ", c.size(1),
                " but caches[0] has ", caches[0].size(1), " (one block table serves every cache)");
    TORCH_CHECK(c.size(1) >= 1, op, ": caches[", i, "] must have a block size (size(1)) of at least 1");
    TORCH_CHECK(c.device() == accepted_slots.device(), op, ": caches[", i, "] is on ", c.device(),
                " but accepted_slots is on ", accepted_slots.device());
    // The CPU kernel reads any strides (vLLM CPU_ATTN's transposed keys); the CUDA one copies rows whole.
    TORCH_CHECK(c.is_cpu() || c.stride(3) == 1, op, ": caches[", i, "] must be contiguous in its last dimension",
                " on ", c.device());
  }
}

}  // namespace ddtree
