"""Memories: adapters that give every recurrent rule one interface (see :mod:`growmem.memories.base`)."""

from growmem.memories.base import Memory
from growmem.memories.deep import DLAMemory, TitansMemory
from growmem.memories.linear import (
    DeltaNetMemory,
    GatedDeltaNetMemory,
    GLAMemory,
    LinearAttentionMemory,
    ScalarGLAMemory,
    SWLAMemory,
)
from growmem.memories.mru import BMRUMemory

__all__ = [
    "DLAMemory",
    "TitansMemory",
    "BMRUMemory",
    "Memory",
    "LinearAttentionMemory",
    "GLAMemory",
    "ScalarGLAMemory",
    "SWLAMemory",
    "DeltaNetMemory",
    "GatedDeltaNetMemory",
]
