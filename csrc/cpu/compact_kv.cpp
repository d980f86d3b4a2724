// CPU compact_kv: in place, in every cache [B, H, S, d], position ctx + i receives the entry at
// ctx + accepted_slots[b, i] for i < accept_len[b], as if every read happened before any write.
//
// Sources and destinations overlap arbitrarily (slot i may read a slot another i' writes), so each
// (cache, request) first gathers its accepted rows into a scratch buffer, then scatters them. Caches
// are only required to be contiguous in d (validate.cpp), so rows are addressed through the strides
// and copied as raw bytes: any dtype works, and the caches are written in place, never copied.
// Work is split over (cache, request) pairs with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "check_cpu.h"
#include "ops.h"

namespace ddtree::cpu {

void compact_kv(const std::vector<at::Tensor>& caches, const at::Tensor& context_lens_in,
                const at::Tensor& accepted_slots_in, const at::Tensor& accept_len_in) {
  const char* op = "compact_kv";
  check_compact_kv(caches, context_lens_in, accepted_slots_in, accept_len_in);
  check_cpu(op, "context_lens", context_lens_in);
  check_cpu(op, "accepted_slots", accepted_slots_in);
  check_cpu(op, "accept_len", accept_len_in);
  const at::Tensor context_lens = context_lens_in.contiguous();
  const at::Tensor accepted_slots = accepted_slots_in.contiguous(), accept_len = accept_len_in.contiguous();

  const int64_t B = accepted_slots.size(0), A = accepted_slots.size(1);
  const int64_t* ctx = context_lens.data_ptr<int64_t>();
  const int64_t* slots = accepted_slots.data_ptr<int64_t>();
  const int32_t* alen = accept_len.data_ptr<int32_t>();
  check_accept_values(op, B, A, ctx, slots, alen);
  for (size_t c = 0; c < caches.size(); ++c) {
    const int64_t S = caches[c].size(2);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(ctx[b] + alen[b] <= S, op, ": context_lens[", b, "] + accept_len[", b, "] = ",
                  ctx[b] + alen[b], " exceeds caches[", c, "].size(2) (", S, ")");
      for (int64_t i = 0; i < alen[b]; ++i) {
        TORCH_CHECK(ctx[b] + slots[b * A + i] < S, op, ": context_lens[", b, "] + accepted_slots[", b, ", ",
                    i, "] = ", ctx[b] + slots[b * A + i], " is outside caches[", c, "] (size(2) = ", S, ")");
      }
    }
  }

  const int64_t n_caches = static_cast<int64_t>(caches.size());
  at::parallel_for(0, n_caches * B, 1, [&](int64_t begin, int64_t end) {
    std::vector<char> scratch;
    for (int64_t cb = begin; cb < end; ++cb) {
      const at::Tensor& cache = caches[cb / B];
      const int64_t b = cb % B, a = alen[b];
      if (a == 0) continue;
      const int64_t H = cache.size(1), elem = cache.element_size();
      const int64_t row_bytes = cache.size(3) * elem;
      const int64_t sb = cache.stride(0) * elem, sh = cache.stride(1) * elem, ss = cache.stride(2) * elem;
      char* base = static_cast<char*>(cache.data_ptr()) + b * sb;
      scratch.resize(H * a * row_bytes);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < a; ++i)
          std::memcpy(scratch.data() + (h * a + i) * row_bytes,
                      base + h * sh + (ctx[b] + slots[b * A + i]) * ss, row_bytes);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < a; ++i)
          std::memcpy(base + h * sh + (ctx[b] + i) * ss, scratch.data() + (h * a + i) * row_bytes, row_bytes);
    }
  });
}

}  // namespace ddtree::cpu
