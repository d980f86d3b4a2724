// accept_tree on CUDA, the host wrapper; the kernel is in accept_tree_kernel.cuh.
// No value is checked on the host: the kernel clamps num_nodes, which keeps every read in bounds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/accept_tree_kernel.cuh"
#include "ops.h"

namespace ddtree::cuda {

using accept::accept_tree_kernel;
using accept::kWarpsPerBlock;

AcceptResult accept_tree(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& num_nodes,
                         const at::Tensor& target_tokens, int64_t max_depth) {
  check_accept_tree(tokens, parents, num_nodes, target_tokens, max_depth);
  TORCH_CHECK(tokens.is_cuda(), "accept_tree: the CUDA kernel needs CUDA tensors, tokens is on ", tokens.device());
  const int64_t B = tokens.size(0), slots = tokens.size(1);
  TORCH_CHECK(slots < (int64_t{1} << 30), "accept_tree: tokens.size(1) (", slots, ") must be below 2^30");
  const int64_t width = accept_width(slots, max_depth);

  c10::cuda::CUDAGuard guard(tokens.device());
  auto opts = tokens.options();
  at::Tensor accepted = at::empty({B, width}, opts.dtype(at::kLong));
  at::Tensor len = at::empty({B}, opts.dtype(at::kInt));
  at::Tensor next = at::empty({B}, opts.dtype(at::kLong));
  if (B == 0) return {accepted, len, next};

  const at::Tensor tok = tokens.contiguous(), par = parents.contiguous(), nn = num_nodes.contiguous(),
                   tgt = target_tokens.contiguous();
  const int64_t blocks = (B + kWarpsPerBlock - 1) / kWarpsPerBlock;
  accept_tree_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
      tok.data_ptr<int64_t>(), par.data_ptr<int32_t>(), nn.data_ptr<int32_t>(), tgt.data_ptr<int64_t>(),
      accepted.data_ptr<int64_t>(), len.data_ptr<int32_t>(), next.data_ptr<int64_t>(), static_cast<int>(B),
      static_cast<int>(slots), static_cast<int>(width));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {accepted, len, next};
}

}  // namespace ddtree::cuda
