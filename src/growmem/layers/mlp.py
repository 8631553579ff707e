"""Feed-forward block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020): y = W_down (silu(x W_gate) * (x W_up)); x ``[..., D]``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden size must be >= 1, got {hidden}")
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
