"""Validated configuration of growmem's causal language model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from growmem.caching.config import MCConfig

if TYPE_CHECKING:
    from growmem.models.rmt import RMTConfig


@dataclass
class ModelConfig:
    """Configuration of :class:`growmem.models.lm.CausalLM`.

    ``mixer`` is one registry name for every layer, or a list of names cycled over the layers
    (a hybrid such as ``["gdn", "attn"]``). See :func:`growmem.models.registry.mixer_names`.
    Memory Caching mixers (``<memory>+<res|grm|soup|ssc|avg>``, ``loglinear++``) read ``mc``.
    ``plain_linear`` strips linear mixers to the MC paper's plain linear memory (no short conv, no
    output gate or norm; bias-free ``q/k/v/u/o_proj`` only).
    ``rmt`` (default None): wrap the LM in a Recurrent Memory Transformer with these options
    (:class:`growmem.models.rmt.RMTConfig`, or a dict of its fields); build with
    :func:`growmem.models.build_model`. ``to_dict`` leaves the key out when it is None.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    num_heads: int = 4
    mixer: str | list[str] = "gdn"
    head_k_dim: int | None = None
    expand_v: float = 1.0
    mlp_hidden: int | None = None  # default: 8/3 * d_model rounded up to a multiple of 8
    use_short_conv: bool = True
    conv_size: int = 4
    chunk_size: int = 64
    window: int = 64  # sliding-window attention width
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    plain_linear: bool = False
    mc: MCConfig = field(default_factory=MCConfig)
    rmt: RMTConfig | None = None

    def __post_init__(self) -> None:
        from growmem.models.registry import get_mixer_spec

        for name in ("vocab_size", "d_model", "n_layers", "num_heads", "conv_size", "chunk_size", "window"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {val!r}")
        if self.head_k_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads} "
                             "(or set head_k_dim)")
        if self.head_k_dim is not None and self.head_k_dim < 1:
            raise ValueError(f"head_k_dim must be >= 1, got {self.head_k_dim}")
        if self.expand_v <= 0:
            raise ValueError(f"expand_v must be > 0, got {self.expand_v}")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be >= 1, got {self.mlp_hidden}")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_base <= 1:
            raise ValueError("norm_eps and init_std must be > 0 and rope_base > 1")
        if isinstance(self.mc, dict):
            self.mc = MCConfig(**self.mc)
        if not isinstance(self.mc, MCConfig):
            raise ValueError(f"ModelConfig.mc must be an MCConfig, got {type(self.mc).__name__}")
        if self.rmt is not None:
            from growmem.models.rmt import RMTConfig

            if isinstance(self.rmt, dict):
                self.rmt = RMTConfig.from_dict(self.rmt)
            if not isinstance(self.rmt, RMTConfig):
                raise ValueError(f"ModelConfig.rmt must be null, an RMTConfig or a mapping of its fields, got "
                                 f"{type(self.rmt).__name__}")
        names = [self.mixer] if isinstance(self.mixer, str) else list(self.mixer)
        if not names:
            raise ValueError("mixer must be a name or a non-empty list of names")
        for n in names:
            get_mixer_spec(n)  # raises with the list of known names
        uses_attn = any(n in ("attn", "swa") for n in names)
        if uses_attn and (self.d_model // self.num_heads) % 2:
            raise ValueError("attention layers need an even head dim (RoPE)")

    @property
    def layer_mixers(self) -> list[str]:
        """The mixer name of each layer."""
        names = [self.mixer] if isinstance(self.mixer, str) else list(self.mixer)
        return [names[i % len(names)] for i in range(self.n_layers)]

    @property
    def mlp_hidden_size(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return -(-(8 * self.d_model // 3) // 8) * 8

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.rmt is None:
            del d["rmt"]  # configs (and checkpoints) without RMT keep their old form
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("mc"), dict):
            d["mc"] = MCConfig(**d["mc"])
        return cls(**d)
