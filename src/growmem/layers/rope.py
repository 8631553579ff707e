"""Rotary position embedding (RoPE; Su et al. 2021, "RoFormer").

For a head vector ``x`` at absolute position ``m`` the feature pairs ``(x_i, x_{i + D/2})``
(rotate-half convention) are rotated by the angle ``m * theta_i`` with
``theta_i = base^(-2 i / D)``, ``i = 0 .. D/2 - 1``:

    RoPE(x, m) = x * cos(m theta) + rotate_half(x) * sin(m theta),
    rotate_half([x1, x2]) = [-x2, x1].

Because the rotation is orthogonal and ``R(m)^T R(n) = R(n - m)``, the score
``<RoPE(q, m), RoPE(k, n)>`` depends on the positions only through ``m - n``.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` along the last dimension (which must be even)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (``cos``/``sin`` broadcast against ``x``)."""
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for ``x: [B, T, H, D]`` at absolute positions ``offset .. offset+T-1``.

    Args:
        head_dim: ``D``, the per-head feature size; must be a positive even integer.
        base: frequency base ``b`` of ``theta_i = b^(-2 i / D)``; must be > 0.

    The angles are computed in float32 (float64 when ``x`` is float64) and the result is cast back
    to ``x.dtype``. ``inv_freq`` is a non-persistent buffer (not saved in the state dict).
    """

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int):
            raise TypeError(f"head_dim must be an int, got {type(head_dim).__name__}")
        if head_dim <= 0 or head_dim % 2 != 0:
            raise ValueError(f"RoPE head_dim must be a positive even integer, got {head_dim}")
        if isinstance(base, bool) or not isinstance(base, (int, float)):
            raise TypeError(f"base must be a number, got {type(base).__name__}")
        if not base > 0 or base == float("inf"):
            raise ValueError(f"RoPE base must be a finite positive number, got {base}")
        self.head_dim = head_dim
        self.base = float(base)
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        self.register_buffer("inv_freq", (self.base ** -exponent).to(torch.float32), persistent=False)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"

    def cos_sin(self, T: int, offset: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin: [T, 1, D]`` for positions ``offset .. offset+T-1`` in ``dtype``."""
        inv_freq = self.inv_freq.to(device=device, dtype=dtype)
        pos = torch.arange(offset, offset + T, device=device, dtype=dtype)
        freqs = torch.outer(pos, inv_freq)  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        return emb.cos(), emb.sin()

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate ``x: [B, T, H, D]``; token ``t`` gets absolute position ``offset + t``."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("RoPE input must be a floating-point tensor [B, T, H, D]")
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"RoPE input must have shape [B, T, H, {self.head_dim}], got {tuple(x.shape)}")
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"RoPE offset must be an int, got {type(offset).__name__}")
        if offset < 0:
            raise ValueError(f"RoPE offset must be >= 0, got {offset}")
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self.cos_sin(x.shape[1], offset, x.device, compute)
        return apply_rotary(x.to(compute), cos, sin).to(x.dtype)
