"""Short causal depthwise convolution (as in Mamba / GLA / DeltaNet token mixers), with a decode cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConvolution(nn.Module):
    """Causal depthwise conv1d over time with kernel ``w`` and SiLU: x ``[B, T, C]`` -> ``[B, T, C]``.

    y_t = silu(sum_{i=0}^{w-1} W_i * x_{t-i} + b). The cache holds the last ``w - 1`` inputs
    ``[B, w - 1, C]`` so that feeding the sequence in pieces equals one call.
    """

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = False, activation: bool = True) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.activation = activation
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None,
                use_cache: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        w = self.kernel_size
        if cache is None:
            cache = x.new_zeros(B, w - 1, C)
        elif cache.shape != (B, w - 1, C):
            raise ValueError(f"conv cache must have shape {(B, w - 1, C)}, got {tuple(cache.shape)}")
        xx = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, T + w - 1, C]
        y = F.conv1d(xx.transpose(1, 2), self.conv.weight, self.conv.bias, groups=C).transpose(1, 2)
        if self.activation:
            y = F.silu(y)
        new_cache = xx[:, xx.shape[1] - (w - 1):] if use_cache else None
        return y, new_cache
