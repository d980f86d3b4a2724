// CUDA build_tree, the host wrapper: checks, outputs, shared memory or scratch, the launch (build_tree_kernel.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <mutex>

#include "cuda/batch_budget_kernel.cuh"
#include "cuda/build_tree_kernel.cuh"
#include "ops.h"

namespace ddtree::cuda {

using namespace build;

TreeResult build_tree(const at::Tensor& logprobs_in, const at::Tensor& token_ids_in,
                      const at::Tensor& root_tokens_in, const at::Tensor& context_lens_in, int64_t max_nodes,
                      const std::optional<at::Tensor>& verify_cost_in, double draft_cost,
                      c10::string_view budget_mode) {
  const char* op = "build_tree";
  const budget::Mode mode = check_build_tree(logprobs_in, token_ids_in, root_tokens_in, context_lens_in,
                                             max_nodes, verify_cost_in, draft_cost, budget_mode);
  // validate.cpp checks that every argument is on logprobs' device.
  TORCH_CHECK(logprobs_in.is_cuda(), op, ": logprobs must be a CUDA tensor for the CUDA kernel, got ",
              logprobs_in.device());
  const int64_t B = logprobs_in.size(0), D = logprobs_in.size(1), K = logprobs_in.size(2);
  TORCH_CHECK(K <= (int64_t{1} << kRankBits), op, ": the CUDA kernel supports at most ", int64_t{1} << kRankBits,
              " candidates per depth, got ", K);
  TORCH_CHECK(D < (int64_t{1} << (32 - kRankBits)), op, ": the CUDA kernel supports depths below ",
              int64_t{1} << (32 - kRankBits), ", got ", D);
  TORCH_CHECK(max_nodes < (int64_t{1} << 24), op, ": max_nodes (", max_nodes, ") is too large");

  c10::cuda::CUDAGuard guard(logprobs_in.device());
  const at::Tensor logprobs = logprobs_in.contiguous(), token_ids = token_ids_in.contiguous();
  const at::Tensor root_tokens = root_tokens_in.contiguous(), context_lens = context_lens_in.contiguous();
  at::Tensor verify_cost;
  if (verify_cost_in) verify_cost = verify_cost_in->contiguous();

  const int64_t T = max_nodes + 1, W = mask_words(T);
  const auto opt = logprobs.options();
  at::Tensor num_nodes = at::empty({B}, opt.dtype(at::kInt));
  at::Tensor tokens = at::empty({B, T}, opt.dtype(at::kLong));
  at::Tensor parents = at::empty({B, T}, opt.dtype(at::kInt));
  at::Tensor depths = at::empty({B, T}, opt.dtype(at::kInt));
  at::Tensor positions = at::empty({B, T}, opt.dtype(at::kLong));
  at::Tensor scores = at::empty({B, T}, opt.dtype(at::kFloat));
  at::Tensor tree_mask = at::empty({B, T, W}, opt.dtype(at::kInt));
  at::Tensor expected = at::empty({B}, opt.dtype(at::kFloat));
  if (B == 0) return {num_nodes, tokens, parents, depths, positions, scores, tree_mask, expected};

  const int64_t Kc = std::min<int64_t>(K, max_nodes + 1);
  // The batch modes build every request's fixed-budget tree, then cut them (batch_budget_kernel.cuh).
  const bool cost = verify_cost.defined() && mode == budget::kRequest;
  const Layout layout = make_layout(max_nodes, D, Kc, cost);

  // Shared memory when it fits (opted in once per device, up to the device's limit), else global scratch.
  // The one-time attribute calls do not touch a stream, so they are harmless under graph capture.
  const int device = logprobs.get_device();
  static std::once_flag opted_in[64];
  static int optin_bytes[64];
  std::call_once(opted_in[device % 64], [&] {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin_bytes[device % 64], cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    if (optin_bytes[device % 64] > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(build_tree_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          optin_bytes[device % 64] - 1024));
    }
  });
  const bool in_smem = layout.total <= dynamic_smem_limit(optin_bytes[device % 64]);
  at::Tensor scratch;
  char* scratch_p = nullptr;
  if (!in_smem) {
    scratch = at::empty({B * layout.total}, opt.dtype(at::kByte));
    scratch_p = reinterpret_cast<char*>(scratch.data_ptr<uint8_t>());
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  build_tree_kernel<<<static_cast<unsigned>(B), kThreads, in_smem ? layout.total : 0, stream>>>(
      logprobs.data_ptr<float>(), token_ids.data_ptr<int64_t>(), root_tokens.data_ptr<int64_t>(),
      context_lens.data_ptr<int64_t>(), cost ? verify_cost.data_ptr<float>() : nullptr,
      cost ? verify_cost.size(1) : 0, static_cast<int>(D), static_cast<int>(K), static_cast<int>(Kc),
      static_cast<int>(max_nodes), draft_cost, scratch_p, in_smem ? 0 : layout.total,
      num_nodes.data_ptr<int32_t>(), tokens.data_ptr<int64_t>(), parents.data_ptr<int32_t>(),
      depths.data_ptr<int32_t>(), positions.data_ptr<int64_t>(), scores.data_ptr<float>(),
      tree_mask.data_ptr<int32_t>(), expected.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (mode != budget::kRequest) {
    at::Tensor cut = at::empty({B}, opt.dtype(at::kInt));
    batch_budget_kernel<<<1, 1, 0, stream>>>(scores.data_ptr<float>(), T, num_nodes.data_ptr<int32_t>(), B,
                                             max_nodes, verify_cost.data_ptr<float>(), draft_cost,
                                             static_cast<int>(mode), cut.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cut_tree_kernel<kThreads><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        cut.data_ptr<int32_t>(), T, W, num_nodes.data_ptr<int32_t>(), tokens.data_ptr<int64_t>(),
        parents.data_ptr<int32_t>(), depths.data_ptr<int32_t>(), positions.data_ptr<int64_t>(),
        scores.data_ptr<float>(), tree_mask.data_ptr<int32_t>(), expected.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {num_nodes, tokens, parents, depths, positions, scores, tree_mask, expected};
}

}  // namespace ddtree::cuda
