// paged_compact_kv on CUDA, the host wrapper: caches grouped by copy unit, one launch per group
// (paged_compact_kv_kernel.cuh, compact_launch.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "cuda/compact_launch.h"
#include "cuda/paged_compact_kv_kernel.cuh"
#include "ops.h"

namespace ddtree::cuda {

using namespace compact;

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

  const auto groups = group_by_copy_unit<PagedCacheDesc>(
      caches, op, [&](size_t i, const at::Tensor& t, const int64_t (&byte_strides)[3], int64_t row_bytes) {
        TORCH_CHECK(t.size(0) < (int64_t{1} << 31) && B * t.size(2) < (int64_t{1} << 30), op, ": caches[", i,
                    "] shape ", t.sizes(), " is too large");
        return PagedCacheDesc{static_cast<char*>(t.data_ptr()), byte_strides[0], byte_strides[1], byte_strides[2],
                              static_cast<int32_t>(t.size(2)), static_cast<int32_t>(t.size(0)),
                              static_cast<int32_t>(row_bytes), 0};
      });

  PagedBatch per_call{};
  per_call.block_table = table.data_ptr<int32_t>();
  per_call.context_lens = ctx.data_ptr<int64_t>();
  per_call.accepted_slots = slots.data_ptr<int64_t>();
  per_call.accept_len = len.data_ptr<int32_t>();
  per_call.max_blocks = max_blocks;
  per_call.block_size = static_cast<int32_t>(block_size);
  per_call.B = static_cast<int32_t>(B);
  per_call.width = static_cast<int32_t>(width);
  launch_groups(groups, per_call, B, c10::cuda::getCurrentCUDAStream(), op,
                [](auto unit_type) { return paged_compact_kv_kernel<decltype(unit_type)>; });
}

}  // namespace ddtree::cuda
