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
  training and prefill. Cumulative log decays ``G`` are restarted at every chunk and the chunk
  states carry ``exp(G_end - G_j) <= 1``. The intra-chunk weights ``exp(G_i - G_j)`` (``i >= j``) are
  either factored through the chunk end, ``exp(G_i) exp(G_end - G_j) exp(-G_end)``, where the chunk's
  total log decay ``-G_end`` is small enough for every factor to stay far inside the range of the
  dtype (:func:`_factor_limit`; the usual case, and free of ``[C, C]`` exponentials), or masked to
  ``i >= j`` *before* the exponential. So arbitrarily strong decay over arbitrarily long sequences
  stays finite.

Performance notes (CPU, but nothing here is CPU-specific). With no or a scalar decay, ``chunk_gla``
is an ``autograd.Function`` (:class:`_ScalarGLAFunction`) with a hand-written backward (first-order
gradients only). It works in blocks of chunks (:func:`_chunks_per_block`), gathered into a
chunk-major layout ``[chunks * B * H, C, D]`` so that every product is one batched matmul, and its
temporaries stay small: cache-resident, and recycled by the allocator instead of freshly paged in on
every call as whole-sequence temporaries would be. Only the elementwise state recurrence runs per
chunk. The per-key decay keeps the plain-autograd path (:func:`_chunk_gla_per_key`). On CPU, for
float32 / float64 inputs, the no / scalar-decay forward and backward run the fused delta-rule kernel
of :mod:`growmem.ops._native` with ``beta = None`` (no delta correction: ``u = v``); without a
compiler, with ``GROWMEM_NATIVE=0``, on GPU or in half precision the blocked form above runs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from growmem.ops._native import delta_rule_backward, delta_rule_forward
from growmem.ops.utils import (
    check_chunk_size,
    check_finite,
    check_float,
    check_gate,
    check_qkv,
    check_qkv_step,
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
    B, H, K, V = check_qkv_step(q, k, v, "step_gla")
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


# ----------------------------------------------------------------------------------------------
# chunk-major blocks (also used by growmem.ops.delta_rule)
# ----------------------------------------------------------------------------------------------

# Work target of one block of chunks: about this many entries in each ``[m * B * H, C, C]`` temporary
# (1 MiB in float32). Blocks this small stay in cache and are recycled by the allocator; whole-sequence
# temporaries would each be a fresh allocation that the OS has to page in again on every call.
_BLOCK_ELEMS = 1 << 18


def _chunks_per_block(N: int, C: int, width: int) -> int:
    """Chunks per block so that a ``[m * N, C, max(C, width)]`` temporary has ~``_BLOCK_ELEMS`` entries."""
    return max(1, _BLOCK_ELEMS // (N * C * max(C, width)))


def _blocks(NC: int, m: int) -> list[tuple[int, int]]:
    """``[(c0, c1), ...]``: consecutive ranges of at most ``m`` of the ``NC`` chunks."""
    return [(c0, min(NC, c0 + m)) for c0 in range(0, NC, m)]


def _gather(x: Tensor, c0: int, c1: int, C: int, dtype: torch.dtype | None = None, *,
            mul: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """Chunks ``c0 .. c1-1`` of ``x: [B, T, H, *F]`` in chunk-major order, ``[(c1-c0) * B * H, C, *F]``.

    Row ``(n * B + b) * H + h`` holds chunk ``c0 + n`` of batch ``b``, head ``h``; zero-padded past
    ``T``. Returns a contiguous copy in ``dtype`` (default: ``x.dtype``, promoted with ``mul.dtype``),
    or, with ``mul: [(c1-c0) * B * H, C]``, the product ``x * mul[..., None]`` computed in the same
    pass. ``out`` (optional): a ``[(c1-c0) * B * H, C, *F]`` tensor to write into (it may be a view
    with strided rows).
    """
    B, T, H, *F = x.shape
    m = c1 - c0
    xb = x[:, c0 * C: c1 * C]
    if xb.shape[1] != m * C:  # the last block of a sequence that is not a multiple of C
        xb = pad_time(xb, C)
    if out is None:
        if dtype is None:
            dtype = x.dtype if mul is None else torch.promote_types(x.dtype, mul.dtype)
        out = torch.empty(m * B * H, C, *F, dtype=dtype, device=x.device)
    if B == 1:  # fewer dims: a faster kernel
        src, dst = xb[0].view(m, C, H, *F).transpose(1, 2), out.view(m, H, C, *F)
    else:
        src = xb.reshape(B, m, C, H, *F).permute(1, 0, 3, 2, *range(4, 4 + len(F)))
        dst = out.view(m, B, H, C, *F)
    if mul is None:
        dst.copy_(src)
    else:
        torch.mul(src, mul.view(*dst.shape[:-1], 1) if F else mul.view(dst.shape), out=dst)
    return out


def _scatter(out: Tensor, xb: Tensor, c0: int, c1: int, C: int) -> None:
    """Inverse of :func:`_gather`: write ``xb: [(c1-c0) * B * H, C, *F]`` into ``out: [B, T, H, *F]``."""
    B, T, H, *F = out.shape
    m = c1 - c0
    t0, t1 = c0 * C, min(c1 * C, T)
    if t1 - t0 == m * C and B == 1:  # fewer dims: a faster copy
        out[0, t0:t1].view(m, C, H, *F).copy_(xb.view(m, H, C, *F).transpose(1, 2))
        return
    src = xb.view(m, B, H, C, *F).permute(1, 0, 3, 2, *range(4, 4 + len(F)))  # [B, m, C, H, *F]
    if t1 - t0 == m * C:
        out[:, t0:t1].view(B, m, C, H, *F).copy_(src)
    else:  # the last block of a sequence that is not a multiple of C
        out[:, t0:t1].copy_(src.reshape(B, m * C, H, *F)[:, : t1 - t0])


def _decay_matrix(G: Tensor, dtype: torch.dtype) -> Tensor:
    """``D[..., i, j] = exp(G_i - G_j)`` for ``i >= j``, else 0, from cumulative log decays ``G: [M, C]``.

    The upper triangle is masked to ``-inf`` *before* the exponential, so for ``g <= 0`` every exponent
    is ``<= 0``. Returns ``[M, C, C]`` in ``dtype``.
    """
    C = G.shape[-1]
    upper = torch.ones(C, C, dtype=torch.bool, device=G.device).triu_(1)
    return (G[:, :, None] - G[:, None, :]).masked_fill_(upper, float("-inf")).exp_().to(dtype)


def _reverse_cumsum(x: Tensor) -> Tensor:
    """``y_i = sum_{j >= i} x_j`` along the last dim (the adjoint of ``cumsum``)."""
    return x.flip(-1).cumsum(-1).flip(-1)


# ----------------------------------------------------------------------------------------------
# chunked form, no or scalar decay: blocked forward and hand-written backward
# ----------------------------------------------------------------------------------------------

def _factor_limit(dtype: torch.dtype) -> float:
    """Largest chunk log decay ``-G_C`` for which ``exp(G_i - G_j)`` may be split as
    ``exp(G_i) * exp(G_C - G_j) * exp(-G_C)``: every factor and product then stays within a quarter of
    the exponent range of ``dtype`` (about ``e^22`` in float32, ``e^2.7`` in float16)."""
    fi = torch.finfo(dtype)
    return 0.25 * min(math.log(fi.max), -math.log(fi.tiny))


class _Gates(NamedTuple):
    """Decay factors of every chunk, computed once per call (chunk-major rows, see :func:`_gather`).

    ``G`` (``[NC * N, C]``, ``N = B * H``) is the within-chunk cumulative log decay in the gate dtype;
    the factors are in the compute dtype. ``chunk_decay[n]`` is ``max(-G_C)`` over the rows of chunk
    ``n`` (a python float).
    """

    G: Tensor  # [NC * N, C]
    exp_g: Tensor  # [NC * N, C]  exp(G)
    exp_to_end: Tensor  # [NC * N, C]  exp(G_C - G)
    dec: Tensor  # [NC * N]  exp(G_C): decay of the whole chunk
    inv_dec: Tensor  # [NC * N]  exp(-G_C) (inf for very strong decay; only used where it is bounded)
    chunk_decay: list[float]

    def rows(self, c0: int, c1: int) -> _Gates:
        """The rows of chunks ``c0 .. c1-1``."""
        N = self.G.shape[0] // len(self.chunk_decay)
        r = slice(c0 * N, c1 * N)
        return _Gates(*(x[r] for x in self[:5]), self.chunk_decay[c0:c1])

    def factored(self, dtype: torch.dtype) -> bool:
        """Whether no chunk decays by more than :func:`_factor_limit` (exp(G_i - G_j) may be split)."""
        return max(self.chunk_decay) <= _factor_limit(dtype)


def _chunk_gates(g: Tensor, NC: int, C: int, gate_dtype: torch.dtype, dtype: torch.dtype) -> _Gates:
    """:class:`_Gates` of the log decays ``g: [B, T, H]`` (zero-padded to ``NC * C`` tokens)."""
    G = _gather(g, 0, NC, C, gate_dtype).cumsum_(-1)
    GC = G[:, -1:]
    return _Gates(G, torch.exp(G).to(dtype), torch.exp(GC - G).to(dtype), torch.exp(GC[:, 0]).to(dtype),
                  torch.exp(-GC[:, 0]).to(dtype), (-GC).view(NC, -1).amax(1).tolist())


class _GLABlock(NamedTuple):
    """Per-block quantities of the no/scalar-decay chunked form (chunk-major, ``M`` rows of ``[C, .]``)."""

    A: Tensor  # [M, C, C]  (q k^T) * D: the intra-chunk weights (D_ij = exp(G_i - G_j) [i >= j])
    qg: Tensor  # [M, C, K]  q * exp(G): queries as they see the chunk start state (unscaled)
    kd: Tensor  # [M, C, K]  k * exp(G_C - G): keys as they reach the chunk end state
    D: Tensor | None  # [M, C, C]  the decay matrix, only if materialised (strong decay)
    qb: Tensor | None  # [M, C, K]  raw q, k: only without decay (= qg, kd) or with D
    kb: Tensor | None


def _scalar_gla_block(q: Tensor, k: Tensor, gates: _Gates | None, c0: int, c1: int, C: int) -> _GLABlock:
    """Per-block quantities of the no/scalar-decay chunked form for chunks ``c0 .. c1-1``.

    ``q, k: [B, T, H, K]`` are the full sequences and ``gates`` the block's rows of :class:`_Gates`
    (``None`` without decay); the block is gathered chunk-major (see :func:`_gather`) with the decay
    factors applied in the same pass. If no chunk of the block decays by more than
    :func:`_factor_limit` (the common case), the decay is factored through the chunk end,
    ``A = tril(qg kd^T) * exp(-G_C)``, and ``D`` is never formed; otherwise ``D`` is built with its
    upper triangle masked before the exponential, so arbitrarily strong decay stays finite.
    """
    if gates is None:
        qb, kb = _gather(q, c0, c1, C), _gather(k, c0, c1, C)
        return _GLABlock(torch.bmm(qb, kb.transpose(1, 2)).tril_(), qb, kb, None, qb, kb)
    qg, kd = _gather(q, c0, c1, C, mul=gates.exp_g), _gather(k, c0, c1, C, mul=gates.exp_to_end)
    if gates.factored(q.dtype):
        A = torch.bmm(qg, kd.transpose(1, 2)).tril_().mul_(gates.inv_dec[:, None, None])
        return _GLABlock(A, qg, kd, None, None, None)
    D = _decay_matrix(gates.G, q.dtype)
    qb, kb = _gather(q, c0, c1, C), _gather(k, c0, c1, C)
    return _GLABlock(torch.bmm(qb, kb.transpose(1, 2)).mul_(D), qg, kd, D, qb, kb)


class _ScalarGLAFunction(torch.autograd.Function):
    """Chunked GLA with no decay or one scalar decay per head and token (exact).

    Inputs ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, ``g: [B, T, H]`` or ``None``, ``s0: [B, H, K, V]``
    or ``None``, python ``scale`` and chunk size ``C``. Outputs ``o: [B, T, H, V]`` and
    ``states: [NC + 1, B * H, K, V]``, the state before every chunk and after the last one
    (``states[0] = s0``). Per chunk ``n`` (``M = B * H`` rows, see :func:`_scalar_gla_block`)::

        o_n       = scale * (qg_n S_n + A_n v_n)
        S_{n + 1} = dec_n * S_n + kd_n^T v_n

    Chunks are processed in blocks of :func:`_chunks_per_block` (chunk-major layout, batched matmuls);
    only the elementwise state recurrence runs per chunk. The backward recomputes the block
    quantities from the inputs and the saved states, and runs the adjoint recurrence
    ``dS_n = dec_n * dS_{n + 1} + scale * qg_n^T do_n`` in reverse.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale, C):
        B, T, H, K = q.shape
        V = v.shape[-1]
        N, NC = B * H, -(-T // C)
        states = q.new_empty(NC + 1, N, K, V)
        if s0 is None:
            states[0].zero_()
        else:
            states[0].copy_(s0.reshape(N, K, V))
        o = q.new_empty(B, T, H, V)
        ctx.scale, ctx.C, ctx.has_s0 = scale, C, s0 is not None
        ctx.set_materialize_grads(False)
        if delta_rule_forward(q, k, v, g, None, states, o, scale, C, _factor_limit(q.dtype)):
            ctx.save_for_backward(q, k, v, g, states)
            return o, states  # the fused CPU kernel ran (growmem.ops._native; beta = None: plain GLA)
        S = states.unbind(0)
        gates = None if g is None else _chunk_gates(g, NC, C, _gate_dtype(q.dtype), q.dtype)
        for c0, c1 in _blocks(NC, _chunks_per_block(N, C, max(K, V))):
            gb = None if gates is None else gates.rows(c0, c1)
            dec = None if gb is None else gb.dec
            A, qg, kd, *_ = _scalar_gla_block(q, k, gb, c0, c1, C)
            vb = _gather(v, c0, c1, C)
            # chunk-local end states kd^T v straight into states[n + 1], then the recurrence in place
            torch.bmm(kd.transpose(1, 2), vb, out=states[c0 + 1: c1 + 1].view(-1, K, V))
            dec_ = None if dec is None else dec.view(-1, N, 1, 1).unbind(0)
            for n in range(c0, c1):
                if dec_ is None:
                    S[n + 1].add_(S[n])
                else:
                    S[n + 1].addcmul_(S[n], dec_[n - c0])
            ob = torch.baddbmm(torch.bmm(qg, states[c0:c1].view(-1, K, V)), A, vb, beta=scale, alpha=scale)
            _scatter(o, ob, c0, c1, C)
        ctx.save_for_backward(q, k, v, g, states)
        return o, states

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dstates):
        q, k, v, g, states = ctx.saved_tensors
        scale, C = ctx.scale, ctx.C
        B, T, H, K = q.shape
        V = v.shape[-1]
        N, NC = B * H, -(-T // C)
        gd = _gate_dtype(q.dtype)
        if do is None:
            do = torch.zeros_like(v)
        fused = delta_rule_backward(q, k, v, g, None, states, do, dstates, scale, C, _factor_limit(q.dtype))
        if fused is not None:  # the fused CPU kernel ran (growmem.ops._native)
            dq, dk, dv, dg, _, ds0 = fused
            return dq, dk, dv, dg, (ds0.view(B, H, K, V) if ctx.has_s0 else None), None, None
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dg = None if g is None else torch.empty(B, T, H, dtype=gd, device=q.device)
        dS = q.new_zeros(N, K, V) if dstates is None else dstates[NC]  # grad of the state after the block
        gates = None if g is None else _chunk_gates(g, NC, C, gd, q.dtype)
        for c0, c1 in reversed(_blocks(NC, _chunks_per_block(N, C, max(K, V)))):
            m = c1 - c0
            gb = None if gates is None else gates.rows(c0, c1)
            dec = None if gb is None else gb.dec
            A, qg, kd, D, qb, kb = _scalar_gla_block(q, k, gb, c0, c1, C)
            vb, dob = _gather(v, c0, c1, C), _gather(do, c0, c1, C)
            Sb = states[c0:c1].view(-1, K, V)
            # adjoint recurrence: dS[j] = grad of states[c0 + j] (j = m: carried in from the next block)
            dSb = q.new_empty(m + 1, N, K, V)
            dSb[m] = dS
            direct = dSb[:m].view(-1, K, V)  # o_n = scale qg_n S_n (+ the grads of returned chunk states)
            if dstates is None:
                direct.baddbmm_(qg.transpose(1, 2), dob, beta=0.0, alpha=scale)
            else:
                torch.baddbmm(dstates[c0:c1].reshape(-1, K, V), qg.transpose(1, 2), dob, alpha=scale, out=direct)
            dS_ = dSb.unbind(0)
            dec_ = None if dec is None else dec.view(m, N, 1, 1).unbind(0)
            for j in range(m - 1, -1, -1):
                if dec_ is None:
                    dS_[j].add_(dS_[j + 1])
                else:
                    dS_[j].addcmul_(dS_[j + 1], dec_[j])
            dS = dSb[0]
            dX = dSb[1:].view(-1, K, V)  # grads of the chunk end states
            dvb = torch.baddbmm(torch.bmm(kd, dX), A.transpose(1, 2), dob, alpha=scale)
            dkd = torch.bmm(vb, dX.transpose(1, 2))
            dqg = torch.bmm(dob, Sb.transpose(1, 2))  # unscaled
            dA = torch.bmm(dob, vb.transpose(1, 2))  # unscaled
            if g is None:
                dA.tril_()
                dqb = torch.baddbmm(dqg, dA, kb, beta=scale, alpha=scale)
                dkb = torch.baddbmm(dkd, dA.transpose(1, 2), qb, alpha=scale)
            else:
                # log-decay grads, from the parametrisation by D: dG_i = sum of (grad * value) over every
                # factor that holds exp(+G_i), minus that over the factors holding exp(-G_i)
                Z = dA * A  # dA_ij A_ij = (grad of D_ij) D_ij up to the scale
                y = (dkd * kd).sum(-1, dtype=gd)  # kd_j = k_j exp(G_C - G_j)
                dG = scale * ((dqg * qg).sum(-1, dtype=gd) + Z.sum(-1, dtype=gd) - Z.sum(-2, dtype=gd)) - y
                ddec = (dSb[1:] * states[c0:c1]).sum((-1, -2), dtype=gd).view(-1)  # dec_n S_n -> S_{n+1}
                dG[:, -1] += y.sum(-1) + ddec * dec.to(gd)
                _scatter(dg, _reverse_cumsum(dG), c0, c1, C)
                eG, eCG = gb.exp_g[..., None], gb.exp_to_end[..., None]
                if D is None:  # A = tril(qg kd^T) exp(-G_C)
                    dA.tril_().mul_(gb.inv_dec[:, None, None])
                    dqb = torch.baddbmm(dqg, dA, kd, beta=scale, alpha=scale).mul_(eG)
                    dkb = torch.baddbmm(dkd, dA.transpose(1, 2), qg, alpha=scale).mul_(eCG)
                else:  # A = (q k^T) * D
                    dA.mul_(D)
                    dqb = torch.baddbmm(dqg * (scale * eG), dA, kb, alpha=scale)
                    dkb = torch.baddbmm(dkd * eCG, dA.transpose(1, 2), qb, alpha=scale)
            for out, xb in ((dq, dqb), (dk, dkb), (dv, dvb)):
                _scatter(out, xb, c0, c1, C)
        ds0 = dS.reshape(B, H, K, V) if ctx.has_s0 else None
        return dq, dk, dv, (None if g is None else dg.to(g.dtype)), ds0, None, None


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
        ``o: [B, T, H, V]`` in ``q.dtype`` (per-key gates: a view into a padded buffer if
        ``T % C != 0``),
        ``final_state: [B, H, K, V]`` or ``None``, ``chunk_states: [B, NC, H, K, V]`` with
        ``NC = ceil(T / chunk_size)``: the state after tokens ``min((n+1) C, T)``, the last equal to the
        final state.

    Without or with a scalar decay the gradient comes from a hand-written backward: differentiable
    once w.r.t. every tensor input (no double backward).
    """
    B, T, H, K, V, per_key, scale = _validate_seq(q, k, v, g, scale, initial_state)
    check_chunk_size(chunk_size)
    dtype = q.dtype
    s0 = None if initial_state is None else initial_state.to(dtype)
    if not per_key:  # no decay or one decay per head: blocked form with a hand-written backward
        C = min(chunk_size, T)  # never work on more padding than needed
        NC = -(-T // C)
        o, states = _ScalarGLAFunction.apply(q, k, v, g, s0, scale, C)
        states = states.view(NC + 1, B, H, K, V)
        if return_chunk_states:
            return o, (states[NC] if output_final_state else None), states[1:].transpose(0, 1)
        # a copy, so that the returned state does not keep every chunk state alive
        return o, (states[NC].clone() if output_final_state else None)
    return _chunk_gla_per_key(q, k, v, g, s0, scale, chunk_size, output_final_state, return_chunk_states)


def _chunk_gla_per_key(q: Tensor, k: Tensor, v: Tensor, g: Tensor, s0: Tensor | None, scale: float,
                       chunk_size: int, output_final_state: bool, return_chunk_states: bool):
    """:func:`chunk_gla` for per-key decays ``g: [B, T, H, K]`` (plain autograd ops, sub-chunked)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = q.dtype
    sub = _sub_chunk_size(chunk_size)
    # never work on more padding than needed: a single chunk only has to cover T (rounded to `sub`)
    C = min(chunk_size, -(-T // sub) * sub)
    NC = -(-T // C)

    def split(x: Tensor) -> Tensor:  # [B, T, H, D] -> [B, H, NC, C, D] (zero padded in time)
        return pad_time(x, C).reshape(B, NC, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    qc, kc, vc = split(q), split(k), split(v)
    gp = pad_time(g, C).to(_gate_dtype(dtype))  # zero log decay on the padding: the state passes unchanged
    G = gp.reshape(B, NC, C, H, K).permute(0, 3, 1, 2, 4).cumsum(-2)  # [B, H, NC, C, K]
    qs = qc * scale
    o = _intra_per_key(qs, kc, vc, G, sub)
    G_end = G[..., -1:, :]
    q_inter = qs * torch.exp(G).to(dtype)
    k_state = kc * torch.exp(G_end - G).to(dtype)
    dec = torch.exp(G_end).to(dtype).transpose(-1, -2)  # [B, H, NC, K, 1]: exp(G_end) per key
    # contribution of every chunk to its own end state, all chunks at once: [B, H, NC, K, V]
    S_loc = k_state.transpose(-1, -2) @ vc
    S = q.new_zeros(B, H, K, V) if s0 is None else s0
    seq = [S]
    for d_n, s_n in zip(dec.unbind(2), S_loc.unbind(2), strict=True):
        S = d_n * S + s_n
        seq.append(S)
    states = torch.stack(seq, dim=2)  # [B, H, NC + 1, K, V]
    o = o + q_inter @ states[:, :, :NC]  # inter-chunk part, all chunks at once
    o = o.permute(0, 2, 3, 1, 4).reshape(B, NC * C, H, V)
    if NC * C != T:
        o = o[:, :T]
    final = states[:, :, NC] if output_final_state else None
    if return_chunk_states:
        return o, final, states[:, :, 1:].permute(0, 2, 1, 3, 4)
    return o, final
