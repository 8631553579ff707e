"""Post-training Memory Caching (MC paper Sec. 4.3): give a model trained without caching a growing
memory at inference, with no new weights.

Every linear-memory layer is wrapped so that after each segment of ``segment_size`` tokens its state
is cached, and every later token adds the plain average of the cached memories' reads to its online
read: y_t = M_t(q_t) + mean_{i < s(t)} M(i)(q_t). Meant for length extrapolation; on sequences no
longer than one segment the model is unchanged.
"""

from __future__ import annotations

from torch import nn

from growmem.caching import CachedMemory, MCConfig
from growmem.layers.linear_mixer import LinearMixer


def apply_post_training_mc(model: nn.Module, segment_size: int, init: str = "checkpoint") -> int:
    """Wrap, in place, the memory of every :class:`LinearMixer` of ``model`` that is not cached yet
    with the ``avg`` aggregation. Load trained weights *before* calling this (the wrapped memory's
    parameters move under ``memory.base``). Returns the number of layers wrapped."""
    config = MCConfig(segment_size=segment_size, init=init)  # validates
    n = 0
    for module in model.modules():
        if isinstance(module, LinearMixer) and not isinstance(module.memory, CachedMemory):
            module.memory = CachedMemory(module.memory, "avg", config)
            n += 1
    if n == 0:
        raise ValueError("the model has no uncached linear-memory layer to wrap")
    return n
