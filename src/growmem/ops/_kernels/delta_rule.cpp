// Fused CPU forward and backward of the chunked (gated) delta rule: growmem.ops.delta_rule, WY / UT form.
//
// Plain C++ (no torch headers, so it compiles in a few seconds); the matrix products go to the BLAS
// that the torch library already carries (Fortran `sgemm_` / `dgemm_`, resolved when the library is
// linked against libtorch_cpu). growmem.ops._native compiles and loads it with ctypes.
//
// Worker threads take contiguous groups of (batch, head) rows and walk them chunk by chunk, every
// temporary of a chunk in small, cache-resident buffers; the triangular solves are register-tiled
// substitutions. Per chunk of c <= C tokens (G_i = cumulative log decay within the chunk,
// dec = exp(G_{c-1})):
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
// <= 0 otherwise, exactly as in the eager path. The backward walks the chunks in reverse, recomputes
// the lines above from the inputs and the saved chunk-start state, and runs the adjoint of
// _DeltaRuleFunction.backward (same equations; the transposed triangular system by backward
// substitution instead of an explicit inverse).
//
// With beta = null the same code runs linear attention / scalar-decay GLA (growmem.ops.gla's
// _ScalarGLAFunction): no delta correction, u = v, so no triangular system and no k k^T term.
//
// Layouts (all contiguous): q, k [B, T, H, K]; v [B, T, H, V]; g (may be null), beta [B, T, H] (may be
// null: GLA);
// states [NC + 1, B * H, K, V] with states[0] filled by the caller; o [B, T, H, V]; the grads have
// the shapes of their inputs (ds0: [B * H, K, V]).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using growmem::gemm;

template <typename T>
struct Args {
  const T *q, *k, *v, *g, *beta;
  T* states;  // [NC + 1, N, K, V]: written by the forward, read by the backward
  T* o;       // forward output [B, T, H, V]
  // backward only: incoming grads (dstates may be null) and the grads written
  const T *dout, *dstates;
  T *dq, *dk, *dv, *dg, *dbeta, *ds0;
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

// rows i = c-2 .. 0 of (I + diag(beta) KD)^T X = R, solved in place (X_i = R_i - sum_{j>i} beta_j KD_ji X_j)
template <typename T>
void backward_substitution(T* __restrict R, int W, const T* __restrict KD, int ldkd, const T* __restrict bt, int c) {
  using vec = typename Simd<T>::type;
  constexpr int L = Simd<T>::width, tile = kVec * L;
  for (int i = c - 2; i >= 0; --i) {
    T* ri = R + static_cast<int64_t>(i) * W;
    int d0 = 0;
    for (; d0 + tile <= W; d0 += tile) {
      vec acc[kVec];
      for (int t = 0; t < kVec; ++t) acc[t] = *reinterpret_cast<const vec*>(ri + d0 + t * L);
      for (int j = i + 1; j < c; ++j) {
        const T aji = bt[j] * KD[static_cast<int64_t>(j) * ldkd + i];
        const T* rj = R + static_cast<int64_t>(j) * W + d0;
        for (int t = 0; t < kVec; ++t) acc[t] -= aji * *reinterpret_cast<const vec*>(rj + t * L);
      }
      for (int t = 0; t < kVec; ++t) *reinterpret_cast<vec*>(ri + d0 + t * L) = acc[t];
    }
    for (int d = d0; d < W; ++d) {
      T acc = ri[d];
      for (int j = i + 1; j < c; ++j) acc -= bt[j] * KD[static_cast<int64_t>(j) * ldkd + i] * R[static_cast<int64_t>(j) * W + d];
      ri[d] = acc;
    }
  }
}

// Per-worker buffers for one chunk of one (batch, head) row.
template <typename T>
struct Workspace {
  std::vector<T> buf;
  T *QK, *kd, *X, *R, *u, *M2, *G, *EG, *ED, *bt;
  // backward only
  T *du, *dqg, *dkd, *dkg, *dP, *dA, *dR, *dS, *dSp, *dG;
  Workspace(int64_t C, int64_t K, int64_t V, bool backward) {
    const int64_t W = K + V;
    const int64_t fwd = 5 * C * K + C * W + C * V + 2 * C * C + 4 * C;
    const int64_t bwd = C * V + 3 * C * K + 2 * C * C + C * W + 2 * K * V + C;
    buf.assign(fwd + (backward ? bwd : 0), T(0));
    QK = buf.data();      // [2C, K]: [qg; kg] (kg starts at row c)
    kd = QK + 2 * C * K;  // [C, K]
    X = kd + C * K;       // [2C, K]: raw [q; k] (strong-decay chunks only)
    R = X + 2 * C * K;    // [C, K + V]: [diag(beta) kg | diag(beta) v], then [W | U]
    u = R + C * W;        // [C, V]
    M2 = u + C * V;       // [2C, C]: P (rows 0 .. c-1) and KD (rows c .. 2c-1)
    G = M2 + 2 * C * C;   // [C]  cumulative log decay
    EG = G + C;           // [C]  exp(G)
    ED = EG + C;          // [C]  exp(G_{c-1} - G)
    bt = ED + C;          // [C]  beta
    du = bt + C;          // [C, V]
    dqg = du + C * V;     // [C, K]
    dkd = dqg + C * K;    // [C, K]
    dkg = dkd + C * K;    // [C, K]
    dP = dkg + C * K;     // [C, C]
    dA = dP + C * C;      // [C, C]
    dR = dA + C * C;      // [C, K + V]
    dS = dR + C * W;      // [K, V]  grad of the state after the chunk
    dSp = dS + K * V;     // [K, V]  grad of the state before it
    dG = dSp + K * V;     // [C]
  }
};

// What prepare_chunk leaves in the workspace for chunk ci of row n (see the top of the file).
struct ChunkInfo {
  int64_t b, h, t0;
  int c;
  bool factored;
};

template <typename T>
ChunkInfo prepare_chunk(const Args<T>& a, Workspace<T>& ws, int64_t n, int64_t ci) {
  const int64_t TT = a.T_, H = a.H, K = a.K, V = a.V, C = a.C, W = K + V;
  const int64_t b = n / H, h = n % H;
  const int64_t ts = H * K, tv = H * V;  // token strides
  const int64_t t0 = ci * C;
  const int c = static_cast<int>(std::min(C, TT - t0));
  const T* qrow = a.q + ((b * TT + t0) * H + h) * K;
  const T* krow = a.k + ((b * TT + t0) * H + h) * K;
  const T* vrow = a.v + ((b * TT + t0) * H + h) * V;
  const T* grow = a.g ? a.g + (b * TT + t0) * H + h : nullptr;
  const bool plain = a.beta == nullptr;  // linear attention / scalar GLA: u = v, no delta correction
  const T* brow = plain ? nullptr : a.beta + (b * TT + t0) * H + h;
  T* __restrict G = ws.G;
  T* __restrict bt = ws.bt;
  T acc = 0;
  for (int i = 0; i < c; ++i) {
    if (grow) acc += grow[i * H];
    G[i] = acc;
    bt[i] = plain ? T(1) : brow[i * H];
  }
  const T GC = G[c - 1];
  const bool factored = -GC <= a.limit;
  T* __restrict qg = ws.QK;
  T* __restrict kg = ws.QK + c * K;
  T* __restrict kd = ws.kd;
  T* __restrict R = ws.R;
  for (int i = 0; i < c; ++i) {  // gathered, decay-weighted rows
    const T eg = std::exp(G[i]), ed = std::exp(GC - G[i]), bi = bt[i];
    ws.EG[i] = eg;
    ws.ED[i] = ed;
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
    gemm<T>(false, true, plain ? c : 2 * c, c, K, std::exp(-GC), ws.QK, K, kd, K, T(0), M2, C);
  } else {
    T* X = ws.X;
    for (int i = 0; i < c; ++i) {
      std::copy(qrow + i * ts, qrow + i * ts + K, X + i * K);
      std::copy(krow + i * ts, krow + i * ts + K, X + (c + i) * K);
    }
    gemm<T>(false, true, plain ? c : 2 * c, c, K, T(1), X, K, X + c * K, K, T(0), M2, C);
    for (int i = 0; i < c; ++i)
      for (int j = 0; j <= i; ++j) {
        const T dij = std::exp(G[i] - G[j]);
        M2[i * C + j] *= dij;
        if (!plain) M2[(c + i) * C + j] *= dij;
      }
  }
  T* P = M2;
  T* KD = M2 + c * C;
  for (int i = 0; i < c; ++i) {
    std::fill(P + i * C + i + 1, P + i * C + c, T(0));
    if (!plain) std::fill(KD + i * C + i, KD + i * C + c, T(0));
  }
  if (!plain) forward_substitution<T>(R, static_cast<int>(W), KD, static_cast<int>(C), bt, c);  // R = [W | U]
  return {b, h, t0, c, factored};
}

// u = U - W S (plain mode: u = v)
template <typename T>
void chunk_u(const Args<T>& a, Workspace<T>& ws, int c, const T* S) {
  const int64_t K = a.K, V = a.V, W = K + V;
  for (int i = 0; i < c; ++i) std::copy(ws.R + i * W + K, ws.R + i * W + W, ws.u + i * V);
  if (a.beta) gemm<T>(false, false, c, V, K, T(-1), ws.R, W, S, V, T(1), ws.u, V);
}

template <typename T>
void forward_chunk(const Args<T>& a, Workspace<T>& ws, int64_t n, int64_t ci) {
  const int64_t H = a.H, K = a.K, V = a.V, C = a.C, N = a.B * H;
  const ChunkInfo ch = prepare_chunk(a, ws, n, ci);
  const int c = ch.c;
  const T dec = std::exp(ws.G[c - 1]);
  T* S = a.states + (ci * N + n) * K * V;
  T* Sn = a.states + ((ci + 1) * N + n) * K * V;
  chunk_u(a, ws, c, S);
  // o = scale (qg S + P u), written straight into o's rows (token stride H * V)
  T* orow = a.o + ((ch.b * a.T_ + ch.t0) * H + ch.h) * V;
  gemm<T>(false, false, c, V, K, a.scale, ws.QK, K, S, V, T(0), orow, H * V);
  gemm<T>(false, false, c, V, c, a.scale, ws.M2, C, ws.u, V, T(1), orow, H * V);
  for (int64_t e = 0; e < K * V; ++e) Sn[e] = dec * S[e];  // S' = dec S + kd^T u
  gemm<T>(true, false, K, V, c, T(1), ws.kd, K, ws.u, V, T(1), Sn, V);
}

template <typename T>
inline T dot(const T* __restrict x, const T* __restrict y, int64_t n) {
  T s = 0;
  for (int64_t d = 0; d < n; ++d) s += x[d] * y[d];
  return s;
}

// The adjoint of one chunk (mirrors _DeltaRuleFunction.backward): reads ws.dS = grad of the state after
// the chunk, leaves the grad of the state before it in ws.dS, writes the chunk's rows of dq, dk, dv,
// dbeta and dg.
template <typename T>
void backward_chunk(const Args<T>& a, Workspace<T>& ws, int64_t n, int64_t ci) {
  const int64_t TT = a.T_, H = a.H, K = a.K, V = a.V, C = a.C, W = K + V, N = a.B * H;
  const ChunkInfo ch = prepare_chunk(a, ws, n, ci);
  const int c = ch.c;
  const T scale = a.scale, GC = ws.G[c - 1], dec = std::exp(GC);
  const bool plain = a.beta == nullptr;
  const T* S = a.states + (ci * N + n) * K * V;
  chunk_u(a, ws, c, S);
  const int64_t row0 = (ch.b * TT + ch.t0) * H + ch.h;  // (b, t0, h) flat
  const int64_t ts = H * K, tv = H * V;
  const T* dor = a.dout + row0 * V;
  const T *qg = ws.QK, *kg = ws.QK + c * K, *kd = ws.kd, *WU = ws.R, *u = ws.u;
  const T *P = ws.M2, *KD = ws.M2 + c * C;
  T *dS = ws.dS, *dSp = ws.dSp, *du = ws.du, *dqg = ws.dqg, *dkd = ws.dkd, *dkg = ws.dkg;
  T *dP = ws.dP, *dA = ws.dA, *dR = ws.dR, *dG = ws.dG;
  // grad of the state before the chunk: returned chunk state's grad + scale qg^T do (+ the rest below)
  if (a.dstates)
    std::copy(a.dstates + (ci * N + n) * K * V, a.dstates + (ci * N + n + 1) * K * V, dSp);
  else
    std::fill(dSp, dSp + K * V, T(0));
  gemm<T>(true, false, K, V, c, scale, qg, K, dor, tv, T(1), dSp, V);
  // du = scale P^T do + kd dS
  gemm<T>(true, false, c, V, c, scale, P, C, dor, tv, T(0), du, V);
  gemm<T>(false, false, c, V, K, T(1), kd, K, dS, V, T(1), du, V);
  gemm<T>(false, true, c, K, V, T(1), dor, tv, S, V, T(0), dqg, K);  // dqg = do S^T (unscaled)
  gemm<T>(false, true, c, c, V, T(1), dor, tv, u, V, T(0), dP, C);   // dP = do u^T (unscaled)
  gemm<T>(false, true, c, K, V, T(1), u, V, dS, V, T(0), dkd, K);    // dkd = u dS^T
  const T ddec = a.g ? dot(dS, S, K * V) : T(0);
  // dS_before = dec dS - W^T du + (the direct terms above)
  for (int64_t e = 0; e < K * V; ++e) dSp[e] += dec * dS[e];
  if (!plain) gemm<T>(true, false, K, V, c, T(-1), WU, W, du, V, T(1), dSp, V);
  std::swap(ws.dS, ws.dSp);
  T* dvr = a.dv + row0 * V;
  if (plain) {  // u = v: dv = du; no triangular system, no beta, no k k^T term
    for (int i = 0; i < c; ++i) {
      std::copy(du + i * V, du + (i + 1) * V, dvr + i * tv);
      dG[i] = 0;
      std::fill(dA + i * C, dA + i * C + c, T(0));  // dKD = 0
    }
  } else {
  // [dW | dU] = [-du S^T | du], then dR = (I + A)^{-T} [dW | dU]
  gemm<T>(false, true, c, K, V, T(-1), du, V, S, V, T(0), dR, W);
  for (int i = 0; i < c; ++i) std::copy(du + i * V, du + (i + 1) * V, dR + i * W + K);
  backward_substitution<T>(dR, static_cast<int>(W), KD, static_cast<int>(C), ws.bt, c);
  // dA = -(dR WU^T), strictly lower
  gemm<T>(false, true, c, c, W, T(-1), dR, W, WU, W, T(0), dA, C);
  const T* vrow = a.v + row0 * V;
  T* dbr = a.dbeta + row0;
  for (int i = 0; i < c; ++i) {
    std::fill(dA + i * C + i, dA + i * C + c, T(0));
    const T bi = ws.bt[i];
    const T* dRk = dR + i * W;
    const T* dRv = dRk + K;
    const T t = dot(dRk, kg + i * K, K);  // R_k = beta kg
    dbr[i * H] = dot(dA + i * C, KD + i * C, i) + dot(dRv, vrow + i * tv, V) + t;
    dG[i] = bi * t;
    for (int64_t d = 0; d < V; ++d) dvr[i * tv + d] = dRv[d] * bi;
    for (int j = 0; j < i; ++j) dA[i * C + j] *= bi;  // now dKD
  }
  }
  T* dKD = dA;
  if (a.g) {  // dG_i from the parametrisation by D (see the eager backward)
    for (int i = 0; i < c; ++i) dG[i] += scale * dot(dqg + i * K, qg + i * K, K);
    T ysum = 0;
    for (int i = 0; i < c; ++i) {
      T rs = 0;
      for (int j = 0; j <= i; ++j) {
        const T z = (plain ? T(0) : dKD[i * C + j] * KD[i * C + j]) + scale * dP[i * C + j] * P[i * C + j];
        rs += z;
        dG[j] -= z;
      }
      dG[i] += rs;
      const T y = dot(dkd + i * K, kd + i * K, K);
      dG[i] -= y;
      ysum += y;
    }
    dG[c - 1] += ysum + ddec * dec;
  }
  T* dqr = a.dq + row0 * K;
  T* dkr = a.dk + row0 * K;
  if (ch.factored) {  // P = tril(qg kd^T) e^{-G_C}, KD = tril_(-1)(kg kd^T) e^{-G_C}
    const T inv = a.g ? std::exp(-GC) : T(1);
    for (int i = 0; i < c; ++i) {
      for (int j = 0; j <= i; ++j) dP[i * C + j] *= inv;
      std::fill(dP + i * C + i + 1, dP + i * C + c, T(0));
      for (int j = 0; j < i; ++j) dKD[i * C + j] *= inv;
    }
    gemm<T>(false, false, c, K, c, scale, dP, C, kd, K, scale, dqg, K);  // dqg_t
    gemm<T>(true, false, c, K, c, scale, dP, C, qg, K, T(1), dkd, K);    // dkd_t
    if (plain) {
      std::fill(dkg, dkg + c * K, T(0));
    } else {
      gemm<T>(true, false, c, K, c, T(1), dKD, C, kg, K, T(1), dkd, K);
      for (int i = 0; i < c; ++i)
        for (int64_t d = 0; d < K; ++d) dkg[i * K + d] = dR[i * W + d] * ws.bt[i];
      gemm<T>(false, false, c, K, c, T(1), dKD, C, kd, K, T(1), dkg, K);  // dkg_t
    }
    for (int i = 0; i < c; ++i) {
      const T eg = ws.EG[i], ed = ws.ED[i];
      for (int64_t d = 0; d < K; ++d) {
        dqr[i * ts + d] = dqg[i * K + d] * eg;
        dkr[i * ts + d] = dkg[i * K + d] * eg + dkd[i * K + d] * ed;
      }
    }
  } else {  // P = (q k^T) * D, KD = (k k^T) * D: grads through D, with the raw q, k in X
    const T* qb = ws.X;
    const T* kb = ws.X + c * K;
    for (int i = 0; i < c; ++i) {
      for (int j = 0; j <= i; ++j) {
        const T dij = std::exp(ws.G[i] - ws.G[j]);
        dP[i * C + j] *= dij;   // dQK
        dKD[i * C + j] *= dij;  // dKK (strictly lower: dKD is zero on the diagonal)
      }
      std::fill(dP + i * C + i + 1, dP + i * C + c, T(0));
    }
    for (int i = 0; i < c; ++i)
      for (int j = 0; j < i; ++j) dKD[j * C + i] = dKD[i * C + j];  // symmetric dKK + dKK^T
    for (int i = 0; i < c; ++i) {
      const T eg = ws.EG[i], ed = ws.ED[i], bi = ws.bt[i];
      for (int64_t d = 0; d < K; ++d) {
        dqg[i * K + d] *= scale * eg;
        dkg[i * K + d] = (plain ? T(0) : dR[i * W + d] * bi * eg) + dkd[i * K + d] * ed;
      }
    }
    gemm<T>(false, false, c, K, c, scale, dP, C, kb, K, T(1), dqg, K);
    gemm<T>(true, false, c, K, c, scale, dP, C, qb, K, T(1), dkg, K);
    if (!plain) gemm<T>(false, false, c, K, c, T(1), dKD, C, kb, K, T(1), dkg, K);
    for (int i = 0; i < c; ++i) {
      std::copy(dqg + i * K, dqg + (i + 1) * K, dqr + i * ts);
      std::copy(dkg + i * K, dkg + (i + 1) * K, dkr + i * ts);
    }
  }
  if (a.dg) {  // g enters through the cumulative sum: dg = reverse cumsum of dG
    T* dgr = a.dg + row0;
    T acc = 0;
    for (int i = c - 1; i >= 0; --i) {
      acc += dG[i];
      dgr[i * H] = acc;
    }
  }
}

template <typename T, typename Fn>
int parallel_rows(const Args<T>& a, int nthreads, bool backward, Fn fn) {
  growmem::for_each_worker(a.B * a.H, nthreads, [&a, &fn, backward](int, int64_t n0, int64_t n1) {
    Workspace<T> ws(a.C, a.K, a.V, backward);
    fn(ws, n0, n1);
  });
  return 0;
}

template <typename T>
int run_forward(const Args<T>& a, int nthreads) {
  const int64_t NC = (a.T_ + a.C - 1) / a.C;
  // chunk-major within a worker's rows: neighbouring heads share cache lines of the inputs
  return parallel_rows(a, nthreads, false, [&a, NC](Workspace<T>& ws, int64_t n0, int64_t n1) {
    for (int64_t ci = 0; ci < NC; ++ci)
      for (int64_t n = n0; n < n1; ++n) forward_chunk(a, ws, n, ci);
  });
}

template <typename T>
int run_backward(const Args<T>& a, int nthreads) {
  const int64_t NC = (a.T_ + a.C - 1) / a.C, N = a.B * a.H, KV = a.K * a.V;
  return parallel_rows(a, nthreads, true, [&a, NC, N, KV](Workspace<T>& ws, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (a.dstates)
        std::copy(a.dstates + (NC * N + n) * KV, a.dstates + (NC * N + n + 1) * KV, ws.dS);
      else
        std::fill(ws.dS, ws.dS + KV, T(0));
      for (int64_t ci = NC - 1; ci >= 0; --ci) backward_chunk(a, ws, n, ci);
      std::copy(ws.dS, ws.dS + KV, a.ds0 + n * KV);
    }
  });
}

}  // namespace

extern "C" {

#define GROWMEM_DELTA_ENTRIES(T, suffix)                                                                     \
  int growmem_delta_rule_fwd_##suffix(const T* q, const T* k, const T* v, const T* g, const T* beta, T* states, \
                                      T* o, int64_t B, int64_t TT, int64_t H, int64_t K, int64_t V, int64_t C, \
                                      double scale, double limit, int nthreads) {                              \
    Args<T> a{q, k, v, g, beta, states, o, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,    \
              nullptr, B, TT, H, K, V, C, static_cast<T>(scale), static_cast<T>(limit)};                       \
    return run_forward(a, nthreads);                                                                           \
  }                                                                                                            \
  int growmem_delta_rule_bwd_##suffix(const T* q, const T* k, const T* v, const T* g, const T* beta, T* states, \
                                      const T* dout, const T* dstates, T* dq, T* dk, T* dv, T* dg, T* dbeta,    \
                                      T* ds0, int64_t B, int64_t TT, int64_t H, int64_t K, int64_t V, int64_t C, \
                                      double scale, double limit, int nthreads) {                              \
    Args<T> a{q, k, v, g, beta, states, nullptr, dout, dstates, dq, dk, dv, dg, dbeta, ds0,                    \
              B, TT, H, K, V, C, static_cast<T>(scale), static_cast<T>(limit)};                                \
    return run_backward(a, nthreads);                                                                          \
  }

GROWMEM_DELTA_ENTRIES(float, f32)
GROWMEM_DELTA_ENTRIES(double, f64)

}  // extern "C"
