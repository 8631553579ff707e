"""Segmentation of a sequence for Memory Caching (MC paper Sec. 3): constant, logarithmic, explicit.

A *plan* is the list of segment lengths covering positions ``0 .. L-1``. Pieces are the parts of a
window of positions ``[pos0, pos0 + T)`` (a call of the parallel forward, or one decoding step) cut
at segment ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Segmentation = Literal["constant", "log", "explicit"]


def log_plan(length: int) -> list[int]:
    """Binary decomposition of ``length``, largest first: ``log_plan(37) == [32, 4, 1]``."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    return [1 << b for b in range(length.bit_length() - 1, -1, -1) if length >> b & 1]


def constant_plan(length: int, segment_size: int) -> list[int]:
    """Segments of ``segment_size`` tokens, the last one possibly shorter."""
    if segment_size < 1 or length < 1:
        raise ValueError(f"segment_size and length must be >= 1, got {segment_size}, {length}")
    full, rest = divmod(length, segment_size)
    return [segment_size] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class SegmentPlan:
    """Where segments end, as a function of absolute position.

    ``constant``: every ``segment_size`` tokens, unbounded. ``log``: the binary decomposition of
    ``total_length`` (which must be known: a logarithmic plan depends on the full length).
    ``explicit``: the given ``lengths``; positions past their sum are an error.
    """

    segmentation: Segmentation
    segment_size: int = 256
    total_length: int | None = None
    lengths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.segmentation not in ("constant", "log", "explicit"):
            raise ValueError(f"segmentation must be 'constant', 'log' or 'explicit', got {self.segmentation!r}")
        if self.segment_size < 1:
            raise ValueError(f"segment_size must be >= 1, got {self.segment_size}")
        if self.segmentation == "log" and (self.total_length is None or self.total_length < 1):
            raise ValueError("logarithmic segmentation needs the total sequence length (a log plan depends on "
                             "it): pass total_length (generate() does this for you)")
        if self.segmentation == "explicit" and (not self.lengths or any(int(n) != n or n < 1 for n in self.lengths)):
            raise ValueError(f"explicit segmentation needs positive integer lengths, got {self.lengths!r}")

    def _fixed(self) -> list[int] | None:
        if self.segmentation == "log":
            assert self.total_length is not None
            return log_plan(self.total_length)
        if self.segmentation == "explicit":
            assert self.lengths is not None
            return list(self.lengths)
        return None

    def ends_in(self, pos0: int, T: int) -> list[int]:
        """Absolute segment ends e (exclusive: a segment ends after position e - 1) with pos0 < e <= pos0 + T."""
        end = pos0 + T
        fixed = self._fixed()
        if fixed is None:
            C = self.segment_size
            first = (pos0 // C + 1) * C
            return list(range(first, end + 1, C))
        cover = sum(fixed)
        if end > cover:
            what = "total_length" if self.segmentation == "log" else "the explicit segment lengths"
            raise ValueError(f"position {end - 1} is beyond the segmentation plan ({what} cover {cover} tokens)")
        out, acc = [], 0
        for n in fixed:
            acc += n
            if pos0 < acc <= end:
                out.append(acc)
        return out

    def pieces(self, pos0: int, T: int) -> list[tuple[int, int, bool]]:
        """Cut local positions ``[0, T)`` at segment ends: ``(start, stop, ends_segment)`` triples."""
        out, start = [], 0
        for e in self.ends_in(pos0, T):
            out.append((start, e - pos0, True))
            start = e - pos0
        if start < T:
            out.append((start, T, False))
        return out
