r"""Causal linear operators of sequence mixers, materialized for one input (for Effective State-Size).

A sequence mixer is viewed as a causal linear operator ``y = T u`` (Parnichkun et al., ICML 2025,
arXiv 2504.19561). For the memories of growmem the operator acts on the *values*: given the
queries, keys and gates (the "featurization", fixed for the input at hand),

.. math::
    o[b, t, h, c] = \sum_{j \le t} T[b, h, t, j] \; v[b, j, h, c],

and ``T[b, h]`` (``[L, L]``, lower triangular) is **the same for every value channel c** of a head:
every rule in growmem evolves the columns of its ``[K, V]`` state independently (decays and the
delta-rule transition act on the key dimension only). So the per-channel (single input, single
output, SISO) operator of channel ``c`` is ``T[b, h]`` for every ``c``, and the per-head operator on
``vec(v)`` is ``T[b, h] \otimes I_V``. Shapes: q, k ``[B, L, H, K]``, v ``[B, L, H, V]``, gates
``[B, L, H]`` or ``[B, L, H, K]``, operators ``[B, H, L, L]`` (rows = output time t, cols = input
time j).

Three ways to materialize (``method``):

* ``closed``: closed forms (float64-friendly):

  - linear attention ``T[t, j] = s <q_t, k_j>`` (``s`` = the query scale, K^-1/2),
  - (scalar or per-key) gated linear attention
    ``T[t, j] = s sum_k q_t[k] k_j[k] exp(G_t[k] - G_j[k])``, ``G = cumsum(g)``,
  - SWLA (MC paper Eqs. 26-29) ``T[t, t] = s c_t <q_t, k_t>``,
    ``T[t, j] = s <q_t, k_j> (a_{j+1} c_j + b_{j+1}) exp(G_t - G_{j+1})`` for ``t > j``,
  - softmax attention ``T = softmax(q k^T / sqrt(d) + mask)`` per head (RoPE already applied),
  - convolutions ``T[c, t, j] = w[c, t - j]`` (Toeplitz, the linear part of a short convolution);

* ``basis``: forward-mode Jacobian of a map that is linear in v: the memory is run on one-hot
  values (value channel ``c`` of batch copy ``r`` carries a unit impulse at time ``j = r V + c``), so
  ``ceil(L / V)`` copies give every column of T in one batched forward pass. Exact for every memory
  that is linear in v with the same operator on every channel (DeltaNet, Gated DeltaNet and every
  Memory Caching variant over the linear family: GRM/SSC weights depend on q, k and u, not on v);

* ``jacobian``: reverse-mode Jacobian ``d o[b, t, h, c] / d v[b, j, h, c]`` over one-hot cotangents
  (``L x C`` of them, folded into the batch dimension in chunks, i.e. a hand-made ``vmap`` of the
  vector-Jacobian product; heads and batch share a cotangent because memories never mix heads or batch
  elements). This needs no linearity:
  for a memory that is nonlinear in v (deep memories) it is the **linearization** at the actual v
  (``Operator.exact = False``), one operator per value channel. It also reports the cross-channel
  coupling it sees, which is 0 for channel-shared operators.

Whole layers (any token mixer, e.g. deep-memory, RMT or BMRU layers): :func:`layer_jacobian_operator`
gives the per-channel diagonal blocks ``d y[b, t, a] / d x[b, j, a]`` of the layer's input-output
Jacobian, a linearization of the layer at the given input (the paper's SISO operators of a
nonlinear layer). :func:`lm_operators` hooks every layer of a :class:`~growmem.models.lm.CausalLM`
and returns its operators for one input.

``torch.func.jacrev`` would build the full ``[B, L, H, V, B, L, H, V]`` Jacobian (and cannot run
through growmem's custom ``autograd.Function`` ops); the functions here build only the blocks ESS needs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from growmem.caching.wrapper import CachedMemory
from growmem.layers.attention import Attention
from growmem.layers.conv import ShortConvolution
from growmem.memories.base import Gates, Memory
from growmem.memories.linear import (
    DeltaNetMemory,
    GatedDeltaNetMemory,
    GLAMemory,
    LinearAttentionMemory,
    ScalarGLAMemory,
    SWLAMemory,
)

__all__ = [
    "Operator", "LayerOperator", "la_operator", "gla_operator", "swla_operator", "attention_operator",
    "conv_operator", "short_conv_operator", "apply_operator", "memory_operator", "value_jacobian_operator",
    "layer_jacobian_operator", "attention_qkv", "capture_layers", "lm_operators", "LINEAR_MEMORIES",
]

#: memories whose output is linear in v with the same operator on every value channel
LINEAR_MEMORIES: tuple[type[Memory], ...] = (LinearAttentionMemory, ScalarGLAMemory, GLAMemory, SWLAMemory,
                                             DeltaNetMemory, GatedDeltaNetMemory)
_CLOSED = (LinearAttentionMemory, ScalarGLAMemory, GLAMemory, SWLAMemory)


@dataclass
class Operator:
    """A materialized causal operator (or a linearization) with named leading dims.

    Attributes:
        matrix: ``[..., L, L]``, rows = output time t, columns = input time j (zero above the diagonal).
        dims: names of the leading dims, e.g. ``("batch", "head")`` (channel-shared operators) or
            ``("batch", "head", "channel")`` (jacobian: one operator per value channel) or
            ``("batch", "channel")`` (layer Jacobians).
        method: ``closed``, ``basis`` or ``jacobian``.
        exact: True when the mixer is linear in the differentiated input given its gates (T is the map
            itself); False for a linearization (Jacobian of a nonlinear map at the given input).
        residual: ``||T v - o|| / ||o||`` against the mixer's real output when verified, else None (always
            None for linearizations, whose ``T v`` need not equal the output).
        coupling: jacobian only: largest |d o[t, c'] / d v[j, c]| over c' != c relative to the largest
            diagonal entry (0 when every channel has its own, unmixed operator).
        channels: jacobian only: which channels the ``channel`` dim holds.
    """

    matrix: torch.Tensor
    dims: tuple[str, ...]
    method: str
    exact: bool
    residual: float | None = None
    coupling: float | None = None
    channels: list[int] | None = None

    @property
    def length(self) -> int:
        return self.matrix.shape[-1]


# --------------------------------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------------------------------
def _scale(scale: float | None, K: int) -> float:
    return K ** -0.5 if scale is None else float(scale)


def _causal(L: int, device: torch.device, diagonal: int = 0) -> torch.Tensor:
    return torch.ones(L, L, dtype=torch.bool, device=device).tril(diagonal)


def la_operator(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Linear attention ``S_t = S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (s q_t)``:
    ``T[b, h, t, j] = s <q_t, k_j>`` for ``j <= t``. q, k ``[B, L, H, K]`` -> ``[B, H, L, L]``."""
    s = _scale(scale, q.shape[-1])
    A = torch.einsum("bthk,bjhk->bhtj", q * s, k)
    return A * _causal(q.shape[1], q.device)


def gla_operator(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor | None = None, scale: float | None = None,
                 block: int = 64) -> torch.Tensor:
    """Gated linear attention ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (s q_t)``.

    ``T[t, j] = s sum_k q_t[k] k_j[k] exp(G_t[k] - G_j[k])`` (``j <= t``, ``G = cumsum_t g``), computed
    in log space with the mask applied before ``exp`` (every exponent <= 0).

    Args:
        q, k: ``[B, L, H, K]``.
        g: log-decays ``<= 0``: ``None`` (plain linear attention), ``[B, L, H]`` (scalar per head, RetNet /
            Mamba2 / ``sgla``) or ``[B, L, H, K]`` (per key dimension, GLA).
        scale: query scale (default K^-1/2).
        block: output rows per step for per-key gates (bounds the ``[B, H, block, L, K]`` temporary).

    Returns:
        ``[B, H, L, L]``.
    """
    if g is None:
        return la_operator(q, k, scale)
    s = _scale(scale, q.shape[-1])
    B, L, H, K = q.shape
    G = g.to(torch.float64 if q.dtype == torch.float64 else torch.float32).cumsum(1)
    mask = _causal(L, q.device)
    if g.dim() == 3:
        Gh = G.permute(0, 2, 1)  # [B, H, L]
        D = torch.exp((Gh[..., :, None] - Gh[..., None, :]).masked_fill(~mask, float("-inf"))).to(q.dtype)
        return torch.einsum("bthk,bjhk->bhtj", q * s, k) * D
    Gk = G.permute(0, 2, 1, 3)  # [B, H, L, K]
    qh, kh = (q * s).permute(0, 2, 1, 3), k.permute(0, 2, 1, 3)
    rows = []
    for t0 in range(0, L, block):
        t1 = min(t0 + block, L)
        ex = Gk[:, :, t0:t1, None, :] - Gk[:, :, None, :, :]  # [B, H, n, L, K]
        ex = ex.masked_fill(~mask[t0:t1, :, None], float("-inf"))
        rows.append(torch.einsum("bhtk,bhjk,bhtjk->bhtj", qh[:, :, t0:t1], kh, torch.exp(ex).to(q.dtype)))
    return torch.cat(rows, dim=2)


def swla_operator(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                  scale: float | None = None) -> torch.Tensor:
    """Sliding-window linear attention, c = 2 (MC paper Eqs. 26-29):
    ``S_t = a_t S_{t-1} + b_t k_{t-1} v_{t-1}^T + c_t k_t v_t^T`` with ``a = exp(g)``.

    Value ``v_j`` enters the state with weight ``c_j k_j`` at step j and ``(a_{j+1} c_j + b_{j+1}) k_j``
    after step j + 1, then decays, so ``T[t, t] = s c_t <q_t, k_t>`` and, for ``t > j``,
    ``T[t, j] = s <q_t, k_j> (a_{j+1} c_j + b_{j+1}) exp(G_t - G_{j+1})``.
    q, k ``[B, L, H, K]``, g, b, c ``[B, L, H]`` -> ``[B, H, L, L]``.
    """
    s = _scale(scale, q.shape[-1])
    B, L, H, K = q.shape
    A = torch.einsum("bthk,bjhk->bhtj", q * s, k)
    gh, bh, ch = (x.permute(0, 2, 1) for x in (g, b, c))  # [B, H, L]
    G = gh.to(torch.float64 if q.dtype == torch.float64 else torch.float32).cumsum(-1)
    W = torch.diag_embed(ch)
    if L > 1:
        coef = gh[..., 1:].exp() * ch[..., :-1] + bh[..., 1:]  # [B, H, L-1], for j = 0 .. L-2
        strict = _causal(L, q.device, -1)
        # exp(G_t - G_{j+1}) for t > j, with G_{j+1} taken at column j
        Gn = torch.cat([G[..., 1:], G[..., -1:]], dim=-1)
        D = torch.exp((G[..., :, None] - Gn[..., None, :]).masked_fill(~strict, float("-inf"))).to(q.dtype)
        coef = torch.cat([coef, coef.new_zeros(B, H, 1)], dim=-1)
        W = W + D * coef[..., None, :]
    return A * W


def attention_operator(q: torch.Tensor, k: torch.Tensor, window: int | None = None,
                       scale: float | None = None) -> torch.Tensor:
    """Causal (optionally sliding-window) softmax attention per head:
    ``T = softmax(q k^T * scale + mask)`` with query i seeing keys ``i - W < j <= i`` (all ``j <= i`` when
    ``window`` is None). q, k ``[B, L, H, D]`` (RoPE already applied) -> ``[B, H, L, L]``."""
    L = q.shape[1]
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    scores = torch.einsum("bthd,bjhd->bhtj", q, k) * s
    visible = _causal(L, q.device)
    if window is not None:
        visible = visible & ~_causal(L, q.device, -window)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)


def conv_operator(weight: torch.Tensor, length: int) -> torch.Tensor:
    """Causal depthwise convolution as Toeplitz matrices.

    Args:
        weight: ``[C, w]`` in ``torch.nn.functional.conv1d`` order on a left-padded input, i.e.
            ``y[t] = sum_i weight[:, i] x[t - (w - 1) + i]``; so ``T[c, t, j] = weight[c, w - 1 - (t - j)]``
            for ``0 <= t - j < w``.
        length: L.

    Returns:
        ``[C, L, L]``. ESS of an FIR filter with w taps is at most ``w - 1`` (its delay line).
    """
    C, w = weight.shape
    lag = torch.arange(length, device=weight.device)[:, None] - torch.arange(length, device=weight.device)[None, :]
    valid = (lag >= 0) & (lag < w)
    idx = (w - 1 - lag).clamp(0, w - 1)
    return weight[:, idx] * valid


def short_conv_operator(conv: ShortConvolution, length: int) -> torch.Tensor:
    """The linear part (before SiLU) of a :class:`~growmem.layers.conv.ShortConvolution`: ``[C, L, L]``."""
    return conv_operator(conv.conv.weight[:, 0], length)


def apply_operator(matrix: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``o[b, t, h, c] = sum_j T[b, h, t, j] v[b, j, h, c]`` for channel-shared ``T [B, H, L, L]``, or
    per channel ``T [B, H, V, L, L]`` -> ``o [B, L, H, V]``."""
    if matrix.dim() == 4:
        return torch.einsum("bhtj,bjhc->bthc", matrix, v)
    return torch.einsum("bhctj,bjhc->bthc", matrix, v)


# --------------------------------------------------------------------------------------------------
# Jacobians
# --------------------------------------------------------------------------------------------------
def _diag_jacobian(fn: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor,
                   channels: Sequence[int] | None, chunk: int) -> tuple[torch.Tensor, float, list[int]]:
    """Diagonal-channel blocks of the Jacobian of a map ``[B, L, M, C] -> [B, L, M, C]``:
    ``J[b, m, i, t, j] = d y[b, t, m, c_i] / d x[b, j, m, c_i]`` -> ``[B, M, len(channels), L, L]``.

    Reverse mode, one cotangent per (t, channel) shared by every b and m (valid because the map never
    mixes batch elements or the M groups, e.g. heads). The cotangents are folded into the batch
    dimension: ``fn(x_rep, n)`` gets ``n`` stacked copies of x (``[n * B, L, M, C]``, copy-major) and must
    return the map applied to each copy; one backward pass with the stacked one-hot cotangents then
    gives n rows of the Jacobian. (This is what ``torch.vmap`` over ``torch.func.vjp`` would do; it is
    done by hand because growmem's ops are custom ``autograd.Function`` classes without functorch support.)
    Returns the blocks, the cross-channel coupling seen and the channel list.
    """
    B, L, M, C = x.shape
    chans = list(range(C)) if channels is None else [int(c) for c in channels]
    if not chans or any(c < 0 or c >= C for c in chans):
        raise ValueError(f"channels must be a non-empty list in [0, {C}), got {chans}")
    x = x.detach()
    J = x.new_zeros(B, M, len(chans), L, L)
    pairs = [(ci, t) for ci in range(len(chans)) for t in range(L)]
    diag_max, off_max = 0.0, 0.0
    for p0 in range(0, len(pairs), chunk):
        part = pairs[p0:p0 + chunk]
        n = len(part)
        ar = torch.arange(n, device=x.device)
        sel = torch.tensor([ci for ci, _ in part], device=x.device)
        ch = torch.tensor([chans[ci] for ci, _ in part], device=x.device)
        t_idx = torch.tensor([t for _, t in part], device=x.device)
        xr = x.repeat(n, 1, 1, 1).requires_grad_(True)
        with torch.enable_grad():
            y = fn(xr, n)
        if y.shape != xr.shape:
            raise ValueError(f"the diagonal Jacobian needs an output shaped like its input {tuple(x.shape)}, "
                             f"got {tuple(y.shape)} for {n} stacked copies")
        cot = x.new_zeros(n, B, L, M, C)
        cot[ar, :, t_idx, :, ch] = 1.0
        (grads,) = torch.autograd.grad(y, xr, cot.reshape(n * B, L, M, C))
        grads = grads.reshape(n, B, L, M, C)
        diag = grads[ar, :, :, :, ch]  # [n, B, L(j), M]
        grads[ar, :, :, :, ch] = 0.0
        diag_max = max(diag_max, float(diag.abs().max()))
        off_max = max(off_max, float(grads.abs().max()))
        J[:, :, sel, t_idx, :] = diag.permute(1, 3, 0, 2)
    coupling = off_max / diag_max if diag_max > 0 else 0.0
    return J, coupling, chans


def value_jacobian_operator(fn: Callable[[torch.Tensor, int], torch.Tensor], v: torch.Tensor,
                            channels: Sequence[int] | None = None,
                            chunk: int = 64) -> tuple[torch.Tensor, float, list[int]]:
    """Per-(head, channel) operators of a map ``v [B, L, H, V] -> o [B, L, H, V]`` by reverse mode:
    ``T[b, h, i, t, j] = d o[b, t, h, c_i] / d v[b, j, h, c_i]`` -> ``[B, H, len(channels), L, L]``.

    ``fn(v_rep, n)`` evaluates the map on ``n`` stacked copies ``[n * B, L, H, V]`` (copy-major: row
    ``r * B + b``); its other inputs must be repeated to match (``x.repeat(n, 1, ...)``). Costs
    ``L * len(channels) / chunk`` batched forward + backward passes of batch ``chunk * B``. Assumes heads
    and batch elements do not interact (true for every growmem memory). Returns ``(T, coupling,
    channels)``; ``coupling`` is the largest cross-channel derivative relative to the largest diagonal one.
    """
    return _diag_jacobian(fn, v, channels, chunk)


def layer_jacobian_operator(layer: Callable[[torch.Tensor], Any], x: torch.Tensor,
                            channels: Sequence[int] | None = None, chunk: int = 64) -> Operator:
    """Linearization of a token mixer at input ``x [B, L, D]``: the per-channel diagonal blocks
    ``T[b, a, t, j] = d y[b, t, a] / d x[b, j, a]`` of its input-output Jacobian -> ``[B, len(channels), L, L]``.

    ``layer(x)`` may return ``y`` or a tuple whose first entry is ``y`` (token mixers return
    ``(y, cache)``); it must treat batch elements independently. Costs ``L * len(channels)`` rows of the
    Jacobian (``chunk`` per batched forward + backward): restrict ``channels`` for long inputs.
    Cross-channel mixing (the projections) is not part of these SISO blocks; ``Operator.coupling``
    reports how large it is relative to them.
    """
    def fn(z: torch.Tensor, n: int) -> torch.Tensor:
        y = layer(z[:, :, 0])
        y = y[0] if isinstance(y, tuple) else y
        return y[:, :, None]

    J, coupling, chans = _diag_jacobian(fn, x[:, :, None], channels, chunk)
    return Operator(J[:, 0], ("batch", "channel"), "jacobian", exact=False, coupling=coupling, channels=chans)


# --------------------------------------------------------------------------------------------------
# memories
# --------------------------------------------------------------------------------------------------
def _is_linear_memory(memory: Memory) -> bool:
    if type(memory) in LINEAR_MEMORIES:
        return True
    return type(memory) is CachedMemory and type(memory.base) in LINEAR_MEMORIES


def _rep(x: torch.Tensor, n: int) -> torch.Tensor:
    """n stacked copies along the batch dim (copy-major: row ``r * B + b``)."""
    return x.repeat(n, *([1] * (x.dim() - 1)))


def _repeat_gates(gates: Gates, n: int) -> Gates:
    return {name: _rep(g, n) for name, g in gates.items()}


def _basis_operator(memory: Memory, q, k, v, gates: Gates, max_copies: int) -> torch.Tensor:
    """Run the memory on one-hot values: batch copy r, channel c carries an impulse at j = r V + c."""
    B, L, H, K = q.shape
    V = v.shape[-1]
    n_total = -(-L // V)
    cols = []
    for r0 in range(0, n_total, max_copies):
        n = min(max_copies, n_total - r0)
        vb = v.new_zeros(n, B, L, H, V)
        for r in range(n):
            j0 = (r0 + r) * V
            m = min(V, L - j0)
            idx = torch.arange(m, device=v.device)
            vb[r, :, j0 + idx, :, idx] = 1.0
        o = memory(_rep(q, n), _rep(k, n), vb.reshape(n * B, L, H, V), _repeat_gates(gates, n))[0]
        # o[r * B + b, t, h, c] = T[b, h, t, (r0 + r) V + c]
        cols.append(o.reshape(n, B, L, H, V).permute(1, 3, 2, 0, 4).reshape(B, H, L, n * V))
    return torch.cat(cols, dim=-1)[..., :L]


def memory_operator(memory: Memory, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: Gates,
                    method: str = "auto", verify: bool = True, channels: Sequence[int] | None = None,
                    chunk: int = 64, max_copies: int = 64) -> Operator:
    """The operator mapping values to outputs of ``memory`` for fixed ``q, k, gates``.

    Args:
        memory: any :class:`~growmem.memories.base.Memory` (``CachedMemory`` included).
        q, k ``[B, L, H, K]``, v ``[B, L, H, V]``, gates: what the memory's forward receives (as built by
            the layer: ``make_gates`` applied, ``u`` included for MC connectors).
        method: ``auto`` (``closed`` for la/sgla/gla/swla, ``basis`` for deltanet/gdn and MC over
            those, ``jacobian`` otherwise), or one of ``closed``, ``basis``, ``jacobian``.
        verify: compare ``T v`` with the memory's real output (``Operator.residual``).
        channels: ``jacobian`` only: value channels to materialize (default all).
        chunk: cotangents per batched backward (``jacobian``); max_copies: one-hot copies per forward (``basis``).

    Returns:
        :class:`Operator` with ``matrix [B, H, L, L]`` (``dims=("batch", "head")``), or for ``jacobian``
        ``[B, H, C, L, L]`` (``dims=("batch", "head", "channel")``).
    """
    linear = _is_linear_memory(memory)
    if method == "auto":
        if type(memory) in _CLOSED:
            method = "closed"
        elif linear:
            method = "basis"
        else:
            method = "jacobian"
    if method == "closed":
        if type(memory) not in _CLOSED:
            raise ValueError(f"no closed form for {type(memory).__name__}; use method='basis' or 'jacobian'")
        if isinstance(memory, SWLAMemory):
            T = swla_operator(q, k, gates["g"], gates["b"], gates["c"], memory.scale)
        else:
            T = gla_operator(q, k, gates.get("g"), memory.scale)
        op = Operator(T, ("batch", "head"), "closed", exact=True)
    elif method == "basis":
        if not linear:
            raise ValueError(f"method='basis' needs a memory linear in v with channel-shared operators; "
                             f"{memory.name} is not known to be one (use 'jacobian')")
        with torch.no_grad():
            T = _basis_operator(memory, q, k, v, gates, max_copies)
        op = Operator(T, ("batch", "head"), "basis", exact=True)
    elif method == "jacobian":
        q, k = q.detach(), k.detach()
        g_fixed = {n: x.detach() for n, x in gates.items()}

        def fn(vv: torch.Tensor, n: int) -> torch.Tensor:
            return memory(_rep(q, n), _rep(k, n), vv, _repeat_gates(g_fixed, n))[0]

        T, coupling, chans = value_jacobian_operator(fn, v.detach(), channels, chunk)
        op = Operator(T, ("batch", "head", "channel"), "jacobian", exact=linear, coupling=coupling, channels=chans)
    else:
        raise ValueError(f"unknown method {method!r}; choose auto, closed, basis or jacobian")
    if verify and op.exact:  # a linearization need not reproduce the output (o is not linear in v)
        with torch.no_grad():
            o = memory(q, k, v, gates)[0]
            if op.matrix.dim() == 5:
                o = o[..., op.channels]
                pred = apply_operator(op.matrix, v[..., op.channels])
            else:
                pred = apply_operator(op.matrix, v)
            op.residual = float((pred - o).norm() / o.norm().clamp_min(1e-300))
    return op


def attention_qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute an :class:`~growmem.layers.attention.Attention` layer's q, k (normed, RoPE at positions
    0..L-1) and v from its input ``x [B, L, D]``, exactly as its forward does: ``[B, L, H, Dh]`` each."""
    B, L, _ = x.shape
    H, Dh = attn.num_heads, attn.head_dim
    q = attn.q_norm(attn.q_proj(x).view(B, L, H, Dh))
    k = attn.k_norm(attn.k_proj(x).view(B, L, H, Dh))
    v = attn.v_proj(x).view(B, L, H, Dh)
    return attn.rope(q, offset=0), attn.rope(k, offset=0), v


# --------------------------------------------------------------------------------------------------
# language models
# --------------------------------------------------------------------------------------------------
@dataclass
class LayerOperator:
    """The operator(s) of one layer of a model for one input.

    Attributes:
        layer: layer index.
        mixer: registry name of the layer's mixer.
        kind: ``memory`` (the memory's value -> output operator; the layer's projections, short
            convolution and output norm are the featurization around it), ``attention`` (softmax
            matrix per head), ``layer_jacobian`` (linearization of the whole mixer, per channel) or
            ``model_jacobian`` (linearization of a whole RMT, per channel; layer index 0).
        operator: the :class:`Operator`.
        module: the memory / attention / mixer module the operator belongs to (for TSS).
        meta: extra facts (e.g. ``head_k_dim``, ``head_v_dim``, ``window``).
    """

    layer: int
    mixer: str
    kind: str
    operator: Operator
    module: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


def _top_memories(mixer: torch.nn.Module) -> list[Memory]:
    """Memory modules inside ``mixer`` that are not themselves inside another Memory."""
    found: list[Memory] = []

    def walk(m: torch.nn.Module) -> None:
        for child in m.children():
            if isinstance(child, Memory):
                found.append(child)
            else:
                walk(child)

    if isinstance(mixer, Memory):
        return [mixer]
    walk(mixer)
    return found


def capture_layers(model: torch.nn.Module, input_ids: torch.Tensor) -> list[dict[str, Any]]:
    """Run ``model(input_ids)`` once and record, for every layer of ``model.layers``, the mixer input
    ``x [B, L, D]`` and the arguments ``(q, k, v, gates)`` and output of every top-level memory call.

    Returns one dict per layer: ``{"x": x, "calls": [(memory, q, k, v, gates, o), ...]}``.
    """
    records: list[dict[str, Any]] = [{"x": None, "calls": []} for _ in model.layers]
    handles = []
    for i, layer in enumerate(model.layers):
        rec = records[i]

        def pre(mod, args, kwargs, rec=rec):
            rec["x"] = (args[0] if args else kwargs["x"]).detach()

        handles.append(layer.mixer.register_forward_pre_hook(pre, with_kwargs=True))
        for mem in _top_memories(layer.mixer):
            def post(mod, args, kwargs, out, rec=rec):
                q, k, v, gates = args[:4] if len(args) >= 4 else (
                    list(args) + [kwargs[n] for n in ("q", "k", "v", "gates")[len(args):]])
                rec["calls"].append((mod, q.detach(), k.detach(), v.detach(),
                                     {n: g.detach() for n, g in gates.items()}, out[0].detach()))

            handles.append(mem.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for h in handles:
            h.remove()
    return records


def rmt_jacobian_operator(model: torch.nn.Module, input_ids: torch.Tensor, channels: Sequence[int] | None = None,
                          chunk: int = 64) -> Operator:
    """Linearization of a whole :class:`~growmem.models.rmt.RecurrentMemoryTransformer` at ``input_ids
    [B, L]``: ``T[b, a, t, j] = d h[b, t, a] / d e[b, j, a]`` -> ``[B, len(channels), L, L]``, with ``e``
    the token embeddings and ``h`` the last residual stream at the token positions (before the final
    norm). Everything between (every segment, the memory tokens carried across segments, every layer)
    is inside the map, so a split at a segment boundary measures what the memory passes on; with
    ``num_mem_tokens = 0`` the segments are independent and those blocks are exactly zero.
    """
    embed = model.backbone.embed

    def fn(z: torch.Tensor, n: int) -> torch.Tensor:
        handle = embed.register_forward_hook(lambda mod, args, out: z[:, :, 0])
        try:
            out = model(input_ids.repeat(n, 1), output_hidden_states=True)
        finally:
            handle.remove()
        return out.hidden_states[-1][:, :, None]

    with torch.no_grad():
        e = embed(input_ids)
    J, coupling, chans = _diag_jacobian(fn, e[:, :, None], channels, chunk)
    return Operator(J[:, 0], ("batch", "channel"), "jacobian", exact=False, coupling=coupling, channels=chans)


def lm_operators(model: torch.nn.Module, input_ids: torch.Tensor, method: str = "auto",
                 dtype: torch.dtype = torch.float64, jacobian_channels: Sequence[int] | None = None,
                 verify: bool = True) -> list[LayerOperator]:
    """Per-layer, per-head operators of a :class:`~growmem.models.lm.CausalLM` on ``input_ids [B, L]``.

    The model is copied and cast to ``dtype`` (float64 by default, so ranks are not blurred by float32
    rounding), run once with hooks (:func:`capture_layers`), and for each layer:

    * a mixer whose memory was called once on the whole sequence -> :func:`memory_operator` on the
      captured ``(q, k, v, gates)`` (``kind="memory"``);
    * :class:`~growmem.layers.attention.Attention` -> :func:`attention_operator` of its recomputed
      q, k (``kind="attention"``; verified against the layer's own output);
    * anything else (deep memories called per segment, BMRU, unknown mixers) ->
      :func:`layer_jacobian_operator` on the captured mixer input (``kind="layer_jacobian"``,
      a linearization; restrict ``jacobian_channels`` for long inputs).

    A Recurrent Memory Transformer gives one operator for the whole model (``kind="model_jacobian"``,
    :func:`rmt_jacobian_operator`): its memory passes between segments through every layer, so no
    single layer's operator carries it.
    """
    from growmem.models.rmt import RecurrentMemoryTransformer

    m = copy.deepcopy(model).to(dtype).eval()
    if isinstance(m, RecurrentMemoryTransformer):
        op = rmt_jacobian_operator(m, input_ids, jacobian_channels)
        r = m.rmt
        return [LayerOperator(0, f"rmt({'+'.join(dict.fromkeys(m.backbone.config.layer_mixers))})", "model_jacobian",
                              op, m, {"d_model": m.backbone.config.d_model, "num_mem_tokens": r.num_mem_tokens,
                                      "segment_len": r.segment_len})]
    records = capture_layers(m, input_ids)
    names = getattr(getattr(m, "config", None), "layer_mixers", None) or [type(lay.mixer).__name__ for lay in m.layers]
    out: list[LayerOperator] = []
    for i, (layer, rec) in enumerate(zip(m.layers, records, strict=True)):
        mixer = layer.mixer
        calls = rec["calls"]
        x = rec["x"]
        L = x.shape[1]
        if len(calls) == 1 and calls[0][1].shape[1] == L:
            mem, q, k, v, gates, o = calls[0]
            chans = None if jacobian_channels is None else [c for c in jacobian_channels if c < v.shape[-1]] or None
            op = memory_operator(mem, q, k, v, gates, method=method, verify=False, channels=chans)
            if verify and op.exact:
                chans = op.channels if op.matrix.dim() == 5 else None
                pred = apply_operator(op.matrix, v[..., chans] if chans else v)
                ref = o[..., chans] if chans else o
                op.residual = float((pred - ref).norm() / ref.norm().clamp_min(1e-300))
            out.append(LayerOperator(i, names[i], "memory", op, mem,
                                     {"head_k_dim": mem.head_k_dim, "head_v_dim": mem.head_v_dim,
                                      "num_heads": mem.num_heads}))
        elif isinstance(mixer, Attention):
            with torch.no_grad():
                q, k, v = attention_qkv(mixer, x)
                T = attention_operator(q, k, window=mixer.window)
                op = Operator(T, ("batch", "head"), "closed", exact=True)
                if verify:
                    y = mixer(x)[0]
                    pred = mixer.o_proj(apply_operator(T, v).reshape(x.shape[0], L, -1))
                    op.residual = float((pred - y).norm() / y.norm().clamp_min(1e-300))
            out.append(LayerOperator(i, names[i], "attention", op, mixer,
                                     {"head_k_dim": mixer.head_dim, "head_v_dim": mixer.head_dim,
                                      "num_heads": mixer.num_heads, "window": mixer.window}))
        else:
            op = layer_jacobian_operator(mixer, x, jacobian_channels)
            out.append(LayerOperator(i, names[i], "layer_jacobian", op, mixer, {"d_model": x.shape[-1]}))
    return out

