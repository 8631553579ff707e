"""Token mixers (nn.Modules with projections) and their building blocks."""

from growmem.layers.attention import Attention
from growmem.layers.base import TokenMixer
from growmem.layers.conv import ShortConvolution
from growmem.layers.linear_mixer import LinearMixer
from growmem.layers.mlp import SwiGLU
from growmem.layers.mru import BMRUMixer, HybridMRUMixer, LRUMixer
from growmem.layers.norm import GatedRMSNorm, RMSNorm
from growmem.layers.rope import RotaryEmbedding

__all__ = ["Attention", "TokenMixer", "ShortConvolution", "LinearMixer", "SwiGLU", "GatedRMSNorm", "RMSNorm",
           "RotaryEmbedding", "BMRUMixer", "LRUMixer", "HybridMRUMixer"]
