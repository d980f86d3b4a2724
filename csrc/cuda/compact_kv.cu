// compact_kv on CUDA, the host wrapper: caches grouped by copy unit, one launch per group (compact_kv_kernel.cuh,
// compact_launch.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "cuda/compact_kv_kernel.cuh"
#include "cuda/compact_launch.h"
#include "ops.h"

namespace ddtree::cuda {

using namespace compact;

void compact_kv(const std::vector<at::Tensor>& caches, const at::Tensor& context_lens,
                const at::Tensor& accepted_slots, const at::Tensor& accept_len) {
  const char* op = "compact_kv";
  check_compact_kv(caches, context_lens, accepted_slots, accept_len);
  TORCH_CHECK(accepted_slots.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, accepted_slots is on ",
              accepted_slots.device());
  const int64_t B = accepted_slots.size(0), width = accepted_slots.size(1);
  if (caches.empty() || B == 0 || width == 0) return;
  TORCH_CHECK(width < (int64_t{1} << 30), op, ": accepted_slots.size(1) (", width, ") must be below 2^30");

  c10::cuda::CUDAGuard guard(accepted_slots.device());
  const at::Tensor ctx = context_lens.contiguous(), slots = accepted_slots.contiguous(),
                   len = accept_len.contiguous();

  const auto groups = group_by_copy_unit<CacheDesc>(
      caches, op, [&](size_t i, const at::Tensor& t, const int64_t (&byte_strides)[3], int64_t row_bytes) {
        TORCH_CHECK(t.size(2) < (int64_t{1} << 31) && B * t.size(1) < (int64_t{1} << 30), op, ": caches[", i,
                    "] shape ", t.sizes(), " is too large");
        return CacheDesc{static_cast<char*>(t.data_ptr()), byte_strides[0], byte_strides[1], byte_strides[2],
                         static_cast<int32_t>(t.size(1)), static_cast<int32_t>(t.size(2)),
                         static_cast<int32_t>(row_bytes), 0};
      });

  Batch per_call{};
  per_call.context_lens = ctx.data_ptr<int64_t>();
  per_call.accepted_slots = slots.data_ptr<int64_t>();
  per_call.accept_len = len.data_ptr<int32_t>();
  per_call.B = static_cast<int32_t>(B);
  per_call.width = static_cast<int32_t>(width);
  launch_groups(groups, per_call, B, c10::cuda::getCurrentCUDAStream(), op,
                [](auto unit_type) { return compact_kv_kernel<decltype(unit_type)>; });
}

}  // namespace ddtree::cuda
