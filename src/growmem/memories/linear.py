"""The linear-recurrent memory family as :class:`~growmem.memories.base.Memory` adapters.

Each class owns its gate parameterization (from raw per-head projections) and calls the matching
chunked op for training / prefill and the step op for decoding.

==========  =======================================================  ====================================
name        state update                                             gates
==========  =======================================================  ====================================
la          S_t = S_{t-1} + k_t v_t^T                                 none
sgla        S_t = exp(g_t) S_{t-1} + k_t v_t^T  (scalar, Mamba2-SSD)  g = -exp(A_log) softplus(a + dt_bias)
gla         S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T  (per key dim)   g = logsigmoid(a) / 16  (GLA)
swla        S_t = a_t S_{t-1} + b_t k_{t-1}v_{t-1}^T + c_t k_t v_t^T    a = sigmoid, b, c = sigmoid
deltanet    S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T          b = sigmoid
gdn         S_t = exp(g_t)(I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T  g as sgla, b = sigmoid
==========  =======================================================  ====================================
Outputs are o_t = S_t^T (scale q_t) with scale = K^-1/2.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from growmem.memories.base import Gates, Memory
from growmem.ops.delta_rule import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    step_delta_rule,
    step_gated_delta_rule,
)
from growmem.ops.gla import chunk_gla, step_gla
from growmem.ops.swla import chunk_swla, step_swla


class _MambaDecay(nn.Module):
    """Per-head scalar log-decay g = -exp(A_log) * softplus(a + dt_bias) (Mamba2 / Gated DeltaNet)."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        A = torch.empty(num_heads).uniform_(1.0, 16.0)
        self.A_log = nn.Parameter(A.log())
        dt = torch.exp(torch.rand(num_heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return -self.A_log.float().exp().to(a.dtype) * F.softplus(a + self.dt_bias.to(a.dtype))


class LinearAttentionMemory(Memory):
    """Plain linear attention (no decay): S_t = S_{t-1} + k_t v_t^T."""

    name = "la"
    gate_features: dict[str, int] = {}

    def forward(self, q, k, v, gates, initial_state=None, output_final_state=False, return_chunk_states=False):
        return chunk_gla(q, k, v, None, initial_state=initial_state, output_final_state=output_final_state,
                         chunk_size=self.chunk_size, return_chunk_states=return_chunk_states)

    def step(self, q, k, v, gates, state):
        return step_gla(q, k, v, None, state)


class ScalarGLAMemory(Memory):
    """Scalar-decay gated linear attention (RetNet / Mamba2-SSD style): S_t = exp(g_t) S_{t-1} + k_t v_t^T."""

    name = "sgla"
    gate_features = {"a": 1}

    def __init__(self, num_heads: int, head_k_dim: int, head_v_dim: int, chunk_size: int = 64) -> None:
        super().__init__(num_heads, head_k_dim, head_v_dim, chunk_size)
        self.decay = _MambaDecay(num_heads)

    def make_gates(self, raw: Gates) -> Gates:
        return {"g": self.decay(raw["a"][..., 0])}

    def forward(self, q, k, v, gates, initial_state=None, output_final_state=False, return_chunk_states=False):
        return chunk_gla(q, k, v, gates["g"], initial_state=initial_state,
                         output_final_state=output_final_state, chunk_size=self.chunk_size,
                         return_chunk_states=return_chunk_states)

    def step(self, q, k, v, gates, state):
        return step_gla(q, k, v, gates["g"], state)


class GLAMemory(ScalarGLAMemory):
    """Gated linear attention with per-key-dimension decay (Yang et al. 2024, GLA):
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T with g_t = logsigmoid(x W_g) / 16."""

    name = "gla"

    def __init__(self, num_heads: int, head_k_dim: int, head_v_dim: int, chunk_size: int = 64,
                 gate_normalizer: float = 16.0) -> None:
        Memory.__init__(self, num_heads, head_k_dim, head_v_dim, chunk_size)
        self.gate_features = {"a": head_k_dim}
        self.gate_normalizer = gate_normalizer

    def make_gates(self, raw: Gates) -> Gates:
        return {"g": F.logsigmoid(raw["a"]) / self.gate_normalizer}


class SWLAMemory(Memory):
    """Sliding-window linear attention, c = 2 (MC paper Eqs. 26-29); state ``(S, k_last, v_last)``."""

    name = "swla"
    gate_features = {"a": 1, "b": 1, "c": 1}

    def make_gates(self, raw: Gates) -> Gates:
        return {"g": F.logsigmoid(raw["a"][..., 0]), "b": torch.sigmoid(raw["b"][..., 0]),
                "c": torch.sigmoid(raw["c"][..., 0])}

    def forward(self, q, k, v, gates, initial_state=None, output_final_state=False, return_chunk_states=False):
        return chunk_swla(q, k, v, gates["g"], gates["b"], gates["c"], initial_state=initial_state,
                          output_final_state=output_final_state, chunk_size=self.chunk_size,
                          return_chunk_states=return_chunk_states)

    def step(self, q, k, v, gates, state):
        return step_swla(q, k, v, gates["g"], gates["b"], gates["c"], state)

    def readable(self, state: Any) -> torch.Tensor:
        return state[0]


class DeltaNetMemory(Memory):
    """DeltaNet (delta rule): S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, keys L2-normalized."""

    name = "deltanet"
    gate_features = {"beta": 1}
    l2_normalize_qk = True

    def make_gates(self, raw: Gates) -> Gates:
        return {"beta": torch.sigmoid(raw["beta"][..., 0])}

    def forward(self, q, k, v, gates, initial_state=None, output_final_state=False, return_chunk_states=False):
        return chunk_delta_rule(q, k, v, gates["beta"], initial_state=initial_state,
                                output_final_state=output_final_state, chunk_size=self.chunk_size,
                                return_chunk_states=return_chunk_states)

    def step(self, q, k, v, gates, state):
        return step_delta_rule(q, k, v, gates["beta"], state)


class GatedDeltaNetMemory(Memory):
    """Gated DeltaNet (Yang et al. 2025): S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T."""

    name = "gdn"
    gate_features = {"a": 1, "beta": 1}
    l2_normalize_qk = True

    def __init__(self, num_heads: int, head_k_dim: int, head_v_dim: int, chunk_size: int = 64) -> None:
        super().__init__(num_heads, head_k_dim, head_v_dim, chunk_size)
        self.decay = _MambaDecay(num_heads)

    def make_gates(self, raw: Gates) -> Gates:
        return {"g": self.decay(raw["a"][..., 0]), "beta": torch.sigmoid(raw["beta"][..., 0])}

    def forward(self, q, k, v, gates, initial_state=None, output_final_state=False, return_chunk_states=False):
        return chunk_gated_delta_rule(q, k, v, gates["g"], gates["beta"], initial_state=initial_state,
                                      output_final_state=output_final_state, chunk_size=self.chunk_size,
                                      return_chunk_states=return_chunk_states)

    def step(self, q, k, v, gates, state):
        return step_gated_delta_rule(q, k, v, gates["g"], gates["beta"], state)
