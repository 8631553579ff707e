"""Helpers shared by the benchmark scripts (run them from the repo root: ``python bench/<name>.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], reps: int) -> float:
    """Best wall time in seconds of ``reps`` calls of ``fn`` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def backward_with_random_grad(out) -> None:
    """``out.backward(grad)`` with a fixed random, contiguous ``grad`` of ``out``'s shape.

    Used instead of ``out.sum().backward()``, whose incoming gradient is an expanded (stride-0) tensor
    of ones: elementwise ops on it run several times slower than on the contiguous gradient a real
    model's next layer hands back, which inflates exactly the cheap elementwise steps we measure."""
    import torch

    key = (tuple(out.shape), out.dtype, out.device)
    grad = _GRADS.get(key)
    if grad is None:
        grad = _GRADS[key] = torch.randn(out.shape, generator=torch.Generator().manual_seed(0),
                                         dtype=out.dtype).to(out.device)
    out.backward(grad)


_GRADS: dict = {}
