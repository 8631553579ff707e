// Fused CPU forward and backward of the gated reads of Memory Caching's GRM / Soup on matrix states
// (growmem.caching.wrapper._GatedRead; Memory Caching paper, Eqs. 9-10 and 14-15):
//
//   r[b, t, h] = sum_{i < n_p} g[b, t, h, i] S_i[b, h]^T (scale q[b, t, h])   for t in piece p
//
// Layouts (contiguous): cached [B, N, H, K, V]; q [B, T, H, K]; g [B, T, H, N]; the window's pieces as
// `sizes` (tokens) and `counts` (cached states visible to the piece, n_p), P of each; r [B, T, H, V].
// Backward: dr [B, T, H, V] in; dS [B, N, H, K, V], dq [B, T, H, K], dg [B, T, H, N] out (written in
// full; dg is 0 at i >= n_p).
//
// Worker threads take contiguous groups of (batch, head) rows. Per row, piece and visible memory i:
// forward r_p += (scale g_i q_p) S_i (one GEMM into r's rows); backward d(g_i q_p) = dr_p S_i^T and
// dS_i += (scale g_i q_p)^T dr_p (two GEMMs), dq and dg from d(g_i q_p). Nothing of size [T, N, K] is
// ever formed.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using growmem::gemm;

template <typename T>
struct GatedArgs {
  const T *cached, *q, *g;
  const int64_t *sizes, *counts;
  T* r;
  const T* dr;
  T *dS, *dq, *dg;
  int64_t B, N, T_, H, K, V, P;
  T scale;
};

// qw[t] = scale g[t, i] q[t] for the L tokens of a piece starting at t0 (row stride H of the inputs)
template <typename T>
void weighted_queries(const GatedArgs<T>& a, int64_t b, int64_t h, int64_t t0, int64_t L, int64_t i, T* qw) {
  const int64_t H = a.H, K = a.K, N = a.N, TT = a.T_;
  for (int64_t t = 0; t < L; ++t) {
    const int64_t row = (b * TT + t0 + t) * H + h;
    const T wt = a.scale * a.g[row * N + i];
    const T* qt = a.q + row * K;
    T* out = qw + t * K;
    for (int64_t d = 0; d < K; ++d) out[d] = wt * qt[d];
  }
}

template <typename T>
void gated_forward_row(const GatedArgs<T>& a, int64_t n, std::vector<T>& buf) {
  const int64_t TT = a.T_, H = a.H, K = a.K, V = a.V, N = a.N;
  const int64_t b = n / H, h = n % H;
  int64_t t0 = 0;
  for (int64_t p = 0; p < a.P; ++p) {
    const int64_t L = a.sizes[p], np = std::min(a.counts[p], N);
    T* rp = a.r + ((b * TT + t0) * H + h) * V;
    if (np == 0)
      for (int64_t t = 0; t < L; ++t) std::fill_n(rp + t * H * V, V, T(0));
    buf.resize(L * K);
    for (int64_t i = 0; i < np; ++i) {
      weighted_queries(a, b, h, t0, L, i, buf.data());
      const T* S = a.cached + ((b * N + i) * H + h) * K * V;
      gemm<T>(false, false, L, V, K, T(1), buf.data(), K, S, V, i == 0 ? T(0) : T(1), rp, H * V);
    }
    t0 += L;
  }
}

template <typename T>
void gated_backward_row(const GatedArgs<T>& a, int64_t n, std::vector<T>& buf) {
  const int64_t TT = a.T_, H = a.H, K = a.K, V = a.V, N = a.N;
  const int64_t b = n / H, h = n % H;
  for (int64_t i = 0; i < N; ++i) std::fill_n(a.dS + ((b * N + i) * H + h) * K * V, K * V, T(0));
  int64_t t0 = 0;
  for (int64_t p = 0; p < a.P; ++p) {
    const int64_t L = a.sizes[p], np = std::min(a.counts[p], N);
    for (int64_t t = 0; t < L; ++t) {
      const int64_t row = (b * TT + t0 + t) * H + h;
      std::fill_n(a.dq + row * K, K, T(0));
      std::fill_n(a.dg + row * N, N, T(0));
    }
    const T* drp = a.dr + ((b * TT + t0) * H + h) * V;
    buf.resize(2 * L * K);
    T* qw = buf.data();
    T* dqw = qw + L * K;
    for (int64_t i = 0; i < np; ++i) {
      const T* S = a.cached + ((b * N + i) * H + h) * K * V;
      gemm<T>(false, true, L, K, V, T(1), drp, H * V, S, V, T(0), dqw, K);  // d(g_i q) = dr S_i^T
      for (int64_t t = 0; t < L; ++t) {
        const int64_t row = (b * TT + t0 + t) * H + h;
        const T gt = a.scale * a.g[row * N + i];
        const T* qt = a.q + row * K;
        const T* dw = dqw + t * K;
        T* dqt = a.dq + row * K;
        T dot = 0;
        for (int64_t d = 0; d < K; ++d) {
          dqt[d] += gt * dw[d];
          dot += dw[d] * qt[d];
        }
        a.dg[row * N + i] = a.scale * dot;
      }
      weighted_queries(a, b, h, t0, L, i, qw);
      T* dS = a.dS + ((b * N + i) * H + h) * K * V;
      gemm<T>(true, false, K, V, L, T(1), qw, K, drp, H * V, T(1), dS, V);  // dS_i += (g_i q)^T dr
    }
    t0 += L;
  }
}

template <typename T, typename Fn>
int gated_rows(const GatedArgs<T>& a, int nthreads, Fn fn) {
  growmem::for_each_worker(a.B * a.H, nthreads, [&a, &fn](int, int64_t n0, int64_t n1) {
    std::vector<T> buf;
    for (int64_t n = n0; n < n1; ++n) fn(a, n, buf);
  });
  return 0;
}

}  // namespace

extern "C" {

#define GROWMEM_GATED_ENTRIES(T, suffix)                                                                       \
  int growmem_gated_read_fwd_##suffix(const T* cached, const T* q, const T* g, const int64_t* sizes,          \
                                      const int64_t* counts, T* r, int64_t B, int64_t N, int64_t TT,          \
                                      int64_t H, int64_t K, int64_t V, int64_t P, double scale, int nthreads) { \
    GatedArgs<T> a{cached, q, g, sizes, counts, r, nullptr, nullptr, nullptr, nullptr, B, N, TT, H, K, V, P,  \
                   static_cast<T>(scale)};                                                                     \
    return gated_rows(a, nthreads, gated_forward_row<T>);                                                      \
  }                                                                                                            \
  int growmem_gated_read_bwd_##suffix(const T* cached, const T* q, const T* g, const int64_t* sizes,          \
                                      const int64_t* counts, const T* dr, T* dS, T* dq, T* dg, int64_t B,     \
                                      int64_t N, int64_t TT, int64_t H, int64_t K, int64_t V, int64_t P,      \
                                      double scale, int nthreads) {                                            \
    GatedArgs<T> a{cached, q, g, sizes, counts, nullptr, dr, dS, dq, dg, B, N, TT, H, K, V, P,                \
                   static_cast<T>(scale)};                                                                     \
    return gated_rows(a, nthreads, gated_backward_row<T>);                                                     \
  }

GROWMEM_GATED_ENTRIES(float, f32)
GROWMEM_GATED_ENTRIES(double, f64)

}  // extern "C"
