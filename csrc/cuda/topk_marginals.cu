// CUDA topk_marginals, the host wrapper: checks, workspace, the two launches (topk_marginals_kernel.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "cuda/topk_marginals_kernel.cuh"
#include "ops.h"

namespace ddtree::cuda {

using namespace topk;

TopkResult topk_marginals(const at::Tensor& logits_in, int64_t k, double temperature) {
  const char* op = "topk_marginals";
  check_topk_marginals(logits_in, k, temperature);
  TORCH_CHECK(logits_in.is_cuda(), op, ": logits must be a CUDA tensor for the CUDA kernel, got ",
              logits_in.device());
  TORCH_CHECK(k <= kMaxK, op, ": the CUDA kernel supports k <= ", kMaxK, ", got ", k);
  const int64_t B = logits_in.size(0), D = logits_in.size(1), V = logits_in.size(2);
  TORCH_CHECK(V < (int64_t{1} << 31), op, ": vocabulary too large (", V, ")");
  const int64_t G = (V + kChunk - 1) / kChunk;
  TORCH_CHECK(G * k <= kMaxCandidates, op, ": the CUDA kernel needs ceil(V / ", kChunk, ") * k <= ",
              kMaxCandidates, " (V up to 262144 at k = 1024), got V = ", V, ", k = ", k);
  const int64_t rows = B * D;
  TORCH_CHECK(rows * G <= std::numeric_limits<int32_t>::max(), op, ": too many rows (", rows, ")");

  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor logprobs = at::empty({B, D, k}, logits.options().dtype(at::kFloat));
  at::Tensor token_ids = at::empty({B, D, k}, logits.options().dtype(at::kLong));
  if (rows == 0) return {logprobs, token_ids};

  // Workspace from the caching allocator (stream-ordered, no synchronisation; fine under graph capture).
  at::Tensor cand = at::empty({rows * G * k}, logits.options().dtype(at::kLong));
  at::Tensor stats = at::empty({rows * G * 2}, logits.options().dtype(at::kFloat));
  at::Tensor posinf = at::empty({rows * G}, logits.options().dtype(at::kInt));
  auto* cand_p = reinterpret_cast<uint64_t*>(cand.data_ptr<int64_t>());
  auto* stats_p = reinterpret_cast<float2*>(stats.data_ptr<float>());

  const float temp = static_cast<float>(temperature);
  const bool divide = temp != 1.0f;  // x / 1.0f == x exactly
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec_ok = (V * static_cast<int64_t>(logits.element_size())) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;

  auto launch_chunks = [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    topk_chunk_kernel<scalar_t><<<static_cast<unsigned>(rows * G), kChunkThreads, 0, stream>>>(
        reinterpret_cast<const scalar_t*>(logits.const_data_ptr()), V, static_cast<int>(G), static_cast<int>(k),
        temp, divide, vec_ok, cand_p, stats_p, posinf.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // Only the three dtypes check_topk_marginals admits (no double instantiation to compile), as the
  // CUDA types that the emulated tests instantiate too (same bits as c10::Half / c10::BFloat16).
  switch (logits.scalar_type()) {
    case at::kFloat: launch_chunks(float{}); break;
    case at::kHalf: launch_chunks(__half{}); break;
    case at::kBFloat16: launch_chunks(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", logits.scalar_type());
  }
  topk_merge_kernel<<<static_cast<unsigned>(rows), kMergeThreads, 0, stream>>>(
      cand_p, stats_p, posinf.data_ptr<int>(), static_cast<int>(G), static_cast<int>(k),
      logprobs.data_ptr<float>(), token_ids.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logprobs, token_ids};
}

}  // namespace ddtree::cuda
