"""Token mixer around any linear-recurrent :class:`~growmem.memories.base.Memory`.

x ``[B, T, D]`` -> q, k ``[B, T, H, K]``, v ``[B, T, H, V]`` (linear projections, optional short causal
depthwise convolution with SiLU, L2-normalized q/k when the rule needs it), raw gates per head ->
the memory's chunked pass (or its step for single-token decoding) -> per-head gated RMSNorm with an
output gate -> output projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from growmem.layers.base import Cache, TokenMixer
from growmem.layers.conv import ShortConvolution
from growmem.layers.norm import GatedRMSNorm, RMSNorm
from growmem.memories.base import Memory


class LinearMixer(TokenMixer):
    """Linear-attention-family token mixer.

    Args:
        d_model: model width D.
        num_heads: heads H.
        memory_factory: builds the memory, called as ``memory_factory(H, K, V, chunk_size)``.
        head_k_dim: K per head (default ``D // H``).
        expand_v: V = ``int(K * expand_v)``.
        conv_size: kernel of the short convolution on q, k, v (``use_short_conv``).
        use_output_gate: gated RMSNorm ``norm(o) * silu(x W_g)``; else plain RMSNorm.
        use_output_norm: with ``use_output_gate=False``, whether to RMS-normalize o at all.
        chunk_size: chunk length of the parallel pass.

    Extra per-head inputs a memory asks for (``memory.input_projections``, e.g. Memory Caching's
    connector ``u``) get their own bias-free projection ``<name>_proj`` and reach the memory in
    ``gates``. With ``use_short_conv=False, use_output_gate=False, use_output_norm=False`` the layer
    is the *plain linear memory* of the MC paper: only ``q_proj, k_proj, v_proj(, u_proj), o_proj``
    (bias-free) around the memory.
    """

    def __init__(self, d_model: int, num_heads: int, memory_factory: Callable[..., Memory],
                 head_k_dim: int | None = None, expand_v: float = 1.0, use_short_conv: bool = True,
                 conv_size: int = 4, use_output_gate: bool = True, chunk_size: int = 64,
                 norm_eps: float = 1e-6, use_output_norm: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or d_model < 1:
            raise ValueError(f"d_model and num_heads must be >= 1, got {d_model}, {num_heads}")
        if head_k_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
            head_k_dim = d_model // num_heads
        head_v_dim = int(head_k_dim * expand_v)
        if head_k_dim < 1 or head_v_dim < 1:
            raise ValueError(f"head dims must be >= 1, got K={head_k_dim}, V={head_v_dim}")
        self.d_model, self.num_heads = d_model, num_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.memory = memory_factory(num_heads, head_k_dim, head_v_dim, chunk_size)
        H, K, V = num_heads, head_k_dim, head_v_dim
        self.q_proj = nn.Linear(d_model, H * K, bias=False)
        self.k_proj = nn.Linear(d_model, H * K, bias=False)
        self.v_proj = nn.Linear(d_model, H * V, bias=False)
        self.gate_sizes = dict(self.memory.gate_features)
        n_gate = sum(self.gate_sizes.values())
        self.gate_proj = nn.Linear(d_model, H * n_gate, bias=True) if n_gate else None
        self.input_sizes = dict(self.memory.input_projections)
        for name, n in self.input_sizes.items():
            setattr(self, f"{name}_proj", nn.Linear(d_model, H * n, bias=False))
        self.use_short_conv = use_short_conv
        if use_short_conv:
            self.q_conv = ShortConvolution(H * K, conv_size)
            self.k_conv = ShortConvolution(H * K, conv_size)
            self.v_conv = ShortConvolution(H * V, conv_size)
        self.use_output_gate = use_output_gate
        if use_output_gate:
            self.g_proj = nn.Linear(d_model, H * V, bias=False)
            self.o_norm: nn.Module = GatedRMSNorm(V, eps=norm_eps)
        elif use_output_norm:
            self.o_norm = RMSNorm(V, eps=norm_eps)
        else:
            self.o_norm = nn.Identity()
        self.o_proj = nn.Linear(H * V, d_model, bias=False)

    def project(self, x: torch.Tensor, cache: Cache | None, use_cache: bool):
        """x ``[B, T, D]`` -> (q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, gates, new conv caches)."""
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new: Cache = {}
        if self.use_short_conv:
            c = cache or {}
            q, new["conv_q"] = self.q_conv(q, c.get("conv_q"), use_cache)
            k, new["conv_k"] = self.k_conv(k, c.get("conv_k"), use_cache)
            v, new["conv_v"] = self.v_conv(v, c.get("conv_v"), use_cache)
        q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)
        if self.memory.l2_normalize_qk:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        raw: dict[str, torch.Tensor] = {}
        if self.gate_proj is not None:
            parts = self.gate_proj(x).view(B, T, H, -1).split(list(self.gate_sizes.values()), dim=-1)
            raw = dict(zip(self.gate_sizes, parts, strict=True))
        gates = self.memory.make_gates(raw)
        for name, n in self.input_sizes.items():
            gates[name] = getattr(self, f"{name}_proj")(x).view(B, T, H, n)
        return q, k, v, gates, new

    def output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Per-head norm (gated by ``x W_g``) and output projection: o ``[B, T, H, V]`` -> ``[B, T, D]``."""
        B, T = o.shape[:2]
        if self.use_output_gate:
            o = self.o_norm(o, self.g_proj(x).view_as(o))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(B, T, -1))

    def new_cache(self, batch_size: int, total_length: int | None = None) -> Cache | None:
        """An empty decoding cache (only needed by memories whose streaming state needs set-up, such as
        Memory Caching with a logarithmic plan, which must know the total length)."""
        state = self.memory.new_state(batch_size, total_length)
        return None if state is None else {"state": state}

    def forward(self, x: torch.Tensor, cache: Cache | None = None,
                use_cache: bool = False) -> tuple[torch.Tensor, Cache | None]:
        self.check_input(x, self.d_model)
        q, k, v, gates, new = self.project(x, cache, use_cache)
        state = cache.get("state") if cache else None
        if x.shape[1] == 1 and state is not None:
            o1, new_state = self.memory.step(q[:, 0], k[:, 0], v[:, 0],
                                             {n: g[:, 0] for n, g in gates.items()}, state)
            o = o1[:, None]
        else:
            o, new_state = self.memory(q, k, v, gates, initial_state=state, output_final_state=use_cache)
        y = self.output(x, o)
        if not use_cache:
            return y, None
        new["state"] = new_state
        return y, new
