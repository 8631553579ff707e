r"""Memory Caching: one wrapper that gives any :class:`~growmem.memories.base.Memory` a growing memory.

MC paper (Behrouz et al., arXiv 2602.24281). The sequence is cut into segments (see
:mod:`growmem.caching.segments`); inside a segment the base memory updates as usual (Eq. 4); at the
end of segment i its state M(i) is cached with a pooled key p(i) (the sum, or mean, of the segment's
keys). Token t of segment s(t) reads its online memory M_t and the cached ones, i < s(t):

* Residual (``res``, Eq. 7):   y_t = M_t(q_t) + sum_i M(i)(q_t)
* Gated Residual (``grm``, Eqs. 9-10): gamma_t = softmax({<u_t, p(i)>}_i, <u_t, p_t^online>) / tau;
  y_t = gamma_t^online M_t(q_t) + sum_i gamma_t^i M(i)(q_t)
* Memory Soup (``soup``, Eqs. 14-15): the memory whose parameters are the gamma-mixture of the
  memories' parameters, applied to q_t. For memories with a linear readout it equals GRM exactly;
  otherwise (deep memories) the base runs once per piece (``forward_with_context``) and its
  ``soup_read`` applies the mixture from per-memory products, with no mixed weight set per token.
* Sparse Selective Caching (``ssc``, Eqs. 16-17): only the ``top_k`` cached memories with the
  largest <u_t, p(i)> enter the softmax (the online memory always does); only they are read.
* Post-training average (``avg``, Sec. 4.3): y_t = M_t(q_t) + mean_i M(i)(q_t), no learned weights.

Shapes: q, k, u ``[B, T, H, K]``, v ``[B, T, H, V]``; cached readable states stacked on dim 1
(``[B, N, H, K, V]`` for matrix memories); pooled keys ``[B, N, H, K]``.

The parallel forward has no per-token loop: the base memory runs chunked (one pass for
``checkpoint``; segments folded into the batch for ``restart``), and the reads of the cached memories
are batched per segment (a Python loop over segments, not tokens). Streaming decode uses the same
code with T = 1 and an :class:`MCState`, so token-by-token output equals the parallel forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from growmem.caching.config import AGGREGATIONS, MCConfig
from growmem.caching.segments import SegmentPlan
from growmem.memories.base import Gates, Memory
from growmem.ops import _native


@dataclass
class MCState:
    """Streaming state of a cached memory.

    Attributes:
        online: the base memory's state (``None`` = its initial state).
        cached: readable states of finished segments stacked on dim 1 (``None`` if none yet).
        pools: pooled keys of the finished segments ``[B, N, H, K]`` (``None`` if none yet; ``[B, N, 0]``
            placeholders for aggregations that never use them).
        pool: running key sum of the current segment ``[B, H, K]`` (``None`` = zero).
        count: tokens seen in the current segment.
        pos: tokens seen in total.
        total_length: the planned total length (needed by logarithmic segmentation).
    """

    online: Any = None
    cached: Any = None
    pools: torch.Tensor | None = None
    pool: torch.Tensor | None = None
    count: int = 0
    pos: int = 0
    total_length: int | None = None

    @property
    def num_cached(self) -> int:
        return 0 if self.pools is None else self.pools.shape[1]


def _cat1(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return tree_map(lambda x, y: torch.cat([x, y], dim=1), a, b)


def _slice1(s: Any, lo: int, hi: int) -> Any:
    return tree_map(lambda x: x[:, lo:hi], s)


def _unbind1(s: Any) -> list[Any]:
    """Split a tree stacked on dim 1 into its entries (one backward op, unlike repeated slicing)."""
    leaves, spec = tree_flatten(s)
    parts = [leaf.unbind(1) for leaf in leaves]
    return [tree_unflatten([p[i] for p in parts], spec) for i in range(len(parts[0]))]


def _stack1(states: list[Any]) -> Any:
    return tree_map(lambda *xs: torch.stack(xs, dim=1), *states) if states else None


class _GatedRead(torch.autograd.Function):
    """Gated reads of cached matrix states for a whole window at once, without keeping activations.

    ``flat [B, H, N*K, V]`` (cached state i at rows ``i*K .. (i+1)*K``), queries ``q [B, T, H, K]``
    (scaled by the python float ``scale`` here), weights ``g [B, T, H, N]``, and the window's pieces
    as ``sizes`` (tokens) and ``counts`` (cached states visible to the piece). For a token of piece j
    with n_j = counts[j], ``r[b, t, h] = sum_{i < n_j} g[b, t, h, i] S_i[b, h]^T (scale q[b, t, h])``,
    computed per piece in weighted-query form ``[g_1 q .. g_n q] @ [S_1; ..; S_n]`` (one matmul); 0 where
    n_j = 0. Backward recomputes the weighted queries per piece and accumulates the gradient of ``flat``
    in place, so memory is O(T N) for the weights instead of O(T N K); the gradient of ``g`` is 0 at
    i >= n_j.
    """

    @staticmethod
    def forward(ctx, flat, q, g, sizes, counts, scale):
        B, T, H, K = q.shape
        V = flat.shape[-1]
        out = q.new_empty(B, H, T, V)
        qT, gT = q.transpose(1, 2), g.transpose(1, 2)  # [B, H, T, K], [B, H, T, N]
        lo = 0
        for L, n in zip(sizes, counts, strict=True):
            if n > 0:
                gs = gT[:, :, lo: lo + L, :n, None] * scale
                wq = (gs * qT[:, :, lo: lo + L, None, :]).view(B, H, L, n * K)
                torch.matmul(wq, flat[:, :, : n * K], out=out[:, :, lo: lo + L])
            else:
                out[:, :, lo: lo + L].zero_()
            lo += L
        ctx.save_for_backward(flat, q, g)
        ctx.sizes, ctx.counts, ctx.scale = sizes, counts, scale
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dr):
        flat, q, g = ctx.saved_tensors
        B, T, H, K = q.shape
        need_f, need_q, need_g = ctx.needs_input_grad[:3]
        scale = ctx.scale
        dflat = torch.zeros_like(flat) if need_f else None
        dqT = q.new_empty(B, H, T, K) if need_q else None
        dgT = g.new_zeros(B, H, T, g.shape[-1]) if need_g else None
        qT, gT, drT = q.transpose(1, 2), g.transpose(1, 2) * scale, dr.transpose(1, 2)  # [B, H, T, .]
        lo = 0
        for L, n in zip(ctx.sizes, ctx.counts, strict=True):
            sl = slice(lo, lo + L)
            lo += L
            if n == 0:
                if need_q:
                    dqT[:, :, sl].zero_()
                continue
            d = drT[:, :, sl].contiguous()  # [B, H, L, V]
            q_, g_ = qT[:, :, sl], gT[:, :, sl, :n]
            if need_q or need_g:
                dwq = (d @ flat[:, :, : n * K].transpose(-1, -2)).view(B, H, L, n, K)
                if need_g:
                    dgT[:, :, sl, :n] = (dwq * q_[:, :, :, None, :]).sum(-1).mul_(scale)
                if need_q:
                    dqT[:, :, sl] = (dwq * g_[..., None]).sum(-2)
            if need_f:
                wq = (g_[..., None] * q_[:, :, :, None, :]).view(B, H, L, n * K)
                dflat[:, :, : n * K] += wq.transpose(-1, -2) @ d
        return (dflat, None if dqT is None else dqT.transpose(1, 2), None if dgT is None else dgT.transpose(1, 2),
                None, None, None)


class CachedMemory(Memory):
    """Memory Caching around any base memory (see the module docstring for the equations).

    Args:
        base: the memory to cache (linear family, deep memories, BMRU, ...).
        aggregation: ``res``, ``grm``, ``soup``, ``ssc`` or ``avg``.
        config: :class:`~growmem.caching.config.MCConfig`.

    Inputs as for any memory; ``gates`` additionally carries ``u [B, T, H, K]`` when the connector
    is a projection (the layer creates ``u_proj`` from :attr:`input_projections`).
    """

    def __init__(self, base: Memory, aggregation: str, config: MCConfig | None = None) -> None:
        super().__init__(base.num_heads, base.head_k_dim, base.head_v_dim, base.chunk_size)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown MC aggregation {aggregation!r}; choose from {', '.join(AGGREGATIONS)}")
        self.base = base
        self.aggregation = aggregation
        self.config = config or MCConfig()
        self.name = f"{base.name}+{aggregation}"
        self.gate_features = dict(base.gate_features)
        self.l2_normalize_qk = base.l2_normalize_qk
        self.linear_readout = base.linear_readout
        self.uses_connector = aggregation in ("grm", "soup", "ssc")
        self.input_projections = dict(base.input_projections)
        if self.uses_connector and self.config.connector == "proj":
            self.input_projections["u"] = base.head_k_dim
        # Soup on a nonlinear readout mixes the online weights of every token: the base gives, per call,
        # a context that lets soup_read apply them (forward_with_context), so run it once per piece.
        self.soup_context = aggregation == "soup" and not base.linear_readout
        if self.soup_context and not (hasattr(base, "soup_read") and hasattr(base, "forward_with_context")):
            raise ValueError(f"Memory Soup needs {type(base).__name__}.soup_read and .forward_with_context "
                             "(its readout is not linear)")

    # -- the Memory interface ------------------------------------------------------------------
    def make_gates(self, raw: Gates) -> Gates:
        return self.base.make_gates(raw)

    def new_state(self, batch_size: int, total_length: int | None = None) -> MCState:
        if total_length is not None and total_length < 1:
            raise ValueError(f"total_length must be >= 1, got {total_length}")
        return MCState(total_length=total_length)

    def state_size(self) -> int:
        return self.base.state_size()

    def step(self, q, k, v, gates, state):
        o, new_state = self.forward(q[:, None], k[:, None], v[:, None], {n: g[:, None] for n, g in gates.items()},
                                    initial_state=state, output_final_state=True)
        return o[:, 0], new_state

    def plan(self, state: MCState, T: int) -> SegmentPlan:
        cfg = self.config
        total = state.total_length
        if total is None and cfg.segmentation == "log" and state.pos == 0:
            total = T
        return SegmentPlan(cfg.segmentation, cfg.segment_size, total, cfg.segment_lengths)

    def forward(self, q, k, v, gates, initial_state=None, output_final_state=False, return_chunk_states=False):
        if return_chunk_states:
            raise ValueError("a cached memory does not return chunk states")
        if initial_state is not None and not isinstance(initial_state, MCState):
            raise TypeError(f"initial_state of a cached memory must be an MCState, got {type(initial_state).__name__}")
        st = initial_state or MCState()
        gates = dict(gates)
        u = gates.pop("u", None)
        if self.uses_connector:
            if self.config.connector == "q":
                u = q
            elif u is None or u.shape != q.shape:
                raise ValueError(f"{self.name} needs the connector u [B, T, H, K] in gates['u']")
        B, T = q.shape[:2]
        pieces = self.plan(st, T).pieces(st.pos, T)
        if self.soup_context:
            o_on, seg_states, online, contexts = self._online_pass_with_context(q, k, v, gates, st, pieces)
        else:
            o_on, seg_states, online = self._online_pass(q, k, v, gates, st, pieces)
            contexts = None
        cached = _cat1(st.cached, seg_states)
        if self.uses_connector:
            pools_new, s_on, pool_last = self._pools(k, u, st, pieces)
        else:  # Residual / average never look at pooled keys; keep only their count (the cache size)
            n_new = sum(e for _, _, e in pieces)
            pools_new = k.new_zeros(B, n_new, 0) if n_new else None
            s_on, pool_last = None, None
        pools = _cat1(st.pools, pools_new)
        read_cached = tree_map(torch.Tensor.detach, cached) if self.config.detach_cached else cached
        y = self._aggregate(q, u, o_on, s_on, read_cached, pools, st.num_cached, pieces, contexts)
        if not output_final_state:
            return y, None
        last_ends = pieces[-1][2]
        new = MCState(
            online=None if (last_ends and self.config.init == "restart") else online,
            cached=cached, pools=pools,
            pool=None if last_ends else pool_last,
            count=0 if last_ends else (st.count + T if len(pieces) == 1 else pieces[-1][1] - pieces[-1][0]),
            pos=st.pos + T, total_length=st.total_length)
        return y, new

    # -- the online memory -----------------------------------------------------------------------
    def _run(self, q, k, v, gates, lo, hi, init):
        """The base memory on local positions [lo, hi) from ``init``: (o, final state)."""
        g = {n: x[:, lo:hi] for n, x in gates.items()}
        if hi - lo == 1 and init is not None:
            o, s = self.base.step(q[:, lo], k[:, lo], v[:, lo], {n: x[:, 0] for n, x in g.items()}, init)
            return o[:, None], s
        return self.base(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g, initial_state=init, output_final_state=True)

    def _online_pass(self, q, k, v, gates, st: MCState, pieces):
        """Online outputs [B, T, H, V], the readable states at the segment ends inside the window
        stacked on dim 1 (None if no segment ends here), and the online state after the window."""
        B, T = q.shape[:2]
        ends = [stop for _, stop, e in pieces if e]
        cs = self.base.chunk_size
        if self.config.init == "checkpoint":
            if ends and T > 1 and all(e % cs == 0 for e in ends) and cs <= T:
                o, final, chunk_states = self.base(q, k, v, gates, initial_state=st.online, output_final_state=True,
                                                   return_chunk_states=True)
                idx = torch.tensor([e // cs - 1 for e in ends], device=q.device)
                return o, tree_map(lambda x: x.index_select(1, idx), chunk_states), final
            outs, seg_states, state = [], [], st.online
            for lo, hi, e in pieces:
                o, state = self._run(q, k, v, gates, lo, hi, state)
                outs.append(o)
                if e:
                    seg_states.append(self.base.readable(state))
            return torch.cat(outs, 1) if len(outs) > 1 else outs[0], _stack1(seg_states), state
        # restart: every segment starts from the initial state; equal-length fresh segments are
        # folded into the batch and run at once.
        outs, seg_states, state = [], [], None
        i = 0
        while i < len(pieces):
            lo, hi, e = pieces[i]
            if i == 0 and st.count > 0:  # continue the current segment from its online state
                o, state = self._run(q, k, v, gates, lo, hi, st.online)
                outs.append(o)
                if e:
                    seg_states.append(self.base.readable(state))
                i += 1
                continue
            n = hi - lo
            j = i
            while j + 1 < len(pieces) and pieces[j + 1][1] - pieces[j + 1][0] == n and pieces[j + 1][2]:
                j += 1
            m = j - i + 1
            if m == 1:
                o, state = self._run(q, k, v, gates, lo, hi, None)
                outs.append(o)
                if e:
                    seg_states.append(self.base.readable(state))
            else:
                def fold(x, lo=lo, m=m, n=n):
                    return x[:, lo: lo + m * n].reshape(B * m, n, *x.shape[2:])
                o, fin = self.base(fold(q), fold(k), fold(v), {nm: fold(x) for nm, x in gates.items()},
                                   output_final_state=True)
                outs.append(o.reshape(B, m * n, *o.shape[2:]))
                fin_b = tree_map(lambda x, m=m: x.reshape(B, m, *x.shape[1:]), fin)
                for r in range(m):
                    seg_states.append(self.base.readable(tree_map(lambda x, r=r: x[:, r], fin_b)))
                state = tree_map(lambda x: x[:, -1], fin_b)
            i = j + 1
        return torch.cat(outs, 1) if len(outs) > 1 else outs[0], _stack1(seg_states), state

    def _online_pass_with_context(self, q, k, v, gates, st: MCState, pieces):
        """As :meth:`_online_pass` (checkpoint or restart), one ``base.forward_with_context`` call per
        piece; also returns the list of the pieces' contexts (for ``soup_read``)."""
        sizes = [hi - lo for lo, hi, _ in pieces]
        names = list(gates)
        parts = zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1),
                    *(gates[n].split(sizes, 1) for n in names), strict=True)
        outs, seg_states, contexts, state = [], [], [], st.online
        for i, ((_, _, e), (qj, kj, vj, *gj)) in enumerate(zip(pieces, parts, strict=True)):
            if i > 0 and self.config.init == "restart":
                state = None  # (piece 0 continues st.online, which is None at a segment start)
            o, state, ctx = self.base.forward_with_context(qj, kj, vj, dict(zip(names, gj, strict=True)),
                                                           initial_state=state)
            outs.append(o)
            contexts.append(ctx)
            if e:
                seg_states.append(self.base.readable(state))
        return torch.cat(outs, 1) if len(outs) > 1 else outs[0], _stack1(seg_states), state, contexts

    # -- pooled keys -------------------------------------------------------------------------------
    def _pools(self, k, u, st: MCState, pieces):
        """Pooled keys of the segments finished in this window ``[B, J, H, K]`` (or None), the online
        memory's score of every token ``s_on = <u_t, online pool_t>`` ``[B, T, H, 1]``, and the running
        pool after the window. On CPU the fused kernel does this in one pass without forming the online
        pools ``[B, T, H, K]`` (:class:`_FusedPoolScores`)."""
        mean = self.config.pooling == "mean"
        p0 = st.pool if st.count > 0 else None
        if _native.pool_scores_applies(u, k, p0):
            sizes = [hi - lo for lo, hi, _ in pieces]
            ends = [int(bool(e)) for _, _, e in pieces]
            s_on, fin, last = _FusedPoolScores.apply(u, k, p0, sizes, ends, st.count, mean)
            return (fin if sum(ends) else None), s_on[..., None], last
        on, fin = [], []
        last = None
        for i, ((lo, hi, e), kj) in enumerate(zip(pieces, k.split([hi - lo for lo, hi, _ in pieces], 1), strict=True)):
            c = kj.cumsum(1)
            count0 = 0
            if i == 0 and st.count > 0:
                if st.pool is not None:
                    c = c + st.pool[:, None]
                count0 = st.count
            last = c[:, -1]
            if mean:
                n = torch.arange(count0 + 1, count0 + hi - lo + 1, device=k.device, dtype=k.dtype)
                c = c / n[None, :, None, None]
            on.append(c)
            if e:
                fin.append(c[:, -1])
        pool_on = torch.cat(on, 1) if len(on) > 1 else on[0]
        return (torch.stack(fin, 1) if fin else None), torch.linalg.vecdot(u, pool_on)[..., None], last

    # -- aggregation ---------------------------------------------------------------------------------
    def _scores(self, u, s_on, pools, n0, pieces):
        """Scores of every token of the window (Eqs. 9, 16): ``s_on [B, T, H, 1]`` = <u_t, online pool>
        (from :meth:`_pools`, passed through) and ``scores [B, T, H, N]`` = <u_t, p(i)>, -inf for the
        memories not yet cached at t (a token of piece j sees the first n0 + j)."""
        N = pools.shape[1]
        dev = u.device
        sizes = torch.tensor([hi - lo for lo, hi, _ in pieces], device=dev)
        n_tok = torch.repeat_interleave(torch.arange(n0, n0 + len(pieces), device=dev), sizes)  # [T]
        hidden = torch.arange(N, device=dev)[None, :] >= n_tok[:, None]  # [T, N]
        scores = torch.einsum("bthk,bnhk->bthn", u, pools).masked_fill(hidden[None, :, None, :], -math.inf)
        return s_on, scores

    def _aggregate(self, q, u, o_on, s_on, cached, pools, n0, pieces, contexts=None):
        agg = self.aggregation
        if pools is None or n0 + len(pieces) - 1 == 0:
            return o_on  # no token of this window sees a cached memory: every variant is the base memory
        if agg == "ssc":
            return self._ssc(q, u, o_on, s_on, cached, pools, n0, pieces)
        # torch.split, not slicing: a slice's backward fills a zero tensor of the full size, per piece
        sizes = [hi - lo for lo, hi, _ in pieces]
        counts = [n0 + j for j in range(len(pieces))]
        lin = self.linear_readout and isinstance(cached, torch.Tensor)
        qs, os_ = q.split(sizes, 1), o_on.split(sizes, 1)
        if agg in ("res", "avg"):
            outs = []
            # linear readout: read the running sum of the cached states (unbind, not slices, so the
            # backward does not zero-fill a full-size gradient per piece)
            states = cached.unbind(1) if lin else None
            running, n_done = None, 0
            for qj, oj, n in zip(qs, os_, counts, strict=True):
                if n == 0:
                    outs.append(oj)
                    continue
                if states is not None:
                    for i in range(n_done, n):
                        running = states[i] if running is None else running + states[i]
                    n_done = n
                    r = self.base.read(running[:, None], qj)[:, :, 0]
                else:
                    r = self.base.read(_slice1(cached, 0, n), qj).sum(2)
                outs.append(oj + (r / n if agg == "avg" else r))
            return torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        # GRM / Soup: one softmax over the online memory and every cached one, masked by position
        s_on, scores = self._scores(u, s_on, pools, n0, pieces)
        gamma = torch.softmax(torch.cat([s_on, scores], -1) / self.config.temperature, dim=-1)
        g_on, g_c = gamma[..., :1], gamma[..., 1:]  # [B, T, H, 1], [B, T, H, N] (0 where not cached)
        if lin and _native.selected_read_applies(cached, q, g_c):  # CPU kernel: no [B, H, N*K, V] copy
            return g_on * o_on + _FusedGatedRead.apply(cached, q, g_c, sizes, counts, self.base.scale)
        if lin:  # Soup = GRM on a linear memory; all reads in one function over [S_1; ..; S_N]
            B, T, H, K = q.shape
            flat = cached.permute(0, 2, 1, 3, 4).reshape(B, H, -1, cached.shape[-1])  # [B, H, N*K, V]
            return g_on * o_on + _GatedRead.apply(flat, q, g_c, sizes, counts, self.base.scale)
        outs = []
        for j, (qj, oj, gon, gc, n) in enumerate(zip(qs, os_, g_on.split(sizes, 1), g_c.split(sizes, 1), counts,
                                                     strict=True)):
            if n == 0:
                outs.append(oj)
            elif agg == "soup" and not self.linear_readout:  # (linear readout: Soup = GRM, below)
                outs.append(self.base.soup_read(qj, oj, gon, _slice1(cached, 0, n), gc[..., :n], online=contexts[j]))
            else:
                r = (self.base.read(_slice1(cached, 0, n), qj) * gc[..., :n].permute(0, 1, 3, 2)[..., None]).sum(2)
                outs.append(gon * oj + r)
        return torch.cat(outs, 1) if len(outs) > 1 else outs[0]

    def _ssc(self, q, u, o_on, s_on, cached, pools, n0, pieces):
        """Sparse Selective Caching: per token, softmax over the online memory and the ``top_k`` cached
        memories with the largest <u_t, p(i)> (Eqs. 16-17); only those are read.

        Selection is one batched op over the whole window: the scores of every token against every
        pooled key, with the memories not yet cached at its position masked to -inf, then one top-k
        and one softmax. Reads are grouped by memory, not by token (:func:`_ssc_groups`): memory i reads,
        in one batched call, the queries of the tokens that picked it. On matrix memories
        :class:`_SelectedRead` does this with a hand-written backward; other memories go through
        ``base.read``. Work O(T N K) for the scores plus O(T k K V) for the reads.
        """
        B, T, H, K = q.shape
        kmax = self.config.top_k
        n_total = pools.shape[1]
        s_on, scores = self._scores(u, s_on, pools, n0, pieces)
        kk = min(kmax, n_total)
        top, idx = scores.topk(kk, dim=-1)
        gamma = torch.softmax(torch.cat([s_on, top], -1) / self.config.temperature, dim=-1)
        g_on, w = gamma[..., :1], gamma[..., 1:]  # masked picks have weight exactly 0
        sel = idx.masked_fill(torch.isneginf(top), -1)
        if kk < kmax:
            sel = torch.cat([sel, sel.new_full((B, T, H, kmax - kk), -1)], -1)
            w = torch.cat([w, w.new_zeros(B, T, H, kmax - kk)], -1)
        out = g_on * o_on
        if self.linear_readout and isinstance(cached, torch.Tensor) and _native.selected_read_applies(cached, q, w):
            return out + _FusedSelectedRead.apply(cached, q, w, sel, self.base.scale)  # CPU kernel, no grouping
        groups = _ssc_groups(sel, n_total)
        if not groups:
            return out
        if self.linear_readout and isinstance(cached, torch.Tensor):
            return out + _SelectedRead.apply(cached, q, w, groups, self.base.scale)
        V = o_on.shape[-1]
        rq, rw, ok = (torch.cat([g[j].reshape(-1) for g in groups]) for j in (2, 3, 4))
        qg = q.reshape(B * T * H, K).index_select(0, rq)
        wg = w.reshape(-1).index_select(0, rw) * ok
        cached_list = _unbind1(cached)
        reads = []
        for (i, c, *_), qi in zip(groups, qg.split([B * H * c for _, c, *_ in groups]), strict=True):
            state_i = tree_map(lambda x: x[:, None], cached_list[i])
            qi = qi.view(B, H, c, K).transpose(1, 2)  # [B, c, H, K]
            reads.append(self.base.read(state_i, qi)[:, :, 0].transpose(1, 2).reshape(-1, V))
        r = torch.cat(reads) * wg[:, None]
        return out.reshape(B * T * H, V).index_add(0, rq, r).reshape(B, T, H, V)


def _ssc_groups(sel: torch.Tensor, n_total: int) -> list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Group SSC's selections by memory. ``sel [B, T, H, k]``: memory ids (-1 = unused slot).

    Returns one ``(i, c, rows_q, rows_w, ok)`` per memory i picked anywhere: ``c`` the largest number of
    picks of i over (batch, head); ``rows_q [B, H, c]`` rows of ``[B*T*H]`` (queries and outputs),
    ``rows_w [B, H, c]`` rows of ``[B*T*H*k]`` (weights), ``ok [B, H, c]`` False on padding rows (which
    repeat a valid row and must get weight 0). Sorting once by (memory, token) makes every gather one
    index operation."""
    B, T, H, kmax = sel.shape
    dev = sel.device
    with torch.no_grad():
        # entries e = t * kmax + slot of each (b, h), sorted by (memory id, t); unused slots last
        key = torch.where(sel >= 0, sel, n_total).permute(0, 2, 1, 3).reshape(B, H, T * kmax)
        key = key * (T * kmax) + torch.arange(T * kmax, device=dev)
        key_sorted, perm = key.sort(dim=-1)
        edges = (torch.arange(n_total + 1, device=dev) * (T * kmax)).expand(B, H, n_total + 1).contiguous()
        bounds = torch.searchsorted(key_sorted.contiguous(), edges)  # [B, H, N+1]: where memory i starts
        cmax = (bounds[..., 1:] - bounds[..., :-1]).amax(dim=(0, 1)).tolist()
        base_row = (torch.arange(B, device=dev)[:, None, None] * T * H + torch.arange(H, device=dev)[None, :, None])
        groups = []
        for i in range(n_total):
            c = int(cmax[i])
            if c == 0:
                continue
            pos = bounds[..., i, None] + torch.arange(c, device=dev)  # [B, H, c]
            ok = pos < bounds[..., i + 1, None]
            ent = perm.gather(-1, pos.clamp(max=T * kmax - 1))  # entry ids [B, H, c]
            rows_q = base_row + (ent // kmax) * H
            groups.append((i, c, rows_q, rows_q * kmax + ent % kmax, ok))
    return groups


class _SelectedRead(torch.autograd.Function):
    """SSC's reads of matrix states: ``r[b, t, h] = sum_j w[b, t, h, j] S_{sel_j}[b, h]^T (scale q[b, t, h])``.

    ``cached [B, N, H, K, V]``, ``q [B, T, H, K]``, ``w [B, T, H, k]`` -> ``r [B, T, H, V]``, with the
    selections given as :func:`_ssc_groups`. Per picked memory: one gather of the weighted queries, one
    batched matmul, one scatter-add; the backward recomputes the gathered queries instead of keeping
    them, and writes the gradients of q and w with scatter-adds (no full-size zero-filled slices).
    """

    @staticmethod
    def forward(ctx, cached, q, w, groups, scale):
        B, T, H, K = q.shape
        V = cached.shape[-1]
        qf, wf = q.reshape(B * T * H, K), w.reshape(-1)
        out = q.new_zeros(B * T * H, V)
        for i, c, rq, rw, ok in groups:
            wi = wf.index_select(0, rw.reshape(-1)).view(B, H, c, 1) * (ok[..., None].to(q.dtype) * scale)
            qw = qf.index_select(0, rq.reshape(-1)).view(B, H, c, K) * wi
            out.index_add_(0, rq.reshape(-1), (qw @ cached[:, i]).reshape(-1, V))
        ctx.save_for_backward(cached, q, w)
        ctx.groups, ctx.scale = groups, scale
        return out.view(B, T, H, V)

    @staticmethod
    def backward(ctx, dout):
        cached, q, w = ctx.saved_tensors
        B, T, H, K = q.shape
        V = cached.shape[-1]
        qf, wf, df = q.reshape(B * T * H, K), w.reshape(-1), dout.reshape(B * T * H, V)
        need_s, need_q, need_w = ctx.needs_input_grad[:3]
        dS = torch.zeros_like(cached) if need_s else None
        dq = torch.zeros_like(qf) if need_q else None
        dw = torch.zeros_like(wf) if need_w else None
        for i, c, rq, rw, ok in ctx.groups:
            rq_, rw_ = rq.reshape(-1), rw.reshape(-1)
            wi = wf.index_select(0, rw_).view(B, H, c, 1) * (ok[..., None].to(q.dtype) * ctx.scale)
            qi = qf.index_select(0, rq_).view(B, H, c, K)
            dr = df.index_select(0, rq_).view(B, H, c, V)
            if need_s:
                dS[:, i] = (qi * wi).transpose(-1, -2) @ dr
            if need_q or need_w:
                dqw = dr @ cached[:, i].transpose(-1, -2)  # [B, H, c, K]: gradient of the weighted query
                if need_q:
                    dq.index_add_(0, rq_, (dqw * wi).reshape(-1, K))
                if need_w:
                    dw.index_add_(0, rw_, ((dqw * qi).sum(-1) * (ok.to(q.dtype) * ctx.scale)).reshape(-1))
        return (dS, None if dq is None else dq.view(q.shape), None if dw is None else dw.view(w.shape), None, None)


class _FusedSelectedRead(torch.autograd.Function):
    """:class:`_SelectedRead` through the fused CPU kernel (:mod:`growmem.ops._native`): the same
    function and gradients, with the selections passed as ``sel [B, T, H, k]`` (memory ids, -1 unused)
    and bucketed per (batch, head) inside the kernel instead of by :func:`_ssc_groups`."""

    @staticmethod
    def forward(ctx, cached, q, w, sel, scale):
        ctx.save_for_backward(cached, q, w, sel)
        ctx.scale = scale
        return _native.selected_read_forward(cached, q, w, sel, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        cached, q, w, sel = ctx.saved_tensors
        dS, dq, dw = _native.selected_read_backward(cached, q, w, sel, dout, ctx.scale)
        return dS, dq, dw, None, None


class _FusedGatedRead(torch.autograd.Function):
    """:class:`_GatedRead` through the fused CPU kernel (:mod:`growmem.ops._native`): the same function
    and gradients, reading ``cached [B, N, H, K, V]`` in place (no flattened copy)."""

    @staticmethod
    def forward(ctx, cached, q, g, sizes, counts, scale):
        ctx.save_for_backward(cached, q, g)
        ctx.sizes, ctx.counts, ctx.scale = sizes, counts, scale
        return _native.gated_read_forward(cached, q, g, sizes, counts, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        cached, q, g = ctx.saved_tensors
        dS, dq, dg = _native.gated_read_backward(cached, q, g, ctx.sizes, ctx.counts, dout, ctx.scale)
        return dS, dq, dg, None, None, None


class _FusedPoolScores(torch.autograd.Function):
    """The pooled keys and the online memory's score (:meth:`CachedMemory._pools`) through the fused CPU
    kernel: ``(s_on [B, T, H], pools [B, J, H, K], last [B, H, K])`` from ``u, k [B, T, H, K]``, the
    continued segment's pool ``p0 [B, H, K]`` (or None), the pieces' ``sizes`` and ``ends``, the
    tokens ``count0`` of the continued segment seen before, and ``mean`` pooling."""

    @staticmethod
    def forward(ctx, u, k, p0, sizes, ends, count0, mean):
        ctx.save_for_backward(u, k, p0)
        ctx.sizes, ctx.ends, ctx.count0, ctx.mean = sizes, ends, count0, mean
        ctx.set_materialize_grads(False)
        return _native.pool_scores_forward(u, k, p0, sizes, ends, count0, mean)

    @staticmethod
    @once_differentiable
    def backward(ctx, ds, dpools, dlast):
        u, k, p0 = ctx.saved_tensors
        du, dk, dp0 = _native.pool_scores_backward(u, k, p0, ctx.sizes, ctx.ends, ctx.count0, ctx.mean, ds,
                                                   dpools, dlast)
        return du, dk, dp0, None, None, None, None
