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
:math:`W = T\operatorname{diag}(\beta e^{G}) K` (one batched triangular solve for every chunk):

.. math::

    u &= U - W S_0, \\
    o &= \text{scale}\,\big[(Q S_0) \odot e^{G} + (Q K^\top \odot D) u\big],
        \quad D_{ij} = e^{G_i - G_j}\,[i \ge j], \\
    S_C &= e^{G_C} S_0 + (K \odot e^{G_C - G})^\top u.

Only the last three lines run in a python loop over chunks (``T / C`` iterations of batched
matmuls); all decay exponents are ``<= 0`` (the mask is applied *before* the exp), so long
sequences with strong decay stay finite.
"""

from __future__ import annotations

import torch

from growmem.ops.utils import (
    check_chunk_size,
    check_finite,
    check_float,
    check_gate,
    check_qkv,
    check_state,
    default_scale,
    pad_time,
)

__all__ = [
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "naive_delta_rule",
    "naive_gated_delta_rule",
    "step_delta_rule",
    "step_gated_delta_rule",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


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
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape [B, H, D] (one token), got {tuple(x.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must have shape [B, H, V] matching q's [B, H], got {tuple(v.shape)} "
                         f"for q {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    B, H, K = q.shape
    V = v.shape[-1]
    if B == 0 or H == 0 or K == 0 or V == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, v {tuple(v.shape)}")
    gates = (("beta", beta),) if g is None else (("g", g), ("beta", beta))
    for name, x in gates:
        check_float(name, x)
        if x.shape != (B, H):
            raise ValueError(f"{name} must have shape [B, H] = {(B, H)}, got {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the same device as q")
    for name, x in (("q", q), ("k", k), ("v", v), *gates):
        check_finite(name, x)
    if state is not None:
        check_float("state", state)
        if state.shape != (B, H, K, V):
            raise ValueError(f"state must have shape [B, H, K, V] = {(B, H, K, V)}, got {tuple(state.shape)}")
        if state.device != q.device:
            raise ValueError("state must be on the same device as q")
        check_finite("state", state)
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


def _chunk(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size, return_chunk_states):
    B, T, H, K, V, scale = _check_seq(q, k, v, g, beta, initial_state, scale)
    check_chunk_size(chunk_size)
    dt = q.dtype
    C = chunk_size
    NC = -(-T // C)
    Tp = NC * C

    # [B, T, H, D] -> [B, H, NC, C, D]; zero padding (k = beta = g = 0) leaves the state unchanged.
    def to_chunks(x):
        x = pad_time(x.to(dt), C)
        return x.reshape(B, NC, C, H, *x.shape[3:]).movedim(3, 1).contiguous()

    qc = to_chunks(q) * scale
    kc, vc = to_chunks(k), to_chunks(v)
    bc = to_chunks(beta)  # [B, H, NC, C]

    idx = torch.arange(C, device=q.device)
    incl = idx[:, None] >= idx[None, :]  # i >= j
    strict = idx[:, None] > idx[None, :]  # i > j

    kk = kc @ kc.transpose(-1, -2)  # [B, H, NC, C, C]
    qk = qc @ kc.transpose(-1, -2)
    if g is not None:
        G = to_chunks(g).cumsum(-1)  # [B, H, NC, C], <= 0 and decreasing for g <= 0
        diff = G[..., :, None] - G[..., None, :]  # G_i - G_j
        D = torch.exp(diff.masked_fill(~incl, float("-inf")))  # masked before exp: exponents <= 0
        eG = torch.exp(G)
        eGC = eG[..., -1]  # [B, H, NC]: decay of the whole chunk
        eGCj = torch.exp(G[..., -1:] - G)  # [B, H, NC, C]: exp(G_C - G_j) <= 1
        A = (bc[..., None] * kk * D).masked_fill(~strict, 0.0)
        P = qk * D  # D is already zero above the diagonal
        rhs_k = kc * (bc * eG)[..., None]
        qg = qc * eG[..., None]
        kdec = kc * eGCj[..., None]
    else:
        A = (bc[..., None] * kk).masked_fill(~strict, 0.0)
        P = qk.masked_fill(~incl, 0.0)
        rhs_k = kc * bc[..., None]
        qg = qc
        kdec = kc

    # One batched unit-lower-triangular solve for W and U of every chunk.
    L = A + torch.eye(C, dtype=dt, device=q.device)
    rhs = torch.cat([rhs_k, vc * bc[..., None]], dim=-1)  # [B, H, NC, C, K + V]
    if dt in _LOW_PRECISION:  # no half-precision triangular solve kernels
        X = torch.linalg.solve_triangular(L.float(), rhs.float(), upper=False, unitriangular=True).to(dt)
    else:
        X = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
    W, U = X[..., :K], X[..., K:]
    kdecT = kdec.transpose(-1, -2)  # [B, H, NC, K, C]

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    outs, states = [], []
    # unbind once (a single stack in backward) instead of indexing per chunk, whose backward would
    # scatter into a full-size zero tensor per chunk (quadratic in the number of chunks).
    dec = eGC[..., None, None].unbind(2) if g is not None else [None] * NC
    for W_n, U_n, Q_n, P_n, kT_n, d_n in zip(W.unbind(2), U.unbind(2), qg.unbind(2), P.unbind(2),
                                             kdecT.unbind(2), dec, strict=True):
        u = U_n - W_n @ S
        outs.append(Q_n @ S + P_n @ u)
        S = (S if d_n is None else d_n * S) + kT_n @ u
        if return_chunk_states:
            states.append(S)

    o = torch.stack(outs, dim=2).reshape(B, H, Tp, V).transpose(1, 2)[:, :T]
    final = S if output_final_state else None
    if return_chunk_states:
        return o, final, torch.stack(states, dim=1)
    return o, final


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
        state). Computed in ``q``'s dtype (the triangular solve in float32 for half dtypes);
        differentiable w.r.t. every tensor input.
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
        state). Computed in ``q``'s dtype (the triangular solve in float32 for half dtypes);
        differentiable w.r.t. every tensor input.
    """
    return _chunk(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size,
                  return_chunk_states)
