"""Registry entries of the memory recurrent units (imported at the end of models/registry.py).

=============  ================================================================================
name           mixer
=============  ================================================================================
bmru           :class:`~growmem.layers.mru.BMRUMixer`: N bistable channels (persistent memory)
lru            :class:`~growmem.layers.mru.LRUMixer`: N complex LRU channels (transient memory)
bmru+lru       :class:`~growmem.layers.mru.HybridMRUMixer`: N/2 BMRU + N/2 LRU channels
bmru-mem       LinearMixer around :class:`~growmem.memories.mru.BMRUMemory` (the base of bmru+<agg>)
bmru+<agg>     the same with Memory Caching, agg in res, grm, soup, ssc, avg (options: ``cfg.mc``)
=============  ================================================================================

Sizes come from existing ModelConfig fields: N = num_heads * head_v_dim with head_v_dim =
(head_k_dim or d_model // num_heads) * expand_v (the total value width of a linear mixer, = d_model by
default). BMRUMemory needs K = V, so the memory mixers use head dim K = V = head_v_dim. Everything else
uses the defaults of the classes (BMRU: surrogate "ste", tau 0.1, theta_range (0.5, 2), learned h_0;
LRU: r in [0.9, 0.999], max_phase 2 pi; hybrid split 1/2).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from growmem.caching import AGGREGATIONS, CachedMemory
from growmem.layers.base import TokenMixer
from growmem.layers.linear_mixer import LinearMixer
from growmem.layers.mru import BMRUMixer, HybridMRUMixer, LRUMixer
from growmem.memories.base import Memory
from growmem.memories.mru import BMRUMemory
from growmem.models.registry import MixerBuilder, register_mixer

if TYPE_CHECKING:
    from growmem.models.config import ModelConfig


def _head_dim(cfg: ModelConfig) -> int:
    return int((cfg.head_k_dim or cfg.d_model // cfg.num_heads) * cfg.expand_v)


def _state_size(cfg: ModelConfig) -> int:
    return cfg.num_heads * _head_dim(cfg)


def _bmru(cfg: ModelConfig, layer_idx: int) -> TokenMixer:
    return BMRUMixer(cfg.d_model, _state_size(cfg))


def _lru(cfg: ModelConfig, layer_idx: int) -> TokenMixer:
    return LRUMixer(cfg.d_model, _state_size(cfg))


def _hybrid(cfg: ModelConfig, layer_idx: int) -> TokenMixer:
    return HybridMRUMixer(cfg.d_model, _state_size(cfg))


def _bmru_memory(aggregation: str | None) -> MixerBuilder:
    def build(cfg: ModelConfig, layer_idx: int) -> TokenMixer:
        def factory(H: int, K: int, V: int, chunk_size: int) -> Memory:
            base = BMRUMemory(H, K, V, chunk_size)
            return base if aggregation is None else CachedMemory(base, aggregation, dataclasses.replace(cfg.mc))

        plain = cfg.plain_linear
        return LinearMixer(cfg.d_model, cfg.num_heads, factory, head_k_dim=_head_dim(cfg), expand_v=1.0,
                           use_short_conv=cfg.use_short_conv and not plain, conv_size=cfg.conv_size,
                           use_output_gate=not plain, use_output_norm=not plain, chunk_size=cfg.chunk_size,
                           norm_eps=cfg.norm_eps)
    return build


_AGG = {"res": "Residual Memory", "grm": "Gated Residual Memory", "soup": "Memory Soup",
        "ssc": "Sparse Selective Caching", "avg": "post-training average of cached reads"}

register_mixer("bmru", _bmru, "bistable memory recurrent unit (persistent memory; reconstruction of arXiv 2601.09495)")
register_mixer("lru", _lru, "linear recurrent unit (Orvieto et al. 2023), complex diagonal, parallel scan")
register_mixer("bmru+lru", _hybrid, "hybrid: BMRU and LRU channels side by side (persistent + transient memory)")
register_mixer("bmru-mem", _bmru_memory(None), "BMRU latch memory (k opens, v sets, q reads) in the linear-mixer "
               "layer: the base of bmru+<agg>")
for _agg in AGGREGATIONS:
    register_mixer(f"bmru+{_agg}", _bmru_memory(_agg), f"BMRU latch memory + Memory Caching ({_AGG[_agg]})",
                   constant_memory=False)


# ---- classic gated RNN baselines (torch's GRU / LSTM), for comparisons with the MRUs ----------------
def _rnn(kind: str):
    from growmem.layers.rnn import RNNMixer

    def build(cfg, layer_idx):
        return RNNMixer(cfg.d_model, kind)
    return build


register_mixer("gru", _rnn("gru"), "torch GRU baseline (hidden = d_model)")
register_mixer("lstm", _rnn("lstm"), "torch LSTM baseline (hidden = d_model)")
