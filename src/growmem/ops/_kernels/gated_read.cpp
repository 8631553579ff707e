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
// Worker threads take contiguous groups of (batch, head) rows. Per row the cached states are stacked
// once into [S_0; ..; S_{N-1}] ([N K, V]); per piece p (L tokens, n states visible), in weighted-query
// form Qw = [scale g_0 q | .. | scale g_{n-1} q] ([L, n K]): forward r_p = Qw [S_0; ..] (one GEMM into
// r's rows); backward dQw = dr_p [S_0; ..]^T and d[S_0; ..] += Qw^T dr_p (two GEMMs), dq and dg from
// dQw. Only per-piece buffers ([L, n K]) are formed, never [T, N, K].

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

// The cached states S_0 .. S_{n-1} of one (batch, head) row stacked into a contiguous [n K, V] buffer,
// so that a piece reads all of its visible states in one GEMM.
template <typename T>
void stack_states(const GatedArgs<T>& a, int64_t b, int64_t h, int64_t n, T* out) {
  const int64_t H = a.H, K = a.K, V = a.V, N = a.N;
  for (int64_t i = 0; i < n; ++i) std::copy_n(a.cached + ((b * N + i) * H + h) * K * V, K * V, out + i * K * V);
}

// Qw[t, i K + d] = scale g[t, i] q[t, d] for the L tokens of a piece starting at t0 and its n states
template <typename T>
void weighted_queries(const GatedArgs<T>& a, int64_t b, int64_t h, int64_t t0, int64_t L, int64_t n, T* Qw) {
  const int64_t H = a.H, K = a.K, N = a.N, TT = a.T_;
  for (int64_t t = 0; t < L; ++t) {
    const int64_t row = (b * TT + t0 + t) * H + h;
    const T* qt = a.q + row * K;
    const T* gt = a.g + row * N;
    T* out = Qw + t * n * K;
    for (int64_t i = 0; i < n; ++i) {
      const T w = a.scale * gt[i];
      for (int64_t d = 0; d < K; ++d) out[i * K + d] = w * qt[d];
    }
  }
}

int64_t max_count(const int64_t* counts, int64_t P, int64_t N) {
  int64_t m = 0;
  for (int64_t p = 0; p < P; ++p) m = std::max(m, std::min(counts[p], N));
  return m;
}

template <typename T>
void gated_forward_row(const GatedArgs<T>& a, int64_t n, std::vector<T>& buf) {
  const int64_t TT = a.T_, H = a.H, K = a.K, V = a.V, N = a.N;
  const int64_t b = n / H, h = n % H;
  const int64_t nmax = max_count(a.counts, a.P, N);
  int64_t Lmax = 0;
  for (int64_t p = 0; p < a.P; ++p) Lmax = std::max(Lmax, a.sizes[p]);
  buf.resize(nmax * K * V + Lmax * nmax * K);
  T* Sst = buf.data();
  T* Qw = Sst + nmax * K * V;
  stack_states(a, b, h, nmax, Sst);
  int64_t t0 = 0;
  for (int64_t p = 0; p < a.P; ++p) {
    const int64_t L = a.sizes[p], np = std::min(a.counts[p], N);
    T* rp = a.r + ((b * TT + t0) * H + h) * V;
    if (np == 0) {
      for (int64_t t = 0; t < L; ++t) std::fill_n(rp + t * H * V, V, T(0));
    } else {
      weighted_queries(a, b, h, t0, L, np, Qw);
      gemm<T>(false, false, L, V, np * K, T(1), Qw, np * K, Sst, V, T(0), rp, H * V);  // r = Qw [S_0; ..]
    }
    t0 += L;
  }
}

template <typename T>
void gated_backward_row(const GatedArgs<T>& a, int64_t n, std::vector<T>& buf) {
  const int64_t TT = a.T_, H = a.H, K = a.K, V = a.V, N = a.N;
  const int64_t b = n / H, h = n % H;
  const int64_t nmax = max_count(a.counts, a.P, N);
  int64_t Lmax = 0;
  for (int64_t p = 0; p < a.P; ++p) Lmax = std::max(Lmax, a.sizes[p]);
  buf.assign(2 * nmax * K * V + 2 * Lmax * nmax * K, T(0));
  T* Sst = buf.data();
  T* dSst = Sst + nmax * K * V;  // [nmax K, V], accumulated over pieces
  T* Qw = dSst + nmax * K * V;   // [L, n K]
  T* dQw = Qw + Lmax * nmax * K;  // [L, n K]
  stack_states(a, b, h, nmax, Sst);
  int64_t t0 = 0;
  for (int64_t p = 0; p < a.P; ++p) {
    const int64_t L = a.sizes[p], np = std::min(a.counts[p], N), nK = np * K;
    const T* drp = a.dr + ((b * TT + t0) * H + h) * V;
    if (np > 0) gemm<T>(false, true, L, nK, V, T(1), drp, H * V, Sst, V, T(0), dQw, nK);  // dQw = dr [S_0; ..]^T
    for (int64_t t = 0; t < L; ++t) {
      const int64_t row = (b * TT + t0 + t) * H + h;
      const T* qt = a.q + row * K;
      const T* gt = a.g + row * N;
      T* dqt = a.dq + row * K;
      T* dgt = a.dg + row * N;
      std::fill_n(dqt, K, T(0));
      std::fill_n(dgt, N, T(0));
      for (int64_t i = 0; i < np; ++i) {
        const T* dw = dQw + t * nK + i * K;
        const T w = a.scale * gt[i];
        T dot = 0;
        for (int64_t d = 0; d < K; ++d) {
          dqt[d] += w * dw[d];
          dot += dw[d] * qt[d];
        }
        dgt[i] = a.scale * dot;
      }
    }
    if (np > 0) {
      weighted_queries(a, b, h, t0, L, np, Qw);
      gemm<T>(true, false, nK, V, L, T(1), Qw, nK, drp, H * V, T(1), dSst, V);  // d[S_0; ..] += Qw^T dr
    }
    t0 += L;
  }
  for (int64_t i = 0; i < N; ++i) {
    T* dS = a.dS + ((b * N + i) * H + h) * K * V;
    if (i < nmax)
      std::copy_n(dSst + i * K * V, K * V, dS);
    else
      std::fill_n(dS, K * V, T(0));
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
