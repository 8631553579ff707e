"""Recurrent Memory Transformer (RMT; Bulatov, Kuratov, Burtsev, arXiv 2207.06881 and 2304.11062).

A growmem :class:`~growmem.models.lm.CausalLM` (the *backbone*: any registry mixer, the Transformer
``attn`` first) reads a long input ``[B, T]`` in segments of ``L = segment_len`` tokens. ``m`` memory
vectors are carried from one segment to the next (decoder variant, memory at the embedding level):

    n = ceil(T / L) segments x_0 .. x_{n-1} (the last one may be shorter: L_s = |x_s| <= L)
    M_0 = learned initial memory [m, D] (broadcast over the batch)
    input of segment s:   Z_s = [M_s ; E(x_s) ; M_s]                      [B, m + L_s + m, D]
                           (read slots, segment token embeddings, write slots)
    H_s = blocks(Z_s)          (final-layer residual stream)              [B, m + L_s + m, D]
    logits of x_s = RMSNorm_final(H_s[:, m : m + L_s]) W_head^T           [B, L_s, vocab]
    M_{s+1} = H_s[:, m + L_s :]                                           [B, m, D]

The same memory vectors fill the read and the write slots. The next memory is the final-layer hidden
state at the write slots *before* the final norm: the residual stream, the space the token embeddings
live in, so memories are ordinary embedding-level inputs; the initial memory is drawn at the embeddings'
scale (std ``memory_init_std``, default the backbone's ``init_std``). With pre-norm blocks every read
normalizes, so the norm of M grows at most additively over segments. (On a long-delay probe this choice
learned in far fewer steps, across seeds, than taking the memory after the final norm or starting it at
std 1.)

Positions and masks (per segment; every segment starts a fresh backbone pass, so positions restart):
    RoPE positions: read slots 0 .. m-1, segment tokens m .. m+L_s-1, write slots m+L_s .. 2m+L_s-1.
    Attention layers get a bidirectional prefix of ``m`` (``Attention(prefix_len=m)``): the read slots
    see each other (all m of them); segment token i sees every read slot and segment tokens <= i (never
    i+1); write slot j sees the read slots, the whole segment and write slots <= j (plain causal, since
    they come last). Other mixers (linear memories, RNNs, ...) read the m read slots in order (causally);
    nothing but the memory is carried across segments (each segment starts from an empty mixer state).
    Sliding-window attention applies its window inside the [read; segment; write] sequence.

Truncated backpropagation through time (``bptt_depth = k``): the memory given to segment s (s >= 1) is
detached when ``s < n - k``: only the last k memory transitions carry gradient, so the loss of the last
segment reaches the inputs of segment j iff ``j >= n - 1 - k`` and reaches M_0 iff ``n - 1 <= k``
(``None``: full BPTT; ``0``: no gradient through memory at all, so write slots never learn).

Loss: mean cross-entropy over all targets != -100 of the whole sequence (``targets[:, t]`` is what
position t predicts), exactly as :class:`CausalLM` computes it from the same logits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from growmem.layers.attention import Attention
from growmem.layers.base import Cache
from growmem.models.config import ModelConfig
from growmem.models.lm import IGNORE_INDEX, CausalLM, LMOutput

__all__ = ["RMTConfig", "RMTOutput", "RMTState", "RecurrentMemoryTransformer", "build_model", "lm_loss"]


def _int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"RMTConfig.{name} must be an int{' or null' if allow_none else ''}, got {value!r}")
    if value < minimum:
        raise ValueError(f"RMTConfig.{name} must be >= {minimum}, got {value}")


@dataclass
class RMTConfig:
    """Options of :class:`RecurrentMemoryTransformer` (``ModelConfig.rmt``).

    Args:
        num_mem_tokens: ``m >= 0`` memory vectors (0: segments are read independently, no recurrence).
        segment_len: ``L >= 1`` tokens per segment (the last segment of an input may be shorter).
        bptt_depth: ``k >= 0`` memory transitions that carry gradient, counted back from the last
            segment; ``None`` = full backpropagation through time.
        max_segments: refuse inputs (and generations) longer than ``max_segments * L`` tokens;
            ``None`` = no limit.
        memory_init_std: std of the learned initial memory ``M_0 ~ N(0, std^2)`` (> 0); ``None`` = the
            backbone's ``init_std`` (the token embeddings' scale).
    """

    num_mem_tokens: int = 4
    segment_len: int = 32
    bptt_depth: int | None = None
    max_segments: int | None = None
    memory_init_std: float | None = None

    def __post_init__(self) -> None:
        _int("num_mem_tokens", self.num_mem_tokens, 0)
        _int("segment_len", self.segment_len, 1)
        _int("bptt_depth", self.bptt_depth, 0, allow_none=True)
        _int("max_segments", self.max_segments, 1, allow_none=True)
        std = self.memory_init_std
        if std is not None:
            if isinstance(std, bool) or not isinstance(std, (int, float)) or not (0 < std < math.inf):
                raise ValueError(f"RMTConfig.memory_init_std must be null or a finite number > 0, got {std!r}")
            self.memory_init_std = float(std)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RMTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RMTConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class RMTOutput(LMOutput):
    """:class:`LMOutput` (``logits [B, T, vocab]``, ``loss``) plus ``memory [B, m, D]``: the memory
    written by the last segment (the input's memory for a continuation), and, when asked for
    (``forward(..., output_hidden_states=True)``), ``hidden_states``: the residual stream at the token
    positions (memory slots left out), ``[B, T, D]`` each: the token embeddings, then the output of
    every block (before the final norm)."""

    memory: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class RecurrentMemoryTransformer(nn.Module):
    """RMT around a growmem :class:`CausalLM` backbone (module docstring for the equations).

    ``forward(input_ids [B, T], targets=None, memory=None) -> RMTOutput`` for any ``T >= 1``;
    ``feed(input_ids, state) -> (logits, state)`` streams pieces across segments with the backbone's
    caches (``new_state(B)`` starts one); ``generate(...)`` decodes with it.

    Parameters: the backbone's (``backbone.*``) and ``memory`` ``[m, D]`` (absent when m = 0).
    """

    def __init__(self, backbone: CausalLM, rmt: RMTConfig | dict[str, Any]) -> None:
        super().__init__()
        if not isinstance(backbone, CausalLM):
            raise TypeError(f"the RMT backbone must be a growmem CausalLM, got {type(backbone).__name__}")
        if isinstance(rmt, dict):
            rmt = RMTConfig.from_dict(rmt)
        if not isinstance(rmt, RMTConfig):
            raise TypeError(f"rmt must be an RMTConfig or a dict, got {type(rmt).__name__}")
        self.backbone = backbone
        self.rmt = rmt
        self.config = dataclasses.replace(backbone.config, rmt=rmt)
        m, D = rmt.num_mem_tokens, backbone.config.d_model
        if m > 0:
            std = backbone.config.init_std if rmt.memory_init_std is None else rmt.memory_init_std
            self.memory = nn.Parameter(torch.randn(m, D) * std)
        else:
            self.register_parameter("memory", None)

    @classmethod
    def from_config(cls, config: ModelConfig) -> RecurrentMemoryTransformer:
        """RMT over ``CausalLM(config without rmt)`` with the options ``config.rmt``."""
        if config.rmt is None:
            raise ValueError("ModelConfig.rmt is not set")
        return cls(CausalLM(dataclasses.replace(config, rmt=None)), config.rmt)

    def extra_repr(self) -> str:
        r = self.rmt
        return (f"num_mem_tokens={r.num_mem_tokens}, segment_len={r.segment_len}, bptt_depth={r.bptt_depth}, "
                f"max_segments={r.max_segments}")

    # ------------------------------------------------------------------------------------------- helpers
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_ids(self, input_ids: torch.Tensor, name: str = "input_ids") -> None:
        self.backbone.check_ids(input_ids, name)

    def num_segments(self, T: int) -> int:
        """``ceil(T / segment_len)``."""
        return -(-T // self.rmt.segment_len)

    def _check_segments(self, T: int) -> int:
        n = self.num_segments(T)
        cap = self.rmt.max_segments
        if cap is not None and n > cap:
            raise ValueError(f"{T} tokens make {n} segments of {self.rmt.segment_len}, more than "
                             f"rmt.max_segments={cap}")
        return n

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        """The learned ``M_0`` broadcast to ``[B, m, D]`` (``[B, 0, D]`` when m = 0)."""
        emb = self.backbone.embed.weight
        if self.memory is None:
            return emb.new_zeros(batch_size, 0, emb.shape[1])
        return self.memory[None].expand(batch_size, -1, -1)

    def _check_memory(self, memory: torch.Tensor, B: int) -> torch.Tensor:
        want = (B, self.rmt.num_mem_tokens, self.backbone.config.d_model)
        if not isinstance(memory, torch.Tensor) or tuple(memory.shape) != want:
            got = tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
            raise ValueError(f"memory must be a tensor of shape {want}, got {got}")
        return memory

    def _blocks(self, x: torch.Tensor, caches: list[Cache | None] | None, use_cache: bool,
                hidden: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[Cache | None]]:
        """The backbone's residual blocks on ``x [B, T, D]`` (as ``Block.forward``), attention layers with
        the read slots as a bidirectional prefix. Returns the last residual stream (before the final norm).
        ``hidden``: if given, the input and every block's output are appended to it."""
        m = self.rmt.num_mem_tokens
        new: list[Cache | None] = []
        if hidden is not None:
            hidden.append(x)
        for i, layer in enumerate(self.backbone.layers):
            c = None if caches is None else caches[i]
            h = layer.norm1(x)
            if isinstance(layer.mixer, Attention):
                y, c = layer.mixer(h, cache=c, use_cache=use_cache, prefix_len=m)
            else:
                y, c = layer.mixer(h, cache=c, use_cache=use_cache)
            x = x + y
            x = x + layer.mlp(layer.norm2(x))
            new.append(c)
            if hidden is not None:
                hidden.append(x)
        return x, new

    def _segment(self, mem: torch.Tensor, xs: torch.Tensor,
                 hidden: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One segment: ``mem [B, m, D]``, token embeddings ``xs [B, L_s, D]`` -> (logits ``[B, L_s, V]``,
        next memory ``[B, m, D]``). ``hidden``: if given, the token positions' residual streams
        ``[B, L_s, D]`` (input, then each block's output) are appended to it."""
        m, Ls = mem.shape[1], xs.shape[1]
        full: list[torch.Tensor] | None = [] if hidden is not None else None
        h, _ = self._blocks(torch.cat((mem, xs, mem), dim=1), None, False, full)
        if hidden is not None and full is not None:
            hidden.extend(t[:, m: m + Ls] for t in full)
        tok, new_mem = torch.split(h, [m + Ls, m], dim=1)
        return self._logits(tok[:, m:]), new_mem

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, output_hidden_states: bool = False) -> RMTOutput:
        """Segment-wise forward over ``input_ids [B, T]`` (any T; the last segment may be shorter).

        Args:
            input_ids: token ids ``[B, T]``.
            targets: ``[B, T]`` aligned with the positions, -100 ignored (as :class:`CausalLM`).
            memory: ``[B, m, D]`` memory to start from (default: the learned initial memory).
            output_hidden_states: also return the token positions' residual streams (``n_layers + 1``
                tensors ``[B, T, D]``: the embeddings, then each block's output before the final norm).

        Returns:
            :class:`RMTOutput` with ``logits [B, T, vocab]``, ``loss`` (or None), ``memory [B, m, D]``,
            the memory written by the last segment, and ``hidden_states`` (or None).
        """
        self.check_ids(input_ids)
        B, T = input_ids.shape
        n = self._check_segments(T)
        mem = self.initial_memory(B) if memory is None else self._check_memory(memory, B)
        k = self.rmt.bptt_depth
        x = self.backbone.embed(input_ids.long())  # [B, T, D]
        logits = []
        per_segment: list[list[torch.Tensor]] = []
        for s, xs in enumerate(torch.split(x, self.rmt.segment_len, dim=1)):
            if s > 0 and k is not None and s < n - k:
                mem = mem.detach()  # truncated BPTT: this transition carries no gradient
            hidden: list[torch.Tensor] | None = [] if output_hidden_states else None
            out, mem = self._segment(mem, xs, hidden)
            logits.append(out)
            if hidden is not None:
                per_segment.append(hidden)
        all_logits = torch.cat(logits, dim=1) if len(logits) > 1 else logits[0]
        loss = None if targets is None else lm_loss(all_logits, targets, input_ids.shape, self.config.vocab_size)
        hidden_states = tuple(torch.cat(hs, dim=1) for hs in zip(*per_segment, strict=True)) \
            if output_hidden_states else None
        return RMTOutput(all_logits, loss, None, mem, hidden_states)

    # ------------------------------------------------------------------------------------------- streaming
    def new_state(self, batch_size: int, memory: torch.Tensor | None = None) -> RMTState:
        """A fresh stream: no token read yet, reading ``memory [B, m, D]`` (default: the initial memory)."""
        mem = self.initial_memory(batch_size) if memory is None else self._check_memory(memory, batch_size)
        return RMTState(mem, None, 0, 0)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: ``[B, t, D] -> [B, t, vocab]``."""
        return self.backbone.lm_head(self.backbone.norm(h))

    def feed(self, input_ids: torch.Tensor, state: RMTState | None = None) -> tuple[torch.Tensor, RMTState]:
        """Stream ``input_ids [B, t]`` (any t >= 1) into ``state`` -> (logits ``[B, t, vocab]``, new state).

        Within a segment the backbone's caches grow token by token: a segment opens with
        ``[read memory ; tokens]`` (read slots as the bidirectional prefix) and is extended by later
        pieces; when it holds ``L`` tokens and more arrive, the write slots are run on its caches
        (positions ``m + L ..``) to give the next memory, and a fresh segment opens. Feeding a sequence
        in any pieces equals :meth:`forward` on it (same memories, same logits up to rounding).
        Call under ``torch.no_grad()`` when decoding (the caches keep the graph otherwise).
        """
        self.check_ids(input_ids)
        B, t = input_ids.shape
        st = self.new_state(B) if state is None else state
        if not isinstance(st, RMTState) or st.memory.shape[0] != B:
            raise ValueError("state must be an RMTState of this batch size (from new_state or feed)")
        L, m = self.rmt.segment_len, self.rmt.num_mem_tokens
        mem, caches, filled, opened = st.memory, st.caches, st.filled, st.segments
        ids = input_ids.long()
        outs, pos = [], 0
        while pos < t:
            if caches is not None and filled == L:  # the segment is full: write, then open the next one
                if m > 0:
                    mem, _ = self._blocks(mem, caches, True)
                caches, filled = None, 0
            take = min(L - filled, t - pos)
            x = self.backbone.embed(ids[:, pos: pos + take])
            if caches is None:
                opened += 1
                if self.rmt.max_segments is not None and opened > self.rmt.max_segments:
                    raise ValueError(f"the stream needs more than rmt.max_segments={self.rmt.max_segments} "
                                     f"segments of {L}")
                h, caches = self._blocks(torch.cat((mem, x), dim=1), self.backbone.new_cache(B, 2 * m + L), True)
                h = h[:, m:]
            else:
                h, caches = self._blocks(x, caches, True)
            outs.append(self._logits(h))
            filled += take
            pos += take
        logits = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        return logits, RMTState(mem, caches, filled, opened)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 memory: torch.Tensor | None = None) -> torch.Tensor:
        """Continue ``input_ids [B, P]`` by ``max_new_tokens`` tokens -> ``[B, P + max_new_tokens]``.

        Prefills the prompt with :meth:`feed` (segment by segment, with the backbone's caches), then
        feeds each new token (a segment boundary runs the write slots and opens a fresh segment), so
        the result is the segment-wise :meth:`forward` of the generated sequence (greedy = its argmax).
        ``temperature == 0`` is greedy; otherwise sample ``softmax(logits / temperature)`` restricted to
        the ``top_k`` most likely tokens (as :meth:`CausalLM.generate`).
        """
        CausalLM.check_generate_args(max_new_tokens, temperature, top_k)
        self.check_ids(input_ids)
        self._check_segments(input_ids.shape[1] + max_new_tokens)
        ids = input_ids.long()
        logits, state = self.feed(ids, self.new_state(ids.shape[0], memory))
        seq = [ids]
        for i in range(max_new_tokens):
            nxt = CausalLM._pick(logits[:, -1], temperature, top_k, generator)
            seq.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                logits, state = self.feed(nxt[:, None], state)
        return torch.cat(seq, dim=1)


@dataclass
class RMTState:
    """A stream of :meth:`RecurrentMemoryTransformer.feed`: ``memory [B, m, D]`` read by the current
    segment, the backbone's per-layer ``caches`` of that segment (None before its first token), the
    number of tokens ``filled`` in it and the number of ``segments`` opened so far."""

    memory: torch.Tensor
    caches: list[Cache | None] | None
    filled: int
    segments: int


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, shape: torch.Size | tuple[int, ...],
            vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, T, V]`` against aligned ``targets [B, T]`` (-100 ignored), with
    :class:`CausalLM`'s checks."""
    if tuple(targets.shape) != tuple(shape):
        raise ValueError(f"targets must have the shape of input_ids {tuple(shape)}, got {tuple(targets.shape)}")
    t = targets.long()
    bad = (t != IGNORE_INDEX) & ((t < 0) | (t >= vocab_size))
    if bool(bad.any()):
        raise ValueError("targets must be in [0, vocab_size) or -100")
    if not bool((t != IGNORE_INDEX).any()):
        raise ValueError("targets are all -100: nothing to predict")
    lf = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return F.cross_entropy(lf.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=IGNORE_INDEX)


def build_model(config: ModelConfig) -> nn.Module:
    """The model a :class:`ModelConfig` describes: ``CausalLM(config)``, or an RMT around it when
    ``config.rmt`` is set (used by the trainer and the CLI)."""
    if getattr(config, "rmt", None) is None:
        return CausalLM(config)
    return RecurrentMemoryTransformer.from_config(config)
