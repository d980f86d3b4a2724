// CPU paged_compact_kv: compact_kv over paged caches (ops.h: [num_blocks, block_size, H, d], position p
// of request b in block block_table[b, p / block_size] at offset p % block_size), in place: position
// ctx + i receives the entry at ctx + accepted_slots[b, i] for i < accept_len[b], as if every read of a
// request happened before any of its writes.
//
// As in compact_kv.cpp, each (cache, request) gathers its accepted rows (every head) into a scratch
// buffer, then scatters them; rows are addressed through the strides and copied as raw bytes, so any
// dtype works and the caches are written in place. Any strides: a row whose head dim is not contiguous
// (vLLM CPU_ATTN's transposed keys, passed as a permuted view) is copied element by element. Work is split
// over (cache, request) pairs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "check_cpu.h"
#include "ops.h"

namespace ddtree::cpu {

constexpr int64_t kParallelRows = 4096;  // (cache, accepted position) pairs from which threads pay

void paged_compact_kv(const std::vector<at::Tensor>& caches, const at::Tensor& block_table_in,
                      const at::Tensor& context_lens_in, const at::Tensor& accepted_slots_in,
                      const at::Tensor& accept_len_in) {
  const char* op = "paged_compact_kv";
  check_paged_compact_kv(caches, block_table_in, context_lens_in, accepted_slots_in, accept_len_in);
  check_cpu(op, "block_table", block_table_in);
  check_cpu(op, "context_lens", context_lens_in);
  check_cpu(op, "accepted_slots", accepted_slots_in);
  check_cpu(op, "accept_len", accept_len_in);
  for (size_t c = 0; c < caches.size(); ++c) TORCH_CHECK(caches[c].device().is_cpu(), op, ": caches[", c,
                                                         "] must be a CPU tensor for the CPU kernel, got ",
                                                         caches[c].device());
  const at::Tensor block_table = block_table_in.contiguous(), context_lens = context_lens_in.contiguous();
  const at::Tensor accepted_slots = accepted_slots_in.contiguous(), accept_len = accept_len_in.contiguous();

  const int64_t B = accepted_slots.size(0), A = accepted_slots.size(1), max_blocks = block_table.size(1);
  const int64_t* ctx = context_lens.data_ptr<int64_t>();
  const int64_t* slots = accepted_slots.data_ptr<int64_t>();
  const int32_t* alen = accept_len.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  check_accept_values(op, B, A, ctx, slots, alen);
  if (caches.empty()) return;
  // One block size for every cache (validate.cpp), so the positions' table entries are checked once.
  const int64_t block_size = caches[0].size(1), span = max_blocks * block_size;
  int64_t num_blocks = caches[0].size(0);
  for (const at::Tensor& c : caches) num_blocks = std::min(num_blocks, c.size(0));
  // Position ctx + off, the `role` (source or destination) of accepted_slots[b, i], must have a block.
  const auto check_position = [&](int64_t b, int64_t i, int64_t off, const char* role) {
    const int64_t p = ctx[b] + off;
    TORCH_CHECK(off < span - ctx[b], op, ": position ", p, " (context_lens[", b, "] + ", off, ", the ", role,
                " of accepted_slots[", b, ", ", i, "]) is past the positions block_table addresses",
                " (block_table.size(1) * block_size = ", span, ")");
    const int32_t id = table[b * max_blocks + p / block_size];
    TORCH_CHECK(id >= 0 && id < num_blocks, op, ": block_table[", b, ", ", p / block_size, "] = ", id, " (position ",
                p, ", the ", role, " of accepted_slots[", b, ", ", i,
                "]) is not a block of every cache (smallest num_blocks = ", num_blocks, ")");
  };
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < alen[b]; ++i) {
      check_position(b, i, i, "destination");
      check_position(b, i, slots[b * A + i], "source");
    }
  }

  // A step's few accepted rows per request move on the calling thread (a parallel region costs more).
  int64_t rows = 0;
  for (int64_t b = 0; b < B; ++b) rows += alen[b];
  const int64_t n_caches = static_cast<int64_t>(caches.size());
  const int64_t grain = rows * n_caches < kParallelRows ? n_caches * B + 1 : 1;
  at::parallel_for(0, n_caches * B, grain, [&](int64_t begin, int64_t end) {
    std::vector<char> scratch;
    for (int64_t cb = begin; cb < end; ++cb) {
      const at::Tensor& cache = caches[cb / B];
      const int64_t b = cb % B, a = alen[b];
      if (a == 0 || cache.numel() == 0) continue;
      const int64_t H = cache.size(2), elem = cache.element_size();
      const int64_t d = cache.size(3), row_bytes = d * elem;
      const int64_t s_block = cache.stride(0) * elem, s_slot = cache.stride(1) * elem, s_head = cache.stride(2) * elem;
      const int64_t s_chan = cache.stride(3) * elem;
      // A cache row to (to_scratch) or from contiguous scratch; strided rows element by element, typed so
      // that each element is one load and one store.
      const auto strided_copy = [&](auto tag, char* row_ptr, char* packed, bool to_scratch) {
        using T = decltype(tag);
        T* p = reinterpret_cast<T*>(packed);
        for (int64_t c = 0; c < d; ++c) {
          T* r = reinterpret_cast<T*>(row_ptr + c * s_chan);
          to_scratch ? (void)(p[c] = *r) : (void)(*r = p[c]);
        }
      };
      const auto copy_row = [&](char* row_ptr, char* packed, bool to_scratch) {
        if (s_chan == elem) {
          to_scratch ? std::memcpy(packed, row_ptr, row_bytes) : std::memcpy(row_ptr, packed, row_bytes);
        } else if (elem == 2) {
          strided_copy(uint16_t{}, row_ptr, packed, to_scratch);
        } else if (elem == 4) {
          strided_copy(uint32_t{}, row_ptr, packed, to_scratch);
        } else if (elem == 8) {
          strided_copy(uint64_t{}, row_ptr, packed, to_scratch);
        } else {
          for (int64_t c = 0; c < d; ++c)
            to_scratch ? std::memcpy(packed + c * elem, row_ptr + c * s_chan, elem)
                       : std::memcpy(row_ptr + c * s_chan, packed + c * elem, elem);
        }
      };
      char* base = static_cast<char*>(cache.data_ptr());
      const auto row = [&](int64_t p) {
        return base + table[b * max_blocks + p / block_size] * s_block + (p % block_size) * s_slot;
      };
      scratch.resize(a * H * row_bytes);
      // A row already in place (slots[i] == i) is skipped: only row i writes position ctx + i, and every
      // read happens before any write, so copying it onto itself changes nothing.
      for (int64_t i = 0; i < a; ++i)
        if (slots[b * A + i] != i)
          for (int64_t h = 0; h < H; ++h)
            copy_row(row(ctx[b] + slots[b * A + i]) + h * s_head, scratch.data() + (i * H + h) * row_bytes, true);
      for (int64_t i = 0; i < a; ++i)
        if (slots[b * A + i] != i)
          for (int64_t h = 0; h < H; ++h)
            copy_row(row(ctx[b] + i) + h * s_head, scratch.data() + (i * H + h) * row_bytes, false);
    }
  });
}

}  // namespace ddtree::cpu
