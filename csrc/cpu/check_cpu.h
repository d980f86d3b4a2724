// Checks shared by the CPU kernels. validate.cpp checks that the arguments of an op share one device;
// these kernels additionally need that device to be the CPU, and say which argument is not.
#pragma once

#include <ATen/core/Tensor.h>

namespace ddtree::cpu {

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel, got ",
              t.device());
}

// The values compact_kv and paged_compact_kv need before they touch a cache (contiguous [B] and [B, A]
// arrays): non-negative context lengths, accept_len in [0, A], non-negative accepted slots.
inline void check_accept_values(const char* op, int64_t B, int64_t A, const int64_t* ctx, const int64_t* slots,
                                const int32_t* alen) {
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(ctx[b] >= 0, op, ": context_lens[", b, "] = ", ctx[b], " must be non-negative");
    TORCH_CHECK(alen[b] >= 0 && alen[b] <= A, op, ": accept_len[", b, "] = ", alen[b],
                " must be in [0, accepted_slots.size(1)] = [0, ", A, "]");
    for (int64_t i = 0; i < alen[b]; ++i) {
      TORCH_CHECK(slots[b * A + i] >= 0, op, ": accepted_slots[", b, ", ", i, "] = ", slots[b * A + i],
                  " must be non-negative");
    }
  }
}

}  // namespace ddtree::cpu
