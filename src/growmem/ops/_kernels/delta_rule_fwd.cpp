// Fused CPU forward of the chunked (gated) delta rule: growmem.ops.delta_rule, WY / UT form.
//
// Plain C++ (no torch headers, so it compiles in about a second); the matrix products go to the
// BLAS that the torch library already carries (Fortran `sgemm_` / `dgemm_`, resolved when the
// library is linked against libtorch_cpu). growmem.ops._native compiles and loads it with ctypes.
//
// Worker threads take contiguous groups of (batch, head) rows and walk them chunk by chunk, every
// temporary of a chunk in small, cache-resident buffers; the triangular solve is register-tiled. Per chunk of c <= C tokens
// (G_i = cumulative log decay within the chunk, dec = exp(G_{c-1})):
//
//   qg = q e^{G},  kg = k e^{G},  kd = k e^{G_{c-1} - G}
//   P  = tril((q k^T) * D),  KD = strict_tril((k k^T) * D),  D_ij = e^{G_i - G_j}
//   (I + diag(beta) KD) [W | U] = [diag(beta) kg | diag(beta) v]     (forward substitution)
//   u  = U - W S
//   o  = scale (qg S + P u)
//   S' = dec S + kd^T u
//
// D is factored through the chunk end (qg kd^T e^{-G_{c-1}}) while the chunk's total log decay is
// below `limit` (every factor then stays far inside the dtype's range), and formed with exponents
// <= 0 otherwise, exactly as in the eager path.
//
// Layouts (all contiguous): q, k [B, T, H, K]; v [B, T, H, V]; g (may be null), beta [B, T, H];
// states [NC + 1, B * H, K, V] with states[0] filled by the caller; o [B, T, H, V].

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*);
// MKL's C entry (the lower-case symbol is the Fortran one); weak: absent from non-MKL builds of torch
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace {

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
void gemm(bool ta, bool tb, int m, int n, int k, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
          int ldc) {
  const char* fa = ta ? "T" : "N";
  const char* fb = tb ? "T" : "N";
  blas_gemm(fb, fa, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

template <typename T>
struct Args {
  const T *q, *k, *v, *g, *beta;
  T *states, *o;
  int64_t B, T_, H, K, V, C;
  T scale, limit;
};

// SIMD vectors of 32 bytes through GCC / Clang vector extensions (unaligned loads and stores allowed)
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(32), aligned(4)));
  static constexpr int width = 8;
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(32), aligned(8)));
  static constexpr int width = 4;
};

// rows i = 1 .. c-1 of (I + diag(beta) KD) X = R, solved in place (X_i = R_i - sum_{j<i} beta_i KD_ij X_j),
// kVec SIMD vectors of columns at a time, held in registers across the j loop
constexpr int kVec = 4;

template <typename T>
void forward_substitution(T* __restrict R, int W, const T* __restrict KD, int ldkd, const T* __restrict bt, int c) {
  using vec = typename Simd<T>::type;
  constexpr int L = Simd<T>::width, tile = kVec * L;
  for (int i = 1; i < c; ++i) {
    T* ri = R + static_cast<int64_t>(i) * W;
    const T* kdi = KD + static_cast<int64_t>(i) * ldkd;
    const T bi = bt[i];
    int d0 = 0;
    for (; d0 + tile <= W; d0 += tile) {
      vec acc[kVec];
      for (int t = 0; t < kVec; ++t) acc[t] = *reinterpret_cast<const vec*>(ri + d0 + t * L);
      for (int j = 0; j < i; ++j) {
        const T aij = bi * kdi[j];
        const T* rj = R + static_cast<int64_t>(j) * W + d0;
        for (int t = 0; t < kVec; ++t) acc[t] -= aij * *reinterpret_cast<const vec*>(rj + t * L);
      }
      for (int t = 0; t < kVec; ++t) *reinterpret_cast<vec*>(ri + d0 + t * L) = acc[t];
    }
    for (int d = d0; d < W; ++d) {
      T acc = ri[d];
      for (int j = 0; j < i; ++j) acc -= bi * kdi[j] * R[static_cast<int64_t>(j) * W + d];
      ri[d] = acc;
    }
  }
}

// Per-worker buffers for one chunk of one (batch, head) row.
template <typename T>
struct Workspace {
  std::vector<T> buf;
  T *QK, *kd, *X, *R, *u, *M2, *G, *bt;
  Workspace(int64_t C, int64_t K, int64_t V) : buf(C * (5 * K + 2 * (K + V) + 2 * C + 2)) {
    QK = buf.data();      // [2C, K]: [qg; kg] (kg starts at row c)
    kd = QK + 2 * C * K;  // [C, K]
    X = kd + C * K;       // [2C, K]: raw [q; k] (strong-decay chunks only)
    R = X + 2 * C * K;    // [C, K + V]: [diag(beta) kg | diag(beta) v], then [W | U]
    u = R + C * (K + V);  // [C, V]
    M2 = u + C * V;       // [2C, C]: P (rows 0 .. c-1) and KD (rows c .. 2c-1)
    G = M2 + 2 * C * C;   // [C]
    bt = G + C;           // [C]
  }
};

template <typename T>
void run_chunk(const Args<T>& a, Workspace<T>& ws, int64_t n, int64_t ci) {
  const int64_t TT = a.T_, H = a.H, K = a.K, V = a.V, C = a.C;
  const int64_t b = n / H, h = n % H;
  const int64_t N = a.B * H, W = K + V;
  const int64_t ts = H * K, tv = H * V;  // token strides
  const int64_t t0 = ci * C;
  const int c = static_cast<int>(std::min(C, TT - t0));
  const T* qrow = a.q + ((b * TT + t0) * H + h) * K;
  const T* krow = a.k + ((b * TT + t0) * H + h) * K;
  const T* vrow = a.v + ((b * TT + t0) * H + h) * V;
  const T* grow = a.g ? a.g + (b * TT + t0) * H + h : nullptr;
  const T* brow = a.beta + (b * TT + t0) * H + h;
  T* __restrict G = ws.G;
  T* __restrict bt = ws.bt;
  T acc = 0;
  for (int i = 0; i < c; ++i) {
    if (grow) acc += grow[i * H];
    G[i] = acc;
    bt[i] = brow[i * H];
  }
  const T GC = G[c - 1];
  const T dec = std::exp(GC);
  const bool factored = -GC <= a.limit;
  T* __restrict qg = ws.QK;
  T* __restrict kg = ws.QK + c * K;
  T* __restrict kd = ws.kd;
  T* __restrict R = ws.R;
  for (int i = 0; i < c; ++i) {  // gathered, decay-weighted rows
    const T eg = std::exp(G[i]), ed = std::exp(GC - G[i]), bi = bt[i];
    const T* __restrict qi = qrow + i * ts;
    const T* __restrict ki = krow + i * ts;
    const T* __restrict vi = vrow + i * tv;
    T* __restrict qgi = qg + i * K;
    T* __restrict kgi = kg + i * K;
    T* __restrict kdi = kd + i * K;
    T* __restrict rk = R + i * W;
#pragma GCC ivdep
    for (int64_t d = 0; d < K; ++d) {
      const T kv = ki[d];
      qgi[d] = qi[d] * eg;
      kgi[d] = kv * eg;
      kdi[d] = kv * ed;
      rk[d] = kv * (eg * bi);
    }
    T* __restrict rv = rk + K;
#pragma GCC ivdep
    for (int64_t d = 0; d < V; ++d) rv[d] = bi * vi[d];
  }
  // [q; k] k^T with the decay: factored through the chunk end, or D formed with exponents <= 0
  T* M2 = ws.M2;
  if (factored) {
    gemm<T>(false, true, 2 * c, c, K, std::exp(-GC), ws.QK, K, kd, K, T(0), M2, C);
  } else {
    T* X = ws.X;
    for (int i = 0; i < c; ++i) {
      std::copy(qrow + i * ts, qrow + i * ts + K, X + i * K);
      std::copy(krow + i * ts, krow + i * ts + K, X + (c + i) * K);
    }
    gemm<T>(false, true, 2 * c, c, K, T(1), X, K, X + c * K, K, T(0), M2, C);
    for (int i = 0; i < c; ++i)
      for (int j = 0; j <= i; ++j) {
        const T dij = std::exp(G[i] - G[j]);
        M2[i * C + j] *= dij;
        M2[(c + i) * C + j] *= dij;
      }
  }
  T* P = M2;
  T* KD = M2 + c * C;
  for (int i = 0; i < c; ++i) {
    std::fill(P + i * C + i + 1, P + i * C + c, T(0));
    std::fill(KD + i * C + i, KD + i * C + c, T(0));
  }
  forward_substitution<T>(R, static_cast<int>(W), KD, static_cast<int>(C), bt, c);
  T* S = a.states + (ci * N + n) * K * V;
  T* Sn = a.states + ((ci + 1) * N + n) * K * V;
  T* __restrict u = ws.u;
  for (int i = 0; i < c; ++i) std::copy(R + i * W + K, R + i * W + W, u + i * V);
  gemm<T>(false, false, c, V, K, T(-1), R, W, S, V, T(1), u, V);  // u = U - W S
  // o = scale (qg S + P u), written straight into o's rows (token stride H * V)
  T* orow = a.o + ((b * TT + t0) * H + h) * V;
  gemm<T>(false, false, c, V, K, a.scale, qg, K, S, V, T(0), orow, tv);
  gemm<T>(false, false, c, V, c, a.scale, P, C, u, V, T(1), orow, tv);
  for (int64_t e = 0; e < K * V; ++e) Sn[e] = dec * S[e];  // S' = dec S + kd^T u
  gemm<T>(true, false, K, V, c, T(1), kd, K, u, V, T(1), Sn, V);
}

template <typename T>
int run(const Args<T>& a, int nthreads) {
  const int64_t N = a.B * a.H, NC = (a.T_ + a.C - 1) / a.C;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, N)));
  // worker w takes the contiguous rows [N w / nt, N (w + 1) / nt) (neighbouring heads share cache lines
  // of the inputs) and walks them chunk by chunk
  auto work = [&a, N, NC, nt](int w) {
    // one BLAS thread per worker: the workers are the parallelism
    const int prev = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    Workspace<T> ws(a.C, a.K, a.V);
    const int64_t n0 = N * w / nt, n1 = N * (w + 1) / nt;
    for (int64_t ci = 0; ci < NC; ++ci)
      for (int64_t n = n0; n < n1; ++n) run_chunk(a, ws, n, ci);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
  };
  if (nt == 1) {
    work(0);
    return 0;
  }
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int w = 1; w < nt; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
  return 0;
}

}  // namespace

extern "C" {

int growmem_delta_rule_fwd_f32(const float* q, const float* k, const float* v, const float* g, const float* beta,
                               float* states, float* o, int64_t B, int64_t T, int64_t H, int64_t K, int64_t V,
                               int64_t C, double scale, double limit, int nthreads) {
  Args<float> a{q, k, v, g, beta, states, o, B, T, H, K, V, C, static_cast<float>(scale), static_cast<float>(limit)};
  return run(a, nthreads);
}

int growmem_delta_rule_fwd_f64(const double* q, const double* k, const double* v, const double* g,
                               const double* beta, double* states, double* o, int64_t B, int64_t T, int64_t H,
                               int64_t K, int64_t V, int64_t C, double scale, double limit, int nthreads) {
  Args<double> a{q, k, v, g, beta, states, o, B, T, H, K, V, C, scale, limit};
  return run(a, nthreads);
}

}  // extern "C"
