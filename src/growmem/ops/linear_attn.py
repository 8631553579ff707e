"""Plain (undecayed) linear attention: a thin wrapper over :mod:`growmem.ops.gla` with ``g = None``.

Layout ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, states ``[B, H, K, V]``::

    S_t = S_{t-1} + k_t v_t^T,    o_t = S_t^T (scale q_t)

With ``normalize=True`` the output is divided by the running normalizer ``z_t = z_0 + sum_{j<=t} k_j``::

    o_t = S_t^T (scale q_t) / (z_t^T (scale q_t) + eps)

implemented exactly by appending a ones column to ``v``: the state then has ``V + 1`` columns,
``[B, H, K, V + 1]``, whose last column is ``z`` (``initial_state`` and the returned states use that
layout too). The denominator is only safe for positive feature maps of ``q`` and ``k`` (e.g.
``elu(x) + 1``); that is the caller's job. ``eps`` (default ``1e-6``) is added to the denominator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from growmem.ops.gla import chunk_gla, naive_gla, step_gla
from growmem.ops.utils import check_float, check_qkv, check_state, default_scale

__all__ = ["naive_linear_attn", "step_linear_attn", "chunk_linear_attn"]


def _check_norm_state(state: Tensor | None, B: int, H: int, K: int, V: int, ref: Tensor) -> None:
    """Normalized states carry ``z`` as an extra last column: ``[B, H, K, V + 1]``."""
    if state is None:
        return
    check_float("initial_state", state)
    if state.shape != (B, H, K, V + 1):
        raise ValueError(f"with normalize=True the state has the normalizer z as an extra last column: it "
                         f"must have shape [B, H, K, V + 1] = {(B, H, K, V + 1)}, got {tuple(state.shape)}")
    check_state(state, B, H, K, V + 1, ref=ref)


def _append_ones(v: Tensor) -> Tensor:
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _divide(o: Tensor, eps: float) -> Tensor:
    return o[..., :-1] / (o[..., -1:] + eps)


def naive_linear_attn(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                      initial_state: Tensor | None = None, output_final_state: bool = False,
                      normalize: bool = False, eps: float = 1e-6) -> tuple[Tensor, Tensor | None]:
    """Reference linear attention (per-token loop).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        initial_state: ``[B, H, K, V]`` (``[B, H, K, V + 1]`` with ``normalize``) or ``None`` (zeros).
        normalize: divide by ``z_t^T (scale q_t) + eps`` (see the module docstring).

    Returns:
        ``(o [B, T, H, V], final_state or None)``.
    """
    if not normalize:
        return naive_gla(q, k, v, None, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state)
    B, T, H, K, V = check_qkv(q, k, v)
    _check_norm_state(initial_state, B, H, K, V, q)
    scale = default_scale(scale, K)
    dtype = q.dtype
    if initial_state is None:
        S, z = q.new_zeros(B, H, K, V), q.new_zeros(B, H, K)
    else:
        S, z = initial_state[..., :V].to(dtype), initial_state[..., V].to(dtype)
    outs = []
    for t in range(T):
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + k[:, t]
        qt = q[:, t] * scale
        num = torch.einsum("bhk,bhkv->bhv", qt, S)
        den = (qt * z).sum(-1, keepdim=True)
        outs.append(num / (den + eps))
    o = torch.stack(outs, dim=1)
    return o, (torch.cat([S, z[..., None]], dim=-1) if output_final_state else None)


def step_linear_attn(q: Tensor, k: Tensor, v: Tensor, state: Tensor | None, *, scale: float | None = None,
                     normalize: bool = False, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """One decoding step: ``q, k: [B, H, K]``, ``v: [B, H, V]``, ``state: [B, H, K, V]`` (``V + 1``
    columns with ``normalize``) or ``None``. Returns ``(o [B, H, V], new_state)``."""
    if not normalize:
        return step_gla(q, k, v, None, state, scale=scale)
    check_float("v", v)
    if v.dim() != 3 or q.dim() != 3:
        raise ValueError(f"step_linear_attn: q, v must have shape [B, H, D], got {tuple(q.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, V = v.shape
    _check_norm_state(state, B, H, q.shape[-1], V, q)
    o, new_state = step_gla(q, k, _append_ones(v), None, state, scale=scale)
    return _divide(o, eps), new_state


def chunk_linear_attn(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                      initial_state: Tensor | None = None, output_final_state: bool = False,
                      chunk_size: int = 64, normalize: bool = False, eps: float = 1e-6,
                      return_chunk_states: bool = False):
    """Chunked linear attention, see :func:`growmem.ops.gla.chunk_gla` (``g = None``).

    Returns ``(o [B, T, H, V], final_state or None)`` plus ``chunk_states [B, NC, H, K, V]`` if
    ``return_chunk_states``. With ``normalize`` all states have ``V + 1`` columns (last = ``z``).
    """
    if not normalize:
        return chunk_gla(q, k, v, None, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, chunk_size=chunk_size,
                         return_chunk_states=return_chunk_states)
    B, T, H, K, V = check_qkv(q, k, v)
    _check_norm_state(initial_state, B, H, K, V, q)
    res = chunk_gla(q, k, _append_ones(v), None, scale=scale, initial_state=initial_state,
                    output_final_state=output_final_state, chunk_size=chunk_size,
                    return_chunk_states=return_chunk_states)
    return (_divide(res[0], eps), *res[1:])
