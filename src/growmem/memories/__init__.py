"""Memories: adapters that give every recurrent rule one interface (see :mod:`growmem.memories.base`)."""

from growmem.memories.base import Memory
from growmem.memories.linear import (
    DeltaNetMemory,
    GatedDeltaNetMemory,
    GLAMemory,
    LinearAttentionMemory,
    ScalarGLAMemory,
    SWLAMemory,
)

__all__ = [
    "Memory",
    "LinearAttentionMemory",
    "GLAMemory",
    "ScalarGLAMemory",
    "SWLAMemory",
    "DeltaNetMemory",
    "GatedDeltaNetMemory",
]
