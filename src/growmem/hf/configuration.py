"""``GrowMemConfig``: a Hugging Face config holding one growmem :class:`~growmem.models.ModelConfig`.

``config.json`` stores the whole ModelConfig (``mc`` included) under the key ``growmem``; the HF-standard
names (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
``tie_word_embeddings``) are read-only views of it, so the file has one source of truth.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from growmem.models.config import ModelConfig

_VIEWS = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
          "num_attention_heads": "num_heads"}


def _view(name: str) -> property:
    key = _VIEWS[name]

    def get(self: GrowMemConfig) -> Any:
        return self.growmem[key]

    def set_(self: GrowMemConfig, value: Any) -> None:
        if value != self.growmem[key]:
            raise AttributeError(f"GrowMemConfig.{name} is read-only (it is growmem[{key!r}] = "
                                 f"{self.growmem[key]!r}); change the growmem dict instead")

    return property(get, set_, doc=f"``growmem[{key!r}]`` (read-only).")


class GrowMemConfig(PretrainedConfig):
    """Hugging Face configuration of a growmem causal LM.

    Args:
        growmem: a :class:`ModelConfig` or its ``to_dict()`` (validated here: an unknown field, an unknown
            mixer name or an invalid value raises ``ValueError``). Default: ``ModelConfig()``.
        growmem_experiment: optional provenance written by :func:`growmem.hf.convert.run_to_hf`: the
            trainer's experiment config (``name``, ``task``, ``train``, ``out_dir``; the model part lives in
            ``growmem``) and the checkpoint ``step``; :func:`~growmem.hf.convert.hf_to_run` restores them.
        kwargs: the usual :class:`PretrainedConfig` arguments.
    """

    model_type = "growmem"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, growmem: ModelConfig | dict[str, Any] | None = None,
                 growmem_experiment: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if growmem is None:
            mc = ModelConfig()
        elif isinstance(growmem, ModelConfig):
            mc = ModelConfig.from_dict(growmem.to_dict())
        elif isinstance(growmem, dict):
            try:
                mc = ModelConfig.from_dict(growmem)
            except TypeError as err:  # a bad value type deep inside the dataclasses
                raise ValueError(f"invalid growmem model config: {err}") from None
        else:
            raise TypeError(f"growmem must be a ModelConfig or a dict, got {type(growmem).__name__}")
        self.growmem = _jsonable(mc.to_dict())
        self.growmem_experiment = growmem_experiment
        tie = kwargs.pop("tie_word_embeddings", mc.tie_embeddings)
        if bool(tie) != mc.tie_embeddings:
            raise ValueError(f"tie_word_embeddings={tie!r} contradicts growmem['tie_embeddings']="
                             f"{mc.tie_embeddings!r}")
        for name in _VIEWS:  # written by other tools; must agree with the growmem dict
            if name in kwargs:
                val = kwargs.pop(name)
                if val != self.growmem[_VIEWS[name]]:
                    raise ValueError(f"config field {name}={val!r} contradicts growmem[{_VIEWS[name]!r}]="
                                     f"{self.growmem[_VIEWS[name]]!r}")
        kwargs["tie_word_embeddings"] = mc.tie_embeddings  # older transformers set it in __init__
        kwargs.setdefault("use_cache", True)
        super().__init__(**kwargs)

    vocab_size = _view("vocab_size")
    hidden_size = _view("hidden_size")
    num_hidden_layers = _view("num_hidden_layers")
    num_attention_heads = _view("num_attention_heads")

    @property
    def tie_word_embeddings(self) -> bool:
        """``growmem['tie_embeddings']`` (read-only)."""
        return bool(self.growmem["tie_embeddings"])

    @tie_word_embeddings.setter
    def tie_word_embeddings(self, value: bool) -> None:
        if bool(value) != self.tie_word_embeddings:
            raise AttributeError("GrowMemConfig.tie_word_embeddings is read-only (it is growmem['tie_embeddings'])")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        try:
            return super().from_dict(config_dict, **kwargs)
        except (ValueError, TypeError) as err:
            raise ValueError(f"invalid growmem config: {err}") from None

    def to_model_config(self) -> ModelConfig:
        """The growmem :class:`ModelConfig` (a fresh, validated copy)."""
        return ModelConfig.from_dict(self.growmem)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> GrowMemConfig:
        return cls(growmem=config, **kwargs)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
