"""Registry entries of the deep mixers (imported at the end of models/registry.py).

==============  ====================================================================================
name            mixer
==============  ====================================================================================
dla             LinearMixer around :class:`~growmem.memories.deep.DLAMemory` (deep linear attention)
titans          LinearMixer around :class:`~growmem.memories.deep.TitansMemory` (Titans' memory)
dla+<agg>       the same with Memory Caching, agg in res, grm, soup, ssc, avg (options: ``cfg.mc``)
titans+<agg>
==============  ====================================================================================

The memories use their class defaults (expansion 4, GELU, no LayerNorm; DLA: dot loss, max_lr 0.1;
Titans: mse loss, max_lr 0.01); the chunk size (the inner mini-batch) is ``cfg.chunk_size``. Deep memories need
head_k_dim == head_v_dim (``expand_v=1``); building one with another ``expand_v`` raises.
"""

from __future__ import annotations

from growmem.caching import AGGREGATIONS
from growmem.memories.deep import DLAMemory, TitansMemory
from growmem.models.registry import _AGG_DESCRIPTIONS, _linear, register_mixer

_DEEP = {
    "dla": (DLAMemory, "deep linear attention: MLP memory, test-time GD on -<M(k), v>"),
    "titans": (TitansMemory, "Titans long-term memory: MLP memory, GD with momentum and retention on ||M(k) - v||^2"),
}
for _name, (_cls, _desc) in _DEEP.items():
    register_mixer(_name, _linear(_cls), _desc)
    for _agg in AGGREGATIONS:
        register_mixer(f"{_name}+{_agg}", _linear(_cls, _agg),
                       f"{_desc} + Memory Caching ({_AGG_DESCRIPTIONS[_agg]})", constant_memory=False)
