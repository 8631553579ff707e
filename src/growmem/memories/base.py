"""The memory interface: one small contract that every recurrent memory implements.

A memory turns per-token queries, keys, values and gates into outputs, and exposes its state so
that wrappers (Memory Caching, analysis tools) can work on any memory without knowing its rule.

Shapes: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, gates ``[B, T, H]`` or ``[B, T, H, K]``. A state
is whatever the rule needs (a ``[B, H, K, V]`` matrix for the linear family, a tuple for SWLA);
the *readable* state (what a cache stores and :meth:`Memory.read` consumes) is a ``[B, H, K, V]``
matrix for matrix memories.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Gates = dict[str, torch.Tensor]


class Memory(nn.Module):
    """Base class of memories. Subclasses hold the gate parameters of their rule.

    Attributes:
        name: registry name of the rule.
        gate_features: number of projected features per head for each raw gate the rule needs
            (the layer projects ``x`` to ``H * sum(gate_features.values())`` numbers per token).
        l2_normalize_qk: whether the layer must L2-normalize q and k per head.
    """

    name: str = "memory"
    gate_features: dict[str, int] = {}
    l2_normalize_qk: bool = False

    def __init__(self, num_heads: int, head_k_dim: int, head_v_dim: int, chunk_size: int = 64) -> None:
        super().__init__()
        if num_heads < 1 or head_k_dim < 1 or head_v_dim < 1:
            raise ValueError("num_heads, head_k_dim and head_v_dim must be >= 1")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.num_heads, self.head_k_dim, self.head_v_dim = num_heads, head_k_dim, head_v_dim
        self.chunk_size = chunk_size

    def make_gates(self, raw: Gates) -> Gates:
        """Map raw projections ``{name: [B, T, H, n]}`` to the gates the rule consumes."""
        return {}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: Gates,
                initial_state: Any = None, output_final_state: bool = False,
                return_chunk_states: bool = False) -> tuple:
        """Chunked parallel pass: ``(o [B, T, H, V], final_state | None[, chunk_states [B, NC, H, K, V]])``."""
        raise NotImplementedError

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: Gates,
             state: Any) -> tuple[torch.Tensor, Any]:
        """One token: q, k ``[B, H, K]``, v ``[B, H, V]``, gates ``[B, H(, K)]`` -> ``(o [B, H, V], state)``."""
        raise NotImplementedError

    def readable(self, state: Any) -> torch.Tensor:
        """The part of a state that is read by queries: ``[B, H, K, V]``."""
        return state

    @staticmethod
    def read(states: torch.Tensor, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Read many matrix states with many queries: states ``[B, N, H, K, V]``, q ``[B, T, H, K]``
        -> ``[B, T, N, H, V]`` with ``out[b, t, n] = states[b, n]^T (scale q[b, t])``."""
        return torch.einsum("bthk,bnhkv->btnhv", q * scale, states)

    def state_size(self) -> int:
        """Number of floats in one head-batch element of the readable state (H * K * V)."""
        return self.num_heads * self.head_k_dim * self.head_v_dim
