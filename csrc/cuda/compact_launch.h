// The host side shared by compact_kv and paged_compact_kv on CUDA: both move raw rows of many caches, one
// launch per copy unit and kMaxCaches caches (launch_batches, compact_kv_kernel.cuh); only the cache
// descriptor, its shape checks and the kernel differ, and those the wrappers pass in.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <map>
#include <vector>

#include "cuda/compact_kv_kernel.cuh"

namespace ddtree::cuda::compact {

// The non-empty caches by copy unit, each described by describe(i, t, byte_strides, row_bytes) (which
// checks what its layout needs) after the row size check both kernels need.
template <class Desc, class Describe>
std::map<int, std::vector<Desc>> group_by_copy_unit(const std::vector<at::Tensor>& caches, const char* op,
                                                    const Describe& describe) {
  std::map<int, std::vector<Desc>> groups;
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& t = caches[i];
    if (t.numel() == 0) continue;
    const int64_t es = t.element_size(), row_bytes = t.size(3) * es;
    TORCH_CHECK(row_bytes <= kStageBytes, op, ": caches[", i, "] rows are ", row_bytes,
                " bytes; the CUDA kernel moves rows of at most ", kStageBytes, " bytes");
    const int64_t byte_strides[3] = {t.stride(0) * es, t.stride(1) * es, t.stride(2) * es};
    const Desc d = describe(i, t, byte_strides, row_bytes);
    groups[copy_unit(t.data_ptr(), byte_strides, row_bytes)].push_back(d);
  }
  return groups;
}

// Launches every group on `stream`: one CTA of kThreads per (cache, request, head), the kernel instance
// kernel_of(U{}) for the group's copy unit type U (with_unit_type), per_call's fields in every batch.
template <class BatchT, class Desc, class KernelOf>
void launch_groups(const std::map<int, std::vector<Desc>>& groups, const BatchT& per_call, int64_t B,
                   cudaStream_t stream, const char* op, const KernelOf& kernel_of) {
  for (const auto& group : groups) {
    const int unit = group.first;
    const bool fits = launch_batches(group.second, per_call, B, [&](const BatchT& batch, int64_t ctas) {
      with_unit_type(unit, [&](auto unit_type) {
        const auto kernel = kernel_of(unit_type);
        kernel<<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(batch);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    TORCH_CHECK(fits, op, ": too many (cache, request, head) triples");
  }
}

}  // namespace ddtree::cuda::compact
