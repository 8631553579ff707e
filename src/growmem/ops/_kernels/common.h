// Shared pieces of growmem's fused CPU kernels (see growmem/ops/_native.py): the BLAS that the torch
// library carries, a row-major GEMM on top of it, and the worker loop.
#pragma once

#include <algorithm>
#include <cstdint>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*);
// MKL's C entry (the lower-case symbol is the Fortran one); weak: absent from non-MKL builds of torch
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace growmem {

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                      const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                      const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                      const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C[m, n] = alpha op(A) op(B) + beta C (op = transpose if the flag is set), through the
// column-major BLAS: C^T = op(B)^T op(A)^T.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  const char* fa = ta ? "T" : "N";
  const char* fb = tb ? "T" : "N";
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  blas_gemm(fb, fa, &ni, &mi, &ki, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

// Run fn(w, n0, n1) for workers w = 0 .. nt-1 over contiguous groups [n0, n1) of `rows` rows. The
// workers are an OpenMP team: compiled with -fopenmp and loaded into a process where torch's libgomp
// is already present, this is torch's own thread pool, so a kernel never competes with idle-spinning
// torch threads (a separate std::thread pool did, and ran 2x slower between torch ops). Each worker
// calls the BLAS single-threaded: the workers are the parallelism.
template <typename Fn>
void for_each_worker(int64_t rows, int nthreads, Fn fn) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, rows)));
#pragma omp parallel for num_threads(nt) schedule(static, 1)
  for (int w = 0; w < nt; ++w) {
    const int prev = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    fn(w, rows * w / nt, rows * (w + 1) / nt);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
  }
}

}  // namespace growmem
