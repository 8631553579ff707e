"""Small shared test helpers."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / max(||b||, tiny): relative error of ``a`` against reference ``b``."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def require_native() -> None:
    """Fail unless the fused CPU kernels (growmem.ops._native) are built and enabled; skip only where
    this machine has no C++ compiler at all (the kernels are optional, the eager path then runs)."""
    import os
    import shutil

    import pytest

    from growmem.ops import _native

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")) and "CXX" not in os.environ:
        pytest.skip("no C++ compiler on this machine: the fused kernels cannot be built here")
    assert _native.native_available(), f"fused kernels failed to build: {_native._error}"


def use_backend(backend: str, monkeypatch) -> None:
    """``"native"``: require the fused CPU kernels (see :func:`require_native`); ``"eager"``: turn them
    off (``GROWMEM_NATIVE=0``) so the PyTorch path runs."""
    if backend == "eager":
        monkeypatch.setenv("GROWMEM_NATIVE", "0")
    elif backend == "native":
        require_native()
    else:
        raise ValueError(f"unknown backend {backend!r}")
