// cuemu: runs the source of the CUDA kernels (csrc/cuda/*_kernel.cuh) on the CPU, compiled by a host
// C++20 compiler, for the emulated-kernel tests in this directory. Test-only: nothing the package
// ships includes it.
//
// What it models
//   * A launch runs its blocks one after another. The threads of a block are fibers (stacks switched
//     by a few lines of x86-64 assembly) on one OS thread, so `__shared__` variables can be `static`;
//     dynamic shared memory is one buffer per launch. Both start every block filled with garbage
//     (0xA5), as shared memory is on hardware, except the static __shared__ variables of template
//     kernels (g++ ignores the section attribute that finds them there): those start zeroed and keep
//     the previous block's values.
//   * __syncthreads is a barrier over all threads of the block. A barrier that cannot complete fails
//     the test, naming the block and the threads: threads waiting at different __syncthreads (by
//     source line), a thread that exits while others wait at one, or one that reaches a barrier
//     after another thread of the block has exited.
//   * Warp collectives (__shfl*_sync, __ballot_sync, __any/__all_sync, __match_any_sync, __syncwarp,
//     ldmatrix, mma) wait until every lane named in the mask has posted its value, so partial masks
//     behave as on Volta and later. The caller must be in its mask, the lanes of one collective must
//     all call the same intrinsic, and a shuffle that reads a lane outside the mask fails.
//   * A scheduler pass in which no thread makes progress fails as a deadlock and lists what every
//     live thread waits on (barrier or collective, with its source line).
//   * CUEMU_SEED=<n> (n != 0): each pass visits the warps, and the lanes within a warp, in a seeded
//     random order, and each warp runs ahead as far as it can. A missing __syncthreads or __syncwarp
//     then shows up as a wrong result. Unset or 0: plain round robin.
//   * cp.async: a copy is pending until its group is committed and a wait_group 0 follows; it lands
//     only at that wait (the latest moment hardware allows), so reading the destination early sees
//     stale data, a wait without a commit lands nothing, and a thread that exits with copies in flight
//     fails. Source and destination must be 16-byte aligned; a zero-fill copy never reads its source.
//   * ldmatrix.x4(.trans) m8n8 b16 and mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate) exchange the
//     fragments across the warp with the layouts of the PTX ISA. Row addresses must be 16-byte aligned.
//   * Under AddressSanitizer the fiber switches are annotated, so out-of-bounds accesses to global
//     memory and to dynamic shared memory (an allocation of exactly the launch's size) are reported.
//
// What it does not model
//   * Races between blocks, and the memory ordering between threads of a block between two
//     synchronisation points: a thread runs from one wait to the next without interruption.
//   * Tensor-core accumulation order and rounding (the emulated mma sums exact fp32 products in k order,
//     then adds them to c), the GPU's libm (expf, exp2f, exp, log are glibc's), fast-math intrinsics.
//   * The fragment layouts follow the PTX documentation; they have not been checked against hardware.
//   * Resource limits: registers, the size of shared memory, occupancy, timing. It complements a run on
//     a GPU and never replaces one.
// x86-64 only (the fiber switch); g++ or clang++ with -std=c++20 -ffp-contract=off -fno-strict-aliasing.
#pragma once

#define CUEMU 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <new>
#include <random>
#include <source_location>
#include <string>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Every static __shared__ variable goes to one section, so that each block can start with it garbage.
#define __shared__ __attribute__((section("cuemu_shared"))) static
#define __launch_bounds__(...)
#define __grid_constant__

#if defined(__SANITIZE_ADDRESS__)
#define CUEMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUEMU_ASAN 1
#endif
#endif
#if defined(CUEMU_ASAN)
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
#endif

// The linker's bounds of the section (absent, so null, when no kernel has a static __shared__ variable).
extern "C" __attribute__((weak)) unsigned char __start_cuemu_shared[];
extern "C" __attribute__((weak)) unsigned char __stop_cuemu_shared[];

namespace cuemu {

using Site = std::source_location;

struct Pending {
  void* dst;
  const void* src;
  bool valid;
};

// What a thread waits for: a barrier generation to pass, its warp slot to be consumed (its previous
// collective still has readers), or every lane of its collective's mask to post.
enum class Wait : uint8_t { kRunning, kBarrier, kSlotFree, kLanes, kDone };

struct Thread {
  void* sp = nullptr;  // saved stack pointer while switched out
  void* stack = nullptr;
  void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping while the fiber is switched out
  uint3 tid{};
  Wait wait = Wait::kRunning;
  unsigned bar_gen = 0;   // kBarrier: the generation it arrived in
  unsigned mask = 0;      // kLanes: the collective's mask
  Site site{};            // where it waits
  const char* what = "";  // the intrinsic it waits in
  std::vector<Pending> uncommitted, committed;
};

// One per lane: the value a lane posted for the collective it is in.
struct Slot {
  alignas(16) unsigned char data[64];
  unsigned mask = 0;
  const char* what = nullptr;
  bool posted = false;
  int readers = 0;
};

inline constexpr size_t kStack = 512 * 1024;
inline std::vector<Thread> g_th;
inline void* g_sched_sp = nullptr;
inline const void* g_sched_stack = nullptr;
inline size_t g_sched_stack_size = 0;
inline int g_cur = 0, g_n = 0, g_live = 0, g_exited = 0, g_bar_arrived = 0;
inline unsigned g_bar_gen = 0;
inline Site g_bar_site{};
inline std::vector<Slot> g_slots;  // 32 per warp
// A full-warp collective whose result is one value for the whole warp (the mma tile) computes it once:
// the first lane that finds every lane posted stores it here, the last reader clears it.
struct WarpResult {
  alignas(16) unsigned char data[512];
  int readers = 0;
};
inline std::vector<WarpResult> g_warp_results;  // one per warp
inline uint3 g_blockIdx{};
inline dim3 g_blockDim, g_gridDim;
inline unsigned char* g_dyn = nullptr;
inline std::function<void()> g_body;
inline std::string g_case;  // set by the test, printed with every failure
inline const unsigned g_seed = [] {
  const char* s = std::getenv("CUEMU_SEED");
  return s ? static_cast<unsigned>(std::strtoul(s, nullptr, 10)) : 0u;
}();
inline std::mt19937 g_rng(g_seed);

inline void set_case(std::string what) { g_case = std::move(what); }

inline std::string where(int i) {
  const Thread& t = g_th[i];
  char buf[96];
  std::snprintf(buf, sizeof buf, "thread %d (threadIdx %u,%u,%u; warp %d lane %d)", i, t.tid.x, t.tid.y, t.tid.z,
                i / 32, i % 32);
  return buf;
}
inline std::string at(const Site& s) { return std::string(s.file_name()) + ":" + std::to_string(s.line()); }

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "cuemu: %s\n  in block (%u,%u,%u) of grid (%u,%u,%u), block (%u,%u,%u)%s%s%s\n", what.c_str(),
               g_blockIdx.x, g_blockIdx.y, g_blockIdx.z, g_gridDim.x, g_gridDim.y, g_gridDim.z, g_blockDim.x,
               g_blockDim.y, g_blockDim.z, g_seed ? ", CUEMU_SEED=" : "", g_seed ? std::to_string(g_seed).c_str() : "",
               g_case.empty() ? "" : ("\n  case: " + g_case).c_str());
  std::fflush(stderr);
  std::abort();
}

// ---- fiber switches ----
// cuemu_switch(save, to): pushes the callee-saved registers, stores the stack pointer in *save, switches
// to the stack `to` and pops the registers saved there (x86-64 System V). No signal-mask system call,
// unlike swapcontext, which is most of the emulator's time otherwise.
#if !defined(__x86_64__)
#error "cuemu: the fiber switch is written for x86-64"
#endif
extern "C" void cuemu_switch(void** save, void* to);
asm(R"(
  .text
  .globl cuemu_switch
  .type cuemu_switch, @function
cuemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuemu_switch, .-cuemu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");

inline void to_scheduler(bool dying) {
#if defined(CUEMU_ASAN)
  __sanitizer_start_switch_fiber(dying ? nullptr : &g_th[g_cur].fake_stack, g_sched_stack, g_sched_stack_size);
#endif
  void* dead_sp;
  cuemu_switch(dying ? &dead_sp : &g_th[g_cur].sp, g_sched_sp);
#if defined(CUEMU_ASAN)
  __sanitizer_finish_switch_fiber(g_th[g_cur].fake_stack, nullptr, nullptr);
#endif
}
inline void run_thread(int i) {
  g_cur = i;
#if defined(CUEMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, g_th[i].stack, kStack);
#endif
  cuemu_switch(&g_sched_sp, g_th[i].sp);
#if defined(CUEMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// Whether thread i may continue; the scheduler resumes only threads that may.
inline bool ready(int i) {
  const Thread& t = g_th[i];
  switch (t.wait) {
    case Wait::kRunning:
      return true;
    case Wait::kBarrier:
      return g_bar_gen != t.bar_gen;
    case Wait::kSlotFree:
      return !g_slots[i].posted;
    case Wait::kLanes: {
      // a lane has arrived when its slot holds a post with the same mask; a post with another mask
      // belongs to a collective this lane is not part of, and must be consumed first
      const Slot* W = &g_slots[i & ~31];
      for (unsigned j = 0; j < 32; ++j)
        if (((t.mask >> j) & 1u) && !(W[j].posted && W[j].mask == t.mask)) return false;
      return true;
    }
    case Wait::kDone:
      return false;
  }
  return false;
}
inline void wait(Wait kind, const Site& site, const char* what) {
  Thread& t = g_th[g_cur];
  t.wait = kind;
  t.site = site;
  t.what = what;
  while (!ready(g_cur)) to_scheduler(false);
  t.wait = Wait::kRunning;
}

// ---- __syncthreads ----
inline void syncthreads(const Site& site) {
  if (g_exited > 0) {
    for (int i = 0; i < g_n; ++i)
      if (g_th[i].wait == Wait::kDone)
        fail("divergent barrier: " + where(g_cur) + " reached __syncthreads at " + at(site) + " after " + where(i) +
             " exited");
  }
  const bool same_site = site.line() == g_bar_site.line() && std::strcmp(site.file_name(), g_bar_site.file_name()) == 0;
  if (g_bar_arrived > 0 && !same_site) {
    for (int i = 0; i < g_n; ++i)
      if (g_th[i].wait == Wait::kBarrier)
        fail("divergent barrier: " + where(g_cur) + " reached __syncthreads at " + at(site) + " while " + where(i) +
             " waits at " + at(g_th[i].site));
  }
  if (g_bar_arrived == 0) g_bar_site = site;
  g_th[g_cur].bar_gen = g_bar_gen;
  if (++g_bar_arrived == g_live) {
    g_bar_arrived = 0;
    ++g_bar_gen;
    return;
  }
  wait(Wait::kBarrier, site, "__syncthreads");
}

inline void entry() {
#if defined(CUEMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack, &g_sched_stack_size);
#endif
  g_body();
  Thread& t = g_th[g_cur];
  if (!t.uncommitted.empty() || !t.committed.empty())
    fail(where(g_cur) + " exited with " + std::to_string(t.uncommitted.size() + t.committed.size()) +
         " cp.async copies never waited for");
  if (g_bar_arrived > 0) {
    for (int i = 0; i < g_n; ++i)
      if (g_th[i].wait == Wait::kBarrier)
        fail("divergent barrier: " + where(g_cur) + " exited while " + where(i) + " waits at __syncthreads at " +
             at(g_th[i].site));
  }
  t.wait = Wait::kDone;
  --g_live;
  ++g_exited;
  to_scheduler(true);
}

// The first frame of every fiber: cuemu_switch "returns" here.
[[noreturn]] inline void fiber_start() {
  entry();
  std::abort();  // a finished fiber is never resumed
}

[[noreturn]] inline void deadlock(unsigned n) {
  std::string msg = "deadlock: no thread can make progress; waiting:";
  int shown = 0;
  for (unsigned i = 0; i < n && shown < 8; ++i) {
    const Thread& t = g_th[i];
    if (t.wait == Wait::kDone) continue;
    msg += "\n    " + where(i) + " in " + t.what + " at " + at(t.site);
    if (t.wait == Wait::kLanes) {
      char m[64];
      std::snprintf(m, sizeof m, " (mask 0x%08x; lanes missing:", t.mask);
      msg += m;
      const Slot* W = &g_slots[i & ~31u];
      for (unsigned j = 0; j < 32; ++j)
        if (((t.mask >> j) & 1u) && !(W[j].posted && W[j].mask == t.mask)) msg += " " + std::to_string(j);
      msg += ")";
    }
    ++shown;
  }
  fail(msg);
}

template <class T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(g_dyn);
}

// Fills the static __shared__ variables with garbage, as a block finds them on hardware. A plain loop:
// the section holds no AddressSanitizer redzones to respect, and memset would be checked.
__attribute__((no_sanitize("address"))) inline void garble_static_shared() {
  if (!__start_cuemu_shared) return;
  for (volatile unsigned char* p = __start_cuemu_shared; p < __stop_cuemu_shared; ++p) *p = 0xA5;
}

template <class K, class... A>
void launch(K kernel, dim3 grid, dim3 block, size_t smem, A... args) {
  const unsigned n = block.x * block.y * block.z;
  if (n == 0 || n > 1024) fail("launch with " + std::to_string(n) + " threads per block");
  if (g_th.size() < n) g_th.resize(n);
  for (auto& t : g_th) {
    if (!t.stack) {
      t.stack = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (t.stack == MAP_FAILED) fail("mmap of a fiber stack failed");
    }
  }
  g_n = static_cast<int>(n);
  g_blockDim = block;
  g_gridDim = grid;
  g_body = [&] { kernel(args...); };
  const size_t smem_alloc = smem > 0 ? smem : 1;
  g_dyn = new (std::align_val_t(16)) unsigned char[smem_alloc];
  const unsigned warps = (n + 31) / 32;
  std::vector<unsigned> warp_order(warps), lane_order(32);
  for (unsigned w = 0; w < warps; ++w) warp_order[w] = w;
  for (unsigned l = 0; l < 32; ++l) lane_order[l] = l;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        g_blockIdx = uint3{bx, by, bz};
        std::memset(g_dyn, 0xA5, smem_alloc);
        garble_static_shared();
        g_slots.assign(warps * 32, Slot{});
        g_warp_results.assign(warps, WarpResult{});
        g_live = static_cast<int>(n);
        g_exited = 0;
        g_bar_arrived = 0;
        for (unsigned i = 0; i < n; ++i) {
          Thread& t = g_th[i];
          t.wait = Wait::kRunning;
          t.uncommitted.clear();
          t.committed.clear();
          t.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
          // initial frame: six zeroed registers, then the return address at a 16-byte aligned slot
          void** top = reinterpret_cast<void**>(static_cast<char*>(t.stack) + kStack - 16);
          top[0] = reinterpret_cast<void*>(&fiber_start);
          for (int r = 1; r <= 6; ++r) top[-r] = nullptr;
          t.sp = top - 6;
        }
        while (g_live > 0) {
          bool progressed = false;
          if (g_seed) std::shuffle(warp_order.begin(), warp_order.end(), g_rng);
          for (unsigned w : warp_order) {
            bool ran;
            do {
              ran = false;
              if (g_seed) std::shuffle(lane_order.begin(), lane_order.end(), g_rng);
              for (unsigned l : lane_order) {
                const unsigned i = 32 * w + l;
                if (i >= n || !ready(static_cast<int>(i))) continue;
                run_thread(static_cast<int>(i));
                ran = progressed = true;
              }
            } while (g_seed && ran);
          }
          if (g_live > 0 && !progressed) deadlock(n);
        }
      }
  ::operator delete[](g_dyn, std::align_val_t(16));
  g_dyn = nullptr;
}

inline unsigned lane() { return static_cast<unsigned>(g_cur) & 31u; }
inline unsigned lanemask_lt() { return (1u << lane()) - 1u; }

// Every lane in `mask` posts `v`; f(get, lane) computes this lane's result once all of them have.
template <class T, class F>
auto warp_op(const char* what, const Site& site, unsigned mask, const T& v, F f) {
  static_assert(sizeof(T) <= 64, "warp_op payload");
  const unsigned l = lane(), base = static_cast<unsigned>(g_cur) & ~31u;
  auto hex = [](unsigned x) {
    char m[16];
    std::snprintf(m, sizeof m, "0x%08x", x);
    return std::string(m);
  };
  if (!((mask >> l) & 1u))
    fail(std::string(what) + " with mask " + hex(mask) + " called by " + where(g_cur) + ", not in its mask, at " +
         at(site));
  for (unsigned j = 0; j < 32; ++j)  // a partial last warp: its missing lanes can never arrive
    if (((mask >> j) & 1u) && base + j >= static_cast<unsigned>(g_n))
      fail(std::string(what) + " mask " + hex(mask) + " names lane " + std::to_string(j) +
           ", which the block does not have");
  Slot* W = &g_slots[base];
  wait(Wait::kSlotFree, site, what);
  std::memcpy(W[l].data, &v, sizeof(T));
  W[l].mask = mask;
  W[l].what = what;
  W[l].posted = true;
  W[l].readers = std::popcount(mask);
  g_th[g_cur].mask = mask;
  wait(Wait::kLanes, site, what);
  for (unsigned j = 0; j < 32; ++j)
    if (((mask >> j) & 1u) && W[j].what != what && std::strcmp(W[j].what, what) != 0)
      fail("lanes of one warp collective disagree: " + where(g_cur) + " is in " + what + " at " + at(site) + ", lane " +
           std::to_string(j) + " in " + W[j].what);
  auto get = [&](unsigned j) {
    if (j >= 32 || !((mask >> j) & 1u))
      fail(std::string(what) + " by " + where(g_cur) + " at " + at(site) + " reads lane " + std::to_string(j) +
           ", outside its mask " + hex(mask));
    T x;
    std::memcpy(&x, W[j].data, sizeof(T));
    return x;
  };
  auto r = f(get, l);
  for (unsigned j = 0; j < 32; ++j)
    if (((mask >> j) & 1u) && --W[j].readers == 0) W[j].posted = false;
  return r;
}

// ---- cp.async ----
inline void cp_async_16(void* dst, const void* src, bool valid, const Site& site = Site::current()) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0))
    fail("cp.async of 16 bytes with a misaligned address by " + where(g_cur) + " at " + at(site));
  g_th[g_cur].uncommitted.push_back({dst, src, valid});
}
inline void cp_async_commit() {
  Thread& t = g_th[g_cur];
  t.committed.insert(t.committed.end(), t.uncommitted.begin(), t.uncommitted.end());
  t.uncommitted.clear();
}
inline void cp_async_wait_all() {  // cp.async.wait_group 0: every committed group
  Thread& t = g_th[g_cur];
  for (const Pending& p : t.committed) {
    if (p.valid) {
      std::memcpy(p.dst, p.src, 16);
    } else {
      std::memset(p.dst, 0, 16);
    }
  }
  t.committed.clear();
}

// ---- ldmatrix.x4(.trans) m8n8 b16: lane l supplies the row address of matrix l / 8, row l % 8 ----
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans, const Site& site = Site::current()) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
    fail("ldmatrix row address not 16-byte aligned, " + where(g_cur) + " at " + at(site));
  struct P {
    const uint16_t* p;
  };
  warp_op(trans ? "ldmatrix.trans" : "ldmatrix", site, 0xffffffffu, P{static_cast<const uint16_t*>(row)},
          [&](auto get, unsigned l) {
            for (int m = 0; m < 4; ++m) {
              uint16_t lo, hi;
              if (!trans) {  // element (row l / 4, cols 2 (l % 4), + 1)
                const uint16_t* rp = get(8 * m + l / 4).p;
                lo = rp[2 * (l % 4)];
                hi = rp[2 * (l % 4) + 1];
              } else {  // transposed: (rows 2 (l % 4), + 1; col l / 4)
                lo = get(8 * m + 2 * (l % 4)).p[l / 4];
                hi = get(8 * m + 2 * (l % 4) + 1).p[l / 4];
              }
              r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
            }
            return 0;
          });
}

// ---- mma.sync m16n8k16 row.col, fp32 accumulate; tof converts one 16-bit pattern to float ----
template <class ToF>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, ToF tof,
                  const Site& site = Site::current()) {
  struct P {
    uint32_t a[4], b0, b1;
  };
  struct Tile {
    float d[16][8];  // A * B; each lane adds its four entries to its accumulators
  };
  static_assert(sizeof(Tile) <= sizeof(WarpResult::data), "mma tile");
  warp_op("mma.sync", site, 0xffffffffu, P{{a[0], a[1], a[2], a[3]}, b0, b1}, [&](auto get, unsigned l) {
    WarpResult& wr = g_warp_results[static_cast<unsigned>(g_cur) / 32];
    Tile tile;
    if (wr.readers > 0) {
      std::memcpy(&tile, wr.data, sizeof tile);
    } else {
      float A[16][16], B[16][8];
      for (unsigned j = 0; j < 32; ++j) {
        const P p = get(j);
        const unsigned g = j / 4, q = j % 4;
        auto lo = [&](uint32_t x) { return tof(static_cast<uint16_t>(x & 0xffffu)); };
        auto hi = [&](uint32_t x) { return tof(static_cast<uint16_t>(x >> 16)); };
        A[g][2 * q] = lo(p.a[0]);
        A[g][2 * q + 1] = hi(p.a[0]);
        A[g + 8][2 * q] = lo(p.a[1]);
        A[g + 8][2 * q + 1] = hi(p.a[1]);
        A[g][2 * q + 8] = lo(p.a[2]);
        A[g][2 * q + 9] = hi(p.a[2]);
        A[g + 8][2 * q + 8] = lo(p.a[3]);
        A[g + 8][2 * q + 9] = hi(p.a[3]);
        B[2 * q][g] = lo(p.b0);
        B[2 * q + 1][g] = hi(p.b0);
        B[2 * q + 8][g] = lo(p.b1);
        B[2 * q + 9][g] = hi(p.b1);
      }
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
          float s = 0.f;  // products of 16-bit floats are exact in fp32; the hardware's sum order is unspecified
          for (int k = 0; k < 16; ++k) s += A[i][k] * B[k][j];
          tile.d[i][j] = s;
        }
      std::memcpy(wr.data, &tile, sizeof tile);
      wr.readers = 32;
    }
    --wr.readers;
    const unsigned g = l / 4, q = l % 4;
    const unsigned rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
    for (int e = 0; e < 4; ++e) c[e] += tile.d[rows[e]][cols[e]];
    return 0;
  });
}

}  // namespace cuemu

// ---- the CUDA names the kernels use ----
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#define threadIdx (::cuemu::g_th[::cuemu::g_cur].tid)
#define blockIdx (::cuemu::g_blockIdx)
#define blockDim (::cuemu::g_blockDim)
#define gridDim (::cuemu::g_gridDim)
inline constexpr int warpSize = 32;

inline void __syncthreads(const cuemu::Site& site = cuemu::Site::current()) { cuemu::syncthreads(site); }
inline void __syncwarp(unsigned mask = 0xffffffffu, const cuemu::Site& site = cuemu::Site::current()) {
  cuemu::warp_op("__syncwarp", site, mask, 0, [](auto, unsigned) { return 0; });
}
template <class T>
T __shfl_sync(unsigned m, T v, int src, int w = 32, const cuemu::Site& site = cuemu::Site::current()) {
  return cuemu::warp_op("__shfl_sync", site, m, v,
                        [&](auto get, unsigned l) { return get((l & ~(w - 1)) + (src & (w - 1))); });
}
template <class T>
T __shfl_xor_sync(unsigned m, T v, int x, int w = 32, const cuemu::Site& site = cuemu::Site::current()) {
  return cuemu::warp_op("__shfl_xor_sync", site, m, v, [&](auto get, unsigned l) {
    const unsigned src = l ^ static_cast<unsigned>(x);
    return src < (l & ~(w - 1u)) + w ? get(src) : get(l);  // a later group: own value
  });
}
template <class T>
T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32, const cuemu::Site& site = cuemu::Site::current()) {
  return cuemu::warp_op("__shfl_down_sync", site, m, v, [&](auto get, unsigned l) {
    return (l % w) + d < static_cast<unsigned>(w) ? get(l + d) : get(l);
  });
}
template <class T>
T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32, const cuemu::Site& site = cuemu::Site::current()) {
  return cuemu::warp_op("__shfl_up_sync", site, m, v,
                        [&](auto get, unsigned l) { return (l % w) >= d ? get(l - d) : get(l); });
}
inline unsigned __ballot_sync(unsigned m, int pred, const cuemu::Site& site = cuemu::Site::current()) {
  return cuemu::warp_op("__ballot_sync", site, m, pred != 0, [&](auto get, unsigned) {
    unsigned r = 0;
    for (unsigned j = 0; j < 32; ++j)
      if (((m >> j) & 1u) && get(j)) r |= 1u << j;
    return r;
  });
}
inline int __any_sync(unsigned m, int p, const cuemu::Site& site = cuemu::Site::current()) {
  return __ballot_sync(m, p, site) != 0;
}
inline int __all_sync(unsigned m, int p, const cuemu::Site& site = cuemu::Site::current()) {
  return __ballot_sync(m, p, site) == m;
}
template <class T>
unsigned __match_any_sync(unsigned m, T v, const cuemu::Site& site = cuemu::Site::current()) {
  return cuemu::warp_op("__match_any_sync", site, m, v, [&](auto get, unsigned) {
    unsigned r = 0;
    for (unsigned j = 0; j < 32; ++j)
      if (((m >> j) & 1u) && get(j) == v) r |= 1u << j;
    return r;
  });
}
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
// IEEE round-to-nearest operations: the build uses -ffp-contract=off, so nothing is fused.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
template <class T>
T __ldg(const T* p) {
  return *p;
}
template <class T>
T atomicAdd(T* p, T v) {  // fibers on one OS thread: nothing runs concurrently
  const T o = *p;
  *p = o + v;
  return o;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
using std::exp;
using std::isfinite;
using std::isnan;
using std::log;
