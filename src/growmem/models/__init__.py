"""Full models: config, registry, causal LM, Recurrent Memory Transformer (``build_model`` picks)."""

from growmem.models.config import ModelConfig
from growmem.models.lm import CausalLM, LMOutput
from growmem.models.registry import build_mixer, get_mixer_spec, mixer_names, register_mixer
from growmem.models.rmt import RecurrentMemoryTransformer, RMTConfig, RMTOutput, build_model

__all__ = ["ModelConfig", "CausalLM", "LMOutput", "build_mixer", "get_mixer_spec", "mixer_names",
           "register_mixer", "RecurrentMemoryTransformer", "RMTConfig", "RMTOutput", "build_model"]
