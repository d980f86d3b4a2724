// The host side shared by tree_attention and paged_tree_attention on CUDA: K/V operand alignment, the
// split-K choice and the launches of an attention kernel (tree_attention_kernel.cuh) and its combine.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <mutex>

#include "cuda/tree_attention_kernel.cuh"

namespace ddtree::cuda::attention {

// A K/V operand the kernel can read directly (kv_layout_ok), else a fresh copy (clone, not contiguous():
// a contiguous view at an odd storage offset would come back unchanged and still be misaligned).
inline at::Tensor kv_operand(const at::Tensor& t) {
  const int64_t stride[4] = {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  return kv_layout_ok(t.data_ptr(), stride) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Launches `kernel` (tree_attention_kernel<T, D> or a variant taking `rows...` after the Params) on
// a (tiles, splits, B * Hkv) grid, then the combine kernel when the keys are split.
template <typename T, int D, typename Kernel, typename... Rows>
void launch_attention(Kernel kernel, Params p, int64_t tiles, const at::Tensor& out, cudaStream_t stream,
                      const Rows&... rows) {
  const size_t smem = smem_bytes<T, D>();

  // Once per device and kernel (so that nothing but launches happens under CUDA-graph capture after a
  // warm-up call): allow > 48 KiB of dynamic shared memory and ask how many CTAs fit on one SM.
  constexpr int kMaxDevices = 64;
  static std::mutex mu;
  static int slots_cache[kMaxDevices] = {};  // SMs * resident CTAs per SM
  const int device = out.device().index();
  int slots = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (device >= 0 && device < kMaxDevices) slots = slots_cache[device];
    if (slots == 0) {
      int blocks_per_sm = 0, sms = 0;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, smem));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
      slots = std::max(blocks_per_sm, 1) * std::max(sms, 1);
      if (device >= 0 && device < kMaxDevices) slots_cache[device] = slots;
    }
  }

  p.num_splits = choose_num_splits(slots, p.B, p.Hkv, tiles, p.S);

  at::Tensor o_part, ml_part;
  const int64_t rows_total = static_cast<int64_t>(p.B) * p.Hq * p.T;
  if (p.num_splits > 1) {
    auto f32 = out.options().dtype(at::kFloat);
    o_part = at::empty({p.num_splits, rows_total, D}, f32);
    ml_part = at::empty({2, p.num_splits, rows_total}, f32);
    p.o_part = o_part.data_ptr<float>();
    p.m_part = ml_part.data_ptr<float>();
    p.l_part = p.m_part + p.num_splits * rows_total;
  }

  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.num_splits),
                  static_cast<unsigned>(p.B * p.Hkv));
  kernel<<<grid, kThreads, smem, stream>>>(p, rows...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (p.num_splits > 1) {
    const int64_t blocks = (rows_total + kThreads / 32 - 1) / (kThreads / 32);
    combine_kernel<T, D><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p.o_part, p.m_part, p.l_part, static_cast<T*>(p.out), p.num_splits, rows_total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace ddtree::cuda::attention
