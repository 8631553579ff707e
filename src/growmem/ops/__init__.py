"""Pure tensor functions for the linear-recurrent memories.

Layout: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, gates ``[B, T, H]`` (or ``[B, T, H, K]``), matrix
states ``[B, H, K, V]``; o_t = S_t^T (scale q_t), scale = K^-1/2 by default. Every rule has

- ``naive_*``: a plain per-token loop (the reference; float64-friendly),
- ``chunk_*``: the chunked parallel form (any T, padded internally) returning ``(o, final_state)``, or
  ``(o, final_state, chunk_states [B, NC, H, K, V])`` with ``return_chunk_states=True``,
- ``step_*``: one token, for decoding.
"""

from growmem.ops.delta_rule import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    naive_delta_rule,
    naive_gated_delta_rule,
    step_delta_rule,
    step_gated_delta_rule,
)
from growmem.ops.gla import chunk_gla, naive_gla, step_gla
from growmem.ops.linear_attn import chunk_linear_attn, naive_linear_attn, step_linear_attn
from growmem.ops.scan import naive_scan, parallel_scan, step_scan
from growmem.ops.swla import chunk_swla, naive_swla, step_swla

__all__ = [
    "chunk_delta_rule", "chunk_gated_delta_rule", "naive_delta_rule", "naive_gated_delta_rule",
    "step_delta_rule", "step_gated_delta_rule", "chunk_gla", "naive_gla", "step_gla",
    "chunk_linear_attn", "naive_linear_attn", "step_linear_attn", "chunk_swla", "naive_swla", "step_swla",
    "naive_scan", "parallel_scan", "step_scan",
]
