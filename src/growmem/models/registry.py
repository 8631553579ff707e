"""The one registry of token-mixer names, used by configs, the CLI and the tests alike.

A name is ``<memory>`` (``la``, ``sgla``, ``gla``, ``swla``, ``deltanet``, ``gdn``), a Memory Caching
variant ``<memory>+<aggregation>`` with aggregation ``res``, ``grm``, ``soup``, ``ssc`` or ``avg``
(options in ``ModelConfig.mc``), the preset ``loglinear++`` (GRM over logarithmic segments on Gated
DeltaNet), or an attention baseline (``attn``, ``swa``). Later features register more names with
:func:`register_mixer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from growmem.caching import AGGREGATIONS, CachedMemory
from growmem.layers.attention import Attention
from growmem.layers.base import TokenMixer
from growmem.layers.linear_mixer import LinearMixer
from growmem.memories import (
    DeltaNetMemory,
    GatedDeltaNetMemory,
    GLAMemory,
    LinearAttentionMemory,
    ScalarGLAMemory,
    SWLAMemory,
)
from growmem.memories.base import Memory

if TYPE_CHECKING:
    from growmem.models.config import ModelConfig

MixerBuilder = Callable[["ModelConfig", int], TokenMixer]


@dataclass(frozen=True)
class MixerSpec:
    """A registered mixer: its builder, a one-line description and whether it decodes in O(1) memory."""

    build: MixerBuilder
    description: str
    constant_memory: bool


_REGISTRY: dict[str, MixerSpec] = {}


def register_mixer(name: str, build: MixerBuilder, description: str, constant_memory: bool = True) -> None:
    """Register a mixer under ``name`` (raises if the name is taken)."""
    if name in _REGISTRY:
        raise ValueError(f"mixer {name!r} is already registered")
    _REGISTRY[name] = MixerSpec(build, description, constant_memory)


def mixer_names() -> list[str]:
    """All registered mixer names, sorted."""
    return sorted(_REGISTRY)


def get_mixer_spec(name: str) -> MixerSpec:
    """The spec of ``name``, or a ``ValueError`` that lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; known mixers: {', '.join(mixer_names())}") from None


def build_mixer(name: str, config: ModelConfig, layer_idx: int) -> TokenMixer:
    """Build the mixer ``name`` for layer ``layer_idx`` of a model with ``config``."""
    return get_mixer_spec(name).build(config, layer_idx)


def _linear(memory_cls: type[Memory], aggregation: str | None = None, **mc_overrides) -> MixerBuilder:
    def build(cfg: ModelConfig, layer_idx: int) -> TokenMixer:
        def factory(H: int, K: int, V: int, chunk_size: int) -> Memory:
            base = memory_cls(H, K, V, chunk_size)
            if aggregation is None:
                return base
            return CachedMemory(base, aggregation, dataclasses.replace(cfg.mc, **mc_overrides))

        plain = cfg.plain_linear
        return LinearMixer(cfg.d_model, cfg.num_heads, factory, head_k_dim=cfg.head_k_dim,
                           expand_v=cfg.expand_v, use_short_conv=cfg.use_short_conv and not plain,
                           conv_size=cfg.conv_size, use_output_gate=not plain, use_output_norm=not plain,
                           chunk_size=cfg.chunk_size, norm_eps=cfg.norm_eps)
    return build


def _attention(windowed: bool) -> MixerBuilder:
    def build(cfg: ModelConfig, layer_idx: int) -> TokenMixer:
        return Attention(cfg.d_model, cfg.num_heads, window=cfg.window if windowed else None,
                         rope_base=cfg.rope_base)
    return build


_LINEAR_MEMORIES: dict[str, tuple[type[Memory], str]] = {
    "la": (LinearAttentionMemory, "linear attention, S += k v^T"),
    "sgla": (ScalarGLAMemory, "scalar-decay gated linear attention (Mamba2-SSD style)"),
    "gla": (GLAMemory, "gated linear attention, per-key-dimension decay (GLA)"),
    "swla": (SWLAMemory, "sliding-window linear attention, c = 2 (MC paper)"),
    "deltanet": (DeltaNetMemory, "DeltaNet, delta rule"),
    "gdn": (GatedDeltaNetMemory, "Gated DeltaNet, gated delta rule"),
}
_AGG_DESCRIPTIONS = {"res": "Residual Memory", "grm": "Gated Residual Memory", "soup": "Memory Soup",
                     "ssc": "Sparse Selective Caching", "avg": "post-training average of cached reads"}
for _name, (_cls, _desc) in _LINEAR_MEMORIES.items():
    register_mixer(_name, _linear(_cls), _desc)
    for _agg in AGGREGATIONS:
        register_mixer(f"{_name}+{_agg}", _linear(_cls, _agg),
                       f"{_desc} + Memory Caching ({_AGG_DESCRIPTIONS[_agg]})", constant_memory=False)
register_mixer("loglinear++", _linear(GatedDeltaNetMemory, "grm", segmentation="log"),
               "Gated DeltaNet + GRM over logarithmic segments (Log-Linear++)", constant_memory=False)
register_mixer("attn", _attention(False), "causal softmax attention with RoPE (KV cache grows)",
               constant_memory=False)
register_mixer("swa", _attention(True), "sliding-window softmax attention with RoPE")

# Feature modules register their own names (kept in separate files so features stay independent).
import growmem.models.mixers_deep  # noqa: E402, F401
import growmem.models.mixers_mru  # noqa: E402, F401
