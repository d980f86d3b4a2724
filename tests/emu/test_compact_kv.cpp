// compact_kv_kernel under the emulator, launched as csrc/cuda/compact_kv.cu's host wrapper does (caches
// grouped by copy unit, at most kMaxCaches per launch, one 256-thread CTA per (cache, request, head)),
// against a port of csrc/cpu/compact_kv.cpp (gather every accepted row, then scatter). The caches are
// views carved out of one random-filled buffer (padded strides, heads-inner layout, K/V interleaved,
// misaligned bases), and the whole buffer is compared byte for byte, so a write outside the destination
// rows shows up too. What this test shares with test_paged_compact_kv.cpp is in compact_kv_cases.h.
#include "cuemu.h"
// clang-format off
#include "cuda/compact_kv_kernel.cuh"
#include "compact_kv_cases.h"
// clang-format on

#include <array>
#include <cstring>
#include <random>
#include <string>

using namespace emu_test::compact_kv;

// ---- the host wrapper (csrc/cuda/compact_kv.cu), ATen cut out; caches are views [B, H, S, d] ----
static Launches g_launched;
static void cuda_compact_kv(const std::vector<View>& caches, const int64_t* ctx, const int64_t* slots,
                            const int32_t* len, int64_t B, int64_t width) {
  if (caches.empty() || B == 0 || width == 0) return;
  const auto groups = group_by_unit<CacheDesc>(caches, [](const View& t) {
    if (t.row_bytes() > kStageBytes) {
      std::printf("test error: row of %ld bytes\n", (long)t.row_bytes());
      std::exit(2);
    }
    return CacheDesc{t.data, t.byte_stride(0), t.byte_stride(1), t.byte_stride(2), static_cast<int32_t>(t.size[1]),
                     static_cast<int32_t>(t.size[2]), static_cast<int32_t>(t.row_bytes()), 0};
  });
  Batch args{};
  args.context_lens = ctx;
  args.accepted_slots = slots;
  args.accept_len = len;
  args.B = static_cast<int32_t>(B);
  args.width = static_cast<int32_t>(width);
  launch_by_unit(
      groups, B, args,
      []<class U>(dim3 grid, const Batch& batch) { cuemu::launch(compact_kv_kernel<U>, grid, dim3(kThreads), 0, batch); },
      g_launched);
}

// ---- references ----
// csrc/cpu/compact_kv.cpp: per (cache, request), gather the H * a accepted rows, then scatter them.
static void ref_compact_kv(const std::vector<View>& caches, const int64_t* ctx, const int64_t* slots,
                           const int32_t* len, int64_t B, int64_t A) {
  std::vector<char> scratch;
  for (const View& c : caches) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t a = len[b];
      if (a == 0) continue;
      const int64_t H = c.size[1], rb = c.size[3] * c.es, sb = c.stride[0] * c.es, sh = c.stride[1] * c.es,
                    ss = c.stride[2] * c.es;
      char* base = c.data + b * sb;
      scratch.resize(H * a * rb);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < a; ++i)
          std::memcpy(scratch.data() + (h * a + i) * rb, base + h * sh + (ctx[b] + slots[b * A + i]) * ss, rb);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < a; ++i)
          std::memcpy(base + h * sh + (ctx[b] + i) * ss, scratch.data() + (h * a + i) * rb, rb);
    }
  }
}
// Invalid input (ops.h: unspecified result, never out of bounds). compact_kv.cu documents what its kernel
// does: a request whose context is outside [0, S) is skipped, accept_len is clamped to [0, width], and
// entries whose slot is negative or whose source or destination lands at or past S are skipped.
static void ref_skip_invalid(const std::vector<View>& caches, const int64_t* ctx, const int64_t* slots,
                             const int32_t* len, int64_t B, int64_t A) {
  for (const View& c : caches) {
    if (c.numel() == 0) continue;
    const int64_t H = c.size[1], S = c.size[2], rb = c.size[3] * c.es;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        if (ctx[b] < 0 || ctx[b] >= S) continue;
        const int64_t a = std::clamp<int64_t>(len[b], 0, A);
        char* base = c.data + b * c.stride[0] * c.es + h * c.stride[1] * c.es;
        auto row = [&](int64_t p) { return base + p * c.stride[2] * c.es; };
        auto ok = [&](int64_t i) {
          const int64_t s = slots[b * A + i];
          return s >= 0 && s != i && ctx[b] + s < S && ctx[b] + i < S;
        };
        std::vector<char> st(a * rb);
        for (int64_t i = 0; i < a; ++i)
          if (ok(i)) std::memcpy(&st[i * rb], row(ctx[b] + slots[b * A + i]), rb);
        for (int64_t i = 0; i < a; ++i)
          if (ok(i)) std::memcpy(row(ctx[b] + i), &st[i * rb], rb);
      }
  }
}

// ---- one call: caches carved out of one random buffer, the emulated op on it, the reference on a copy ----
struct Arena {
  int64_t used = 64;                               // 64 guard bytes before the first cache
  int64_t take(int64_t bytes, int64_t misalign) {  // 256-aligned + misalign, 64+ guard bytes after
    const int64_t off = (used + 255) / 256 * 256 + misalign;
    used = off + bytes + 64;
    return off;
  }
};
enum CacheLayout { kContig, kPadded, kHeadsInner, kInterleavedKV, kNumLayouts };
struct CacheSpec {
  int64_t H, S, d, es;
  int layout;
  int64_t misalign;
};
static const char* kLayoutName[] = {"contiguous", "padded", "heads-inner", "kv-interleaved"};

static SplitMix64 g_bytes;  // what the buffers start as

// Builds the caches (a K/V pair per spec), runs the emulated op and the reference, compares the buffers.
static void run_call(const char* what, int64_t B, const std::vector<CacheSpec>& specs, const std::vector<int64_t>& ctx,
                     const std::vector<int64_t>& slots, const std::vector<int32_t>& len, int64_t A, bool invalid,
                     Stats& st) {
  Arena ar;
  struct Placed {
    int64_t off;
    CacheSpec s;
    int which;
  };
  std::vector<Placed> placed;
  for (const CacheSpec& s : specs) {
    const int64_t row = s.d * s.es;
    switch (s.layout) {
      case kContig:
      case kHeadsInner:
        for (int w = 0; w < 2; ++w) placed.push_back({ar.take(B * s.H * s.S * row, s.misalign), s, w});
        break;
      case kPadded:  // [B, H, S + 3, d + 8] storage, the view [.., :S, :d]
        for (int w = 0; w < 2; ++w)
          placed.push_back({ar.take(B * s.H * (s.S + 3) * (s.d + 8) * s.es, s.misalign), s, w});
        break;
      case kInterleavedKV: {  // one [B, H, S, 2, d] buffer, K = [..., 0, :], V = [..., 1, :]
        const int64_t off = ar.take(B * s.H * s.S * 2 * row, s.misalign);
        placed.push_back({off, s, 0});
        placed.push_back({off, s, 1});
      } break;
    }
  }
  const int64_t bytes = ar.used + 65536;  // a tail guard larger than any out-of-range write could reach
  unsigned char* buf = static_cast<unsigned char*>(std::aligned_alloc(256, (bytes + 255) / 256 * 256));
  unsigned char* ref = static_cast<unsigned char*>(std::aligned_alloc(256, (bytes + 255) / 256 * 256));
  for (int64_t i = 0; i < bytes; i += 8) {
    const uint64_t r = g_bytes();
    std::memcpy(buf + i, &r, std::min<int64_t>(8, bytes - i));
  }
  std::memcpy(ref, buf, bytes);
  auto views_on = [&](unsigned char* base) {
    std::vector<View> v;
    for (const Placed& p : placed) {
      const CacheSpec& s = p.s;
      View t{reinterpret_cast<char*>(base + p.off), s.es, {B, s.H, s.S, s.d}, {s.H * s.S * s.d, s.S * s.d, s.d, 1}};
      if (s.layout == kPadded) {
        const int64_t dd = s.d + 8, SS = s.S + 3;
        t.stride[0] = s.H * SS * dd;
        t.stride[1] = SS * dd;
        t.stride[2] = dd;
      } else if (s.layout == kHeadsInner) {  // [B, S, H, d].permute(0, 2, 1, 3)
        t.stride[0] = s.S * s.H * s.d;
        t.stride[1] = s.d;
        t.stride[2] = s.H * s.d;
      } else if (s.layout == kInterleavedKV) {
        t.stride[0] = s.H * s.S * 2 * s.d;
        t.stride[1] = s.S * 2 * s.d;
        t.stride[2] = 2 * s.d;
        t.data += p.which * s.d * s.es;
      }
      v.push_back(t);
    }
    return v;
  };
  const std::vector<View> vb = views_on(buf), vr = views_on(ref);
  cuemu::set_case(std::string(what) + " call " + std::to_string(st.calls));
  cuda_compact_kv(vb, ctx.data(), slots.data(), len.data(), B, A);
  (invalid ? ref_skip_invalid : ref_compact_kv)(vr, ctx.data(), slots.data(), len.data(), B, A);
  ++st.calls;
  for (const View& v : vb) st.count_slices(v.size[0], v.size[1], v.row_bytes(), len);
  if (std::memcmp(buf, ref, bytes) != 0) {
    int64_t off = 0;
    while (buf[off] == ref[off]) ++off;
    std::string where = "outside every cache row";
    const char* p = reinterpret_cast<const char*>(buf + off);
    for (size_t i = 0; i < vb.size(); ++i) {
      const View& v = vb[i];
      for (int64_t b = 0; b < v.size[0]; ++b)
        for (int64_t h = 0; h < v.size[1]; ++h)
          for (int64_t q = 0; q < v.size[2]; ++q) {
            const char* r = v.data + (b * v.stride[0] + h * v.stride[1] + q * v.stride[2]) * v.es;
            if (p >= r && p < r + v.size[3] * v.es)
              where = "cache " + std::to_string(i) + " (" + kLayoutName[placed[i].s.layout] + ", es " +
                      std::to_string(v.es) + ", d " + std::to_string(v.size[3]) + ", unit " +
                      std::to_string(v.copy_unit()) + ") b " + std::to_string(b) + " h " + std::to_string(h) + " pos " +
                      std::to_string(q) + " byte " + std::to_string(p - r);
          }
    }
    if (st.bad < 5) {
      std::printf("  MISMATCH in %s call (B=%ld, width=%ld, %zu caches): first differing byte %ld: %s\n", what, (long)B,
                  (long)A, placed.size(), (long)off, where.c_str());
      print_requests(ctx, len, slots, B, A);
    }
    ++st.bad;
  }
  std::free(buf);
  std::free(ref);
}

// The smallest S for which the input is valid (ctx + accept_len <= S, ctx + every accepted slot < S).
static int64_t span(const std::vector<int64_t>& ctx, const std::vector<int64_t>& slots, const std::vector<int32_t>& len,
                    int64_t A) {
  int64_t need = 1;
  for (size_t b = 0; b < ctx.size(); ++b) {
    need = std::max(need, ctx[b] + len[b]);
    for (int64_t i = 0; i < len[b]; ++i) need = std::max(need, ctx[b] + slots[b * A + i] + 1);
  }
  return need;
}

int main() {
  std::mt19937 rng(5);
  auto rnd = [&](int64_t lo, int64_t hi) {
    return lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(hi - lo + 1));
  };
  Stats st;
  const int64_t kEs[] = {2, 2,
                         4};  // fp16, bf16, fp32 (the kernel moves bytes; the element size sets row bytes and units)

  // Accept paths: arbitrary slots (duplicates, backwards, permutations), root paths (strictly increasing
  // from 0, as accept_tree returns), s == i, and "s >= i" (what chunks need).
  auto make_slots = [&](int64_t a, int64_t maxslot, int kind, bool ge_i) {
    std::vector<int64_t> s(a);
    if (kind == 0)
      for (int64_t i = 0; i < a; ++i) s[i] = rnd(ge_i ? i : 0, std::max(maxslot, i));
    if (kind == 1) {
      int64_t c = 0;
      for (int64_t i = 0; i < a; ++i) {
        s[i] = c;
        c += rnd(1, std::max<int64_t>(1, (maxslot - c) / std::max<int64_t>(1, a - i)));
      }
    }
    if (kind == 2)
      for (int64_t i = 0; i < a; ++i) s[i] = ge_i ? i : a - 1 - i;  // identity / reversal
    if (kind == 3)
      for (int64_t i = 0; i < a; ++i) s[i] = ge_i ? i + rnd(0, 3) : (i + 1) % a;  // short hops / rotation
    if (kind == 4)
      for (int64_t i = 0; i < a; ++i)
        s[i] = ge_i ? std::max(i, rnd(0, maxslot)) : rnd(0, std::min<int64_t>(3, maxslot));  // duplicates
    return s;
  };

  // 1. Layers of K/V caches, fp16/bf16/fp32, d 64/128, B 1..4, H 1..8, arbitrary slots within the stage.
  for (int call = 0; call < 60; ++call) {
    const int64_t B = rnd(1, 4), L = rnd(1, 4);
    std::vector<CacheSpec> specs;
    int64_t max_row = 0;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t es = kEs[rng() % 3], d = rng() % 2 ? 64 : 128;
      const int layout = call < 16 ? kContig : static_cast<int>(rng() % kNumLayouts);
      const int64_t mis = call % 4 == 3 ? std::array<int64_t, 3>{es, 4, 8}[rng() % 3] : 0;
      specs.push_back({std::array<int64_t, 4>{1, 2, 4, 8}[rng() % 4], 0, d, es, layout, mis});
      max_row = std::max(max_row, d * es);
    }
    const int64_t A = rnd(1, kStageBytes / max_row), maxslot = rnd(A - 1, A + 40);
    std::vector<int64_t> ctx(B), slots(B * A, -7);
    std::vector<int32_t> len(B);
    for (int64_t b = 0; b < B; ++b) {
      ctx[b] = rnd(0, 60);
      len[b] = static_cast<int32_t>(rng() % 5 == 0 ? A : rnd(0, A));
      auto s = make_slots(len[b], maxslot, static_cast<int>(rng() % 5), false);
      std::copy(s.begin(), s.end(), slots.begin() + b * A);
    }
    for (auto& s : specs) s.S = span(ctx, slots, len, A) + rnd(0, 5);
    run_call("layers", B, specs, ctx, slots, len, A, false, st);
  }

  // 2. Paths longer than the 32 KiB stage (chunks in order), slots[i] >= i.
  for (int call = 0; call < 30; ++call) {
    const int64_t B = rnd(1, 3);
    std::vector<CacheSpec> specs;
    const int pick = call % 5;  // row bytes 512 (64 rows a chunk), 256 (128), 192 (170), 32768 (1), 128 (256)
    const int64_t d = std::array<int64_t, 5>{128, 128, 96, 8192, 64}[pick],
                  es = std::array<int64_t, 5>{4, 2, 2, 4, 2}[pick];
    const int64_t H = pick == 3 ? rnd(1, 2) : rnd(1, 4);
    for (int l = 0, nl = static_cast<int>(rnd(1, 2)); l < nl; ++l)
      specs.push_back({H, 0, d, es, static_cast<int>(rng() % kNumLayouts), 0});
    if (call % 2) specs.push_back({1, 0, 64, 2, kContig, 0});  // a small cache in the same launch
    const int64_t rows = kStageBytes / (d * es);
    const int64_t A = pick == 3 ? rnd(2, 6) : rnd(rows + 1, 3 * rows + 7), maxslot = A + rnd(0, 30);
    std::vector<int64_t> ctx(B), slots(B * A, -7);
    std::vector<int32_t> len(B);
    for (int64_t b = 0; b < B; ++b) {
      ctx[b] = rnd(0, 40);
      len[b] = static_cast<int32_t>(b == 0 ? A : rnd(0, A));
      auto s = make_slots(len[b], maxslot, static_cast<int>(rng() % 5), true);
      std::copy(s.begin(), s.end(), slots.begin() + b * A);
    }
    for (auto& s : specs) s.S = span(ctx, slots, len, A) + rnd(0, 3);
    run_call("chunked", B, specs, ctx, slots, len, A, false, st);
  }

  // Exactly one full stage (accept_len * row bytes = 32 KiB), reversed / rotated paths: still exact for any slots.
  for (int call = 0; call < 4; ++call) {
    const int64_t B = 2, A = call < 2 ? 64 : 128;
    std::vector<CacheSpec> specs = {{2, 0, 128, 2, kContig, 0}, {2, 0, 128, 2, kHeadsInner, 0}};
    if (A == 64) specs.push_back({2, 0, 128, 4, kInterleavedKV, 0});  // fp32 d = 128: 64 rows fill the stage
    std::vector<int64_t> ctx = {static_cast<int64_t>(call), 5}, slots(B * A);
    for (int64_t i = 0; i < A; ++i) {
      slots[i] = A - 1 - i;
      slots[A + i] = call % 2 ? (i + 1) % A : (i + A / 2) % A;
    }
    std::vector<int32_t> len = {static_cast<int32_t>(A), static_cast<int32_t>(A - call)};
    for (auto& s : specs) s.S = span(ctx, slots, len, A) + 2;
    run_call("full-stage", B, specs, ctx, slots, len, A, false, st);
  }

  // 3. More caches than one launch takes (kMaxCaches = 128), all copy units (16, 8, 4, 2, 1), an empty cache.
  for (int call = 0; call < 2; ++call) {
    const int64_t B = 2, A = 6;
    std::vector<CacheSpec> specs;
    for (int i = 0; i < 66; ++i) specs.push_back({1, 12, 64, 2, kContig, 0});  // 132 caches of unit 16: 2 launches
    specs.push_back({2, 12, 4, 2, kContig, 0});                                // 8-byte rows: unit 8
    specs.push_back({2, 12, 64, 4, kContig, 4});                               // base + 4: unit 4
    specs.push_back({2, 12, 3, 2, kHeadsInner, 0});                            // 6-byte rows: unit 2
    specs.push_back({2, 12, 5, 1, kContig, 0});                                // 1-byte elements, 5 per row: unit 1
    specs.push_back({2, 12, 7, 1, kInterleavedKV, 3});                         // unit 1
    specs.push_back({0, 12, 64, 2, kContig, 0});                               // H = 0: skipped
    std::vector<int64_t> ctx = {0, 3}, slots = {0, 2, 1, 5, 5, 4, 3, 0, 8, 1, 1, 2};
    std::vector<int32_t> len = {6, call ? 4 : 6};
    run_call("many-caches", B, specs, ctx, slots, len, A, false, st);
  }

  // 4. Invalid values: contexts outside [0, S), accept_len outside [0, width], negative slots, sources and
  //    destinations at or past S. Checked against the kernel's documented skipping, and nothing else moves.
  for (int call = 0; call < 40; ++call) {
    const int64_t B = 4, A = rnd(1, 20), S = 48;
    std::vector<CacheSpec> specs = {{2, S, 64, 2, static_cast<int>(rng() % kNumLayouts), 0},
                                    {1, S, 128, 4, kContig, 0}};
    std::vector<int64_t> ctx(B), slots(B * A);
    std::vector<int32_t> len(B);
    for (int64_t b = 0; b < B; ++b) {
      const int k = static_cast<int>(rng() % 6);
      ctx[b] = k == 0 ? -rnd(1, 5) : k == 1 ? S + rnd(0, 3) : k <= 3 ? S - rnd(1, 8) : rnd(0, 30);
      len[b] = static_cast<int32_t>(rng() % 5 == 0 ? -rnd(1, 3) : rng() % 4 == 0 ? A + rnd(1, 3) : rnd(0, A));
      const int64_t room = std::clamp<int64_t>(S - ctx[b], 1, S);  // sources ctx + s < S need s < room
      for (int64_t i = 0; i < A; ++i) {
        const unsigned p = rng() % 10;
        slots[b * A + i] = p < 2 ? -rnd(1, 100) : p < 4 ? room + rnd(0, 5) : rnd(0, room - 1);
      }
    }
    run_call("invalid", B, specs, ctx, slots, len, A, true, st);
  }

  // 5. Nothing to do: no caches, width 0.
  run_call("no-caches", 2, {}, {0, 0}, {0, 0}, {1, 1}, 1, false, st);
  run_call("width-0", 2, {{2, 8, 64, 2, kContig, 0}}, {0, 1}, {}, {0, 0}, 0, false, st);

  return finish("compact_kv", st, g_launched);
}
