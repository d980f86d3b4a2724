// C[M, N] += A[M, K] @ B[K, N] in fp32, every operand row-major with its own row stride: the two products
// of CPU paged_tree_attention (logits = queries @ keys [d, positions]; outputs = weights @ values), whose
// sizes (tens of rows, a block of positions, one head dim) are too small for a BLAS call to pay.
//
// AVX2 + FMA where the CPU has them (chosen at run time; the build targets plain x86-64): tiles of 4 rows x
// 16 columns held in 8 registers, B's row loaded once per tile for the 4 rows; the last columns of a row
// through masked loads and stores (no read past N). Elsewhere a plain loop the compiler vectorises.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ddtree::cpu {

inline void gemm_acc_plain(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb,
                           int64_t M, int64_t N, int64_t K) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[i * lda + k];
      const float* b = B + k * ldb;
      float* c = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
// Lanes [0, n) of 8 set (n <= 0: none; n >= 8: all).
__attribute__((target("avx2"))) inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 0 ? 0 : n > 8 ? 8 : n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Rows [i, i + R) x columns [j, j + 16) of C, the columns from j + n on left alone (n < 16: masked).
template <int R>
__attribute__((target("avx2,fma"))) inline void gemm_tile(float* C, int64_t ldc, const float* A, int64_t lda,
                                                          const float* B, int64_t ldb, int64_t K, int64_t n) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  if (n >= 16) {
    for (int64_t k = 0; k < K; ++k) {
      const __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
        acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float* c = C + r * ldc;
      _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), acc[r][0]));
      _mm256_storeu_ps(c + 8, _mm256_add_ps(_mm256_loadu_ps(c + 8), acc[r][1]));
    }
    return;
  }
  const __m256i m0 = lanes_below(n), m1 = lanes_below(n - 8);
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_maskload_ps(B + k * ldb, m0), b1 = _mm256_maskload_ps(B + k * ldb + 8, m1);
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* c = C + r * ldc;
    _mm256_maskstore_ps(c, m0, _mm256_add_ps(_mm256_maskload_ps(c, m0), acc[r][0]));
    _mm256_maskstore_ps(c + 8, m1, _mm256_add_ps(_mm256_maskload_ps(c + 8, m1), acc[r][1]));
  }
}

template <int R>
__attribute__((target("avx2,fma"))) void gemm_rows_avx2(float* C, int64_t ldc, const float* A, int64_t lda,
                                                        const float* B, int64_t ldb, int64_t N, int64_t K) {
  for (int64_t j = 0; j < N; j += 16) gemm_tile<R>(C + j, ldc, A, lda, B + j, ldb, K, N - j);
}

__attribute__((target("avx2,fma"))) inline void gemm_acc_avx2(float* C, int64_t ldc, const float* A, int64_t lda,
                                                              const float* B, int64_t ldb, int64_t M, int64_t N,
                                                              int64_t K) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) gemm_rows_avx2<4>(C + i * ldc, ldc, A + i * lda, lda, B, ldb, N, K);
  switch (M - i) {
    case 3: gemm_rows_avx2<3>(C + i * ldc, ldc, A + i * lda, lda, B, ldb, N, K); break;
    case 2: gemm_rows_avx2<2>(C + i * ldc, ldc, A + i * lda, lda, B, ldb, N, K); break;
    case 1: gemm_rows_avx2<1>(C + i * ldc, ldc, A + i * lda, lda, B, ldb, N, K); break;
    default: break;
  }
}
#endif

inline void gemm_acc(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t M,
                     int64_t N, int64_t K) {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_avx2) return gemm_acc_avx2(C, ldc, A, lda, B, ldb, M, N, K);
#endif
  gemm_acc_plain(C, ldc, A, lda, B, ldb, M, N, K);
}

}  // namespace ddtree::cpu
