// paged_compact_kv on CUDA, the host wrapper: caches grouped by copy unit, one launch per group
// (paged_compact_kv_kernel.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <vector>

#include "cuda/paged_compact_kv_kernel.cuh"
#include "ops.h"

namespace ddtree::cuda {
namespace {

using namespace compact;

template <typename U>
void launch_group(PagedBatch& batch, int64_t ctas, cudaStream_t stream) {
  paged_compact_kv_kernel<U><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(batch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void paged_compact_kv(const std::vector<at::Tensor>& caches, const at::Tensor& block_table,
                      const at::Tensor& context_lens, const at::Tensor& accepted_slots, const at::Tensor& accept_len) {
  const char* op = "paged_compact_kv";
  check_paged_compact_kv(caches, block_table, context_lens, accepted_slots, accept_len);
  TORCH_CHECK(accepted_slots.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, accepted_slots is on ",
              accepted_slots.device());
  const int64_t B = accepted_slots.size(0), width = accepted_slots.size(1), max_blocks = block_table.size(1);
  if (caches.empty() || B == 0 || width == 0) return;
  TORCH_CHECK(width < (int64_t{1} << 30), op, ": accepted_slots.size(1) (", width, ") must be below 2^30");
  const int64_t block_size = caches[0].size(1);
  TORCH_CHECK(block_size < (int64_t{1} << 31) && max_blocks * block_size < (int64_t{1} << 62), op,
              ": block_table.size(1) * block_size (", max_blocks, " * ", block_size, ") is too large");

  c10::cuda::CUDAGuard guard(accepted_slots.device());
  const at::Tensor table = block_table.contiguous(), ctx = context_lens.contiguous(),
                   slots = accepted_slots.contiguous(), len = accept_len.contiguous();

  // Group the caches by copy unit; within a group, chunks of kMaxCaches make one launch each.
  std::map<int, std::vector<PagedCacheDesc>> groups;
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& t = caches[i];
    if (t.numel() == 0) continue;
    const int64_t es = t.element_size(), row_bytes = t.size(3) * es;
    TORCH_CHECK(row_bytes <= kStageBytes, op, ": caches[", i, "] rows are ", row_bytes,
                " bytes; the CUDA kernel moves rows of at most ", kStageBytes, " bytes");
    TORCH_CHECK(t.size(0) < (int64_t{1} << 31) && B * t.size(2) < (int64_t{1} << 30), op, ": caches[", i, "] shape ",
                t.sizes(), " is too large");
    const int64_t byte_strides[3] = {t.stride(0) * es, t.stride(1) * es, t.stride(2) * es};
    groups[copy_unit(t.data_ptr(), byte_strides, row_bytes)].push_back(
        PagedCacheDesc{static_cast<char*>(t.data_ptr()), byte_strides[0], byte_strides[1], byte_strides[2],
                       static_cast<int32_t>(t.size(2)), static_cast<int32_t>(t.size(0)),
                       static_cast<int32_t>(row_bytes), 0});
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (auto& [unit, descs] : groups) {
    for (size_t first = 0; first < descs.size(); first += kMaxCaches) {
      PagedBatch batch{};
      batch.block_table = table.data_ptr<int32_t>();
      batch.context_lens = ctx.data_ptr<int64_t>();
      batch.accepted_slots = slots.data_ptr<int64_t>();
      batch.accept_len = len.data_ptr<int32_t>();
      batch.max_blocks = max_blocks;
      batch.block_size = static_cast<int32_t>(block_size);
      batch.B = static_cast<int32_t>(B);
      batch.width = static_cast<int32_t>(width);
      int64_t ctas = 0;
      for (size_t i = first; i < descs.size() && i < first + kMaxCaches; ++i) {
        PagedCacheDesc d = descs[i];
        TORCH_CHECK(ctas + B * d.H < (int64_t{1} << 31), op, ": too many (cache, request, head) triples");
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
