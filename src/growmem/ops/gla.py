"""Gated / decayed linear attention (GLA, RetNet / Mamba2-style scalar decay), chunked in log space.

Layout: ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, matrix states ``[B, H, K, V]``. For every batch
``b`` and head ``h`` the recurrence (flash-linear-attention convention) is::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T          # S_t: [K, V]
    o_t = S_t^T (scale * q_t)                          # o_t: [V]

where ``g_t`` is a log-decay (``<= 0``), either

* ``None``: no decay (plain linear attention),
* ``[B, T, H]``: one scalar decay per head and token (RetNet / Mamba2 style), or
* ``[B, T, H, K]``: one decay per key dimension (GLA style).

``scale`` defaults to ``K ** -0.5``.

Three implementations:

* :func:`naive_gla` -- per-token python loop, the reference.
* :func:`step_gla` -- one token, for decoding.
* :func:`chunk_gla` -- the chunked (parallel within a chunk, recurrent across chunks) form used for
  training and prefill. Every exponent it takes is ``<= 0``: cumulative log decays ``G`` are
  restarted at every chunk, intra-chunk weights ``exp(G_i - G_j)`` are masked to ``i >= j`` *before*
  the exponential, and the chunk states carry ``exp(G_end - G_j)``. So arbitrarily strong decay
  over arbitrarily long sequences stays finite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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

__all__ = ["naive_gla", "step_gla", "chunk_gla"]


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------

def _check_nonpositive(g: Tensor) -> None:
    """Raise ``ValueError`` if the log-decay ``g`` has a positive entry (skipped while compiling)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return
    if (g > 0).any():
        raise ValueError(f"g is a log-decay and must be <= 0 everywhere, got max(g) = {g.max().item():.4g}")


def _validate_seq(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, scale: float | None,
                  initial_state: Tensor | None) -> tuple[int, int, int, int, int, bool | None, float]:
    """Validate sequence inputs; returns ``(B, T, H, K, V, per_key, scale)`` (``per_key`` None if no g)."""
    B, T, H, K, V = check_qkv(q, k, v)
    per_key = None
    if g is not None:
        per_key = check_gate("g", g, B, T, H, K, ref=q, allow_per_key=True)
        _check_nonpositive(g)
    check_state(initial_state, B, H, K, V, ref=q)
    return B, T, H, K, V, per_key, default_scale(scale, K)


def _gate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Cumulative log decays are summed in at least float32 (16-bit cumsums lose the decay)."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------
# reference and decoding step
# ----------------------------------------------------------------------------------------------

def naive_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, scale: float | None = None,
              initial_state: Tensor | None = None, output_final_state: bool = False
              ) -> tuple[Tensor, Tensor | None]:
    """Reference gated linear attention: a plain per-token loop (slow; for tests).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: log-decay ``<= 0``, ``[B, T, H]`` (scalar per head), ``[B, T, H, K]`` (per key) or ``None``.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or ``None`` (zeros).
        output_final_state: also return ``S_T``.

    Returns:
        ``(o, final_state)`` with ``o: [B, T, H, V]`` and ``final_state: [B, H, K, V]`` or ``None``.
        Computes ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)`` in the dtype
        of ``q``.
    """
    B, T, H, K, V, per_key, scale = _validate_seq(q, k, v, g, scale, initial_state)
    dtype = q.dtype
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        if g is not None:
            a = torch.exp(g[:, t].to(dtype))
            S = S * (a[..., None] if per_key else a[..., None, None])
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, dim=1)
    return o, (S if output_final_state else None)


def step_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, state: Tensor | None, *,
             scale: float | None = None) -> tuple[Tensor, Tensor]:
    """One decoding step of gated linear attention.

    Args:
        q, k: ``[B, H, K]``; v: ``[B, H, V]``.
        g: log-decay ``<= 0``, ``[B, H]``, ``[B, H, K]`` or ``None`` (no decay).
        state: ``[B, H, K, V]`` or ``None`` (zeros).
        scale: query scale, default ``K ** -0.5``.

    Returns:
        ``(o, new_state)``: ``o = new_state^T (scale q)`` of shape ``[B, H, V]`` and
        ``new_state = diag(exp(g)) state + k v^T`` of shape ``[B, H, K, V]``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
        if x.dim() != 3:
            raise ValueError(f"step_gla: {name} must have shape [B, H, D], got {tuple(x.shape)}")
    B, _, H, K, V = check_qkv(q[:, None], k[:, None], v[:, None])
    if g is not None:
        check_float("g", g)
        if g.shape == (B, H):
            per_key = False
        elif g.shape == (B, H, K):
            per_key = True
        else:
            raise ValueError(f"step_gla: g must have shape [B, H] = {(B, H)} or [B, H, K] = {(B, H, K)}, "
                             f"got {tuple(g.shape)}")
        if g.device != q.device:
            raise ValueError("g must be on the same device as q")
        check_finite("g", g)
        _check_nonpositive(g)
    check_state(state, B, H, K, V, ref=q)
    scale = default_scale(scale, K)
    dtype = q.dtype
    kv = k[..., :, None] * v[..., None, :]
    if state is None:
        new_state = kv
    else:
        state = state.to(dtype)
        if g is not None:
            a = torch.exp(g.to(dtype))
            state = state * (a[..., None] if per_key else a[..., None, None])
        new_state = state + kv
    o = (new_state * (q * scale)[..., None]).sum(-2)
    return o, new_state


# ----------------------------------------------------------------------------------------------
# chunked form
# ----------------------------------------------------------------------------------------------

def _sub_chunk_size(C: int) -> int:
    """Largest divisor of ``C`` not above ``ceil(sqrt(C))`` (balances the per-key intra-chunk memory)."""
    r = math.isqrt(C)
    if r * r < C:
        r += 1
    for c in range(r, 0, -1):
        if C % c == 0:
            return c
    return 1  # pragma: no cover


def _intra_per_key(q: Tensor, k: Tensor, v: Tensor, G: Tensor, c: int) -> Tensor:
    """Intra-chunk output for per-key decays, exact and with every exponent ``<= 0``.

    ``q`` (already scaled), ``k``, ``G``: ``[..., C, K]`` with ``G`` the within-chunk cumulative log
    decay; ``v``: ``[..., C, V]``; ``c`` divides ``C``. Returns ``o_i = sum_{j <= i} (q_i * exp(G_i - G_j))
    . k_j v_j``, ``[..., C, V]``.

    The chunk is split into ``n = C / c`` sub-chunks. Diagonal sub-blocks use a masked
    ``[c, c, K]`` weight tensor. An off-diagonal block (sub-chunk ``a`` attending to ``b < a``) is
    factored through the last position ``r`` of sub-chunk ``a - 1``:
    ``exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j)``, both exponents ``<= 0`` (``j <= r < i``).
    """
    dtype = q.dtype
    C = q.shape[-2]
    n = C // c
    qs, ks, Gs = (x.unflatten(-2, (n, c)) for x in (q, k, G))  # [..., n, c, K]
    neg_inf = float("-inf")
    tri = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    # diagonal sub-blocks: A[a, i, j] = sum_k q[a,i,k] k[a,j,k] exp(G[a,i,k] - G[a,j,k]), j <= i
    ex = (Gs[..., :, None, :] - Gs[..., None, :, :]).masked_fill(~tri[:, :, None], neg_inf)
    A = (qs[..., :, None, :] * torch.exp(ex).to(dtype) * ks[..., None, :, :]).sum(-1)  # [..., n, c, c]
    o = A @ v.unflatten(-2, (n, c))  # [..., n, c, V]
    if n == 1:
        return o.flatten(-3, -2)
    # off-diagonal blocks, rows a = 1..n-1 (index a' = a - 1), columns b = 0..n-2 with b <= a'
    Gr = Gs[..., :-1, -1, :]  # [..., n-1, K]: G at the end of sub-chunk a'
    q_t = qs[..., 1:, :, :] * torch.exp(Gs[..., 1:, :, :] - Gr[..., :, None, :]).to(dtype)  # [..., n-1, c, K]
    low = torch.ones(n - 1, n - 1, dtype=torch.bool, device=q.device).tril()
    ex = (Gr[..., :, None, None, :] - Gs[..., None, :-1, :, :]).masked_fill(~low[:, :, None, None], neg_inf)
    k_t = ks[..., None, :-1, :, :] * torch.exp(ex).to(dtype)  # [..., n-1 (a'), n-1 (b), c, K]
    A_off = q_t @ k_t.flatten(-3, -2).transpose(-1, -2)  # [..., n-1, c, (n-1) c]
    o_off = A_off.flatten(-3, -2) @ v[..., : C - c, :]  # [..., (n-1) c, V]
    return torch.cat([o[..., 0, :, :], o[..., 1:, :, :].flatten(-3, -2) + o_off], dim=-2)


def chunk_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, scale: float | None = None,
              initial_state: Tensor | None = None, output_final_state: bool = False, chunk_size: int = 64,
              return_chunk_states: bool = False):
    """Chunked gated linear attention (exact; same result as :func:`naive_gla`).

    Recurrence per batch and head: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``,
    ``o_t = S_t^T (scale q_t)``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; any ``T >= 1`` (padded internally).
        g: log-decay ``<= 0``: ``[B, T, H]`` (scalar per head), ``[B, T, H, K]`` (per key dimension)
            or ``None`` (no decay). Positive entries raise ``ValueError``.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or ``None`` (zeros); cast to ``q.dtype``.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk ``C``. Work is ``O(T C (K + V))`` intra-chunk plus ``O(T/C)``
            sequential ``[B, H, K, V]`` state updates. Per-key gates additionally materialise
            ``O(T c K)`` and ``O(T (C/c) K)`` decay tensors with ``c`` the largest divisor of ``C`` up to
            ``sqrt(C)``; prefer a chunk size with such a divisor (a power of two).
        return_chunk_states: also return the state after every chunk.

    Returns:
        ``(o, final_state)``, or ``(o, final_state, chunk_states)`` if ``return_chunk_states``:
        ``o: [B, T, H, V]`` in ``q.dtype`` (a view into a padded buffer if ``T % C != 0``),
        ``final_state: [B, H, K, V]`` or ``None``, ``chunk_states: [B, NC, H, K, V]`` with
        ``NC = ceil(T / chunk_size)``: the state after tokens ``min((n+1) C, T)``, the last equal to the
        final state.
    """
    B, T, H, K, V, per_key, scale = _validate_seq(q, k, v, g, scale, initial_state)
    check_chunk_size(chunk_size)
    dtype = q.dtype
    sub = _sub_chunk_size(chunk_size) if per_key else 1
    # never work on more padding than needed: a single chunk only has to cover T (rounded to `sub`)
    C = min(chunk_size, -(-T // sub) * sub)
    NC = -(-T // C)

    def split(x: Tensor) -> Tensor:  # [B, T, H, D] -> [B, H, NC, C, D] (zero padded in time)
        return pad_time(x, C).reshape(B, NC, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    qc, kc, vc = split(q), split(k), split(v)
    neg_inf = float("-inf")
    chunk_decay = None  # exp(G_end) per chunk, [B, H, NC] or [B, H, NC, K]
    if g is None:
        qs = qc * scale
        A = (qs @ kc.transpose(-1, -2)).tril()  # [B, H, NC, C, C]
        o = A @ vc
        q_inter, k_state = qs, kc
    else:
        gd = _gate_dtype(dtype)
        gp = pad_time(g, C).to(gd)  # zero log decay on the padding: the state passes unchanged
        if per_key:
            G = gp.reshape(B, NC, C, H, K).permute(0, 3, 1, 2, 4).cumsum(-2)  # [B, H, NC, C, K]
            qs = qc * scale
            o = _intra_per_key(qs, kc, vc, G, sub)
            G_end = G[..., -1:, :]
            q_inter = qs * torch.exp(G).to(dtype)
            k_state = kc * torch.exp(G_end - G).to(dtype)
            chunk_decay = torch.exp(G_end[..., 0, :]).to(dtype)
        else:
            G = gp.reshape(B, NC, C, H).permute(0, 3, 1, 2).cumsum(-1)  # [B, H, NC, C]
            causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
            D = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~causal, neg_inf)).to(dtype)
            A = ((qc * scale) @ kc.transpose(-1, -2)) * D  # [B, H, NC, C, C]
            o = A @ vc
            G_end = G[..., -1:]
            q_inter = qc * (torch.exp(G).to(dtype) * scale)[..., None]
            k_state = kc * torch.exp(G_end - G).to(dtype)[..., None]
            chunk_decay = torch.exp(G_end[..., 0]).to(dtype)
    # contribution of every chunk to its own end state, all chunks at once: [B, H, NC, K, V]
    S_loc = k_state.transpose(-1, -2) @ vc
    S0 = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    if chunk_decay is None:
        states = torch.cat([S0[:, :, None], S_loc], dim=2).cumsum(2)  # [B, H, NC + 1, K, V]
    else:
        dec = chunk_decay[..., None, None] if chunk_decay.dim() == 3 else chunk_decay[..., None]
        S = S0
        seq = [S]
        for d_n, s_n in zip(dec.unbind(2), S_loc.unbind(2), strict=True):
            S = d_n * S + s_n
            seq.append(S)
        states = torch.stack(seq, dim=2)
    o = o + q_inter @ states[:, :, :NC]  # inter-chunk part, all chunks at once
    o = o.permute(0, 2, 3, 1, 4).reshape(B, NC * C, H, V)
    if NC * C != T:
        o = o[:, :T]
    final = states[:, :, NC] if output_final_state else None
    if return_chunk_states:
        return o, final, states[:, :, 1:].permute(0, 2, 1, 3, 4)
    return o, final
