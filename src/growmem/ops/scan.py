r"""Parallel scan for first-order linear recurrences (elementwise, real or complex).

For inputs ``a, b: [B, T, ...]`` (any trailing dims; ``a`` may be any shape that broadcasts to ``b``)
and an optional initial state ``h0: [B, ...]`` (broadcastable; ``None`` = zeros)::

    h_t = a_t * h_{t-1} + b_t          (elementwise, h_{-1} = h0)

:func:`parallel_scan` returns every state ``h: [B, T, ...]`` (the final state is ``h[:, -1]``). The
recurrence is the scan of the associative operator on pairs

    (a_1, b_1) o (a_2, b_2) = (a_2 a_1, a_2 b_1 + b_2)

which needs no division, so a_t = 0 (a reset, as in the BMRU's switches) is handled exactly: nothing
is ever divided by a cumulative product of the a's and no logarithm is taken.

Forward algorithms (``method``):

* ``"blelloch"`` (default) -- work-efficient recursive doubling: combine neighbouring pairs, solve the
  half-length problem recursively, then fill the even positions. O(T) work, O(log T) depth,
  ~4 elementwise ops per level on halving sizes. (On CPU, long inputs are cut into cache-sized blocks
  of tokens scanned in order: depth O((T / block) log block), 2x faster there.)
* ``"hillis_steele"`` -- Hillis-Steele inclusive scan: log2(T) sweeps over the whole sequence
  (offset 1, 2, 4, ...). O(T log T) work, O(log T) depth.
* ``"chunked"`` -- chunks of ``chunk_size``: a python loop over the positions *inside* a chunk (all
  chunks at once) that also forms the within-chunk products of a by cumulative multiplication, a
  Blelloch scan over the chunk carries, and one fix-up ``h = h_local + P_local * carry``. No division.

Gradients come from a custom autograd function whose backward is itself a (reversed) linear scan::

    g_t = dL/dh_t + conj(a_{t+1}) g_{t+1},   dL/db_t = g_t,   dL/da_t = g_t conj(h_{t-1}),
    dL/dh0 = conj(a_0) g_0

(PyTorch's complex convention), so backward costs one more scan and saves only ``a`` and ``h``. The
first-order backward of ``"blelloch"`` runs that reverse scan natively (no flipped copies); with
``create_graph=True`` (and for the other methods) it is the forward scan of the flipped sequence built
from differentiable ops, so double backward works too.

:func:`naive_scan` is the sequential loop (the reference); :func:`step_scan` is one step (decoding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from growmem.ops.utils import check_chunk_size, check_finite

__all__ = ["naive_scan", "step_scan", "parallel_scan", "SCAN_METHODS"]

SCAN_METHODS = ("blelloch", "hillis_steele", "chunked")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

def _check_tensor(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} must be a floating-point or complex tensor, got dtype {x.dtype}")


def _prepare(a: Tensor, b: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate, promote to a common dtype, expand ``a`` to ``b``'s shape and ``h0`` to ``[B, ...]``."""
    _check_tensor("a", a)
    _check_tensor("b", b)
    if b.dim() < 2:
        raise ValueError(f"b must have shape [B, T, ...], got {tuple(b.shape)}")
    if b.shape[0] == 0 or b.shape[1] == 0 or b.numel() == 0:
        raise ValueError(f"empty scan input b {tuple(b.shape)}")
    try:
        ok = torch.broadcast_shapes(a.shape, b.shape) == b.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"a {tuple(a.shape)} must broadcast to b's shape {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError("a and b must be on the same device")
    dtype = torch.promote_types(a.dtype, b.dtype)
    state_shape = b.shape[:1] + b.shape[2:]
    if h0 is not None:
        _check_tensor("h0", h0)
        try:
            ok = torch.broadcast_shapes(h0.shape, state_shape) == state_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"h0 {tuple(h0.shape)} must broadcast to the state shape [B, ...] = {tuple(state_shape)}")
        if h0.device != b.device:
            raise ValueError("h0 must be on the same device as b")
        dtype = torch.promote_types(dtype, h0.dtype)
        check_finite("h0", h0)
        h0 = h0.to(dtype).expand(state_shape)
    check_finite("a", a)
    check_finite("b", b)
    return a.to(dtype).expand(b.shape), b.to(dtype), h0


# ----------------------------------------------------------------------------------------------
# forward algorithms (no autograd inside; never modify their inputs)
# ----------------------------------------------------------------------------------------------

def _blelloch_into(a: Tensor, b: Tensor, out: Tensor, wa: Tensor, wb: Tensor, off: int) -> None:
    """Write the scan of (a, b) along dim 1 (h_{-1} = 0) into ``out`` (possibly a strided view).

    Pairs (2i, 2i+1) are combined into (a_o a_e, a_o b_e + b_o), stored in the workspaces ``wa, wb``
    from column ``off`` on; their scan (recursively, written straight into the odd positions of ``out``)
    gives h at the odd positions, and h_{2i} = a_{2i} h_{2i-1} + b_{2i} fills the even ones.
    """
    T = b.shape[1]
    if T == 1:
        out[:, 0] = b[:, 0]
        return
    n = T // 2
    ae, ao = a[:, 0:2 * n:2], a[:, 1:2 * n:2]
    be, bo = b[:, 0:2 * n:2], b[:, 1:2 * n:2]
    A, Bv = wa[:, off:off + n], wb[:, off:off + n]
    torch.mul(ao, ae, out=A)
    torch.addcmul(bo, ao, be, out=Bv)
    _blelloch_into(A, Bv, out[:, 1:2 * n:2], wa, wb, off + n)
    out[:, 0] = b[:, 0]
    m = (T - 1) // 2  # even positions 2, 4, ... <= T-1 read h at 1, 3, ..., 2m-1
    if m:
        torch.addcmul(b[:, 2::2], a[:, 2::2], out[:, 1:2 * m:2], out=out[:, 2::2])


# On CPU the recursion runs block by block, each block's data small enough to stay in cache (about
# this many bytes of b per block); the state is carried from block to block. On other devices one block.
_CPU_BLOCK_BYTES = 4 << 20


def _scan_blelloch(a: Tensor, b: Tensor) -> Tensor:
    """Recursive doubling on dim 1: h with h_t = a_t h_{t-1} + b_t, h_{-1} = 0. One output buffer and
    two workspaces for all levels (T//2 + T//4 + ... < T columns; fresh allocations per level cost more
    than the math). On CPU, sequences larger than ``_CPU_BLOCK_BYTES`` are scanned in cache-sized blocks
    of tokens, in order, each block starting from the previous block's last state (2x faster at
    [1, 65536, 256] float32; the result is the same)."""
    B, T = b.shape[:2]
    per_token = max(b[:, 0].numel() * b.element_size(), 1)
    Tb = T if b.device.type != "cpu" else min(T, max(256, _CPU_BLOCK_BYTES // per_token))
    out = b.new_empty(b.shape)
    ws = (B, Tb, *b.shape[2:])
    wa, wb = a.new_empty(ws), b.new_empty(ws)
    if Tb == T:
        _blelloch_into(a, b, out, wa, wb, 0)
        return out
    first = b.new_empty(b[:, 0].shape)
    for lo in range(0, T, Tb):
        hi = min(lo + Tb, T)
        a_blk, b_blk = a[:, lo:hi], b[:, lo:hi]
        if lo:  # b_lo + a_lo h_{lo-1}: only the first column changes, so swap it in
            torch.addcmul(b_blk[:, 0], a_blk[:, 0], out[:, lo - 1], out=first)
            b_blk = torch.cat([first[:, None], b_blk[:, 1:]], 1)
        _blelloch_into(a_blk, b_blk, out[:, lo:hi], wa, wb, 0)
    return out


def _blelloch_rev_into(a: Tensor, d: Tensor, out: Tensor, wa: Tensor, wb: Tensor, off: int) -> None:
    """The *reverse* scan g_t = a_{t+1} g_{t+1} + d_t (g_T = 0; a_0 is never read) into ``out``.

    Mirror of :func:`_blelloch_into` without flipping anything: G_i = g_{2i} satisfies
    G_i = (a_{2i+1} a_{2i+2}) G_{i+1} + (d_{2i} + a_{2i+1} d_{2i+1}), a reverse scan of length
    ceil(T/2) written straight into the even positions of ``out``; then
    g_{2i+1} = a_{2i+2} G_{i+1} + d_{2i+1} fills the odd ones (g_{T-1} = d_{T-1}).
    """
    T = d.shape[1]
    if T == 1:
        out[:, 0] = d[:, 0]
        return
    m, n = (T + 1) // 2, T // 2  # reduced length; number of full pairs (2i, 2i+1)
    A, D = wa[:, off:off + m], wb[:, off:off + m]
    if m > 1:  # A_j = a_{2j-1} a_{2j}, j = 1 .. m-1 (A_0 is never read)
        torch.mul(a[:, 1:2 * m - 1:2], a[:, 2:2 * m - 1:2], out=A[:, 1:])
    torch.addcmul(d[:, 0:2 * n:2], a[:, 1:2 * n:2], d[:, 1:2 * n:2], out=D[:, :n])
    if m > n:  # T odd: the last token is alone
        D[:, n] = d[:, T - 1]
    _blelloch_rev_into(A, D, out[:, 0::2], wa, wb, off + m)
    # odd positions 2i+1 < T-1 read G_{i+1} = g_{2i+2}; g_{T-1} = d_{T-1} when T is even
    k = (T - 1) // 2  # odd positions with a successor: 1, 3, ..., 2k-1
    if k:
        torch.addcmul(d[:, 1:2 * k:2], a[:, 2:2 * k + 1:2], out[:, 2:2 * k + 1:2], out=out[:, 1:2 * k:2])
    if T % 2 == 0:
        out[:, T - 1] = d[:, T - 1]


def _scan_blelloch_rev(a: Tensor, d: Tensor) -> Tensor:
    """g with g_t = a_{t+1} g_{t+1} + d_t, g_T = 0 (the backward of the scan), in cache-sized blocks
    on CPU like :func:`_scan_blelloch`, last block first."""
    B, T = d.shape[:2]
    per_token = max(d[:, 0].numel() * d.element_size(), 1)
    Tb = T if d.device.type != "cpu" else min(T, max(256, _CPU_BLOCK_BYTES // per_token))
    out = d.new_empty(d.shape)
    n_ws, t = 1, Tb  # workspace columns: ceil(Tb/2) + ceil(Tb/4) + ... (a little over Tb)
    while t > 1:
        t = (t + 1) // 2
        n_ws += t
    ws = (B, n_ws, *d.shape[2:])
    wa, wb = a.new_empty(ws), d.new_empty(ws)
    if Tb == T:
        _blelloch_rev_into(a, d, out, wa, wb, 0)
        return out
    last = d.new_empty(d[:, 0].shape)
    starts = list(range(0, T, Tb))
    for lo in reversed(starts):
        hi = min(lo + Tb, T)
        d_blk = d[:, lo:hi]
        if hi < T:  # d_{hi-1} + a_hi g_hi
            torch.addcmul(d_blk[:, -1], a[:, hi], out[:, hi], out=last)
            d_blk = torch.cat([d_blk[:, :-1], last[:, None]], 1)
        _blelloch_rev_into(a[:, lo:hi], d_blk, out[:, lo:hi], wa, wb, 0)
    return out


def _scan_hillis_steele(a: Tensor, b: Tensor) -> Tensor:
    """Hillis-Steele inclusive scan on dim 1 (log2 T full sweeps)."""
    T = b.shape[1]
    A, H = a.clone(), b.clone()
    d = 1
    while d < T:
        # right-hand sides are evaluated before the (overlapping) in-place assignment
        H[:, d:] = torch.addcmul(H[:, d:], A[:, d:], H[:, :-d])
        if 2 * d < T:
            A[:, d:] = A[:, d:] * A[:, :-d]
        d *= 2
    return H


def _scan_chunked(a: Tensor, b: Tensor, chunk_size: int) -> Tensor:
    """Loop inside chunks (all chunks at once), Blelloch scan over chunk carries, one fix-up."""
    B, T = b.shape[:2]
    rest = b.shape[2:]
    C = min(chunk_size, T)
    NC = -(-T // C)
    pad = NC * C - T
    if pad:  # padding with a = 1, b = 0 leaves the real positions unchanged
        a = torch.cat([a, a.new_ones((B, pad, *rest))], 1)
        b = torch.cat([b, b.new_zeros((B, pad, *rest))], 1)
    a = a.reshape(B, NC, C, *rest)
    b = b.reshape(B, NC, C, *rest)
    hl = b.new_empty(b.shape)  # local scan from a zero state
    P = a.new_empty(a.shape)  # within-chunk products a_i ... a_0 (cumulative multiplication)
    hl[:, :, 0] = b[:, :, 0]
    P[:, :, 0] = a[:, :, 0]
    for i in range(1, C):
        hl[:, :, i] = torch.addcmul(b[:, :, i], a[:, :, i], hl[:, :, i - 1])
        P[:, :, i] = a[:, :, i] * P[:, :, i - 1]
    if NC > 1:
        carry = _scan_blelloch(P[:, :, -1], hl[:, :, -1])  # states at the chunk ends [B, NC, ...]
        hl[:, 1:] = torch.addcmul(hl[:, 1:], P[:, 1:], carry[:, :-1, None])
    h = hl.reshape(B, NC * C, *rest)
    return h[:, :T] if pad else h


def _forward(a: Tensor, b: Tensor, h0: Tensor | None, method: str, chunk_size: int) -> Tensor:
    if h0 is not None:  # fold the initial state into the first input: b_0 + a_0 h0
        b = b.clone()
        b[:, 0] = torch.addcmul(b[:, 0], a[:, 0], h0)
    if method == "blelloch":
        return _scan_blelloch(a, b)
    if method == "hillis_steele":
        return _scan_hillis_steele(a, b)
    return _scan_chunked(a, b, chunk_size)


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor | None, method: str, chunk_size: int) -> Tensor:
        with torch.no_grad():
            h = _forward(a, b, h0, method, chunk_size)
        ctx.method, ctx.chunk_size = method, chunk_size
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(a, h, h0 if h0 is not None else None)
        return h

    @staticmethod
    def backward(ctx, gh: Tensor):
        a, h, h0 = ctx.saved_tensors
        need_a, need_b, need_h0 = ctx.needs_input_grad[:3]
        if ctx.method == "blelloch" and not torch.is_grad_enabled():
            # first-order backward: the reverse scan in place of flips, grad_a filled in one buffer
            g = _scan_blelloch_rev(a.conj().resolve_conj(), gh)  # (ops on lazy-conj views are slower)
            grad_a = grad_h0 = None
            if need_a:
                grad_a = torch.empty_like(g)
                torch.mul(g[:, 1:], h[:, :-1].conj(), out=grad_a[:, 1:])
                if ctx.has_h0:
                    torch.mul(g[:, 0], h0.conj(), out=grad_a[:, 0])
                else:
                    grad_a[:, 0] = 0
            if need_h0 and ctx.has_h0:
                grad_h0 = a[:, 0].conj() * g[:, 0]
            return grad_a, (g if need_b else None), grad_h0, None, None
        # g_t = gh_t + conj(a_{t+1}) g_{t+1}: a scan over the reversed sequence (differentiable again)
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1).conj()
        g = _LinearScan.apply(a_next.flip(1), gh.flip(1), None, ctx.method, ctx.chunk_size).flip(1)
        grad_a = grad_h0 = None
        if need_a:
            first = h0[:, None] if ctx.has_h0 else torch.zeros_like(h[:, :1])
            grad_a = g * torch.cat([first, h[:, :-1]], 1).conj()
        if need_h0 and ctx.has_h0:
            grad_h0 = a[:, 0].conj() * g[:, 0]
        return grad_a, (g if need_b else None), grad_h0, None, None


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------

def parallel_scan(a: Tensor, b: Tensor, h0: Tensor | None = None, method: str = "blelloch",
                  chunk_size: int = 64) -> Tensor:
    """All states of h_t = a_t * h_{t-1} + b_t (elementwise), computed in parallel over time.

    Args:
        a: decays ``[B, T, ...]`` or any shape broadcasting to ``b`` (e.g. ``[N]`` for a time-constant
            decay); real or complex; zeros allowed.
        b: inputs ``[B, T, ...]``; real or complex.
        h0: initial state broadcasting to ``[B, ...]`` (``None`` = zeros).
        method: ``"blelloch"``, ``"hillis_steele"`` or ``"chunked"`` (see the module docstring).
        chunk_size: chunk length of ``"chunked"``.

    Returns:
        h ``[B, T, ...]`` in the promoted dtype of a, b (and h0); ``h[:, -1]`` is the final state.
    """
    if method not in SCAN_METHODS:
        raise ValueError(f"unknown scan method {method!r}; choose from {', '.join(SCAN_METHODS)}")
    check_chunk_size(chunk_size)
    a, b, h0 = _prepare(a, b, h0)
    return _LinearScan.apply(a, b, h0, method, chunk_size)


def naive_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """The sequential loop h_t = a_t * h_{t-1} + b_t (reference; plain autograd). Shapes as
    :func:`parallel_scan`."""
    a, b, h0 = _prepare(a, b, h0)
    h = h0
    out = []
    # unbind, not a[:, t]: the backward of T slices would fill T full-size zero tensors (O(T^2))
    for a_t, b_t in zip(a.unbind(1), b.unbind(1), strict=True):
        h = b_t if h is None else a_t * h + b_t
        out.append(h)
    return torch.stack(out, 1)


def step_scan(a: Tensor, b: Tensor, h: Tensor | None = None) -> Tensor:
    """One step: ``a, b: [B, ...]``, previous state ``h: [B, ...]`` (``None`` = zeros) -> new state."""
    return b if h is None else a * h + b
