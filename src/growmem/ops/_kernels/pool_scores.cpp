// Fused CPU forward and backward of Memory Caching's pooled keys and the online memory's score
// (growmem.caching.wrapper.CachedMemory._pools / _scores; Memory Caching paper, Eqs. 9 and 16):
//
//   pool_t = (p0 [first piece continues a segment] + sum_{j <= t in t's piece} k_j) / (cnt0 + i + 1 if mean)
//   s_t    = <u_t, pool_t>                                   (the online memory's score)
//   pools  = pool at the end of every piece that ends a segment; last = the raw sum after the window
//
// without materialising pool_t ([B, T, H, K]). Layouts (contiguous): u, k [B, T, H, K]; p0 [B, H, K] or
// null; pieces as `sizes` and `ends` (1 if the piece ends a segment), P of each; count0 = tokens of the
// first piece's segment seen before this window (0: it starts fresh). Outputs s [B, T, H], pools
// [B, J, H, K] (J = number of ends), last [B, H, K]. Backward: ds, dpools, dlast (each may be null)
// -> du, dk [B, T, H, K], dp0 [B, H, K] (if p0).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

template <typename T>
struct PoolArgs {
  const T *u, *k, *p0;
  const int64_t *sizes, *ends;
  T *s, *pools, *last;
  const T *ds, *dpools, *dlast;
  T *du, *dk, *dp0;
  int64_t B, T_, H, K, P, J, count0;
  bool mean;
};

template <typename T>
inline T inv_count(const PoolArgs<T>& a, bool cont, int64_t i) {
  return a.mean ? T(1) / static_cast<T>((cont ? a.count0 : 0) + i + 1) : T(1);
}

template <typename T>
void pool_forward_row(const PoolArgs<T>& a, int64_t n, std::vector<T>& acc) {
  const int64_t TT = a.T_, H = a.H, K = a.K;
  const int64_t b = n / H, h = n % H;
  acc.resize(K);
  int64_t t = 0, j = 0;
  for (int64_t p = 0; p < a.P; ++p) {
    const bool cont = p == 0 && a.count0 > 0;
    if (cont && a.p0)
      std::copy_n(a.p0 + (b * H + h) * K, K, acc.data());
    else
      std::fill(acc.begin(), acc.end(), T(0));
    const int64_t L = a.sizes[p];
    T inv = 1;
    for (int64_t i = 0; i < L; ++i, ++t) {
      const int64_t row = (b * TT + t) * H + h;
      const T* kt = a.k + row * K;
      const T* ut = a.u + row * K;
      T dot = 0;
      for (int64_t d = 0; d < K; ++d) {
        acc[d] += kt[d];
        dot += ut[d] * acc[d];
      }
      inv = inv_count(a, cont, i);
      a.s[row] = inv * dot;
    }
    if (a.ends[p]) {
      T* out = a.pools + ((b * a.J + j) * H + h) * K;
      for (int64_t d = 0; d < K; ++d) out[d] = acc[d] * inv;
      ++j;
    }
    if (p == a.P - 1) std::copy_n(acc.data(), K, a.last + (b * H + h) * K);
  }
}

template <typename T>
void pool_backward_row(const PoolArgs<T>& a, int64_t n, std::vector<T>& acc) {
  const int64_t TT = a.T_, H = a.H, K = a.K;
  const int64_t b = n / H, h = n % H;
  acc.resize(2 * K);
  T* run = acc.data();   // the running pool (forward direction), for du
  T* grad = run + K;     // the running gradient of the pool (reverse direction), for dk
  int64_t t0 = 0, j = 0;
  for (int64_t p = 0; p < a.P; ++p) {
    const bool cont = p == 0 && a.count0 > 0;
    const int64_t L = a.sizes[p];
    // du_t = ds_t inv_t pool_t
    if (cont && a.p0)
      std::copy_n(a.p0 + (b * H + h) * K, K, run);
    else
      std::fill_n(run, K, T(0));
    for (int64_t i = 0; i < L; ++i) {
      const int64_t row = (b * TT + t0 + i) * H + h;
      const T* kt = a.k + row * K;
      T* dut = a.du + row * K;
      const T w = a.ds ? a.ds[row] * inv_count(a, cont, i) : T(0);
      for (int64_t d = 0; d < K; ++d) {
        run[d] += kt[d];
        dut[d] = w * run[d];
      }
    }
    // dk_j = sum over t >= j of the piece of d pool_t (+ the grads of the piece's end values)
    std::fill_n(grad, K, T(0));
    if (p == a.P - 1 && a.dlast)
      for (int64_t d = 0; d < K; ++d) grad[d] += a.dlast[(b * H + h) * K + d];
    if (a.ends[p]) {
      if (a.dpools) {
        const T inv = inv_count(a, cont, L - 1);
        const T* dp = a.dpools + ((b * a.J + j) * H + h) * K;
        for (int64_t d = 0; d < K; ++d) grad[d] += dp[d] * inv;
      }
      ++j;
    }
    for (int64_t i = L - 1; i >= 0; --i) {
      const int64_t row = (b * TT + t0 + i) * H + h;
      const T* ut = a.u + row * K;
      T* dkt = a.dk + row * K;
      const T w = a.ds ? a.ds[row] * inv_count(a, cont, i) : T(0);
      for (int64_t d = 0; d < K; ++d) {
        grad[d] += w * ut[d];
        dkt[d] = grad[d];
      }
    }
    if (cont && a.p0 && a.dp0) std::copy_n(grad, K, a.dp0 + (b * H + h) * K);
    t0 += L;
  }
  if (a.p0 && a.dp0 && a.count0 <= 0) std::fill_n(a.dp0 + (b * H + h) * K, K, T(0));
}

template <typename T, typename Fn>
int pool_rows(const PoolArgs<T>& a, int nthreads, Fn fn) {
  growmem::for_each_worker(a.B * a.H, nthreads, [&a, &fn](int, int64_t n0, int64_t n1) {
    std::vector<T> acc;
    for (int64_t n = n0; n < n1; ++n) fn(a, n, acc);
  });
  return 0;
}

}  // namespace

extern "C" {

#define GROWMEM_POOL_ENTRIES(T, suffix)                                                                        \
  int growmem_pool_scores_fwd_##suffix(const T* u, const T* k, const T* p0, const int64_t* sizes,              \
                                       const int64_t* ends, T* s, T* pools, T* last, int64_t B, int64_t TT,    \
                                       int64_t H, int64_t K, int64_t P, int64_t J, int64_t count0, int mean,   \
                                       int nthreads) {                                                         \
    PoolArgs<T> a{u, k, p0, sizes, ends, s, pools, last, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, \
                  B, TT, H, K, P, J, count0, mean != 0};                                                       \
    return pool_rows(a, nthreads, pool_forward_row<T>);                                                        \
  }                                                                                                            \
  int growmem_pool_scores_bwd_##suffix(const T* u, const T* k, const T* p0, const int64_t* sizes,              \
                                       const int64_t* ends, const T* ds, const T* dpools, const T* dlast,      \
                                       T* du, T* dk, T* dp0, int64_t B, int64_t TT, int64_t H, int64_t K,      \
                                       int64_t P, int64_t J, int64_t count0, int mean, int nthreads) {         \
    PoolArgs<T> a{u, k, p0, sizes, ends, nullptr, nullptr, nullptr, ds, dpools, dlast, du, dk, dp0,            \
                  B, TT, H, K, P, J, count0, mean != 0};                                                       \
    return pool_rows(a, nthreads, pool_backward_row<T>);                                                       \
  }

GROWMEM_POOL_ENTRIES(float, f32)
GROWMEM_POOL_ENTRIES(double, f64)

}  // extern "C"
