r"""Sliding-window linear attention with window c = 2 (SWLA, Memory Caching paper Eqs. 26-29).

Recurrence, for q, k ``[B, T, H, K]``, v ``[B, T, H, V]`` and per-head gates a, b, c ``[B, T, H]``:

.. math::
    S_t = a_t S_{t-1} + b_t k_{t-1} v_{t-1}^T + c_t k_t v_t^T, \qquad o_t = S_t^T (\text{scale}\, q_t)

The decay is given in log space, ``g = log a <= 0``. Because token t-1 enters the state again at
step t, the recurrent state is the triple ``(S [B, H, K, V], k_last [B, H, K], v_last [B, H, V])``.

Chunked form (exact): with ``U_t = S_t - c_t k_t v_t^T`` one finds

.. math::
    U_t = a_t U_{t-1} + k_{t-1} \big((a_t c_{t-1} + b_t) v_{t-1}\big)^T, \qquad U_0 = S_0,

i.e. a scalar-gated linear attention over the keys/values shifted by one token (the first shifted
token is the carried ``(k_last, b_1 v_last)``). So SWLA reuses :func:`growmem.ops.gla.chunk_gla` and
adds the diagonal term ``c_t <q_t, k_t> v_t``.
"""

from __future__ import annotations

import torch

from growmem.ops.gla import chunk_gla
from growmem.ops.utils import check_chunk_size, check_float, check_gate, check_qkv, check_state, default_scale

SWLAState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_swla(q, k, v, g, b, c, initial_state):
    B, T, H, K, V = check_qkv(q, k, v)
    for name, x in (("g", g), ("b", b), ("c", c)):
        check_gate(name, x, B, T, H, ref=q)
    if initial_state is not None:
        if not (isinstance(initial_state, tuple) and len(initial_state) == 3):
            raise TypeError("SWLA initial_state must be a tuple (S [B,H,K,V], k_last [B,H,K], v_last [B,H,V])")
        S0, k0, v0 = initial_state
        check_state(S0, B, H, K, V, q)
        for name, x, shape in (("k_last", k0, (B, H, K)), ("v_last", v0, (B, H, V))):
            check_float(name, x)
            if x.shape != shape:
                raise ValueError(f"SWLA initial_state {name} must have shape {shape}, got {tuple(x.shape)}")
    return B, T, H, K, V


def _zero_state(q: torch.Tensor, v: torch.Tensor) -> SWLAState:
    B, _, H, K = q.shape
    V = v.shape[-1]
    return (q.new_zeros(B, H, K, V), q.new_zeros(B, H, K), q.new_zeros(B, H, V))


def naive_swla(q, k, v, g, b, c, *, scale=None, initial_state: SWLAState | None = None,
               output_final_state: bool = False):
    """Per-token loop reference of SWLA (c = 2). Returns ``(o [B, T, H, V], final_state | None)``."""
    B, T, H, K, V = _check_swla(q, k, v, g, b, c, initial_state)
    scale = default_scale(scale, K)
    S, k_prev, v_prev = initial_state if initial_state is not None else _zero_state(q, v)
    outs = []
    for t in range(T):
        a_t = g[:, t].exp()[..., None, None]
        S = (a_t * S
             + b[:, t, :, None, None] * k_prev[..., :, None] * v_prev[..., None, :]
             + c[:, t, :, None, None] * k[:, t, :, :, None] * v[:, t, :, None, :])
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
        k_prev, v_prev = k[:, t], v[:, t]
    o = torch.stack(outs, dim=1)
    return o, ((S, k_prev, v_prev) if output_final_state else None)


def step_swla(q, k, v, g, b, c, state: SWLAState | None, *, scale=None):
    """One decoding step. q, k ``[B, H, K]``, v ``[B, H, V]``, g, b, c ``[B, H]``.

    Returns ``(o [B, H, V], new_state)`` with the state triple ``(S, k_last, v_last)``.
    """
    o, new_state = naive_swla(q[:, None], k[:, None], v[:, None], g[:, None], b[:, None], c[:, None],
                              scale=scale, initial_state=state, output_final_state=True)
    return o[:, 0], new_state


def chunk_swla(q, k, v, g, b, c, *, scale=None, initial_state: SWLAState | None = None,
               output_final_state: bool = False, chunk_size: int = 64, return_chunk_states: bool = False):
    """Chunked SWLA through the shifted scalar-gated linear attention (see module docstring).

    Returns ``(o [B, T, H, V], final_state | None)``; with ``return_chunk_states`` also
    ``chunk_states [B, NC, H, K, V]``: the readable matrix ``S`` after each chunk (the carried last
    token is not included; it is the last token of that chunk).
    """
    B, T, H, K, V = _check_swla(q, k, v, g, b, c, initial_state)
    check_chunk_size(chunk_size)
    scale = default_scale(scale, K)
    S0, k0, v0 = initial_state if initial_state is not None else _zero_state(q, v)
    a = g.exp()
    # shifted stream: token t carries (k_{t-1}, (a_t c_{t-1} + b_t) v_{t-1}); t = 0 carries the state's last token.
    w_prev = torch.cat([b[:, :1], a[:, 1:] * c[:, :-1] + b[:, 1:]], dim=1)  # [B, T, H]
    k_sh = torch.cat([k0[:, None], k[:, :-1]], dim=1)
    v_sh = torch.cat([v0[:, None], v[:, :-1]], dim=1) * w_prev[..., None]
    res = chunk_gla(q, k_sh, v_sh, g, scale=scale, initial_state=S0,
                    output_final_state=output_final_state or return_chunk_states,
                    chunk_size=chunk_size, return_chunk_states=return_chunk_states)
    o_u, U_T = res[0], res[1]
    diag = (q * k).sum(-1) * (c * scale)  # [B, T, H]
    o = o_u + diag[..., None] * v
    final = None
    if output_final_state:
        S_T = U_T + c[:, -1, :, None, None] * k[:, -1, :, :, None] * v[:, -1, :, None, :]
        final = (S_T, k[:, -1], v[:, -1])
    if not return_chunk_states:
        return o, final
    U_chunks = res[2]  # [B, NC, H, K, V]
    ends = torch.arange(chunk_size - 1, T + chunk_size - 1, chunk_size, device=q.device).clamp(max=T - 1)
    ends = ends[: U_chunks.shape[1]]
    kc, vc, cc = k[:, ends], v[:, ends], c[:, ends]
    S_chunks = U_chunks + cc[..., None, None] * kc[..., :, None] * vc[..., None, :]
    return o, final, S_chunks
