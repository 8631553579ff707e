"""Hugging Face integration: ``GrowMemConfig``, ``GrowMemForCausalLM`` (any growmem model, Recurrent Memory
Transformers included; ``save_pretrained`` / ``from_pretrained`` in safetensors, ``generate`` with growmem's
caches), registration with the ``Auto*`` classes, conversion between trainer run folders and HF folders
(:mod:`growmem.hf.convert`) and an lm-evaluation-harness adapter (:mod:`growmem.hf.lm_eval_adapter`,
``--model growmem``).

Needs the ``hf`` extra (``pip install growmem[hf]``: transformers). The core package never imports this
module. Importing it registers the model type ``growmem`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM`` (``AutoModel`` gives the causal LM too: growmem has no headless model class).
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("growmem.hf needs transformers: pip install 'growmem[hf]' (transformers>=4.40)") from err

from growmem.hf.configuration import GrowMemConfig
from growmem.hf.modeling import GrowMemCache, GrowMemForCausalLM, GrowMemPreTrainedModel, GrowMemRMTCache

__all__ = ["GrowMemConfig", "GrowMemForCausalLM", "GrowMemPreTrainedModel", "GrowMemCache", "GrowMemRMTCache",
           "register", "run_to_hf", "hf_to_run"]


def register() -> None:
    """Register ``growmem`` with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register("growmem", GrowMemConfig, exist_ok=True)
    AutoModel.register(GrowMemConfig, GrowMemForCausalLM, exist_ok=True)
    AutoModelForCausalLM.register(GrowMemConfig, GrowMemForCausalLM, exist_ok=True)


register()


def __getattr__(name: str):  # lazy: conversion pulls in the trainer's checkpoint code
    if name in ("run_to_hf", "hf_to_run"):
        from growmem.hf import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'growmem.hf' has no attribute {name!r}")
