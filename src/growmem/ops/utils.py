"""Shared helpers of the ops: input validation, padding, scale defaults.

Every op in :mod:`growmem.ops` validates its inputs with these helpers so that bad input gives a
clear ``ValueError``/``TypeError`` instead of a silently wrong answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, x: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``x`` is a floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or Inf (skipped while tracing/compiling).

    Fast path: a finite ``x.sum()`` proves every entry finite (one NaN/Inf entry makes the sum
    NaN/Inf), at the cost of one read of ``x`` and no temporaries. Only when the sum is not finite
    (a non-finite entry, or finite entries whose sum overflows) does the exact elementwise check
    decide.
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return
    if torch.isfinite(x.sum()):
        return
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate sequence inputs ``q, k: [B, T, H, K]`` and ``v: [B, T, H, V]``.

    Returns ``(B, T, H, K, V)``. Raises on wrong rank, mismatched shapes, dtypes or devices,
    empty sequences, non-float dtypes and non-finite values.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, T, H, D], got {tuple(x.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape [B, T, H, V] matching q's [B, T, H], got {tuple(v.shape)} "
                         f"for q {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if B == 0 or T == 0 or H == 0 or K == 0 or V == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, v {tuple(v.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_finite(name, x)
    return B, T, H, K, V


def check_qkv_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, who: str) -> tuple[int, int, int, int]:
    """Validate one decoding token ``q, k: [B, H, K]``, ``v: [B, H, V]`` (same rules as :func:`check_qkv`).

    Returns ``(B, H, K, V)``; ``who`` names the caller in the error messages.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
        if x.dim() != 3:
            raise ValueError(f"{who}: {name} must have shape [B, H, D] (one token), got {tuple(x.shape)}")
    B, _, H, K, V = check_qkv(q[:, None], k[:, None], v[:, None])
    return B, H, K, V


def check_gate(name: str, g: torch.Tensor, B: int, T: int, H: int, K: int | None = None,
               ref: torch.Tensor | None = None, allow_per_key: bool = False) -> bool:
    """Validate a per-token gate ``[B, T, H]`` (or ``[B, T, H, K]`` if ``allow_per_key``).

    Returns ``True`` if the gate is per key dimension. ``ref`` supplies dtype/device to match.
    """
    check_float(name, g)
    per_key = False
    if g.shape == (B, T, H):
        per_key = False
    elif allow_per_key and K is not None and g.shape == (B, T, H, K):
        per_key = True
    else:
        want = "[B, T, H]" + (" or [B, T, H, K]" if allow_per_key else "")
        raise ValueError(f"{name} must have shape {want} = {(B, T, H)}"
                         f"{' / ' + str((B, T, H, K)) if allow_per_key else ''}, got {tuple(g.shape)}")
    if ref is not None and g.device != ref.device:
        raise ValueError(f"{name} must be on the same device as q")
    check_finite(name, g)
    return per_key


def check_state(initial_state: torch.Tensor | None, B: int, H: int, K: int, V: int,
                ref: torch.Tensor) -> None:
    """Validate an initial matrix state ``[B, H, K, V]``."""
    if initial_state is None:
        return
    check_float("initial_state", initial_state)
    if initial_state.shape != (B, H, K, V):
        raise ValueError(f"initial_state must have shape [B, H, K, V] = {(B, H, K, V)}, "
                         f"got {tuple(initial_state.shape)}")
    if initial_state.device != ref.device:
        raise ValueError("initial_state must be on the same device as q")
    check_finite("initial_state", initial_state)


def check_chunk_size(chunk_size: int) -> None:
    """Raise unless ``chunk_size`` is a positive int."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def default_scale(scale: float | None, K: int) -> float:
    """``scale`` or ``K ** -0.5`` when ``None``."""
    if scale is None:
        return K ** -0.5
    if not isinstance(scale, (int, float)) or scale != scale:
        raise ValueError(f"scale must be a real number, got {scale!r}")
    return float(scale)


def pad_time(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 1 (time) of ``x`` up to a multiple of ``multiple``."""
    T = x.shape[1]
    pad = (-T) % multiple
    if pad == 0:
        return x
    # F.pad pads from the last dim backwards: (last_lo, last_hi, ..., dim1_lo, dim1_hi)
    spec = [0, 0] * (x.dim() - 2) + [0, pad]
    return F.pad(x, spec)
