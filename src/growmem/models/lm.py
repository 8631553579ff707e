"""growmem's causal language model: embedding, pre-norm residual blocks (mixer + SwiGLU), final norm,
tied output head; every mixer chosen by registry name; ``generate()`` with each mixer's cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from growmem.layers.base import Cache
from growmem.layers.mlp import SwiGLU
from growmem.layers.norm import RMSNorm
from growmem.models.config import ModelConfig
from growmem.models.registry import build_mixer

IGNORE_INDEX = -100


@dataclass
class LMOutput:
    """logits ``[B, T, vocab]``; loss (mean cross-entropy over targets != -100) or None; cache or None."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    cache: list[Cache] | None = None


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then + SwiGLU(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.mixer_name = config.layer_mixers[layer_idx]
        self.norm1 = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = build_mixer(self.mixer_name, config, layer_idx)
        self.norm2 = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden_size)

    def forward(self, x: torch.Tensor, cache: Cache | None, use_cache: bool) -> tuple[torch.Tensor, Cache | None]:
        h, new_cache = self.mixer(self.norm1(x), cache=cache, use_cache=use_cache)
        x = x + h
        return x + self.mlp(self.norm2(x)), new_cache


class CausalLM(nn.Module):
    """A causal LM over token ids ``[B, T]`` -> logits ``[B, T, vocab]``.

    ``targets`` are aligned with the positions (``targets[:, t]`` is what position t should predict,
    e.g. ``input_ids[:, t + 1]``); entries equal to -100 are ignored.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_ids(self, input_ids: torch.Tensor, name: str = "input_ids") -> None:
        """Validate token ids ``[B, T]``: integer dtype, non-empty, within ``[0, vocab_size)``."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32,
                                                                               torch.int16, torch.uint8):
            raise TypeError(f"{name} must be an integer tensor [B, T]")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"{name} must be a non-empty [B, T] tensor, got shape {tuple(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"{name} out of range: found ids in [{lo}, {hi}], vocab_size is "
                             f"{self.config.vocab_size}")

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: list[Cache] | None = None, use_cache: bool = False) -> LMOutput:
        self.check_ids(input_ids)
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, model has {len(self.layers)}")
        x = self.embed(input_ids.long())
        new_cache: list[Any] = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, cache[i] if cache is not None else None, use_cache)
            new_cache.append(c)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            if targets.shape != input_ids.shape:
                raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(targets.shape)}")
            t = targets.long()
            bad = (t != IGNORE_INDEX) & ((t < 0) | (t >= self.config.vocab_size))
            if bool(bad.any()):
                raise ValueError("targets must be in [0, vocab_size) or -100")
            if not bool((t != IGNORE_INDEX).any()):
                raise ValueError("targets are all -100: nothing to predict")
            lf = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
            loss = F.cross_entropy(lf.reshape(-1, logits.shape[-1]), t.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return LMOutput(logits, loss, new_cache if use_cache else None)

    def new_cache(self, batch_size: int, total_length: int | None = None) -> list[Cache | None]:
        """Empty per-layer decoding caches for a stream of at most ``total_length`` tokens (the total
        length matters only to mixers whose plan depends on it, e.g. logarithmic Memory Caching)."""
        return [layer.mixer.new_cache(batch_size, total_length) if hasattr(layer.mixer, "new_cache") else None
                for layer in self.layers]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prefill ``input_ids [B, T]`` once, then decode ``max_new_tokens`` tokens one at a time
        with the mixers' caches. ``temperature == 0`` is greedy; otherwise sample from
        ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens.
        Returns ``[B, T + max_new_tokens]``."""
        self.check_generate_args(max_new_tokens, temperature, top_k)
        cache0 = self.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        out = self(input_ids, cache=cache0, use_cache=True)
        seq = [input_ids.long()]
        cache = out.cache
        logits = out.logits[:, -1]
        for i in range(max_new_tokens):
            nxt = self._pick(logits, temperature, top_k, generator)
            seq.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                out = self(nxt[:, None], cache=cache, use_cache=True)
                cache, logits = out.cache, out.logits[:, -1]
        return torch.cat(seq, dim=1)

    @staticmethod
    def check_generate_args(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
        """Refuse ``max_new_tokens < 0``, ``temperature < 0`` or ``top_k < 1`` with a clear error."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
