"""Options of Memory Caching, validated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Aggregation = Literal["res", "grm", "soup", "ssc", "avg"]
AGGREGATIONS: tuple[str, ...] = ("res", "grm", "soup", "ssc", "avg")


@dataclass
class MCConfig:
    """Memory Caching options (MC paper, arXiv 2602.24281).

    Attributes:
        segmentation: ``constant`` (segments of ``segment_size``), ``log`` (binary decomposition of
            the length, largest first) or ``explicit`` (``segment_lengths``).
        segment_size: C for constant segmentation (paper: 256 at 4K context).
        segment_lengths: lengths for explicit segmentation.
        init: ``checkpoint`` (a segment starts from the previous segment's final state) or
            ``restart`` (every segment starts from the initial state: independent compressors).
        pooling: pooled key of a segment, ``sum`` (paper's formula) or ``mean`` of its keys.
        connector: ``proj`` (u_t = x_t W_u, a separate bias-free projection) or ``q`` (u_t = q_t).
        temperature: gamma = softmax(<u_t, p(i)> / temperature).
        top_k: cached memories selected per token by Sparse Selective Caching.
        detach_cached: stop gradients through cached states.
    """

    segmentation: Literal["constant", "log", "explicit"] = "constant"
    segment_size: int = 256
    segment_lengths: tuple[int, ...] | None = None
    init: Literal["checkpoint", "restart"] = "checkpoint"
    pooling: Literal["sum", "mean"] = "sum"
    connector: Literal["proj", "q"] = "proj"
    temperature: float = 1.0
    top_k: int = 2
    detach_cached: bool = False

    def __post_init__(self) -> None:
        if self.segmentation not in ("constant", "log", "explicit"):
            raise ValueError(f"MC segmentation must be constant, log or explicit, got {self.segmentation!r}")
        if not isinstance(self.segment_size, int) or self.segment_size < 1:
            raise ValueError(f"MC segment_size must be a positive int, got {self.segment_size!r}")
        if self.segment_lengths is not None:
            self.segment_lengths = tuple(self.segment_lengths)
            if not self.segment_lengths or any(not isinstance(n, int) or n < 1 for n in self.segment_lengths):
                raise ValueError(f"MC segment_lengths must be positive ints, got {self.segment_lengths!r}")
        if self.segmentation == "explicit" and self.segment_lengths is None:
            raise ValueError("MC segmentation='explicit' needs segment_lengths")
        if self.init not in ("checkpoint", "restart"):
            raise ValueError(f"MC init must be checkpoint or restart, got {self.init!r}")
        if self.pooling not in ("sum", "mean"):
            raise ValueError(f"MC pooling must be sum or mean, got {self.pooling!r}")
        if self.connector not in ("proj", "q"):
            raise ValueError(f"MC connector must be proj or q, got {self.connector!r}")
        if not self.temperature > 0:
            raise ValueError(f"MC temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise ValueError(f"MC top_k must be a positive int, got {self.top_k!r}")
