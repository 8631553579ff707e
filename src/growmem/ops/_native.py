"""Optional fused CPU kernels, compiled on first use (a C++ compiler is needed; none is required).

The kernels in ``growmem/ops/_kernels/*.cpp`` are plain C++ with a C interface: no torch headers, so
a build takes a second or two, not the minute of a ``torch.utils.cpp_extension`` build. Their matrix
products call the BLAS inside the torch library (``sgemm_`` / ``dgemm_`` of the MKL that x86 builds
of torch carry), so the shared object is linked against ``libtorch_cpu``. It is built once per
source version, torch version and CPU model into ``$GROWMEM_KERNEL_CACHE`` (default
``~/.cache/growmem/kernels``), written under a temporary name and renamed into place (concurrent
processes never load a half-written file), and loaded with :mod:`ctypes` (foreign calls release the
GIL; the kernel runs its own worker threads, ``torch.get_num_threads()`` of them).

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

__all__ = ["NativeBuildError", "delta_rule_forward", "native_available", "native_enabled"]

_SRC = Path(__file__).with_name("_kernels") / "delta_rule_fwd.cpp"
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
    src = _SRC.read_bytes()
    torch_lib = Path(torch.__file__).parent / "lib"
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        raise NativeBuildError("no C++ compiler found (set CXX, or install g++)")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno"]
    key = hashlib.sha256(b"\0".join([src, torch.__version__.encode(), _cpu_model().encode(), compiler.encode(),
                                     " ".join(flags).encode()])).hexdigest()[:16]
    out = _cache_dir() / f"delta_rule_fwd-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [compiler, *flags, str(_SRC), "-o", tmp, f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise NativeBuildError(f"compiling {_SRC.name} failed:\n{res.stderr[-2000:]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    i64, dbl, ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    for name in ("growmem_delta_rule_fwd_f32", "growmem_delta_rule_fwd_f64"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ptr] * 7 + [i64] * 6 + [dbl, dbl, ctypes.c_int]
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


def delta_rule_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                       beta: torch.Tensor, states: torch.Tensor, o: torch.Tensor, scale: float, C: int,
                       limit: float) -> bool:
    """Run the fused chunked (gated) delta-rule forward if it applies; return whether it ran.

    ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, ``g`` (or ``None``), ``beta: [B, T, H]``, CPU tensors of
    one dtype (float32 or float64; made contiguous here); ``states: [NC + 1, B * H, K, V]`` with ``states[0]``
    set, and ``o: [B, T, H, V]``, both written. ``limit``: the largest chunk log decay for which the
    decay matrix may be factored (:func:`growmem.ops.gla._factor_limit`). Returns ``False`` without
    touching anything when the kernel does not apply (other dtype or device, disabled, not built).
    """
    dt = q.dtype
    if dt not in (torch.float32, torch.float64) or q.device.type != "cpu" or not native_enabled():
        return False
    ins = (q, k, v, beta) if g is None else (q, k, v, g, beta)
    if any(x.dtype != dt or x.device != q.device for x in ins) or not (states.is_contiguous() and o.is_contiguous()):
        return False
    lib = _load()
    if lib is None:
        return False
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    g = None if g is None else g.contiguous()
    B, T, H, K = q.shape
    V = v.shape[-1]
    fn = lib.growmem_delta_rule_fwd_f32 if dt == torch.float32 else lib.growmem_delta_rule_fwd_f64
    rc = fn(_ptr(q), _ptr(k), _ptr(v), _ptr(g), _ptr(beta), _ptr(states), _ptr(o), B, T, H, K, V, C,
            float(scale), float(limit), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"growmem delta-rule kernel failed (code {rc})")
    return True
