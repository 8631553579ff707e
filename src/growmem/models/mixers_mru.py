"""Registry entries of the mru mixers (imported at the end of models/registry.py)."""

from __future__ import annotations
