// The only inline PTX of the CUDA kernels, and the one place that knows whether the kernel headers
// (csrc/cuda/*_kernel.cuh) are compiled by nvcc or by a host compiler under the CPU emulator of the
// tests (tests/emu/cuemu.h, which defines CUEMU before it includes a kernel header). Under nvcc
// everything here is the sm80+ PTX; under the emulator the same functions call the emulator's models
// of these instructions, so the kernel source itself is identical in both builds.
//
//   lanemask_lt                       bits of the lanes below this one
//   cp_async_16 / _commit / _wait_all 16-byte global -> shared copies that zero-fill when the source is
//                                     out of range (the source address is then never dereferenced)
//   ldmatrix_x4(_trans)               four 8x8 b16 matrices from shared memory into mma fragments;
//                                     lane l supplies the row address of matrix l / 8, row l % 8
//   mma_16816<T>                      c += a * b, one m16n8k16 tile, T = bf16 or fp16, fp32 accumulators
//   DDTREE_DYNAMIC_SMEM(type, name)   declares `name`, the launch's dynamic shared memory as a 16-byte
//                                     aligned array of `type` (a pointer under the emulator)
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, q = lane % 4), which the attention kernel relies on:
//   A (16x16, row-major): a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..)
//   B (16x8,  "col"):     b0 = (k 2q..2q+1, n g), b1 = (k 2q+8..2q+9, n g)
//   C (16x8,  fp32):      c0,c1 = (g, 2q..2q+1), c2,c3 = (g+8, 2q..2q+1)
// Each 32-bit register holds two 16-bit values, the lower column (or k) in the low half.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#if defined(CUEMU)
#define DDTREE_DYNAMIC_SMEM(type, name) type* const name = ::cuemu::dynamic_smem<type>()
#else
#define DDTREE_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace ddtree::cuda::ptx {

#if defined(CUEMU)

__device__ __forceinline__ unsigned lanemask_lt() { return ::cuemu::lanemask_lt(); }
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  ::cuemu::cp_async_16(smem, gmem, valid);
}
__device__ __forceinline__ void cp_async_commit() { ::cuemu::cp_async_commit(); }
__device__ __forceinline__ void cp_async_wait_all() { ::cuemu::cp_async_wait_all(); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  ::cuemu::ldmatrix_x4(r, smem, false);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  ::cuemu::ldmatrix_x4(r, smem, true);
}
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(sizeof(T) == 2, "mma_16816 takes 16-bit operands");
  ::cuemu::mma_m16n8k16(c, a, b0, b1, [](uint16_t bits) {
    T x;
    std::memcpy(static_cast<void*>(&x), &bits, sizeof x);
    return static_cast<float>(x);
  });
}

#else

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif

}  // namespace ddtree::cuda::ptx
