"""Analysis tools: causal operators of sequence mixers and their Effective State-Size (arXiv 2504.19561).

Core needs only torch; plotting (the ``ess`` command) imports matplotlib lazily.
"""

from growmem.analysis.ess import (
    CostEstimate,
    ESSResult,
    aggregate,
    combine_results,
    effective_state_size,
    ess_from_svdvals,
    estimate_cost,
    layer_state_size,
    past_future_svdvals,
    select_positions,
    state_size_curve,
)
from growmem.analysis.operators import (
    LayerOperator,
    Operator,
    apply_operator,
    attention_operator,
    attention_qkv,
    capture_layers,
    conv_operator,
    gla_operator,
    la_operator,
    layer_jacobian_operator,
    lm_operators,
    memory_operator,
    short_conv_operator,
    swla_operator,
    value_jacobian_operator,
)

__all__ = [
    "CostEstimate", "ESSResult", "aggregate", "combine_results", "effective_state_size", "ess_from_svdvals",
    "estimate_cost", "layer_state_size", "past_future_svdvals", "select_positions", "state_size_curve",
    "LayerOperator", "Operator", "apply_operator", "attention_operator", "attention_qkv", "capture_layers",
    "conv_operator", "gla_operator", "la_operator", "layer_jacobian_operator", "lm_operators", "memory_operator",
    "short_conv_operator", "swla_operator", "value_jacobian_operator",
]
