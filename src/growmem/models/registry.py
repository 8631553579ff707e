"""The one registry of token-mixer names, used by configs, the CLI and the tests alike.

A name is ``<memory>`` (``la``, ``sgla``, ``gla``, ``swla``, ``deltanet``, ``gdn``) or an attention
baseline (``attn``, ``swa``). Later features register more names with :func:`register_mixer`
(e.g. Memory Caching's ``<memory>+<aggregation>``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

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


def _linear(memory_cls: type[Memory]) -> MixerBuilder:
    def build(cfg: ModelConfig, layer_idx: int) -> TokenMixer:
        return LinearMixer(cfg.d_model, cfg.num_heads, memory_cls, head_k_dim=cfg.head_k_dim,
                           expand_v=cfg.expand_v, use_short_conv=cfg.use_short_conv, conv_size=cfg.conv_size,
                           chunk_size=cfg.chunk_size, norm_eps=cfg.norm_eps)
    return build


def _attention(windowed: bool) -> MixerBuilder:
    def build(cfg: ModelConfig, layer_idx: int) -> TokenMixer:
        return Attention(cfg.d_model, cfg.num_heads, window=cfg.window if windowed else None,
                         rope_base=cfg.rope_base)
    return build


register_mixer("la", _linear(LinearAttentionMemory), "linear attention, S += k v^T")
register_mixer("sgla", _linear(ScalarGLAMemory), "scalar-decay gated linear attention (Mamba2-SSD style)")
register_mixer("gla", _linear(GLAMemory), "gated linear attention, per-key-dimension decay (GLA)")
register_mixer("swla", _linear(SWLAMemory), "sliding-window linear attention, c = 2 (MC paper)")
register_mixer("deltanet", _linear(DeltaNetMemory), "DeltaNet, delta rule")
register_mixer("gdn", _linear(GatedDeltaNetMemory), "Gated DeltaNet, gated delta rule")
register_mixer("attn", _attention(False), "causal softmax attention with RoPE (KV cache grows)",
               constant_memory=False)
register_mixer("swa", _attention(True), "sliding-window softmax attention with RoPE")
