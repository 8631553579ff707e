"""Full models: config, registry, causal LM."""

from growmem.models.config import ModelConfig
from growmem.models.lm import CausalLM, LMOutput
from growmem.models.registry import build_mixer, get_mixer_spec, mixer_names, register_mixer

__all__ = ["ModelConfig", "CausalLM", "LMOutput", "build_mixer", "get_mixer_spec", "mixer_names",
           "register_mixer"]
