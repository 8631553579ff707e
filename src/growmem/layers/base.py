"""The token-mixer interface shared by every layer in :mod:`growmem.layers`.

A token mixer maps ``x: [B, T, D]`` to ``y: [B, T, D]`` causally. Decoding works through a cache:

    y, cache = mixer(x_prompt, cache=None, use_cache=True)   # prefill, any T >= 1
    y, cache = mixer(x_next, cache=cache, use_cache=True)    # continue, any T >= 1 (usually 1)

Feeding a sequence in pieces with the returned cache must equal one call on the whole sequence
(up to float rounding). ``use_cache=False`` returns ``(y, None)`` and keeps no state. Caches are
plain ``dict[str, Any]`` objects owned by the mixer that made them; callers never look inside.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Cache = dict[str, Any]


class TokenMixer(nn.Module):
    """Base class: ``forward(x [B, T, D], cache=None, use_cache=False) -> (y [B, T, D], cache | None)``."""

    d_model: int

    def forward(self, x: torch.Tensor, cache: Cache | None = None,
                use_cache: bool = False) -> tuple[torch.Tensor, Cache | None]:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def check_input(x: torch.Tensor, d_model: int) -> None:
        """Validate ``x: [B, T, D]`` (float, finite, non-empty, D == d_model)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("mixer input must be a floating-point tensor [B, T, D]")
        if x.dim() != 3 or x.shape[-1] != d_model:
            raise ValueError(f"mixer input must have shape [B, T, {d_model}], got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"empty mixer input {tuple(x.shape)}")
