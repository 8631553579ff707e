r"""DeltaNet and Gated DeltaNet: the (gated) delta rule as a matrix-valued linear recurrence.

Layout (flash-linear-attention convention): ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``,
``beta, g: [B, T, H]``, states ``S: [B, H, K, V]``.

The rule, per batch and head, for ``t = 1 .. T``:

.. math::

    S_t = \alpha_t (I - \beta_t k_t k_t^\top) S_{t-1} + \beta_t k_t v_t^\top, \qquad
    o_t = S_t^\top (\text{scale}\cdot q_t),

with :math:`\alpha_t = \exp(g_t)`, ``g`` a per-head log-decay (``g <= 0``; Gated DeltaNet) or
:math:`\alpha_t = 1` (DeltaNet). ``beta`` is the writing strength, usually ``sigmoid(.)`` in
``(0, 1)`` (or ``2 * sigmoid(.)`` in ``(0, 2)``); it is only checked for finiteness. The recurrence is
stable (the transition :math:`I - \beta_t k_t k_t^\top` is non-expansive) iff
:math:`|1 - \beta_t \|k_t\|^2| \le 1`; layers therefore L2-normalize ``k`` and keep ``beta`` in
``(0, 2)``. ``g`` is not checked for sign either: a positive ``g`` means growth and may overflow.
``scale`` defaults to ``K ** -0.5``.

Chunked form (WY / UT representation; Yang et al. 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length"; Yang et al. 2025, "Gated Delta Networks: Improving Mamba2 with
Delta Rule"). Split the sequence into chunks of ``C`` tokens; inside a chunk with start state
:math:`S_0` let :math:`G_i = \sum_{l \le i} g_l` (cumulative log-decay within the chunk). Writing
:math:`S_i = \alpha_i S_{i-1} + k_i u_i^\top` with :math:`u_i = \beta_i (v_i - \alpha_i S_{i-1}^\top
k_i)` and unrolling gives the unit-lower-triangular system

.. math::

    (I + A)\,u = \operatorname{diag}(\beta)\,v - \operatorname{diag}(\beta e^{G}) K S_0, \qquad
    A_{ij} = \beta_i e^{G_i - G_j} k_i^\top k_j \ (i > j),

so with :math:`T = (I + A)^{-1}`, :math:`U = T\operatorname{diag}(\beta) V` and
:math:`W = T\operatorname{diag}(\beta e^{G}) K`:

.. math::

    u &= U - W S_0, \\
    o &= \text{scale}\,\big[(Q S_0) \odot e^{G} + (Q K^\top \odot D) u\big],
        \quad D_{ij} = e^{G_i - G_j}\,[i \ge j], \\
    S_C &= e^{G_C} S_0 + (K \odot e^{G_C - G})^\top u.

Implementation (:class:`_DeltaRuleFunction`, an ``autograd.Function`` with a hand-written backward;
first-order gradients only). Chunks are processed in blocks (see :mod:`growmem.ops.gla`), gathered
into a chunk-major layout ``[chunks * B * H, C, D]``; per block, all of ``[Q; K] K^T``, :math:`T`,
``[W | U]`` and the outputs are batched matmuls. :math:`T` is formed explicitly by
:func:`_unit_lower_inverse` (triangular solves of ``16 x 16`` diagonal blocks, then block doubling
with matmuls), which is several times faster than a batched triangular solve with ``K + V``
right-hand sides. Only the two lines giving ``u`` and ``S_C`` run per chunk (two small matmuls). The
decay matrix :math:`D` is factored through the chunk end,
:math:`e^{G_i - G_j} = e^{G_i} e^{G_C - G_j} e^{-G_C}`, when the chunk's total log decay is small
enough for all factors to stay well inside the dtype's range (:func:`growmem.ops.gla._factor_limit`);
otherwise it is formed with the mask applied *before* the exp (all exponents ``<= 0``). So long
sequences with strong decay stay finite. The backward recomputes the block quantities from the
inputs and the saved chunk states and runs the adjoint recurrence in reverse.

On CPU, for float32 / float64 inputs, forward and backward run a fused C++ kernel instead
(:mod:`growmem.ops._native`: the same equations chunk by chunk, every temporary in cache, one worker
thread per group of heads; on 2 cores about 2x faster forward and 1.6x forward+backward than the
eager blocks above, see ``docs/benchmarks.md``). It is compiled on first use and is optional:
without a C++ compiler, with ``GROWMEM_NATIVE=0``, on GPU and in half precision the eager path runs.
Tests run both paths.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from growmem.ops._native import delta_rule_backward, delta_rule_forward
from growmem.ops.gla import (
    _blocks,
    _chunk_gates,
    _chunks_per_block,
    _decay_matrix,
    _factor_limit,
    _Gates,
    _gather,
    _reverse_cumsum,
    _scatter,
)
from growmem.ops.utils import (
    check_chunk_size,
    check_finite,
    check_float,
    check_gate,
    check_qkv,
    check_qkv_step,
    check_state,
    default_scale,
)

__all__ = [
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "naive_delta_rule",
    "naive_gated_delta_rule",
    "step_delta_rule",
    "step_gated_delta_rule",
]


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _check_seq(q, k, v, g, beta, initial_state, scale):
    B, T, H, K, V = check_qkv(q, k, v)
    check_gate("beta", beta, B, T, H, ref=q)
    if g is not None:
        check_gate("g", g, B, T, H, ref=q)
    check_state(initial_state, B, H, K, V, ref=q)
    return B, T, H, K, V, default_scale(scale, K)


def _check_step(q, k, v, g, beta, state, scale):
    B, H, K, V = check_qkv_step(q, k, v, "step_delta_rule")
    gates = (("beta", beta),) if g is None else (("g", g), ("beta", beta))
    for name, x in gates:
        check_float(name, x)
        if x.shape != (B, H):
            raise ValueError(f"{name} must have shape [B, H] = {(B, H)}, got {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the same device as q")
        check_finite(name, x)
    check_state(state, B, H, K, V, ref=q)
    return B, H, K, V, default_scale(scale, K)


# ----------------------------------------------------------------------------------------------
# naive reference (per-token loop)
# ----------------------------------------------------------------------------------------------


def _naive(q, k, v, g, beta, scale, initial_state, output_final_state):
    B, T, H, K, V, scale = _check_seq(q, k, v, g, beta, initial_state, scale)
    dt = q.dtype
    beta = beta.to(dt)
    eye = torch.eye(K, dtype=dt, device=q.device)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, t] * scale, k[:, t], v[:, t]  # [B, H, K], [B, H, K], [B, H, V]
        b_t = beta[:, t, :, None, None]  # [B, H, 1, 1]
        kk = k_t[..., :, None] * k_t[..., None, :]  # [B, H, K, K]
        trans = eye - b_t * kk
        if g is not None:
            trans = torch.exp(g[:, t].to(dt))[..., None, None] * trans
        S = trans @ S + b_t * (k_t[..., :, None] * v_t[..., None, :])
        outs.append((S * q_t[..., :, None]).sum(-2))  # S^T q: [B, H, V]
    o = torch.stack(outs, dim=1)
    return o, (S if output_final_state else None)


def naive_delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False):
    r"""Reference DeltaNet by a per-token loop (slow; for tests).

    :math:`S_t = (I - \beta_t k_t k_t^\top) S_{t-1} + \beta_t k_t v_t^\top`,
    :math:`o_t = S_t^\top (\text{scale}\, q_t)`.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]``.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or ``None`` (zeros).
        output_final_state: also return the final state.

    Returns:
        ``(o [B, T, H, V], final_state [B, H, K, V] or None)``, computed in ``q``'s dtype.
    """
    return _naive(q, k, v, None, beta, scale, initial_state, output_final_state)


def naive_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False):
    r"""Reference Gated DeltaNet by a per-token loop (slow; for tests).

    :math:`S_t = e^{g_t} (I - \beta_t k_t k_t^\top) S_{t-1} + \beta_t k_t v_t^\top`,
    :math:`o_t = S_t^\top (\text{scale}\, q_t)`.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g (log-decay, ``<= 0``), beta: ``[B, T, H]``.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or ``None`` (zeros).
        output_final_state: also return the final state.

    Returns:
        ``(o [B, T, H, V], final_state [B, H, K, V] or None)``, computed in ``q``'s dtype.
    """
    return _naive(q, k, v, g, beta, scale, initial_state, output_final_state)


# ----------------------------------------------------------------------------------------------
# single-token step (recurrent inference)
# ----------------------------------------------------------------------------------------------


def _step(q, k, v, g, beta, state, scale):
    B, H, K, V, scale = _check_step(q, k, v, g, beta, state, scale)
    dt = q.dtype
    b = beta.to(dt)[..., None]  # [B, H, 1]
    if state is None:
        S = q.new_zeros(B, H, K, V)
        kS = q.new_zeros(B, H, V)
    else:
        S = state.to(dt)
        kS = torch.einsum("bhk,bhkv->bhv", k, S)  # S^T k
    if g is not None:
        a = torch.exp(g.to(dt))[..., None]  # [B, H, 1]
        u = b * (v - a * kS)
        S = a[..., None] * S + k[..., :, None] * u[..., None, :]
    else:
        u = b * (v - kS)
        S = S + k[..., :, None] * u[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q * scale, S)
    return o, S


def step_delta_rule(q, k, v, beta, state, *, scale=None):
    r"""One DeltaNet token (recurrent inference).

    :math:`S' = (I - \beta k k^\top) S + \beta k v^\top`, :math:`o = S'^\top (\text{scale}\, q)`.

    Args:
        q, k: ``[B, H, K]``; v: ``[B, H, V]``; beta: ``[B, H]``.
        state: ``[B, H, K, V]`` or ``None`` (zeros).
        scale: query scale, default ``K ** -0.5``.

    Returns:
        ``(o [B, H, V], new_state [B, H, K, V])``.
    """
    return _step(q, k, v, None, beta, state, scale)


def step_gated_delta_rule(q, k, v, g, beta, state, *, scale=None):
    r"""One Gated DeltaNet token (recurrent inference).

    :math:`S' = e^{g} (I - \beta k k^\top) S + \beta k v^\top`, :math:`o = S'^\top (\text{scale}\, q)`.

    Args:
        q, k: ``[B, H, K]``; v: ``[B, H, V]``; g (log-decay, ``<= 0``), beta: ``[B, H]``.
        state: ``[B, H, K, V]`` or ``None`` (zeros).
        scale: query scale, default ``K ** -0.5``.

    Returns:
        ``(o [B, H, V], new_state [B, H, K, V])``.
    """
    return _step(q, k, v, g, beta, state, scale)


# ----------------------------------------------------------------------------------------------
# chunked (WY representation)
# ----------------------------------------------------------------------------------------------


def _unit_lower_inverse(A: Tensor, base: int = 16) -> Tensor:
    r"""``(I + A)^{-1}`` for strictly lower triangular ``A: [M, C, C]`` (exact; batched matmuls).

    The inverse of a unit lower triangular matrix is unit lower triangular, and for the block split
    ``I + A = [[L_11, 0], [L_21, L_22]]`` it is ``[[X_11, 0], [-X_22 L_21 X_11, X_22]]`` with
    ``X_ii = L_ii^{-1}``. Diagonal blocks of size ``base`` are inverted by one batched triangular solve,
    then the solved blocks are doubled in size (``C / base`` must be a power of two; otherwise, and for
    ``C <= base``, a single triangular solve of the whole matrix is used). Doubling needs ``~C^3 / 3``
    multiply-adds per matrix, in matmuls of ``base .. C / 2`` rows: much faster than a solve of ``C``
    right-hand sides, whose per-matrix kernels are slow at these sizes.
    """
    M, C, _ = A.shape
    n = C // base
    if n < 2 or C % base or n & (n - 1):
        base = C
    eye = torch.eye(base, dtype=A.dtype, device=A.device)
    if base == C:
        X = A.new_empty(M, C, C)
        diag = A[:, None], X[:, None]
    else:
        X = torch.zeros_like(A)
        s0, s1, s2 = A.stride()
        size, stride = (M, n, base, base), (s0, base * (s1 + s2), s1, s2)
        diag = A.as_strided(size, stride), X.as_strided(size, stride)
    # diagonal blocks: solve Y L^T = I (an upper triangular right solve: the fastest batched variant of
    # the LAPACK kernel here), then X_ii = Y^T = L_ii^{-1}
    LT = torch.add(diag[0].transpose(-1, -2), eye, out=torch.empty_like(diag[0]))
    Y = torch.linalg.solve_triangular(LT, eye.expand_as(LT), upper=True, left=False, unitriangular=True)
    diag[1].copy_(Y.transpose(-1, -2))
    b = base
    s0, s1, s2 = X.stride()
    a0, a1, a2 = A.stride()
    while b < C:
        for r in range(0, C, 2 * b):  # diagonal [2b, 2b] block at r: fill its lower-left [b, b] block
            lo, hi = r, r + b  # X_11 = X[lo:hi, lo:hi], X_22 = X[hi:hi+b, hi:hi+b], L_21 = A[hi:hi+b, lo:hi]
            X11, X22, X21 = (X.as_strided((M, b, b), (s0, s1, s2), X.storage_offset() + i * s1 + j * s2)
                             for i, j in ((lo, lo), (hi, hi), (hi, lo)))
            L21 = A.as_strided((M, b, b), (a0, a1, a2), A.storage_offset() + hi * a1 + lo * a2)
            torch.neg(torch.bmm(X22, torch.bmm(L21, X11)), out=X21)
        b *= 2
    return X


class _Block(NamedTuple):
    """Per-block quantities of the chunked delta rule (chunk-major, ``M`` rows of ``[C, .]``)."""

    bb: Tensor  # [M, C]  beta
    gates: _Gates | None  # the block's decay factors (None: ungated)
    qg: Tensor  # [M, C, K]  q * exp(G): queries as they see the chunk start state (unscaled)
    kg: Tensor  # [M, C, K]  k * exp(G)
    kd: Tensor  # [M, C, K]  k * exp(G_C - G): keys as they reach the chunk end state
    D: Tensor | None  # [M, C, C]  exp(G_i - G_j) [i >= j] if materialised (strong decay), else None
    P: Tensor  # [M, C, C]  (q k^T) * D, lower triangle incl. the diagonal
    KD: Tensor  # [M, C, C]  (k k^T) * D, strictly lower
    Tinv: Tensor  # [M, C, C]  (I + diag(beta) KD)^{-1}
    WU: Tensor  # [M, C, K + V]  [W | U] = Tinv [diag(beta) kg | diag(beta) v]


def _delta_block(q: Tensor, k: Tensor, v: Tensor, bb: Tensor, gates: _Gates | None, c0: int, c1: int,
                 C: int) -> _Block:
    """The within-chunk part of the chunked (gated) delta rule for chunks ``c0 .. c1-1``.

    ``q, k, v`` are the full ``[B, T, H, .]`` sequences, ``bb: [M, C]`` the block's beta and ``gates``
    its rows of :class:`growmem.ops.gla._Gates` (``None`` without gate), all in the compute dtype. The
    block is gathered chunk-major (see :func:`growmem.ops.gla._gather`) with the decay factors applied
    in the same pass. ``q k^T`` and ``k k^T`` come from one matmul ``[q; k] k^T``. While no chunk of
    the block decays by more than :func:`growmem.ops.gla._factor_limit` (always without gate), the
    decay is factored through the chunk end, ``(q k^T) * D = tril(qg kd^T) exp(-G_C)`` (likewise
    ``k k^T``); otherwise ``D`` is formed, masked before the exponential. See :class:`_Block`.
    """
    K = k.shape[-1]
    M = bb.shape[0]
    X = bb.new_empty(M, 2 * C, K)  # [q; k] (times exp(G))
    R = bb.new_empty(M, C, K + v.shape[-1])  # [diag(beta) kg | diag(beta) v]
    _gather(v, c0, c1, C, mul=bb, out=R[..., K:])
    D = None
    if gates is None:
        qg, kg = _gather(q, c0, c1, C, out=X[:, :C]), _gather(k, c0, c1, C, out=X[:, C:])
        kd = kg
        R2 = torch.bmm(X, kg.transpose(1, 2))
    else:
        qg = _gather(q, c0, c1, C, mul=gates.exp_g, out=X[:, :C])
        kg = _gather(k, c0, c1, C, mul=gates.exp_g, out=X[:, C:])
        if gates.factored(bb.dtype):
            kd = kg * (gates.exp_to_end / gates.exp_g)[..., None]  # exponents within +-G_C here
            R2 = torch.bmm(X, kd.transpose(1, 2)).mul_(gates.inv_dec[:, None, None])
        else:
            kd = _gather(k, c0, c1, C, mul=gates.exp_to_end)
            D = _decay_matrix(gates.G, bb.dtype)
            qb, kb = _gather(q, c0, c1, C, bb.dtype), _gather(k, c0, c1, C, bb.dtype)
            R2 = torch.bmm(torch.cat([qb, kb], 1), kb.transpose(1, 2)).mul_(D.repeat(1, 2, 1))
    P, KD = R2[:, :C].tril_(), R2[:, C:].tril_(-1)
    torch.mul(kg, bb[..., None], out=R[..., :K])
    Tinv = _unit_lower_inverse(KD * bb[..., None])
    return _Block(bb, gates, qg, kg, kd, D, P, KD, Tinv, torch.bmm(Tinv, R))


class _DeltaRuleFunction(torch.autograd.Function):
    r"""Chunked (gated) delta rule, blocked over chunks, with a hand-written backward (exact).

    Inputs ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, ``g`` (or ``None``), ``beta: [B, T, H]``, ``s0:
    [B, H, K, V]`` or ``None``, python ``scale`` and chunk size ``C``. Outputs ``o: [B, T, H, V]`` and
    ``states: [NC + 1, B * H, K, V]`` (compute dtype), the state before every chunk and after the last
    (``states[0] = s0``). With the block quantities of :class:`_Block`, per chunk ``n``::

        u_n       = U_n - W_n S_n
        S_{n + 1} = dec_n S_n + kd_n^T u_n
        o_n       = scale * (qg_n S_n + P_n u_n)

    Only the first two lines run per chunk (two small matmuls); everything else is batched over a
    block of chunks. The backward recomputes the block quantities from the inputs and the saved
    states and runs the adjoint recurrence in reverse::

        du_n = scale P_n^T do_n + kd_n dS_{n + 1}
        dS_n = dec_n dS_{n + 1} - W_n^T du_n + scale qg_n^T do_n
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, s0, scale, C):
        B, T, H, K = q.shape
        V = v.shape[-1]
        N, NC = B * H, -(-T // C)
        ct = torch.promote_types(q.dtype, torch.float32)  # no half-precision triangular solves
        states = q.new_empty(NC + 1, N, K, V, dtype=ct)
        if s0 is None:
            states[0].zero_()
        else:
            states[0].copy_(s0.reshape(N, K, V))
        o = q.new_empty(B, T, H, V)
        ctx.scale, ctx.C, ctx.has_s0 = scale, C, s0 is not None
        ctx.set_materialize_grads(False)
        if ct == q.dtype and delta_rule_forward(q, k, v, g, beta, states, o, scale, C, _factor_limit(ct)):
            ctx.save_for_backward(q, k, v, g, beta, states)
            return o, states  # the fused CPU kernel ran (growmem.ops._native)
        S = states.unbind(0)
        beta_c = _gather(beta, 0, NC, C, ct)  # [NC * N, C]
        gates = None if g is None else _chunk_gates(g, NC, C, ct, ct)
        for c0, c1 in _blocks(NC, _chunks_per_block(N, C, K + V)):
            m = c1 - c0
            gb = None if gates is None else gates.rows(c0, c1)
            blk = _delta_block(q, k, v, beta_c[c0 * N: c1 * N], gb, c0, c1, C)
            W, U = blk.WU[..., :K].view(m, N, C, K).unbind(0), blk.WU[..., K:].view(m, N, C, V).unbind(0)
            kdT = blk.kd.transpose(1, 2).view(m, N, K, C).unbind(0)
            dec = [None] * m if gb is None else gb.dec.view(m, N, 1, 1).unbind(0)
            u = states.new_empty(m, N, C, V)
            for j, u_j in enumerate(u.unbind(0)):
                n = c0 + j
                torch.baddbmm(U[j], W[j], S[n], alpha=-1.0, out=u_j)
                if dec[j] is None:
                    torch.baddbmm(S[n], kdT[j], u_j, out=S[n + 1])
                else:
                    torch.mul(S[n], dec[j], out=S[n + 1]).baddbmm_(kdT[j], u_j)
            Sb = states[c0:c1].view(-1, K, V)
            ob = torch.baddbmm(torch.bmm(blk.qg, Sb), blk.P, u.view(-1, C, V), beta=scale, alpha=scale)
            _scatter(o, ob, c0, c1, C)
        ctx.save_for_backward(q, k, v, g, beta, states)
        return o, states

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dstates):
        q, k, v, g, beta, states = ctx.saved_tensors
        scale, C = ctx.scale, ctx.C
        B, T, H, K = q.shape
        V = v.shape[-1]
        N, NC = B * H, -(-T // C)
        ct = states.dtype
        if do is None:
            do = torch.zeros_like(v)
        if ct == q.dtype:
            fused = delta_rule_backward(q, k, v, g, beta, states, do, dstates, scale, C, _factor_limit(ct))
            if fused is not None:  # the fused CPU kernel ran (growmem.ops._native)
                dq, dk, dv, dg, dbeta, ds0 = fused
                return dq, dk, dv, dg, dbeta, (ds0.view(B, H, K, V) if ctx.has_s0 else None), None, None
        dq, dk, dv, dbeta = (torch.empty_like(x) for x in (q, k, v, beta))
        dg = None if g is None else torch.empty_like(g)
        dS = states.new_zeros(N, K, V) if dstates is None else dstates[NC].to(ct)
        beta_c = _gather(beta, 0, NC, C, ct)  # [NC * N, C]
        gates = None if g is None else _chunk_gates(g, NC, C, ct, ct)
        for c0, c1 in reversed(_blocks(NC, _chunks_per_block(N, C, K + V))):
            m = c1 - c0
            gb = None if gates is None else gates.rows(c0, c1)
            bb = beta_c[c0 * N: c1 * N]
            blk = _delta_block(q, k, v, bb, gb, c0, c1, C)
            dob, vb = _gather(do, c0, c1, C, ct), _gather(v, c0, c1, C, ct)
            W, U = blk.WU[..., :K], blk.WU[..., K:]
            Sb = states[c0:c1].view(-1, K, V)
            u = torch.baddbmm(U, W, Sb, alpha=-1.0)  # [M, C, V], as in the forward
            # adjoint recurrence; dSb[j] = grad of states[c0 + j], dSb[m] carried in from the next block
            dSb = states.new_empty(m + 1, N, K, V)
            dSb[m] = dS
            direct = dSb[:m].view(-1, K, V)  # o_n = scale qg_n S_n (+ the grads of returned chunk states)
            if dstates is None:
                direct.baddbmm_(blk.qg.transpose(1, 2), dob, beta=0.0, alpha=scale)
            else:
                torch.baddbmm(dstates[c0:c1].reshape(-1, K, V).to(ct), blk.qg.transpose(1, 2), dob, alpha=scale,
                              out=direct)
            # du = grad of u (contiguous: in-place matmuls into strided results are slow)
            du = torch.baddbmm(dob, blk.P.transpose(1, 2), dob, beta=0.0, alpha=scale)
            du_, kd_ = du.view(m, N, C, V).unbind(0), blk.kd.view(m, N, C, K).unbind(0)
            WT_, dS_ = W.transpose(1, 2).view(m, N, K, C).unbind(0), dSb.unbind(0)
            dec = [None] * m if gb is None else gb.dec.view(m, N, 1, 1).unbind(0)
            for j in range(m - 1, -1, -1):
                du_[j].baddbmm_(kd_[j], dS_[j + 1])
                if dec[j] is None:
                    dS_[j].add_(dS_[j + 1])
                else:
                    dS_[j].addcmul_(dS_[j + 1], dec[j])
                dS_[j].baddbmm_(WT_[j], du_[j], alpha=-1.0)
            dS = dSb[0]
            dX = dSb[1:].view(-1, K, V)  # grads of the chunk end states
            dqg = torch.bmm(dob, Sb.transpose(1, 2))  # unscaled
            dP = torch.bmm(dob, u.transpose(1, 2))  # unscaled
            dkd = torch.bmm(u, dX.transpose(1, 2))
            dWU = states.new_empty(m * N, C, K + V)  # [dW | dU]: u = U - W S
            torch.neg(torch.bmm(du, Sb.transpose(1, 2)), out=dWU[..., :K])
            dWU[..., K:] = du
            dR = torch.bmm(blk.Tinv.transpose(1, 2), dWU)  # WU = Tinv R
            dA = torch.bmm(dR, blk.WU.transpose(1, 2)).neg_().tril_(-1)  # Tinv = (I + A)^{-1}
            dRk, dRv = dR[..., :K], dR[..., K:]
            bcol = bb[..., None]
            t = (dRk * blk.kg).sum(-1)  # R_k = beta kg
            dbb = (dA * blk.KD).sum(-1) + (dRv * vb).sum(-1) + t  # A = diag(beta) KD, R_v = beta v
            dvb = dRv * bcol
            dKD = dA.mul_(bcol)
            if blk.D is None:  # P = tril(qg kd^T) e^{-G_C}, KD = tril_(-1)(kg kd^T) e^{-G_C}
                dP_ = dP.tril()
                if gb is not None:
                    dP_.mul_(gb.inv_dec[:, None, None])
                    dKD_ = dKD * gb.inv_dec[:, None, None]
                else:
                    dKD_ = dKD
                dqg_t = torch.baddbmm(dqg, dP_, blk.kd, beta=scale, alpha=scale)
                dkd_t = torch.baddbmm(dkd, dP_.transpose(1, 2), blk.qg, alpha=scale)
                dkd_t.baddbmm_(dKD_.transpose(1, 2), blk.kg)
                dkg_t = torch.baddbmm(dRk * bcol, dKD_, blk.kd)
                if g is None:
                    dqb, dkb = dqg_t, dkg_t.add_(dkd_t)
                else:
                    eG, eCG = gb.exp_g[..., None], gb.exp_to_end[..., None]
                    dqb, dkb = dqg_t.mul_(eG), dkg_t.mul_(eG).addcmul_(dkd_t, eCG)
            else:  # P = (q k^T) * D, KD = (k k^T) * D
                eG, eCG = gb.exp_g[..., None], gb.exp_to_end[..., None]
                qb, kb = _gather(q, c0, c1, C, ct), _gather(k, c0, c1, C, ct)
                dQK = dP * blk.D
                dKK = dKD * blk.D
                dKK = dKK + dKK.transpose(1, 2)
                dqb = torch.baddbmm(dqg * (scale * eG), dQK, kb, alpha=scale)
                dkb = torch.baddbmm(dRk * (bcol * eG) + dkd * eCG, dQK.transpose(1, 2), qb, alpha=scale)
                dkb.baddbmm_(dKK, kb)
            if g is not None:
                # dG_i, from the parametrisation by D: sum of (grad * value) over the factors holding
                # exp(+G_i), minus that over the factors holding exp(-G_i)
                Z = (dKD * blk.KD).addcmul_(dP, blk.P, value=scale)  # (grad of D_ij) D_ij
                y = (dkd * blk.kd).sum(-1)  # kd_j = k_j exp(G_C - G_j)
                dG = bb * t + scale * (dqg * blk.qg).sum(-1) + Z.sum(-1) - Z.sum(-2) - y
                ddec = (dSb[1:] * states[c0:c1]).sum((-1, -2)).view(-1)  # dec_n S_n -> S_{n+1}
                dG[:, -1] += y.sum(-1) + ddec * gb.dec
                _scatter(dg, _reverse_cumsum(dG), c0, c1, C)
            for out, xb in ((dq, dqb), (dk, dkb), (dv, dvb)):
                _scatter(out, xb, c0, c1, C)
            _scatter(dbeta, dbb, c0, c1, C)
        ds0 = dS.reshape(B, H, K, V) if ctx.has_s0 else None
        return dq, dk, dv, dg, dbeta, ds0, None, None


def _chunk(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size, return_chunk_states):
    B, T, H, K, V, scale = _check_seq(q, k, v, g, beta, initial_state, scale)
    check_chunk_size(chunk_size)
    dt = q.dtype
    C = min(chunk_size, T)  # never work on more padding than needed
    NC = -(-T // C)
    s0 = None if initial_state is None else initial_state.to(torch.promote_types(dt, torch.float32))
    o, states = _DeltaRuleFunction.apply(q, k, v, g, beta, s0, scale, C)
    states = states.view(NC + 1, B, H, K, V).to(dt)
    if return_chunk_states:
        return o, (states[NC] if output_final_state else None), states[1:].transpose(0, 1)
    # a copy, so that the returned state does not keep every chunk state alive
    return o, (states[NC].clone() if output_final_state else None)


def chunk_delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
                     chunk_size=64, return_chunk_states=False):
    r"""Chunked DeltaNet (WY representation; see the module docstring).

    :math:`S_t = (I - \beta_t k_t k_t^\top) S_{t-1} + \beta_t k_t v_t^\top`,
    :math:`o_t = S_t^\top (\text{scale}\, q_t)`.

    Args:
        q, k: ``[B, T, H, K]`` (``k`` should be L2-normalized); v: ``[B, T, H, V]``;
        beta: ``[B, T, H]`` (usually ``sigmoid(.)``).
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or ``None`` (zeros).
        output_final_state: also return the final state.
        chunk_size: chunk length ``C``; any ``T`` works (padded internally).
        return_chunk_states: also return the state after every chunk.

    Returns:
        ``(o [B, T, H, V], final_state [B, H, K, V] or None)`` and, with ``return_chunk_states``,
        a third element ``chunk_states [B, ceil(T / C), H, K, V]`` (its last entry is the final
        state). Returned in ``q``'s dtype (computed in float32 for half dtypes); differentiable once
        w.r.t. every tensor input (hand-written backward, no double backward).
    """
    return _chunk(q, k, v, None, beta, scale, initial_state, output_final_state, chunk_size,
                  return_chunk_states)


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                           chunk_size=64, return_chunk_states=False):
    r"""Chunked Gated DeltaNet (WY representation; see the module docstring).

    :math:`S_t = e^{g_t} (I - \beta_t k_t k_t^\top) S_{t-1} + \beta_t k_t v_t^\top`,
    :math:`o_t = S_t^\top (\text{scale}\, q_t)`.

    Args:
        q, k: ``[B, T, H, K]`` (``k`` should be L2-normalized); v: ``[B, T, H, V]``;
        g: per-head log-decay ``[B, T, H]`` (``<= 0``, e.g. ``-softplus(.)``);
        beta: ``[B, T, H]`` (usually ``sigmoid(.)``).
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or ``None`` (zeros).
        output_final_state: also return the final state.
        chunk_size: chunk length ``C``; any ``T`` works (padded internally).
        return_chunk_states: also return the state after every chunk.

    Returns:
        ``(o [B, T, H, V], final_state [B, H, K, V] or None)`` and, with ``return_chunk_states``,
        a third element ``chunk_states [B, ceil(T / C), H, K, V]`` (its last entry is the final
        state). Returned in ``q``'s dtype (computed in float32 for half dtypes); differentiable once
        w.r.t. every tensor input (hand-written backward, no double backward).
    """
    return _chunk(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size,
                  return_chunk_states)
