// Self-test of the emulator (cuemu.h): the warp intrinsics against their documented semantics, ldmatrix
// and mma.sync against a plain matrix product through the fragment layouts written in portability.cuh,
// and the failures it must report (deadlock, divergent barrier, a read outside a shuffle's mask, a
// cp.async never waited for, a misaligned cp.async), each run in a child process whose message is checked.
#include "cuemu.h"
// clang-format off
#include "cuda/portability.cuh"
#include "check.h"
// clang-format on

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

using emu_test::fmt;
using namespace ddtree::cuda::ptx;

// ---- warp intrinsics: every lane records what it got ----
__global__ void shuffles(int* out) {
  const int lane = threadIdx.x % 32, v = 100 + lane;
  int* o = out + threadIdx.x * 8;
  o[0] = __shfl_sync(0xffffffffu, v, 5);
  o[1] = __shfl_sync(0xffffffffu, v, lane + 3, 8);  // within groups of 8
  o[2] = __shfl_xor_sync(0xffffffffu, v, 6);
  o[3] = __shfl_down_sync(0xffffffffu, v, 3, 16);
  o[4] = __shfl_up_sync(0xffffffffu, v, 2);
  o[5] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[6] = lane % 2 == 0 ? static_cast<int>(__ballot_sync(0x55555555u, lane % 4 == 0)) : -1;  // even lanes only
  o[7] = static_cast<int>(__match_any_sync(0xffffffffu, lane / 5)) ^ static_cast<int>(lanemask_lt());
}

static std::string check_shuffles() {
  std::vector<int> out(64 * 8);
  cuemu::launch(shuffles, dim3(1), dim3(64), 0, out.data());
  for (int t = 0; t < 64; ++t) {
    const int l = t % 32;
    unsigned b3 = 0, b4 = 0, m5 = 0;
    for (int j = 0; j < 32; ++j) {
      b3 |= (j % 3 == 0 ? 1u : 0u) << j;
      b4 |= (j % 4 == 0 ? 1u : 0u) << j;
      m5 |= (j / 5 == l / 5 ? 1u : 0u) << j;
    }
    const int want[8] = {105,
                         100 + (l & ~7) + (l + 3) % 8,
                         100 + (l ^ 6),
                         l % 16 + 3 < 16 ? 100 + l + 3 : 100 + l,
                         l >= 2 ? 100 + l - 2 : 100 + l,
                         static_cast<int>(b3),
                         l % 2 == 0 ? static_cast<int>(b4) : -1,
                         static_cast<int>(m5 ^ ((1u << l) - 1u))};
    for (int k = 0; k < 8; ++k)
      if (out[t * 8 + k] != want[k])
        return fmt("thread %d intrinsic %d: got %d want %d", t, k, out[t * 8 + k], want[k]);
  }
  return "";
}

// ---- ldmatrix + mma: C = A (16x16, row-major in shared memory) * B (16x8, given as B^T rows) ----
__global__ void mma_tile(const __nv_bfloat16* a, const __nv_bfloat16* bt, float* c) {
  __shared__ __align__(16) __nv_bfloat16 sa[16 * 16], sb[8 * 16];
  for (int i = threadIdx.x; i < 256; i += 32) sa[i] = a[i];
  for (int i = threadIdx.x; i < 128; i += 32) sb[i] = bt[i];
  __syncwarp();
  const int lane = threadIdx.x;
  uint32_t af[4], bf[4];
  // A fragments: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
  ldmatrix_x4(af, sa + ((lane % 8) + ((lane / 8) & 1) * 8) * 16 + (lane / 16) * 8);
  // B^T rows are n: matrices (n 0-7, k 0-7), (n 0-7, k 8-15); the upper two repeat them
  ldmatrix_x4(bf, sb + (lane % 8) * 16 + ((lane / 8) & 1) * 8);
  float acc[4] = {1.f, 1.f, 1.f, 1.f};
  mma_16816<__nv_bfloat16>(acc, af, bf[0], bf[1]);
  const int g = lane / 4, q = lane % 4;
  c[g * 8 + 2 * q] = acc[0];
  c[g * 8 + 2 * q + 1] = acc[1];
  c[(g + 8) * 8 + 2 * q] = acc[2];
  c[(g + 8) * 8 + 2 * q + 1] = acc[3];
}

static std::string check_mma() {
  emu_test::Rng rng(2);
  std::vector<__nv_bfloat16> a(256), bt(128);
  for (auto& x : a) x = __nv_bfloat16(static_cast<float>(rng(-8, 8)) / 4.f);  // small dyadics: exact sums
  for (auto& x : bt) x = __nv_bfloat16(static_cast<float>(rng(-8, 8)) / 4.f);
  std::vector<float> c(128, NAN);
  cuemu::launch(mma_tile, dim3(1), dim3(32), 0, (const __nv_bfloat16*)a.data(), (const __nv_bfloat16*)bt.data(),
                c.data());
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      float want = 1.f;
      for (int k = 0; k < 16; ++k) want += static_cast<float>(a[i * 16 + k]) * static_cast<float>(bt[j * 16 + k]);
      if (c[i * 8 + j] != want) return fmt("C[%d][%d] = %g want %g", i, j, c[i * 8 + j], want);
    }
  return "";
}

// ---- what must fail, and with which message ----
__global__ void deadlock(int) {
  if (threadIdx.x != 7) __ballot_sync(0xffffffffu, 1);  // lane 7 never arrives
}
__global__ void divergent(int) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}
__global__ void early_exit(int) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
}
__global__ void outside_mask(int) {
  if (threadIdx.x % 2 == 0) __shfl_sync(0x55555555u, 1, 1);  // lane 1 is not in the mask
}
__global__ void never_waited(const int4* src) {
  __shared__ int4 dst[32];
  cp_async_16(&dst[threadIdx.x], src + threadIdx.x, true);
  cp_async_commit();
}
__global__ void misaligned(const char* src) {
  __shared__ int4 dst[32];
  cp_async_16(&dst[threadIdx.x], src + 8, true);
  cp_async_commit();
  cp_async_wait_all();
}

// Runs f in a child process; returns "" if it aborted with a message containing every one of `want`.
static std::string expect_failure(const std::function<void()>& f, const std::vector<std::string>& want) {
  int fd[2];
  if (pipe(fd) != 0) return "pipe failed";
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(fd[1], 2);
    close(fd[0]);
    f();
    _exit(0);
  }
  close(fd[1]);
  std::string msg;
  char buf[512];
  for (ssize_t n; (n = read(fd[0], buf, sizeof buf)) > 0;) msg.append(buf, static_cast<size_t>(n));
  close(fd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "did not fail";
  for (const std::string& w : want)
    if (msg.find(w) == std::string::npos) return "message lacks '" + w + "': " + msg;
  return "";
}

int main() {
  emu_test::Tally tally("cuemu self-test");
  alignas(16) static int4 src[64];
  tally.record("warp intrinsics", check_shuffles());
  tally.record("ldmatrix + mma.sync", check_mma());
  tally.record("deadlock", expect_failure([] { cuemu::launch(deadlock, dim3(3), dim3(64), 0, 0); },
                                          {"deadlock", "block (0,0,0)", "thread 0 ", "lanes missing: 7"}));
  tally.record("divergent barrier", expect_failure([] { cuemu::launch(divergent, dim3(2), dim3(64), 0, 0); },
                                                   {"divergent barrier", "block (0,0,0)", "warp 0", "warp 1"}));
  tally.record("exit while others wait", expect_failure([] { cuemu::launch(early_exit, dim3(1), dim3(64), 0, 0); },
                                                        {"divergent barrier", "exited"}));
  tally.record("read outside the mask", expect_failure([] { cuemu::launch(outside_mask, dim3(1), dim3(32), 0, 0); },
                                                       {"__shfl_sync", "reads lane 1", "outside its mask"}));
  tally.record("cp.async never waited",
               expect_failure([] { cuemu::launch(never_waited, dim3(1), dim3(32), 0, (const int4*)src); },
                              {"cp.async copies never waited for"}));
  tally.record(
      "misaligned cp.async",
      expect_failure([] { cuemu::launch(misaligned, dim3(1), dim3(32), 0, (const char*)src); }, {"misaligned"}));
  return tally.finish("");
}
