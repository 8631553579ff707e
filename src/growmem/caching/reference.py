"""A per-token reference of Memory Caching, for tests: plain loops, no shared code with the fast path.

It uses only the base memory's ``step`` (itself checked against the ops' naive loops), its
``readable`` and ``read``; Memory Soup materializes the gamma-mixed readable state of every token.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from growmem.caching.config import MCConfig
from growmem.memories.base import Gates, Memory


def reference_segment_ends(T: int, config: MCConfig, total_length: int | None = None) -> set[int]:
    """Positions t (1-based counts) after which a segment ends, for a sequence of T tokens."""
    if config.segmentation == "constant":
        return set(range(config.segment_size, T + 1, config.segment_size))
    if config.segmentation == "log":
        n = total_length or T
        lengths = [2 ** b for b in reversed(range(n.bit_length())) if (n >> b) & 1]
    else:
        lengths = list(config.segment_lengths or ())
    ends, acc = set(), 0
    for n in lengths:
        acc += n
        ends.add(acc)
    return ends


def _weighted(state, w: torch.Tensor):
    """w [B, H] times every leaf [B, H, ...] of a readable state."""
    return tree_map(lambda x: w.reshape(*w.shape, *([1] * (x.dim() - 2))) * x, state)


def _add(a, b):
    return b if a is None else tree_map(torch.add, a, b)


def naive_memory_caching(base: Memory, aggregation: str, config: MCConfig, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, gates: Gates, u: torch.Tensor | None = None,
                         total_length: int | None = None) -> torch.Tensor:
    """Memory Caching by a loop over tokens. q, k, u ``[B, T, H, K]``, v ``[B, T, H, V]``, gates ``[B, T, H(, K)]``
    (already through ``make_gates``). Returns ``y [B, T, H, V]``."""
    B, T, H, K = q.shape
    if config.connector == "q":
        u = q
    ends = reference_segment_ends(T, config, total_length)
    state = None
    cached: list = []
    pools: list[torch.Tensor] = []
    pool = torch.zeros_like(k[:, 0])
    count = 0
    ys = []
    for t in range(T):
        o_t, state = base.step(q[:, t], k[:, t], v[:, t], {n: g[:, t] for n, g in gates.items()}, state)
        pool = pool + k[:, t]
        count += 1
        p_on = pool / count if config.pooling == "mean" else pool
        q_t = q[:, t: t + 1]
        reads = [base.read(tree_map(lambda x: x[:, None], c), q_t)[:, 0, 0] for c in cached]  # [B, H, V] each
        if not cached:
            y = o_t
        elif aggregation in ("res", "avg"):
            tot = sum(reads)
            y = o_t + (tot / len(reads) if aggregation == "avg" else tot)
        else:
            u_t = u[:, t]
            s_c = torch.stack([(u_t * p).sum(-1) for p in pools], -1)  # [B, H, n]
            s_on = (u_t * p_on).sum(-1, keepdim=True)
            if aggregation == "ssc":
                kk = min(config.top_k, len(cached))
                top, idx = s_c.topk(kk, dim=-1)
                gamma = torch.softmax(torch.cat([s_on, top], -1) / config.temperature, -1)
                y = gamma[..., 0, None] * o_t
                for slot in range(kk):
                    for i, r in enumerate(reads):
                        y = y + ((idx[..., slot] == i) * gamma[..., slot + 1])[..., None] * r
            else:
                gamma = torch.softmax(torch.cat([s_on, s_c], -1) / config.temperature, -1)
                if aggregation == "grm":
                    y = gamma[..., 0, None] * o_t + sum(gamma[..., i + 1, None] * r for i, r in enumerate(reads))
                else:  # soup: mix the memories' parameters, then apply the mixed memory to q_t
                    mixed = _weighted(base.readable(state), gamma[..., 0])
                    for i, c in enumerate(cached):
                        mixed = _add(mixed, _weighted(c, gamma[..., i + 1]))
                    y = base.read(tree_map(lambda x: x[:, None], mixed), q_t)[:, 0, 0]
        ys.append(y)
        if t + 1 in ends:
            cached.append(base.readable(state))
            pools.append(p_on)
            pool = torch.zeros_like(pool)
            count = 0
            if config.init == "restart":
                state = None
    return torch.stack(ys, 1)
