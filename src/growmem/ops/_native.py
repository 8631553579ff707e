"""Optional fused CPU kernels, compiled on first use (a C++ compiler is needed; none is required).

Today: the forward and backward of the chunked (gated) delta rule (``_kernels/delta_rule.cpp``, used by
:func:`growmem.ops.delta_rule.chunk_delta_rule` / ``chunk_gated_delta_rule`` and so by every DeltaNet /
Gated DeltaNet layer, Memory Caching wrapper and model on CPU; with ``beta = None`` the same kernel
runs linear attention and scalar-decay GLA for :func:`growmem.ops.gla.chunk_gla`), and Memory Caching's reads of cached
matrix states: SSC's selected reads (``_kernels/selected_read.cpp``) and GRM / Soup's gated reads
(``_kernels/gated_read.cpp``), and its pooled keys with the online memory's score
(``_kernels/pool_scores.cpp``), used by :class:`growmem.caching.CachedMemory`.

The kernels in ``growmem/ops/_kernels/*.cpp`` are plain C++ with a C interface: no torch headers, so
a build takes a few seconds, not the minute of a ``torch.utils.cpp_extension`` build. Their matrix
products call the BLAS inside the torch library (``sgemm_`` / ``dgemm_`` of the MKL that x86 builds
of torch carry), so the shared object is linked against ``libtorch_cpu``. It is built once per
source version, torch version and CPU model into ``$GROWMEM_KERNEL_CACHE`` (default
``~/.cache/growmem/kernels``; a folder in the system's temporary folder if that one is not
writable), written under a temporary name and renamed into place (concurrent processes never load a
half-written file), and loaded with :mod:`ctypes` (foreign calls release the GIL; the kernel runs its
own worker threads, ``torch.get_num_threads()`` of them).

If anything fails (no compiler, a torch build without those BLAS symbols, a non-CPU tensor), the
callers use their eager PyTorch path, which computes the same function; :func:`native_available`
says which one runs, and ``GROWMEM_NATIVE=0`` turns the kernels off (``GROWMEM_NATIVE=1`` makes a
failed build an error instead of a silent fallback). Tests compare both paths with the per-token
reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = [
    "NativeBuildError",
    "delta_rule_backward",
    "delta_rule_forward",
    "gated_read_backward",
    "gated_read_forward",
    "native_available",
    "native_enabled",
    "pool_scores_applies",
    "pool_scores_backward",
    "pool_scores_forward",
    "selected_read_applies",
    "selected_read_backward",
    "selected_read_forward",
]

_SOURCES = sorted((Path(__file__).with_name("_kernels")).glob("*.cpp"))
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


class NativeBuildError(RuntimeError):
    """The fused kernels could not be built or loaded (only raised with ``GROWMEM_NATIVE=1``)."""


def native_enabled() -> bool:
    """Whether the kernels may be used at all (``GROWMEM_NATIVE`` is not ``0``)."""
    return os.environ.get("GROWMEM_NATIVE", "auto").strip().lower() not in ("0", "off", "false", "no")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("GROWMEM_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "growmem" / "kernels"


def _build() -> ctypes.CDLL:
    src = b"\0".join(p.read_bytes() for p in sorted(_SOURCES[0].parent.glob("*.[ch]*")))  # sources + headers
    torch_lib = Path(torch.__file__).parent / "lib"
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        raise NativeBuildError("no C++ compiler found (set CXX, or install g++)")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno"]
    key = hashlib.sha256(b"\0".join([src, torch.__version__.encode(), _cpu_model().encode(), compiler.encode(),
                                     " ".join(flags).encode()])).hexdigest()[:16]
    fallback = Path(tempfile.gettempdir()) / f"growmem-kernels-{getattr(os, 'getuid', lambda: 0)()}"
    for folder in (_cache_dir(), fallback):
        out = folder / f"growmem_kernels-{key}.so"
        if out.exists():
            break
        try:  # an unwritable cache folder (read-only home): build in the temporary folder instead
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        except OSError:
            continue
        os.close(fd)
        # -L/-rpath torch's lib folder: BLAS from libtorch_cpu and torch's own libgomp (one OpenMP runtime)
        cmd = [compiler, *flags, *map(str, _SOURCES), "-o", tmp,
               f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise NativeBuildError(f"compiling the kernels failed:\n{res.stderr[-2000:]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        break
    else:
        raise NativeBuildError(f"no writable folder for the compiled kernel ({_cache_dir()} or {fallback})")
    lib = ctypes.CDLL(str(out))
    i64, dbl, ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    for sfx in ("f32", "f64"):
        fwd, bwd = getattr(lib, f"growmem_delta_rule_fwd_{sfx}"), getattr(lib, f"growmem_delta_rule_bwd_{sfx}")
        fwd.restype = bwd.restype = ctypes.c_int
        fwd.argtypes = [ptr] * 7 + [i64] * 6 + [dbl, dbl, ctypes.c_int]
        bwd.argtypes = [ptr] * 14 + [i64] * 6 + [dbl, dbl, ctypes.c_int]
        fwd, bwd = getattr(lib, f"growmem_selected_read_fwd_{sfx}"), getattr(lib, f"growmem_selected_read_bwd_{sfx}")
        fwd.restype = bwd.restype = ctypes.c_int
        fwd.argtypes = [ptr] * 5 + [i64] * 7 + [dbl, ctypes.c_int]
        bwd.argtypes = [ptr] * 8 + [i64] * 7 + [dbl, ctypes.c_int]
        fwd, bwd = getattr(lib, f"growmem_gated_read_fwd_{sfx}"), getattr(lib, f"growmem_gated_read_bwd_{sfx}")
        fwd.restype = bwd.restype = ctypes.c_int
        fwd.argtypes = [ptr] * 6 + [i64] * 7 + [dbl, ctypes.c_int]
        bwd.argtypes = [ptr] * 9 + [i64] * 7 + [dbl, ctypes.c_int]
        fwd, bwd = getattr(lib, f"growmem_pool_scores_fwd_{sfx}"), getattr(lib, f"growmem_pool_scores_bwd_{sfx}")
        fwd.restype = bwd.restype = ctypes.c_int
        fwd.argtypes = [ptr] * 8 + [i64] * 7 + [ctypes.c_int, ctypes.c_int]
        bwd.argtypes = [ptr] * 11 + [i64] * 7 + [ctypes.c_int, ctypes.c_int]
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build()
            except (NativeBuildError, OSError, subprocess.SubprocessError, AttributeError) as e:
                _error = f"{type(e).__name__}: {e}"
                if os.environ.get("GROWMEM_NATIVE", "").strip() == "1":
                    raise NativeBuildError(_error) from e
                warnings.warn(f"growmem: fused CPU kernels unavailable, using the eager path ({_error})",
                              RuntimeWarning, stacklevel=3)
    return _lib


def native_available() -> bool:
    """Whether the fused CPU kernels are enabled and built (builds them on the first call)."""
    return native_enabled() and _load() is not None


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _applies(tensors: tuple[torch.Tensor, ...], outs: tuple[torch.Tensor, ...]) -> ctypes.CDLL | None:
    """The loaded library if the kernels cover these inputs (one float32/float64 dtype, CPU, outputs
    contiguous), else ``None``."""
    dt, dev = tensors[0].dtype, tensors[0].device
    if dt not in (torch.float32, torch.float64) or dev.type != "cpu" or not native_enabled():
        return None
    if any(x.dtype != dt or x.device != dev for x in (*tensors, *outs)) or not all(x.is_contiguous() for x in outs):
        return None
    return _load()


def delta_rule_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                       beta: torch.Tensor | None, states: torch.Tensor, o: torch.Tensor, scale: float, C: int,
                       limit: float) -> bool:
    """Run the fused chunked (gated) delta-rule forward if it applies; return whether it ran.

    ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, ``g`` (or ``None``), ``beta: [B, T, H]`` (or ``None``:
    linear attention / scalar-decay GLA, ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``), CPU tensors of one
    dtype (float32 or float64; made contiguous here); ``states: [NC + 1, B * H, K, V]`` with
    ``states[0]`` set, and ``o: [B, T, H, V]``, both written. ``limit``: the largest chunk log decay for
    which the decay matrix may be factored (:func:`growmem.ops.gla._factor_limit`). Returns ``False``
    without touching anything when the kernel does not apply (other dtype or device, disabled, not built).
    """
    lib = _applies(tuple(x for x in (q, k, v, g, beta) if x is not None), (states, o))
    if lib is None:
        return False
    q, k, v = (x.contiguous() for x in (q, k, v))
    g, beta = (None if x is None else x.contiguous() for x in (g, beta))
    B, T, H, K = q.shape
    V = v.shape[-1]
    fn = lib.growmem_delta_rule_fwd_f32 if q.dtype == torch.float32 else lib.growmem_delta_rule_fwd_f64
    rc = fn(_ptr(q), _ptr(k), _ptr(v), _ptr(g), _ptr(beta), _ptr(states), _ptr(o), B, T, H, K, V, C,
            float(scale), float(limit), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"growmem delta-rule kernel failed (code {rc})")
    return True


def delta_rule_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                        beta: torch.Tensor | None, states: torch.Tensor, do: torch.Tensor, dstates: torch.Tensor | None,
                        scale: float, C: int, limit: float) -> tuple[torch.Tensor, ...] | None:
    """The fused backward of :func:`delta_rule_forward`, or ``None`` where it does not apply.

    ``states``: the forward's ``[NC + 1, B * H, K, V]`` chunk states; ``do: [B, T, H, V]`` and ``dstates``
    (same shape as ``states``, or ``None``) the incoming grads. Returns ``(dq, dk, dv, dg, dbeta, ds0)``
    with ``dg = None`` without gate, ``dbeta = None`` without beta, and ``ds0: [B * H, K, V]`` the grad of
    ``states[0]``. Per chunk, in
    reverse, the block quantities are recomputed from the inputs and the saved state and the adjoint
    recurrence of ``_DeltaRuleFunction.backward`` runs (the triangular systems by substitution).
    """
    lib = _applies(tuple(x for x in (q, k, v, g, beta, states, do, dstates) if x is not None), ())
    if lib is None:
        return None
    q, k, v, states, do = (x.contiguous() for x in (q, k, v, states, do))
    g, beta, dstates = (None if x is None else x.contiguous() for x in (g, beta, dstates))
    B, T, H, K = q.shape
    V = v.shape[-1]
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    dg, dbeta = (None if x is None else torch.empty_like(x) for x in (g, beta))
    ds0 = states.new_empty(B * H, K, V)
    fn = lib.growmem_delta_rule_bwd_f32 if q.dtype == torch.float32 else lib.growmem_delta_rule_bwd_f64
    rc = fn(_ptr(q), _ptr(k), _ptr(v), _ptr(g), _ptr(beta), _ptr(states), _ptr(do), _ptr(dstates), _ptr(dq),
            _ptr(dk), _ptr(dv), _ptr(dg), _ptr(dbeta), _ptr(ds0), B, T, H, K, V, C, float(scale), float(limit),
            torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"growmem delta-rule kernel failed (code {rc})")
    return dq, dk, dv, dg, dbeta, ds0


def selected_read_applies(cached: torch.Tensor, q: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`selected_read_forward` (or :func:`gated_read_forward`, with ``w`` the weights)
    covers these inputs (and the kernels are built)."""
    return _applies((cached, q, w), ()) is not None


def selected_read_forward(cached: torch.Tensor, q: torch.Tensor, w: torch.Tensor, sel: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """SSC's reads ``r[b, t, h] = sum_j w[b, t, h, j] S_{sel[b, t, h, j]}[b, h]^T (scale q[b, t, h])``.

    ``cached [B, N, H, K, V]``, ``q [B, T, H, K]``, ``w [B, T, H, k]``, ``sel [B, T, H, k]`` (memory ids,
    -1 for an unused slot) -> ``r [B, T, H, V]``. Only call where :func:`selected_read_applies`.
    """
    lib = _load()
    cached, q, w = cached.contiguous(), q.contiguous(), w.contiguous()
    sel = sel.to(torch.int64).contiguous()
    B, N, H, K, V = cached.shape
    T, k = q.shape[1], w.shape[-1]
    r = q.new_empty(B, T, H, V)
    fn = lib.growmem_selected_read_fwd_f32 if q.dtype == torch.float32 else lib.growmem_selected_read_fwd_f64
    if fn(_ptr(cached), _ptr(q), _ptr(w), _ptr(sel), _ptr(r), B, N, T, H, K, V, k, float(scale),
          torch.get_num_threads()) != 0:
        raise RuntimeError("growmem selected-read kernel failed")
    return r


def selected_read_backward(cached: torch.Tensor, q: torch.Tensor, w: torch.Tensor, sel: torch.Tensor,
                           dr: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads ``(d cached, dq, dw)`` of :func:`selected_read_forward` for the output grad ``dr``."""
    lib = _load()
    cached, q, w, dr = cached.contiguous(), q.contiguous(), w.contiguous(), dr.contiguous()
    sel = sel.to(torch.int64).contiguous()
    B, N, H, K, V = cached.shape
    T, k = q.shape[1], w.shape[-1]
    dS, dq, dw = torch.empty_like(cached), torch.empty_like(q), torch.empty_like(w)
    fn = lib.growmem_selected_read_bwd_f32 if q.dtype == torch.float32 else lib.growmem_selected_read_bwd_f64
    if fn(_ptr(cached), _ptr(q), _ptr(w), _ptr(sel), _ptr(dr), _ptr(dS), _ptr(dq), _ptr(dw), B, N, T, H, K, V, k,
          float(scale), torch.get_num_threads()) != 0:
        raise RuntimeError("growmem selected-read kernel failed")
    return dS, dq, dw


def _pieces(sizes: list[int], counts: list[int], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    if len(sizes) != len(counts) or sum(sizes) != T or min(sizes, default=1) < 0 or min(counts, default=0) < 0:
        raise ValueError(f"pieces {sizes} / {counts} do not cover a window of {T} tokens")
    return torch.tensor(sizes, dtype=torch.int64), torch.tensor(counts, dtype=torch.int64)


def gated_read_forward(cached: torch.Tensor, q: torch.Tensor, g: torch.Tensor, sizes: list[int], counts: list[int],
                       scale: float) -> torch.Tensor:
    """GRM / Soup's gated reads ``r[b, t, h] = sum_{i < n_p} g[b, t, h, i] S_i[b, h]^T (scale q[b, t, h])``.

    ``cached [B, N, H, K, V]``, ``q [B, T, H, K]``, ``g [B, T, H, N]``; the window's pieces as ``sizes``
    (tokens, summing to T) and ``counts`` (``n_p``, the cached states piece p sees) -> ``r [B, T, H, V]``.
    Only call where :func:`selected_read_applies` (``cached, q, g``).
    """
    lib = _load()
    cached, q, g = cached.contiguous(), q.contiguous(), g.contiguous()
    B, N, H, K, V = cached.shape
    T = q.shape[1]
    sz, ct = _pieces(sizes, counts, T)
    r = q.new_empty(B, T, H, V)
    fn = lib.growmem_gated_read_fwd_f32 if q.dtype == torch.float32 else lib.growmem_gated_read_fwd_f64
    if fn(_ptr(cached), _ptr(q), _ptr(g), _ptr(sz), _ptr(ct), _ptr(r), B, N, T, H, K, V, len(sizes), float(scale),
          torch.get_num_threads()) != 0:
        raise RuntimeError("growmem gated-read kernel failed")
    return r


def gated_read_backward(cached: torch.Tensor, q: torch.Tensor, g: torch.Tensor, sizes: list[int],
                        counts: list[int], dr: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads ``(d cached, dq, dg)`` of :func:`gated_read_forward` for the output grad ``dr``."""
    lib = _load()
    cached, q, g, dr = cached.contiguous(), q.contiguous(), g.contiguous(), dr.contiguous()
    B, N, H, K, V = cached.shape
    T = q.shape[1]
    sz, ct = _pieces(sizes, counts, T)
    dS, dq, dg = torch.empty_like(cached), torch.empty_like(q), torch.empty_like(g)
    fn = lib.growmem_gated_read_bwd_f32 if q.dtype == torch.float32 else lib.growmem_gated_read_bwd_f64
    if fn(_ptr(cached), _ptr(q), _ptr(g), _ptr(sz), _ptr(ct), _ptr(dr), _ptr(dS), _ptr(dq), _ptr(dg), B, N, T, H, K,
          V, len(sizes), float(scale), torch.get_num_threads()) != 0:
        raise RuntimeError("growmem gated-read kernel failed")
    return dS, dq, dg


def pool_scores_applies(u: torch.Tensor | None, k: torch.Tensor, p0: torch.Tensor | None) -> bool:
    """Whether :func:`pool_scores_forward` covers these inputs (and the kernels are built)."""
    if u is None or u.shape != k.shape:
        return False
    return _applies(tuple(x for x in (u, k, p0) if x is not None), ()) is not None


def pool_scores_forward(u: torch.Tensor, k: torch.Tensor, p0: torch.Tensor | None, sizes: list[int],
                        ends: list[int], count0: int, mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Memory Caching's pooled keys and online score in one pass (see ``_kernels/pool_scores.cpp``).

    ``u, k [B, T, H, K]``; ``p0 [B, H, K]`` the continued segment's pool (or None); ``sizes`` / ``ends``
    the window's pieces (tokens, 1 where a piece ends a segment); ``count0`` the tokens of the continued
    segment seen before (0: the first piece starts a segment); ``mean`` pooling. Returns ``s [B, T, H]``
    (``<u_t, pool_t>``), ``pools [B, J, H, K]`` (the pool at each segment end, J = sum(ends)) and
    ``last [B, H, K]`` (the raw sum after the window, for the streaming state).
    """
    lib = _load()
    u, k = u.contiguous(), k.contiguous()
    p0 = None if p0 is None else p0.contiguous()
    B, T, H, K = k.shape
    sz, en = _pieces(sizes, [int(bool(e)) for e in ends], T)
    J = int(en.sum())
    s, pools, last = k.new_empty(B, T, H), k.new_empty(B, J, H, K), k.new_empty(B, H, K)
    fn = lib.growmem_pool_scores_fwd_f32 if k.dtype == torch.float32 else lib.growmem_pool_scores_fwd_f64
    if fn(_ptr(u), _ptr(k), _ptr(p0), _ptr(sz), _ptr(en), _ptr(s), _ptr(pools), _ptr(last), B, T, H, K, len(sizes),
          J, int(count0), int(bool(mean)), torch.get_num_threads()) != 0:
        raise RuntimeError("growmem pool-scores kernel failed")
    return s, pools, last


def pool_scores_backward(u: torch.Tensor, k: torch.Tensor, p0: torch.Tensor | None, sizes: list[int],
                         ends: list[int], count0: int, mean: bool, ds: torch.Tensor | None,
                         dpools: torch.Tensor | None, dlast: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Grads ``(du, dk, dp0)`` of :func:`pool_scores_forward` (``dp0`` None without ``p0``)."""
    lib = _load()
    u, k = u.contiguous(), k.contiguous()
    p0 = None if p0 is None else p0.contiguous()
    ds, dpools, dlast = (None if x is None else x.to(k.dtype).contiguous() for x in (ds, dpools, dlast))
    B, T, H, K = k.shape
    sz, en = _pieces(sizes, [int(bool(e)) for e in ends], T)
    du, dk = torch.empty_like(u), torch.empty_like(k)
    dp0 = None if p0 is None else torch.empty_like(p0)
    fn = lib.growmem_pool_scores_bwd_f32 if k.dtype == torch.float32 else lib.growmem_pool_scores_bwd_f64
    if fn(_ptr(u), _ptr(k), _ptr(p0), _ptr(sz), _ptr(en), _ptr(ds), _ptr(dpools), _ptr(dlast), _ptr(du), _ptr(dk),
          _ptr(dp0), B, T, H, K, len(sizes), int(en.sum()), int(count0), int(bool(mean)),
          torch.get_num_threads()) != 0:
        raise RuntimeError("growmem pool-scores kernel failed")
    return du, dk, dp0
