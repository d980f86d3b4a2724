// paged_compact_kv_kernel under the emulator, launched as csrc/cuda/paged_compact_kv.cu's host wrapper does
// (caches grouped by copy unit, at most kMaxCaches per launch, one CTA per (cache, request, head)),
// against a port of csrc/cpu/paged_compact_kv.cpp (per cache and request, gather every accepted row
// through the block table, then scatter). The paged caches [num_blocks, block_size, H, d] are views
// carved out of one random-filled buffer (contiguous, padded strides, vLLM's K/V pair of one
// [2, num_blocks, ...] allocation, misaligned bases); the block tables are random permutations with spare
// blocks; the whole buffer is compared byte for byte, so a write outside the destination rows shows up.
// What this test shares with test_compact_kv.cpp is in compact_kv_cases.h.
#include "cuemu.h"
// clang-format off
#include "cuda/paged_compact_kv_kernel.cuh"
#include "compact_kv_cases.h"
// clang-format on

#include <algorithm>
#include <array>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace emu_test::compact_kv;

struct Call {  // the op's other arguments
  std::vector<int32_t> table;  // [B, max_blocks]
  std::vector<int64_t> ctx, slots;
  std::vector<int32_t> len;
  int64_t B, max_blocks, block_size, A;
};

// ---- the host wrapper (csrc/cuda/paged_compact_kv.cu), ATen cut out; caches are views
// [num_blocks, block_size, H, d] ----
static Launches g_launched;
static void cuda_paged_compact_kv(const std::vector<View>& caches, const Call& c) {
  if (caches.empty() || c.B == 0 || c.A == 0) return;
  const auto groups = group_by_unit<PagedCacheDesc>(caches, [](const View& t) {
    return PagedCacheDesc{t.data, t.byte_stride(0), t.byte_stride(1), t.byte_stride(2), static_cast<int32_t>(t.size[2]),
                          static_cast<int32_t>(t.size[0]), static_cast<int32_t>(t.row_bytes()), 0};
  });
  PagedBatch args{};
  args.block_table = c.table.data();
  args.context_lens = c.ctx.data();
  args.accepted_slots = c.slots.data();
  args.accept_len = c.len.data();
  args.max_blocks = c.max_blocks;
  args.block_size = static_cast<int32_t>(c.block_size);
  args.B = static_cast<int32_t>(c.B);
  args.width = static_cast<int32_t>(c.A);
  launch_by_unit(
      groups, c.B, args,
      []<class U>(dim3 grid, const PagedBatch& batch) {
        cuemu::launch(paged_compact_kv_kernel<U>, grid, dim3(kThreads), 0, batch);
      },
      g_launched);
}

// ---- references ----
// Row of position p (every head: h * stride[2] on top) of request b, or nullptr where p or its block id
// is out of range (only invalid calls have such entries).
static char* row_of(const View& v, const Call& c, int64_t b, int64_t p) {
  if (p < 0 || p >= c.max_blocks * c.block_size) return nullptr;
  const int32_t id = c.table[b * c.max_blocks + p / c.block_size];
  if (id < 0 || id >= v.size[0]) return nullptr;
  return v.data + (id * v.stride[0] + (p % c.block_size) * v.stride[1]) * v.es;
}
// csrc/cpu/paged_compact_kv.cpp: per (cache, request), gather the a * H accepted rows, then scatter them.
static void ref_paged_compact_kv(const std::vector<View>& caches, const Call& c) {
  std::vector<char> scratch;
  for (const View& v : caches) {
    const int64_t H = v.size[2], rb = v.size[3] * v.es, sh = v.stride[2] * v.es;
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t a = c.len[b];
      scratch.resize(a * H * rb);
      for (int64_t i = 0; i < a; ++i)
        for (int64_t h = 0; h < H; ++h)
          std::memcpy(&scratch[(i * H + h) * rb], row_of(v, c, b, c.ctx[b] + c.slots[b * c.A + i]) + h * sh, rb);
      for (int64_t i = 0; i < a; ++i)
        for (int64_t h = 0; h < H; ++h) std::memcpy(row_of(v, c, b, c.ctx[b] + i) + h * sh, &scratch[(i * H + h) * rb], rb);
    }
  }
}
// Invalid input (ops.h: unspecified result, never out of bounds). paged_compact_kv_kernel.cuh documents
// what the kernel does: a request whose context is outside [0, span) is skipped, accept_len is clamped
// to [0, width], and a move whose source or destination position is outside [0, span) or has a block id
// outside [0, num_blocks) is skipped (as is s == i).
static void ref_skip_invalid(const std::vector<View>& caches, const Call& c) {
  const int64_t span = c.max_blocks * c.block_size;
  for (const View& v : caches) {
    if (v.numel() == 0) continue;
    const int64_t H = v.size[2], rb = v.size[3] * v.es, sh = v.stride[2] * v.es;
    for (int64_t b = 0; b < c.B; ++b) {
      if (c.ctx[b] < 0 || c.ctx[b] >= span) continue;
      const int64_t a = std::clamp<int64_t>(c.len[b], 0, c.A);
      const auto src = [&](int64_t i) {
        const int64_t s = c.slots[b * c.A + i];
        return s < 0 || s >= span ? nullptr : row_of(v, c, b, c.ctx[b] + s);
      };
      const auto ok = [&](int64_t i) {
        return c.slots[b * c.A + i] != i && src(i) != nullptr && row_of(v, c, b, c.ctx[b] + i) != nullptr;
      };
      std::vector<char> st(a * H * rb);
      for (int64_t i = 0; i < a; ++i)
        if (ok(i))
          for (int64_t h = 0; h < H; ++h) std::memcpy(&st[(i * H + h) * rb], src(i) + h * sh, rb);
      for (int64_t i = 0; i < a; ++i)
        if (ok(i))
          for (int64_t h = 0; h < H; ++h) std::memcpy(row_of(v, c, b, c.ctx[b] + i) + h * sh, &st[(i * H + h) * rb], rb);
    }
  }
}

// ---- one call: caches carved out of one random buffer, the emulated op on it, the reference on a copy ----
enum CacheLayout { kContig, kPadded, kKvPair, kNumLayouts };
static const char* kLayoutName[] = {"contiguous", "padded", "kv-pair"};
struct CacheSpec {
  int64_t num_blocks, H, d, es;
  int layout;
  int64_t misalign;  // bytes added to the base (0 keeps it 256-aligned)
};

static SplitMix64 g_bytes;  // what the buffers start as

// Lays out the caches (a K/V pair per spec) in `buf`; returns their views. Byte sizes only: a dry run
// with buf = nullptr returns the buffer size needed in `bytes`.
static std::vector<View> place(char* buf, const std::vector<CacheSpec>& specs, int64_t block_size, int64_t& bytes) {
  std::vector<View> views;
  int64_t used = 64;  // guard bytes before the first cache
  for (const CacheSpec& s : specs) {
    const int64_t NB = s.num_blocks, H = s.H, d = s.d, es = s.es;
    int64_t stride[4] = {block_size * H * d, H * d, d, 1}, block_elems = NB * block_size * H * d;
    if (s.layout == kPadded) {  // [NB, block_size + 1, H, d + 8] storage, the view [:, :block_size, :, :d]
      stride[0] = (block_size + 1) * H * (d + 8), stride[1] = H * (d + 8), stride[2] = d + 8;
      block_elems = NB * stride[0];
    }
    const int64_t pairs = s.layout == kKvPair ? 1 : 2;  // a kv-pair is one [2, NB, ...] allocation
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t off = (used + 255) / 256 * 256 + s.misalign;
      const int64_t n = s.layout == kKvPair ? 2 : 1;
      used = off + n * block_elems * es + 64;  // 64 guard bytes after
      for (int64_t k = 0; k < n; ++k) {
        View v{buf ? buf + off + k * block_elems * es : nullptr, es, {NB, block_size, H, d}, {0, 0, 0, 1}};
        std::copy(stride, stride + 4, v.stride);
        views.push_back(v);
      }
    }
  }
  bytes = used;
  return views;
}

static void run_call(const char* what, const std::vector<CacheSpec>& specs, const Call& c, bool invalid, Stats& st) {
  int64_t bytes = 0;
  place(nullptr, specs, c.block_size, bytes);
  char* buf = static_cast<char*>(std::malloc(bytes));
  char* ref = static_cast<char*>(std::malloc(bytes));
  for (int64_t i = 0; i < bytes; ++i) buf[i] = static_cast<char>(g_bytes());
  std::memcpy(ref, buf, bytes);
  const std::vector<View> vb = place(buf, specs, c.block_size, bytes), vr = place(ref, specs, c.block_size, bytes);
  cuemu::set_case(std::string(what) + " call " + std::to_string(st.calls));
  cuda_paged_compact_kv(vb, c);
  (invalid ? ref_skip_invalid : ref_paged_compact_kv)(vr, c);
  ++st.calls;
  for (const View& v : vb) st.count_slices(c.B, v.size[2], v.row_bytes(), c.len);
  if (std::memcmp(buf, ref, bytes) != 0) {
    int64_t off = 0;
    while (buf[off] == ref[off]) ++off;
    if (st.bad < 5) {
      std::printf("  MISMATCH in %s call (B=%ld, width=%ld, block_size=%ld, %zu caches): first differing byte %ld\n",
                  what, (long)c.B, (long)c.A, (long)c.block_size, vb.size(), (long)off);
      std::printf("    layouts:");
      for (const CacheSpec& s : specs) std::printf(" %s", kLayoutName[s.layout]);
      std::printf("\n");
      print_requests(c.ctx, c.len, c.slots, c.B, c.A);
    }
    ++st.bad;
  }
  std::free(buf);
  std::free(ref);
}

int main() {
  std::mt19937 rng(8);
  auto rnd = [&](int64_t lo, int64_t hi) {
    return lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(hi - lo + 1));
  };
  Stats st;
  const int64_t kEs[] = {2, 2, 4};  // fp16, bf16, fp32 (the kernel moves bytes)
  const int64_t kBlockSizes[] = {1, 16, 32, 5};

  // Accept paths: arbitrary slots (duplicates, backwards, permutations), root paths (strictly increasing
  // from 0, as accept_tree returns), and "s >= i" (what chunks need).
  auto make_slots = [&](int64_t a, int64_t maxslot, int kind, bool ge_i) {
    std::vector<int64_t> s(a);
    for (int64_t i = 0; i < a; ++i) {
      if (kind == 0) s[i] = rnd(ge_i ? i : 0, std::max(maxslot, i));
      if (kind == 1) s[i] = i == 0 ? 0 : s[i - 1] + rnd(1, 3);
      if (kind == 2) s[i] = ge_i ? i : a - 1 - i;          // identity / reversal
      if (kind == 3) s[i] = ge_i ? i + rnd(0, 3) : (i + 1) % a;  // short hops / rotation
    }
    return s;
  };
  // A call whose table gives every request max_blocks distinct blocks out of num_blocks (spares unowned),
  // ragged contexts (0 included) and paths of up to A slots within `room` positions after the context
  // (exactly A for the first request when `first_full`).
  auto make_call = [&](int64_t B, int64_t A, int64_t block_size, int64_t room, bool ge_i, int64_t& num_blocks,
                       bool first_full = false) {
    Call c;
    c.B = B, c.A = A, c.block_size = block_size;
    c.ctx.resize(B);
    for (int64_t b = 0; b < B; ++b) c.ctx[b] = b == 0 ? 0 : rnd(0, 70);
    const int64_t need = *std::max_element(c.ctx.begin(), c.ctx.end()) + room + 2 * A + 3;
    c.max_blocks = (need + block_size - 1) / block_size + rnd(0, 2);
    num_blocks = B * c.max_blocks + rnd(0, 3);
    std::vector<int32_t> perm(num_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    c.table.assign(perm.begin(), perm.begin() + B * c.max_blocks);
    c.slots.assign(B * A, -7);
    c.len.resize(B);
    for (int64_t b = 0; b < B; ++b) {
      c.len[b] = static_cast<int32_t>((b == 0 && first_full) || rng() % 5 == 0 ? A : rnd(0, A));
      auto s = make_slots(c.len[b], room, static_cast<int>(rng() % 4), ge_i);
      std::copy(s.begin(), s.end(), c.slots.begin() + b * A);
    }
    return c;
  };

  // 1. Layers of K/V caches, fp16/bf16/fp32, d 64/128, block sizes 1/16/32/5, B 1..4, H 1..8, arbitrary
  //    slots within the stage; one cache may have more blocks than the table uses.
  for (int call = 0; call < 48; ++call) {
    const int64_t B = rnd(1, 4), L = rnd(1, 3), block_size = kBlockSizes[call % 4];
    int64_t max_row = 0;
    std::vector<std::array<int64_t, 5>> layer;  // H, d, es, layout, misalign
    for (int64_t l = 0; l < L; ++l) {
      const int64_t es = kEs[rng() % 3], d = rng() % 2 ? 64 : 128;
      const int64_t mis = call % 4 == 3 ? std::array<int64_t, 3>{es, 4, 8}[rng() % 3] : 0;
      layer.push_back({std::array<int64_t, 4>{1, 2, 4, 8}[rng() % 4], d, es, call < 8 ? kContig : rnd(0, 2), mis});
      max_row = std::max(max_row, d * es);
    }
    const int64_t A = rnd(1, std::min<int64_t>(24, kStageBytes / max_row));
    int64_t NB = 0;
    const Call c = make_call(B, A, block_size, A + 8, false, NB);
    std::vector<CacheSpec> specs;
    for (auto& [H, d, es, layout, mis] : layer)
      specs.push_back({NB + (rng() % 3 == 0 ? rnd(1, 4) : 0), H, d, es, static_cast<int>(layout), mis});
    run_call("layers", specs, c, false, st);
  }

  // 2. Paths longer than the 32 KiB stage (chunks in order), slots[i] >= i.
  for (int call = 0; call < 12; ++call) {
    const int64_t B = rnd(1, 3), block_size = kBlockSizes[call % 4];
    const int pick = call % 3;  // row bytes 512 (64 rows a chunk), 256 (128), 128 (256)
    const int64_t d = std::array<int64_t, 3>{128, 128, 64}[pick], es = std::array<int64_t, 3>{4, 2, 2}[pick];
    const int64_t rows = kStageBytes / (d * es), A = rnd(rows + 1, 2 * rows + 7);
    int64_t NB = 0;
    const Call c = make_call(B, A, block_size, A + 20, true, NB, true);
    run_call("chunked", {{NB, rnd(1, 2), d, es, static_cast<int>(rng() % kNumLayouts), 0}}, c, false, st);
  }

  // 3. More caches than one launch takes (kMaxCaches = 128), all copy units (16, 8, 4, 2, 1), an empty cache.
  for (int call = 0; call < 2; ++call) {
    int64_t NB = 0;
    const Call c = make_call(2, 6, 4, 8, false, NB);
    std::vector<CacheSpec> specs;
    for (int i = 0; i < 66; ++i) specs.push_back({NB, 1, 64, 2, kContig, 0});  // 132 caches of unit 16
    specs.push_back({NB, 2, 4, 2, kContig, 0});                                // 8-byte rows: unit 8
    specs.push_back({NB, 2, 64, 4, kContig, 4});                               // base + 4: unit 4
    specs.push_back({NB, 2, 3, 2, kPadded, 0});                                // 6-byte rows: unit 2
    specs.push_back({NB, 2, 5, 1, kContig, 0});                                // 5-byte rows: unit 1
    specs.push_back({NB, 0, 64, 2, kContig, 0});                               // H = 0: skipped
    run_call("many-caches", specs, c, false, st);
  }

  // 4. Invalid values: contexts outside [0, span), accept_len outside [0, width], negative slots, positions
  //    past the table, block ids outside [0, num_blocks). Checked against the kernel's documented skipping.
  for (int call = 0; call < 40; ++call) {
    const int64_t B = 4, A = rnd(1, 12), block_size = kBlockSizes[call % 4];
    int64_t NB = 0;
    Call c = make_call(B, A, block_size, A + 4, false, NB);
    const int64_t span = c.max_blocks * block_size;
    for (int64_t b = 0; b < B; ++b) {
      const int k = static_cast<int>(rng() % 6);
      c.ctx[b] = k == 0 ? -rnd(1, 5) : k == 1 ? span + rnd(0, 3) : k <= 3 ? span - rnd(1, 8) : rnd(0, 30);
      c.len[b] = static_cast<int32_t>(rng() % 5 == 0 ? -rnd(1, 3) : rng() % 4 == 0 ? A + rnd(1, 3) : rnd(0, A));
      for (int64_t i = 0; i < A; ++i) {
        const unsigned p = rng() % 10;
        c.slots[b * A + i] = p < 2 ? -rnd(1, 100) : p < 3 ? span + rnd(0, 5) : p < 4 ? (int64_t{1} << 62) : rnd(0, 2 * A);
      }
      for (int64_t j = 0; j < c.max_blocks; ++j)
        if (rng() % 4 == 0) c.table[b * c.max_blocks + j] = static_cast<int32_t>(rng() % 2 ? -rnd(1, 9) : NB + rnd(0, 9));
    }
    run_call("invalid", {{NB, 2, 64, 2, static_cast<int>(rng() % kNumLayouts), 0}, {NB, 1, 128, 4, kContig, 0}}, c, true,
             st);
  }

  // 5. Nothing to do: no caches, width 0.
  int64_t NB = 0;
  run_call("no-caches", {}, make_call(2, 1, 16, 4, false, NB), false, st);
  Call empty = make_call(2, 1, 16, 4, false, NB);
  empty.A = 0, empty.slots.clear(), empty.len.assign(2, 0);
  run_call("width-0", {{NB, 2, 64, 2, kContig, 0}}, empty, false, st);

  return finish("paged_compact_kv", st, g_launched);
}
