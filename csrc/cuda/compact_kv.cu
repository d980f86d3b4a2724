// compact_kv on CUDA, the host wrapper: caches grouped by copy unit, one launch per group (compact_kv_kernel.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <vector>

#include "cuda/compact_kv_kernel.cuh"
#include "ops.h"

namespace ddtree::cuda {
namespace {

using namespace compact;

int copy_unit_of(const at::Tensor& t) {
  const int64_t es = t.element_size();
  const int64_t byte_strides[3] = {t.stride(0) * es, t.stride(1) * es, t.stride(2) * es};
  return compact::copy_unit(t.data_ptr(), byte_strides, t.size(3) * es);
}

template <typename U>
void launch_group(Batch& batch, int64_t ctas, cudaStream_t stream) {
  compact_kv_kernel<U><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(batch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void compact_kv(const std::vector<at::Tensor>& caches, const at::Tensor& context_lens,
                const at::Tensor& accepted_slots, const at::Tensor& accept_len) {
  check_compact_kv(caches, context_lens, accepted_slots, accept_len);
  TORCH_CHECK(accepted_slots.is_cuda(), "compact_kv: the CUDA kernel needs CUDA tensors, accepted_slots is on ",
              accepted_slots.device());
  const int64_t B = accepted_slots.size(0), width = accepted_slots.size(1);
  if (caches.empty() || B == 0 || width == 0) return;
  TORCH_CHECK(width < (int64_t{1} << 30), "compact_kv: accepted_slots.size(1) (", width, ") must be below 2^30");

  c10::cuda::CUDAGuard guard(accepted_slots.device());
  const at::Tensor ctx = context_lens.contiguous(), slots = accepted_slots.contiguous(),
                   len = accept_len.contiguous();

  // Group the caches by copy unit; within a group, chunks of kMaxCaches make one launch each.
  std::map<int, std::vector<CacheDesc>> groups;
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& t = caches[i];
    if (t.numel() == 0) continue;
    const int64_t row_bytes = t.size(3) * t.element_size();
    TORCH_CHECK(row_bytes <= kStageBytes, "compact_kv: caches[", i, "] rows are ", row_bytes,
                " bytes; the CUDA kernel moves rows of at most ", kStageBytes, " bytes");
    TORCH_CHECK(t.size(2) < (int64_t{1} << 31) && B * t.size(1) < (int64_t{1} << 30), "compact_kv: caches[", i,
                "] shape ", t.sizes(), " is too large");
    const int64_t es = t.element_size();
    groups[copy_unit_of(t)].push_back(CacheDesc{static_cast<char*>(t.data_ptr()), t.stride(0) * es, t.stride(1) * es,
                                             t.stride(2) * es, static_cast<int32_t>(t.size(1)),
                                             static_cast<int32_t>(t.size(2)), static_cast<int32_t>(row_bytes), 0});
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (auto& [unit, descs] : groups) {
    for (size_t first = 0; first < descs.size(); first += kMaxCaches) {
      Batch batch{};
      batch.context_lens = ctx.data_ptr<int64_t>();
      batch.accepted_slots = slots.data_ptr<int64_t>();
      batch.accept_len = len.data_ptr<int32_t>();
      batch.B = static_cast<int32_t>(B);
      batch.width = static_cast<int32_t>(width);
      int64_t ctas = 0;
      for (size_t i = first; i < descs.size() && i < first + kMaxCaches; ++i) {
        CacheDesc d = descs[i];
        TORCH_CHECK(ctas + B * d.H < (int64_t{1} << 31), "compact_kv: too many (cache, request, head) triples");
        d.cta_begin = static_cast<int32_t>(ctas);
        ctas += B * d.H;
        batch.caches[batch.count++] = d;
      }
      switch (unit) {
        case 16: launch_group<uint4>(batch, ctas, stream); break;
        case 8: launch_group<uint2>(batch, ctas, stream); break;
        case 4: launch_group<uint32_t>(batch, ctas, stream); break;
        case 2: launch_group<uint16_t>(batch, ctas, stream); break;
        default: launch_group<uint8_t>(batch, ctas, stream); break;
      }
    }
  }
}

}  // namespace ddtree::cuda
