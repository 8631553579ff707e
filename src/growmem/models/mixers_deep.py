"""Registry entries of the deep mixers (imported at the end of models/registry.py)."""

from __future__ import annotations
