"""Long-delay memory: remember one symbol across ``delay`` distractor steps, recall it at a cue.

Tokens: symbols ``0..n_symbols-1``, ``BLANK = n_symbols``, ``CUE = n_symbols + 1``, and for
``distractor="noise"`` the noise tokens ``n_symbols+2 .. n_symbols+1+n_noise`` (disjoint from the symbols, so
the answer is unambiguous). ``vocab_size = n_symbols + 2 (+ n_noise)``. ``T = seq_len = delay + 2``.

With a fixed delay (``min_delay=None``)::

    position  0     1 .. delay               delay+1
    input     s     d_1 .. d_delay           CUE         d_i = BLANK, or uniform noise tokens
    target    -100  -100 .. -100             s

With ``min_delay`` set, each sample draws its delay ``D`` uniformly in ``[min_delay, delay]`` and puts the
symbol at position ``delay - D``; every other position before the cue is a distractor, so exactly D
distractors separate the symbol from the cue at ``T - 1``.

Generation is vectorized (one ``integers`` call per batch; a [B, T] fill for blanks), cheap for T = 10^4
and beyond. Metadata: ``"delay"`` (LongTensor [B], D), ``"symbol"`` (LongTensor [B], s).
Metric: ``accuracy`` (argmax at the cue == s; chance is 1 / n_symbols).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from growmem.tasks.base import (
    IGNORE_INDEX,
    SeedLike,
    Task,
    as_rng,
    check_int,
    to_batch,
)


@dataclass
class LongDelayConfig:
    """Config of :class:`LongDelayTask`: ``delay`` (max) distractor steps (T = delay + 2), ``n_symbols`` to
    remember from, ``distractor`` "blank" or "noise", ``n_noise`` noise tokens, ``min_delay`` (None: fixed
    delay; else each sample's delay is uniform in [min_delay, delay])."""

    delay: int = 1000
    n_symbols: int = 8
    distractor: str = "blank"
    n_noise: int = 8
    min_delay: int | None = None

    def __post_init__(self) -> None:
        own = "LongDelayConfig"
        check_int(own, "delay", self.delay, 0)
        check_int(own, "n_symbols", self.n_symbols, 2)
        check_int(own, "n_noise", self.n_noise, 1)
        if self.distractor not in ("blank", "noise"):
            raise ValueError(f"LongDelayConfig.distractor must be 'blank' or 'noise', got {self.distractor!r}")
        if self.min_delay is not None:
            check_int(own, "min_delay", self.min_delay, 0)
            if self.min_delay > self.delay:
                raise ValueError(f"LongDelayConfig.min_delay={self.min_delay} > delay={self.delay}")


class LongDelayTask(Task):
    """Remember the first symbol over ``delay`` distractors; see :mod:`growmem.tasks.long_delay`.
    ``batch(B, seed)`` -> ``{"input_ids": [B, delay+2], "targets": [B, delay+2], "delay": [B], "symbol": [B]}``."""

    name = "long_delay"
    Config = LongDelayConfig
    config: LongDelayConfig

    @property
    def blank(self) -> int:
        return self.config.n_symbols

    @property
    def cue(self) -> int:
        return self.config.n_symbols + 1

    @property
    def vocab_size(self) -> int:
        c = self.config
        return c.n_symbols + 2 + (c.n_noise if c.distractor == "noise" else 0)

    @property
    def seq_len(self) -> int:
        return self.config.delay + 2

    def batch(self, batch_size: int, seed_or_generator: SeedLike) -> dict[str, torch.Tensor]:
        self._check_batch_size(batch_size)
        rng = as_rng(seed_or_generator)
        c = self.config
        B, T = batch_size, self.seq_len
        sym = rng.integers(0, c.n_symbols, size=B, dtype=np.int64)
        if c.min_delay is None:
            delay = np.full(B, c.delay, dtype=np.int64)
        else:
            delay = rng.integers(c.min_delay, c.delay + 1, size=B, dtype=np.int64)
        if c.distractor == "noise":
            ids = rng.integers(c.n_symbols + 2, c.n_symbols + 2 + c.n_noise, size=(B, T), dtype=np.int64)
        else:
            ids = np.full((B, T), self.blank, dtype=np.int64)
        ids[np.arange(B), c.delay - delay] = sym
        ids[:, T - 1] = self.cue
        tgt = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        tgt[:, T - 1] = sym
        return to_batch(ids, tgt, delay=delay, symbol=sym)

    def evaluate(self, model: Any, n_samples: int = 256, batch_size: int = 32, seed: int = 0) -> dict[str, float]:
        """``accuracy`` (argmax at the cue == the symbol), ``n_samples``."""
        return self.scored_accuracy(model, n_samples, batch_size, seed)
