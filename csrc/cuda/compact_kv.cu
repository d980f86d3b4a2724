// compact_kv on CUDA: every layer's K and V caches in one launch.
//
// One CTA per (cache, request b, head h). Position ctx + i receives position ctx + accepted_slots[b, i]
// for i < accept_len[b], "as if every read happened before any write": the CTA stages the source rows
// in shared memory, __syncthreads(), then writes them. When more rows are accepted than fit in the
// stage (kStageBytes / row bytes, e.g. 128 rows of d = 128 bf16), it proceeds in chunks of rows in
// order; that is still exact whenever accepted_slots[b, i] >= i, which holds for every root path
// accept_tree returns (slots strictly increase from 0), because a chunk's writes land below every
// later source.
//
// The caches are passed by value in a kernel-argument struct (no host->device copy, nothing to keep
// alive, safe under CUDA-graph capture), up to kMaxCaches per launch. Rows are moved as raw bytes in
// the widest unit (16/8/4/2/1 bytes) that the cache's base address, strides and row size allow, so
// caches of different dtypes share a launch; caches are grouped by that unit (one launch per unit,
// normally just one).
//
// Without a host sync, invalid values are skipped rather than raised: a context length outside
// [0, S), accept_len outside [0, width] (clamped) and slots that are negative or land at or past S.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <vector>

#include "ops.h"

namespace ddtree::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kStageBytes = 32 * 1024;
constexpr int kMaxCaches = 128;  // 48 bytes each: 6 KiB of kernel arguments (limit 32 KiB since CUDA 12.1)

struct CacheDesc {
  char* base;
  int64_t sb, sh, ss;  // byte strides of dims 0, 1, 2 (dim 3 is contiguous)
  int32_t H, S;
  int32_t row_bytes;   // d * element size
  int32_t cta_begin;   // first CTA of this cache in the launch; it owns B * H CTAs
};

struct Batch {
  CacheDesc caches[kMaxCaches];
  const int64_t* context_lens;    // [B]
  const int64_t* accepted_slots;  // [B, width]
  const int32_t* accept_len;      // [B]
  int32_t count, B, width;
};

template <typename U>
__global__ void __launch_bounds__(kThreads) compact_kv_kernel(const __grid_constant__ Batch batch) {
  __shared__ U stage[kStageBytes / sizeof(U)];
  const int cta = blockIdx.x;
  int ci = 0;
  while (ci + 1 < batch.count && batch.caches[ci + 1].cta_begin <= cta) ++ci;
  const CacheDesc& c = batch.caches[ci];
  const int local = cta - c.cta_begin;
  const int b = local / c.H, h = local % c.H;

  // Uniform across the CTA, so returning here keeps the __syncthreads below safe.
  const int64_t ctx = batch.context_lens[b];
  if (ctx < 0 || ctx >= c.S) return;
  int a = batch.accept_len[b];
  a = a < 0 ? 0 : (a > batch.width ? batch.width : a);

  const int64_t* slots = batch.accepted_slots + static_cast<int64_t>(b) * batch.width;
  char* slice = c.base + b * c.sb + h * c.sh;
  const int units = c.row_bytes / static_cast<int>(sizeof(U));
  const int rows_per_chunk = kStageBytes / c.row_bytes;

  for (int i0 = 0; i0 < a; i0 += rows_per_chunk) {
    const int n = min(rows_per_chunk, a - i0);
    for (int u = threadIdx.x; u < n * units; u += kThreads) {
      const int i = i0 + u / units;
      const int64_t s = slots[i];
      if (s >= 0 && s != i && ctx + s < c.S && ctx + i < c.S) {
        stage[u] = *reinterpret_cast<const U*>(slice + (ctx + s) * c.ss + (u % units) * sizeof(U));
      }
    }
    __syncthreads();  // every read of this chunk before any of its writes
    for (int u = threadIdx.x; u < n * units; u += kThreads) {
      const int i = i0 + u / units;
      const int64_t s = slots[i];
      if (s >= 0 && s != i && ctx + s < c.S && ctx + i < c.S) {
        *reinterpret_cast<U*>(slice + (ctx + i) * c.ss + (u % units) * sizeof(U)) = stage[u];
      }
    }
    __syncthreads();  // the stage is reused by the next chunk
  }
}

// Widest copy unit that divides the base address, every byte stride and the row size.
int copy_unit(const at::Tensor& t) {
  const int64_t es = t.element_size();
  int64_t bits = reinterpret_cast<uintptr_t>(t.data_ptr()) | (t.size(3) * es);
  for (int dim = 0; dim < 3; ++dim) bits |= t.stride(dim) * es;
  for (int unit : {16, 8, 4, 2}) {
    if (bits % unit == 0) return unit;
  }
  return 1;
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
    groups[copy_unit(t)].push_back(CacheDesc{static_cast<char*>(t.data_ptr()), t.stride(0) * es, t.stride(1) * es,
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
