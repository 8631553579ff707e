r"""Effective State-Size (ESS; Parnichkun et al., ICML 2025, arXiv 2504.19561) of materialized operators.

For a causal operator ``T [L, L]`` (see :mod:`growmem.analysis.operators`) and a split position
``s`` (``1 <= s <= L - 1``: the number of *past* tokens), the block

.. math::
    H_s = T[s:, :s] \in \mathbb{R}^{(L - s) \times s}

maps the past inputs ``u_0 .. u_{s-1}`` to the present and future outputs ``y_s .. y_{L-1}``. Any
recurrence realizing T must carry at least ``rank(H_s)`` numbers from step ``s - 1`` to step ``s``
(minimal realization theory): ``ESS_s = rank(H_s)``. (The paper writes ``H_i = T_{i:, :i-1}`` with
1-based inclusive indices: outputs from i on, inputs before i; our ``s`` is its ``i - 1``, the count of
past tokens.) From the singular values ``sigma_1 >= ... >= sigma_r`` of ``H_s``:

* tolerance-ESS: ``#{m : sigma_m > tau}``, with ``tau = tol * sigma_1`` (``relative=True``, default) or
  ``tau = tol`` (absolute);
* entropy-ESS: ``exp(-sum_m p_m log p_m)`` with ``p_m = sigma_m / sum_m sigma_m`` (0 for a zero block);
* numerical rank: tolerance-ESS at ``tau = max(L - s, s) * eps(dtype) * sigma_1`` (``rank_rtol`` overrides
  the factor), the exact rank up to rounding: the quantity the analytic bounds speak about.

Accounting: ESS here is **per value channel** (the paper's single-input single-output operators).
For the matrix memories every channel of a head shares T, so one SVD per head serves its V channels;
the per-head figures are V times the per-channel ones (the per-head operator is ``T \otimes I_V``, of
rank ``V rank(H_s)``), and ESS/TSS is the same in both accountings.

Theoretical state size (TSS) per channel, :func:`state_size_curve`:

* matrix memories (la, sgla, gla, deltanet, gdn): ``K`` (a channel owns one K-column of ``S [K, V]``);
* SWLA: ``K`` (its carried ``v_{t-1}`` enters the future only through ``S_t``, inside the same K-dim span);
* Memory Caching: ``(1 + n(s)) K_base`` with ``n(s)`` the segments cached when the split is reached
  (segment ends ``e <= s``): the online state plus every cached state. Residual / average over a linear
  memory collapse the cached states into one sum, so their ESS is at most ``2 K``, whatever ``n(s)``;
* softmax attention: ``s`` (the KV cache holds s values per channel); sliding window W: ``min(s, W - 1)``;
* short convolution with w taps: ``min(s, w - 1)``; unknown / nonlinear layers: ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from growmem.analysis.operators import LINEAR_MEMORIES, LayerOperator, Operator
from growmem.caching.wrapper import CachedMemory, MCState
from growmem.layers.attention import Attention
from growmem.layers.conv import ShortConvolution
from growmem.layers.linear_mixer import LinearMixer
from growmem.memories.base import Memory

__all__ = ["ESSResult", "CostEstimate", "select_positions", "past_future_svdvals", "ess_from_svdvals",
           "effective_state_size", "combine_results", "aggregate", "estimate_cost", "state_size_curve",
           "layer_state_size"]

#: rough single-core LAPACK throughput used for the time estimate (GFLOP/s)
_GFLOPS = 5.0


def select_positions(length: int, positions: Sequence[int] | None = None, stride: int | None = None,
                     num: int | None = None) -> list[int]:
    """Split positions ``s`` in ``[1, L - 1]``: the given ones, every ``stride``-th (``s = stride, 2 stride,
    ...``), ``num`` evenly spaced ones, or all of them."""
    if length < 2:
        raise ValueError(f"ESS needs a sequence of at least 2 tokens, got {length}")
    if positions is not None:
        pos = sorted({int(s) for s in positions})
        if pos and (pos[0] < 1 or pos[-1] > length - 1):
            raise ValueError(f"positions must lie in [1, {length - 1}], got {pos[0]}..{pos[-1]}")
        return pos
    if stride is not None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        return list(range(stride, length, stride)) or [length - 1]
    if num is not None:
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        if num >= length - 1:
            return list(range(1, length))
        return sorted({round(1 + i * (length - 2) / max(num - 1, 1)) for i in range(num)})
    return list(range(1, length))


@dataclass
class CostEstimate:
    """Work of an ESS sweep: ``num_svds`` SVDs (values only) of ``(L - s) x s`` blocks."""

    num_svds: int
    smallest: tuple[int, int]
    largest: tuple[int, int]
    gflop: float

    @property
    def seconds(self) -> float:
        """A rough single-core estimate (at ~5 GFLOP/s)."""
        return self.gflop / _GFLOPS

    def __str__(self) -> str:
        return (f"{self.num_svds} SVDs (values only), blocks from {self.smallest[0]}x{self.smallest[1]} to "
                f"{self.largest[0]}x{self.largest[1]}, ~{self.gflop:.1f} GFLOP, ~{self.seconds:.0f} s on one core")


def _svd_flops(m: int, n: int) -> float:
    m, n = max(m, n), min(m, n)
    return 4.0 * m * n * n - 4.0 * n ** 3 / 3.0


def estimate_cost(num_operators: int, length: int, positions: Sequence[int]) -> CostEstimate:
    """Cost of :func:`past_future_svdvals` on ``num_operators`` operators of length L at ``positions``."""
    pos = list(positions)
    if not pos:
        return CostEstimate(0, (0, 0), (0, 0), 0.0)
    sizes = [(length - s, s) for s in pos]
    flops = sum(_svd_flops(m, n) for m, n in sizes) * num_operators
    by_work = sorted(sizes, key=lambda mn: _svd_flops(*mn))
    return CostEstimate(num_operators * len(pos), by_work[0], by_work[-1], flops / 1e9)


def past_future_svdvals(matrix: torch.Tensor, positions: Sequence[int] | None = None,
                        dtype: torch.dtype | None = torch.float64, max_elems: int = 1 << 24,
                        pad_frac: float = 0.125) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of every ``H_s = T[..., s:, :s]``.

    Args:
        matrix: ``[..., L, L]`` operators.
        positions: split positions ``s`` (default all of ``1 .. L - 1``).
        dtype: compute dtype (float64 default; None keeps the input's).
        max_elems: largest number of elements of one batched SVD call.
        pad_frac: positions are grouped so that one ``torch.linalg.svdvals`` call handles many of them at
            once: the blocks of ``s_0 <= s <= s_1`` are zero-padded to ``(L - s_0) x s_1`` (zero rows and
            columns do not change the nonzero singular values; the structural zeros are dropped), with
            ``s_1 - s_0 <= pad_frac * min(s_0, L - s_1)`` so the padding costs at most ~``pad_frac`` extra.

    Returns:
        ``(positions [P] long, svals [..., P, R])`` with ``R = max_s min(s, L - s)``; the singular values
        of ``H_s`` in decreasing order, zero-filled beyond its ``min(s, L - s)`` entries.
    """
    L = matrix.shape[-1]
    if matrix.shape[-2] != L:
        raise ValueError(f"operators must be square [..., L, L], got {tuple(matrix.shape)}")
    pos = select_positions(L, positions)
    lead = matrix.shape[:-2]
    N = math.prod(lead)
    M = matrix.reshape(N, L, L)
    if dtype is not None:
        M = M.to(dtype)
    R = max(min(s, L - s) for s in pos) if pos else 0
    out = M.new_zeros(N, len(pos), R)
    dev = M.device
    i = 0
    while i < len(pos):
        s0 = pos[i]
        j = i + 1
        while j < len(pos):
            s1 = pos[j]
            if s1 - s0 > pad_frac * min(s0, L - s1) or (j - i + 1) * N * (L - s0) * s1 > max_elems:
                break
            j += 1
        group = pos[i:j]
        s1 = group[-1]
        rows = torch.arange(s0, L, device=dev)[:, None]
        cols = torch.arange(s1, device=dev)[None, :]
        sg = torch.tensor(group, device=dev)[:, None, None]
        mask = (rows[None] >= sg) & (cols[None] < sg)  # [G, L - s0, s1]
        blocks = M[None, :, s0:, :s1] * mask[:, None].to(M.dtype)  # [G, N, L - s0, s1]
        sv = torch.linalg.svdvals(blocks)
        for g, s in enumerate(group):
            r = min(s, L - s)
            out[:, i + g, :r] = sv[g, :, :r]
        i = j
    return torch.tensor(pos, dtype=torch.long), out.reshape(*lead, len(pos), R)


def ess_from_svdvals(svals: torch.Tensor, positions: torch.Tensor, length: int, tol: float = 1e-3,
                     relative: bool = True, rank_rtol: float | None = None) -> dict[str, torch.Tensor]:
    """Tolerance-ESS, entropy-ESS and numerical rank from ``svals [..., P, R]`` (see the module docstring).

    Returns ``{"tolerance": [..., P], "entropy": [..., P], "rank": [..., P]}`` (float tensors).
    """
    smax = svals[..., :1]
    thr = tol * smax if relative else torch.full_like(smax, tol)
    tol_ess = (svals > thr).sum(-1).to(svals.dtype)
    m = torch.maximum(positions, length - positions).to(svals.dtype)  # max(L - s, s)
    factor = m * torch.finfo(svals.dtype).eps if rank_rtol is None else torch.full_like(m, rank_rtol)
    rank = (svals > factor[:, None] * smax).sum(-1).to(svals.dtype)
    total = svals.sum(-1, keepdim=True)
    p = svals / total.clamp_min(torch.finfo(svals.dtype).tiny)
    ent = -(p * torch.log(p.clamp_min(torch.finfo(svals.dtype).tiny))).sum(-1)
    ent_ess = torch.where(total[..., 0] > 0, torch.exp(ent), torch.zeros_like(ent))
    return {"tolerance": tol_ess, "entropy": ent_ess, "rank": rank}


@dataclass
class ESSResult:
    """ESS of a set of operators at split positions ``s``.

    Attributes:
        positions: ``[P]`` split positions (number of past tokens).
        tolerance, entropy, rank: ``[..., P]`` tolerance-ESS, entropy-ESS and numerical rank, leading dims
            named by ``dims`` (as the operator's, e.g. ``("batch", "head")``).
        dims: names of the leading dims.
        tol, relative: the tolerance used by tolerance-ESS.
        svals: the singular values ``[..., P, R]`` when requested.
    """

    positions: torch.Tensor
    tolerance: torch.Tensor
    entropy: torch.Tensor
    rank: torch.Tensor
    dims: tuple[str, ...]
    tol: float
    relative: bool
    svals: torch.Tensor | None = None

    def reduce(self, how: str = "mean", dims: Sequence[str] | None = None) -> ESSResult:
        """Aggregate over the named dims (all when None) with ``mean``, ``max``, ``min`` or ``sum``."""
        names = list(self.dims) if dims is None else list(dims)
        idx = [self.dims.index(n) for n in names]
        keep = tuple(n for n in self.dims if n not in names)
        return ESSResult(self.positions, aggregate(self.tolerance, idx, how), aggregate(self.entropy, idx, how),
                         aggregate(self.rank, idx, how), keep, self.tol, self.relative)

    def to_dict(self) -> dict[str, Any]:
        return {"positions": self.positions.tolist(), "dims": list(self.dims), "tol": self.tol,
                "relative": self.relative, "tolerance": self.tolerance.tolist(),
                "entropy": self.entropy.tolist(), "rank": self.rank.tolist()}


def aggregate(x: torch.Tensor, dims: Sequence[int], how: str = "mean") -> torch.Tensor:
    """Reduce ``x`` over ``dims`` with ``mean``, ``max``, ``min`` or ``sum``."""
    dims = tuple(dims)
    if not dims:
        return x
    if how == "mean":
        return x.mean(dims)
    if how == "sum":
        return x.sum(dims)
    if how == "max":
        return x.amax(dims)
    if how == "min":
        return x.amin(dims)
    raise ValueError(f"unknown aggregation {how!r}; choose mean, max, min or sum")


def combine_results(results: Sequence[ESSResult], how: str = "mean") -> ESSResult:
    """Aggregate several results at the same positions (e.g. the layers of a model): each is reduced over all
    its dims with ``how``, then the stack is reduced over the new ``layer`` dim with ``how``."""
    if not results:
        raise ValueError("nothing to combine")
    pos = results[0].positions
    if any(not torch.equal(r.positions, pos) for r in results):
        raise ValueError("results must share their positions")
    red = [r.reduce(how) for r in results]
    stacked = {m: torch.stack([getattr(r, m) for r in red]) for m in ("tolerance", "entropy", "rank")}
    return ESSResult(pos, *(aggregate(stacked[m], [0], how) for m in ("tolerance", "entropy", "rank")), (),
                     results[0].tol, results[0].relative)


def effective_state_size(op: Operator | torch.Tensor, positions: Sequence[int] | None = None, tol: float = 1e-3,
                         relative: bool = True, dtype: torch.dtype | None = torch.float64,
                         rank_rtol: float | None = None, keep_svals: bool = False,
                         max_elems: int = 1 << 24) -> ESSResult:
    """ESS of an :class:`~growmem.analysis.operators.Operator` (or a bare ``[..., L, L]`` tensor) at
    ``positions`` (default every split ``1 .. L - 1``). See the module docstring for the metrics and
    :func:`estimate_cost` for the work (``prod(leading dims) * P`` SVDs)."""
    if isinstance(op, Operator):
        matrix, dims = op.matrix, op.dims
    else:
        matrix = op
        dims = tuple(f"d{i}" for i in range(op.dim() - 2))
    pos, sv = past_future_svdvals(matrix, positions, dtype=dtype, max_elems=max_elems)
    L = matrix.shape[-1]
    m = ess_from_svdvals(sv, pos.to(sv.device), L, tol, relative, rank_rtol)
    return ESSResult(pos, m["tolerance"], m["entropy"], m["rank"], tuple(dims), tol, relative,
                     sv if keep_svals else None)


# --------------------------------------------------------------------------------------------------
# theoretical state size
# --------------------------------------------------------------------------------------------------
def _as_tensor(vals: list[float]) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.float64)


def state_size_curve(module: Any, length: int, positions: Sequence[int]) -> torch.Tensor | None:
    """Theoretical state size per value channel at each split position (see the module docstring).

    ``module``: a Memory (CachedMemory included), a LinearMixer (its memory), an Attention layer, a
    ShortConvolution, or anything else (-> None).
    """
    pos = list(positions)
    if isinstance(module, LinearMixer):
        module = module.memory
    if isinstance(module, Memory):
        if type(module) in LINEAR_MEMORIES:
            return _as_tensor([float(module.head_k_dim)] * len(pos))
        if type(module) is CachedMemory:
            base = state_size_curve(module.base, length, pos)
            if base is None:
                return None
            ends = module.plan(MCState(), length).ends_in(0, length)
            n = _as_tensor([float(sum(e <= s for e in ends)) for s in pos])
            return (1.0 + n) * base
        return None
    if isinstance(module, Attention):
        w = module.window
        return _as_tensor([float(s if w is None else min(s, w - 1)) for s in pos])
    if isinstance(module, ShortConvolution):
        return _as_tensor([float(min(s, module.kernel_size - 1)) for s in pos])
    return None


def layer_state_size(layer_op: LayerOperator, positions: Sequence[int]) -> torch.Tensor | None:
    """TSS per channel of a :class:`~growmem.analysis.operators.LayerOperator` at ``positions``
    (None for linearized layers)."""
    if layer_op.kind in ("layer_jacobian", "model_jacobian"):
        return None
    return state_size_curve(layer_op.module, layer_op.operator.length, positions)
