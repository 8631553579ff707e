// Fused CPU forward and backward of Sparse Selective Caching's reads of matrix states
// (growmem.caching.wrapper._SelectedRead; Memory Caching paper, Eqs. 16-17):
//
//   r[b, t, h] = sum_j w[b, t, h, j] S_{sel[b, t, h, j]}[b, h]^T (scale q[b, t, h])
//
// Layouts (contiguous): cached [B, N, H, K, V]; q [B, T, H, K]; w [B, T, H, k]; sel [B, T, H, k] (int64
// memory ids, -1 = unused slot); r [B, T, H, V]. Backward: dr [B, T, H, V] in, dS [B, N, H, K, V],
// dq [B, T, H, K], dw [B, T, H, k] out (all written in full).
//
// Worker threads take contiguous groups of (batch, head) rows. Per row, the (token, slot) picks are
// bucketed by memory with a counting sort; per picked memory i, the weighted queries of the tokens
// that picked it are gathered into a small buffer, multiplied by S_i in one BLAS call, and the rows
// added into r. The backward does the same walk: dS_i = (w q)^T dr, d(w q) = dr S_i^T.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using growmem::gemm;

template <typename T>
struct ReadArgs {
  const T *cached, *q, *w;
  const int64_t* sel;
  T* r;  // forward output
  const T* dr;
  T *dS, *dq, *dw;  // backward outputs
  int64_t B, N, T_, H, K, V, k;
  T scale;
};

// Picks of one (batch, head) row bucketed by memory: entries start[i] .. start[i + 1] - 1 of `pick`
// are the (token * k + slot) picks of memory i, in token order.
struct Buckets {
  std::vector<int64_t> start, pick, fill;
  template <typename T>
  void build(const ReadArgs<T>& a, int64_t b, int64_t h) {
    const int64_t TT = a.T_, H = a.H, k = a.k, N = a.N;
    start.assign(N + 1, 0);
    for (int64_t t = 0; t < TT; ++t) {
      const int64_t* s = a.sel + ((b * TT + t) * H + h) * k;
      for (int64_t j = 0; j < k; ++j)
        if (s[j] >= 0 && s[j] < N) ++start[s[j] + 1];
    }
    for (int64_t i = 0; i < N; ++i) start[i + 1] += start[i];
    pick.resize(start[N]);
    fill.assign(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < TT; ++t) {
      const int64_t* s = a.sel + ((b * TT + t) * H + h) * k;
      for (int64_t j = 0; j < k; ++j)
        if (s[j] >= 0 && s[j] < N) pick[fill[s[j]]++] = t * k + j;
    }
  }
};

template <typename T>
void read_forward_row(const ReadArgs<T>& a, int64_t n, Buckets& bk, std::vector<T>& buf) {
  const int64_t TT = a.T_, H = a.H, K = a.K, V = a.V, k = a.k, N = a.N;
  const int64_t b = n / H, h = n % H;
  for (int64_t t = 0; t < TT; ++t) std::fill_n(a.r + ((b * TT + t) * H + h) * V, V, T(0));
  bk.build(a, b, h);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t c = bk.start[i + 1] - bk.start[i];
    if (c == 0) continue;
    buf.resize(c * (K + V));
    T* Qw = buf.data();
    T* R = Qw + c * K;
    const int64_t* p = bk.pick.data() + bk.start[i];
    for (int64_t e = 0; e < c; ++e) {
      const int64_t t = p[e] / k, j = p[e] % k;
      const int64_t row = (b * TT + t) * H + h;
      const T wt = a.w[row * k + j] * a.scale;
      const T* qt = a.q + row * K;
      for (int64_t d = 0; d < K; ++d) Qw[e * K + d] = wt * qt[d];
    }
    const T* S = a.cached + ((b * N + i) * H + h) * K * V;
    gemm<T>(false, false, static_cast<int>(c), static_cast<int>(V), static_cast<int>(K), T(1), Qw,
            static_cast<int>(K), S, static_cast<int>(V), T(0), R, static_cast<int>(V));
    for (int64_t e = 0; e < c; ++e) {
      T* rt = a.r + ((b * TT + p[e] / k) * H + h) * V;
      for (int64_t d = 0; d < V; ++d) rt[d] += R[e * V + d];
    }
  }
}

template <typename T>
void read_backward_row(const ReadArgs<T>& a, int64_t n, Buckets& bk, std::vector<T>& buf) {
  const int64_t TT = a.T_, H = a.H, K = a.K, V = a.V, k = a.k, N = a.N;
  const int64_t b = n / H, h = n % H;
  for (int64_t t = 0; t < TT; ++t) {
    const int64_t row = (b * TT + t) * H + h;
    std::fill_n(a.dq + row * K, K, T(0));
    std::fill_n(a.dw + row * k, k, T(0));
  }
  bk.build(a, b, h);
  for (int64_t i = 0; i < N; ++i) {
    T* dS = a.dS + ((b * N + i) * H + h) * K * V;
    const int64_t c = bk.start[i + 1] - bk.start[i];
    if (c == 0) {
      std::fill_n(dS, K * V, T(0));
      continue;
    }
    buf.resize(c * (2 * K + V));
    T* Qw = buf.data();   // [c, K]  scale w q
    T* dR = Qw + c * K;   // [c, V]  gathered dr
    T* dQw = dR + c * V;  // [c, K]  grad of the weighted queries
    const int64_t* p = bk.pick.data() + bk.start[i];
    for (int64_t e = 0; e < c; ++e) {
      const int64_t t = p[e] / k, j = p[e] % k;
      const int64_t row = (b * TT + t) * H + h;
      const T wt = a.w[row * k + j] * a.scale;
      const T* qt = a.q + row * K;
      for (int64_t d = 0; d < K; ++d) Qw[e * K + d] = wt * qt[d];
      std::copy_n(a.dr + row * V, V, dR + e * V);
    }
    const T* S = a.cached + ((b * N + i) * H + h) * K * V;
    const int ci = static_cast<int>(c), Ki = static_cast<int>(K), Vi = static_cast<int>(V);
    gemm<T>(true, false, Ki, Vi, ci, T(1), Qw, Ki, dR, Vi, T(0), dS, Vi);    // dS_i = (w q)^T dr
    gemm<T>(false, true, ci, Ki, Vi, T(1), dR, Vi, S, Vi, T(0), dQw, Ki);    // d(w q) = dr S_i^T
    for (int64_t e = 0; e < c; ++e) {
      const int64_t t = p[e] / k, j = p[e] % k;
      const int64_t row = (b * TT + t) * H + h;
      const T wt = a.w[row * k + j] * a.scale;
      const T* qt = a.q + row * K;
      T* dqt = a.dq + row * K;
      T dot = 0;
      for (int64_t d = 0; d < K; ++d) {
        dqt[d] += wt * dQw[e * K + d];
        dot += dQw[e * K + d] * qt[d];
      }
      a.dw[row * k + j] = a.scale * dot;
    }
  }
}

template <typename T, typename Fn>
int parallel_rows(int64_t rows, int nthreads, Fn fn) {
  growmem::for_each_worker(rows, nthreads, [&fn](int, int64_t n0, int64_t n1) {
    Buckets bk;
    std::vector<T> buf;
    for (int64_t n = n0; n < n1; ++n) fn(n, bk, buf);
  });
  return 0;
}

}  // namespace

extern "C" {

#define GROWMEM_READ_ENTRIES(T, suffix)                                                                          \
  int growmem_selected_read_fwd_##suffix(const T* cached, const T* q, const T* w, const int64_t* sel, T* r,       \
                                         int64_t B, int64_t N, int64_t TT, int64_t H, int64_t K, int64_t V,      \
                                         int64_t k, double scale, int nthreads) {                                \
    ReadArgs<T> a{cached, q, w, sel, r, nullptr, nullptr, nullptr, nullptr, B, N, TT, H, K, V, k,                \
                  static_cast<T>(scale)};                                                                        \
    return parallel_rows<T>(B * H, nthreads,                                                                     \
                            [&a](int64_t n, Buckets& bk, std::vector<T>& buf) { read_forward_row(a, n, bk, buf); }); \
  }                                                                                                              \
  int growmem_selected_read_bwd_##suffix(const T* cached, const T* q, const T* w, const int64_t* sel,            \
                                         const T* dr, T* dS, T* dq, T* dw, int64_t B, int64_t N, int64_t TT,     \
                                         int64_t H, int64_t K, int64_t V, int64_t k, double scale, int nthreads) { \
    ReadArgs<T> a{cached, q, w, sel, nullptr, dr, dS, dq, dw, B, N, TT, H, K, V, k, static_cast<T>(scale)};    \
    return parallel_rows<T>(B * H, nthreads,                                                                     \
                            [&a](int64_t n, Buckets& bk, std::vector<T>& buf) { read_backward_row(a, n, bk, buf); }); \
  }

GROWMEM_READ_ENTRIES(float, f32)
GROWMEM_READ_ENTRIES(double, f64)

}  // extern "C"
