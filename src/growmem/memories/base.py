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
        input_projections: extra per-head inputs projected from x by separate bias-free linear maps
            named ``<name>_proj`` (e.g. Memory Caching's connector ``u``), passed in ``gates``.
        l2_normalize_qk: whether the layer must L2-normalize q and k per head.
        linear_readout: the output is linear in the readable state, ``read(sum_i w_i S_i) =
            sum_i w_i read(S_i)`` (true for matrix memories; false for deep MLP memories). Wrappers
            use it to collapse sums of states (Residual) and to equate Memory Soup with GRM.
    """

    name: str = "memory"
    gate_features: dict[str, int] = {}
    input_projections: dict[str, int] = {}
    l2_normalize_qk: bool = False
    linear_readout: bool = True

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
        """Chunked parallel pass: ``(o [B, T, H, V], final_state | None[, chunk_states])``.

        ``initial_state=None`` means the rule's initial (zero) state. ``chunk_states`` are the
        *readable* states after every ``chunk_size`` tokens, stacked on dim 1 (``[B, NC, H, K, V]``).
        """
        raise NotImplementedError

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: Gates,
             state: Any) -> tuple[torch.Tensor, Any]:
        """One token: q, k ``[B, H, K]``, v ``[B, H, V]``, gates ``[B, H(, K)]`` -> ``(o [B, H, V], state)``."""
        raise NotImplementedError

    def readable(self, state: Any) -> torch.Tensor:
        """The part of a state that is read by queries: ``[B, H, K, V]``."""
        return state

    @property
    def scale(self) -> float:
        """Query scale of the rule's readout (K^-1/2, the ops' default)."""
        return self.head_k_dim ** -0.5

    def new_state(self, batch_size: int, total_length: int | None = None) -> Any:
        """A fresh state for streaming (``None`` = the rule's zero state, created lazily)."""
        return None

    def read(self, states: Any, q: torch.Tensor) -> torch.Tensor:
        """Read many readable states with many queries: states stacked on dim 1 (``[B, N, H, K, V]``),
        q ``[B, T, H, K]`` -> ``[B, T, N, H, V]`` with ``out[b, t, n] = states[b, n]^T (scale q[b, t])``."""
        return torch.einsum("bthk,bnhkv->btnhv", q * self.scale, states)

    def state_size(self) -> int:
        """Number of floats in one head-batch element of the readable state (H * K * V)."""
        return self.num_heads * self.head_k_dim * self.head_v_dim
