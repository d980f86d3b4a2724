// What the emulated tests of compact_kv and paged_compact_kv share: the cache view, the host wrappers'
// launches (caches grouped by copy unit, at most kMaxCaches per launch, one CTA per (cache, request,
// head)), the random bytes the caches start with, and the counts and mismatch report of the calls.
// Each test brings its own layouts, descriptors and reference. Include after cuemu.h and the kernel.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <vector>

namespace emu_test::compact_kv {

using namespace ddtree::cuda::compact;

struct View {  // an at::Tensor of 4 dims, contiguous in the last; es bytes an element, strides in elements
  char* data;
  int64_t es, size[4], stride[4];
  int64_t numel() const { return size[0] * size[1] * size[2] * size[3]; }
  int64_t row_bytes() const { return size[3] * es; }
  int64_t byte_stride(int dim) const { return stride[dim] * es; }
  int copy_unit() const {
    const int64_t byte_strides[3] = {byte_stride(0), byte_stride(1), byte_stride(2)};
    return ddtree::cuda::compact::copy_unit(data, byte_strides, row_bytes());
  }
};

// The launches the host wrappers made, in all and by copy unit (bytes).
struct Launches {
  int launches = 0, ctas = 0;
  std::map<int, int> by_unit;
};

// The host wrappers' grouping: every non-empty cache, as the kernel's descriptor desc(view), under its
// copy unit.
template <class Desc, class MakeDesc>
std::map<int, std::vector<Desc>> group_by_unit(const std::vector<View>& caches, MakeDesc desc) {
  std::map<int, std::vector<Desc>> groups;
  for (const View& t : caches)
    if (t.numel() != 0) groups[t.copy_unit()].push_back(desc(t));
  return groups;
}

// The host wrappers' launches, through the wrappers' own packing (launch_batches, with_unit_type in
// compact_kv_kernel.cuh): per copy unit, batches of at most kMaxCaches caches, cache i owning the B * H CTAs
// from its cta_begin; `args` holds the call's other arguments (no caches yet).
// launch.operator()<U>(grid, batch) launches the kernel that moves rows in units of type U.
template <class Desc, class Batch, class Launch>
void launch_by_unit(const std::map<int, std::vector<Desc>>& groups, int64_t B, const Batch& args, Launch&& launch,
                    Launches& n) {
  for (const auto& [unit, descs] : groups) {
    const bool fits = launch_batches(descs, args, B, [&](const Batch& batch, int64_t ctas) {
      const dim3 grid(static_cast<unsigned>(ctas));
      with_unit_type(unit, [&](auto u) { launch.template operator()<decltype(u)>(grid, batch); });
      ++n.launches;
      n.ctas += static_cast<int>(ctas);
      ++n.by_unit[unit];
    });
    if (!fits) {  // the wrappers raise here; no test case comes near 2^31 CTAs
      std::printf("launch_by_unit: too many (cache, request, head) triples\n");
      std::exit(1);
    }
  }
}

// SplitMix64: the bytes the caches start with, a stream of their own.
struct SplitMix64 {
  uint64_t state = 0x9E3779B97F4A7C15ull;
  uint64_t operator()() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
};

struct Stats {
  int calls = 0, slices = 0, chunked_slices = 0, bad = 0;
  // One cache's (request, head) slices of a call, and those whose accepted rows overflow the stage.
  void count_slices(int64_t B, int64_t H, int64_t row_bytes, const std::vector<int32_t>& len) {
    slices += static_cast<int>(B * H);
    for (int64_t b = 0; b < B; ++b) chunked_slices += len[b] * row_bytes > kStageBytes ? static_cast<int>(H) : 0;
  }
};

// The per-request arguments of a mismatching call: context, accept_len and the first 12 slots of each.
inline void print_requests(const std::vector<int64_t>& ctx, const std::vector<int32_t>& len,
                           const std::vector<int64_t>& slots, int64_t B, int64_t A) {
  for (int64_t b = 0; b < B; ++b) {
    std::printf("    b %ld: ctx %ld len %d slots", (long)b, (long)ctx[b], len[b]);
    for (int64_t i = 0; i < std::min<int64_t>(A, 12); ++i) std::printf(" %ld", (long)slots[b * A + i]);
    std::printf("%s\n", A > 12 ? " ..." : "");
  }
}

// The summary line; the exit status (1 if any call mismatched).
inline int finish(const char* op, const Stats& st, const Launches& n) {
  std::printf("%s: %d calls, %d launches (%d CTAs; by unit:", op, st.calls, n.launches, n.ctas);
  for (auto [u, k] : n.by_unit) std::printf(" %d B x%d", u, k);
  std::printf("), %d (cache, request, head) slices, %d of them chunked, %d mismatches\n", st.slices, st.chunked_slices,
              st.bad);
  return st.bad != 0;
}

}  // namespace emu_test::compact_kv
