"""Softmax attention baselines: full causal attention and sliding-window attention (SWA).

Per head, with queries ``q_i``, keys ``k_j``, values ``v_j`` (head size ``d``) and positions
rotated by RoPE (Su et al. 2021, see :mod:`growmem.layers.rope`):

    o = softmax(q k^T / sqrt(d) + mask) v,
    mask_ij = 0 if j is visible to i else -inf.

Full causal attention: key ``j`` is visible to query ``i`` iff ``j <= i``.
Sliding window ``W``: visible iff ``i - W < j <= i`` (the query sees itself and the ``W - 1`` keys
before it), so decoding needs only the last ``W - 1`` keys/values: constant memory.

Positions are absolute. When the queries are the last ``Tq`` of ``Tk`` keys (decoding with a KV
cache) the causal mask is aligned bottom-right: query ``i`` sits at key position ``Tk - Tq + i``.

Bidirectional prefix (``prefix_len = P``, default 0; used by the Recurrent Memory Transformer's read
memory): the first ``P`` key positions form a block that sees itself fully,

    visible(i, j) = causal/window(i, j)  or  (i < P and j < P),

so a prefix query also sees the prefix keys after it; queries at ``i >= P`` are unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from growmem.layers.base import Cache, TokenMixer
from growmem.layers.rope import RotaryEmbedding

__all__ = ["Attention", "attention_op", "naive_attention", "default_block_size"]


def _check_window(window: int | None) -> None:
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be None or an int >= 1, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


def _check_attn_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate ``q: [B, Tq, H, D]``, ``k: [B, Tk, H, D]``, ``v: [B, Tk, H, Dv]``; return (B, Tq, Tk, H)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, T, H, D], got {tuple(x.shape)}")
    B, Tq, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"k must have shape [B, Tk, H, D] matching q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape [B, Tk, H, Dv] matching k {tuple(k.shape)}, "
                         f"got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    if min(q.shape) == 0 or min(k.shape) == 0 or v.shape[-1] == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    return B, Tq, k.shape[1], H


def _resolve_offset(q_offset: int | None, Tq: int, Tk: int) -> int:
    if q_offset is None:
        q_offset = Tk - Tq
    if isinstance(q_offset, bool) or not isinstance(q_offset, int):
        raise TypeError(f"q_offset must be None or an int, got {type(q_offset).__name__}")
    if q_offset < 0 or q_offset + Tq > Tk:
        raise ValueError(f"q_offset must satisfy 0 <= q_offset and q_offset + Tq <= Tk; got q_offset="
                         f"{q_offset}, Tq={Tq}, Tk={Tk} (every query must see its own key)")
    return q_offset


def _check_prefix(prefix_len: int, Tk: int) -> int:
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
        raise TypeError(f"prefix_len must be an int >= 0, got {type(prefix_len).__name__}")
    if prefix_len < 0 or prefix_len > Tk:
        raise ValueError(f"prefix_len must satisfy 0 <= prefix_len <= Tk={Tk}, got {prefix_len}")
    return prefix_len


def _visible(i: torch.Tensor, j: torch.Tensor, window: int | None, prefix_len: int) -> torch.Tensor:
    """Boolean visibility of key position ``j`` to query position ``i`` (broadcast)."""
    vis = j <= i
    if window is not None:
        vis = vis & (j > i - window)
    if prefix_len > 0:
        vis = vis | ((i < prefix_len) & (j < prefix_len))
    return vis


def default_block_size(window: int) -> int:
    """Query block size of the blocked SWA path: ``clamp(window, 64, 512)``."""
    return min(max(window, 64), 512)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
                    scale: float | None = None, prefix_len: int = 0) -> torch.Tensor:
    """Reference causal (optionally sliding-window) softmax attention, by an explicit masked softmax.

    Args:
        q: ``[B, Tq, H, D]``; k: ``[B, Tk, H, D]``; v: ``[B, Tk, H, Dv]`` with ``Tk >= Tq`` (usually
            equal). The queries are the *last* ``Tq`` positions of the keys (bottom-right alignment).
        window: ``None`` for full causal attention, else ``W >= 1``: query ``i`` sees ``i-W < j <= i``.
        scale: score scale, default ``1 / sqrt(D)``.
        prefix_len: ``P``: key positions ``< P`` form a bidirectional prefix (module docstring).

    Returns:
        ``o: [B, Tq, H, Dv]`` = ``softmax(q k^T * scale + mask) v``, computed in the input dtype
        (use float64 for a tight reference). Materializes the full ``[B, H, Tq, Tk]`` score matrix.
    """
    B, Tq, Tk, H = _check_attn_inputs(q, k, v)
    _check_window(window)
    off = _resolve_offset(None, Tq, Tk)
    prefix_len = _check_prefix(prefix_len, Tk)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale  # [B, H, Tq, Tk]
    i = torch.arange(Tq, device=q.device)[:, None] + off
    j = torch.arange(Tk, device=q.device)[None, :]
    visible = _visible(i, j, window, prefix_len)
    scores = scores.masked_fill(~visible, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhij,bjhd->bihd", p, v)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
          scale: float) -> torch.Tensor:
    """SDPA on ``[B, H, T, D]`` tensors."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
                 q_offset: int | None = None, scale: float | None = None,
                 block_size: int | None = None, prefix_len: int = 0) -> torch.Tensor:
    """Causal / sliding-window softmax attention via ``F.scaled_dot_product_attention``.

    Args:
        q: ``[B, Tq, H, D]`` queries (already position-encoded).
        k: ``[B, Tk, H, D]`` keys, v: ``[B, Tk, H, Dv]`` values, indexed by key position ``0..Tk-1``.
        window: ``None`` = full causal; ``W >= 1`` = query at position ``p`` sees keys ``p-W < j <= p``.
        q_offset: key position of query 0 (query ``i`` sits at ``q_offset + i``); default ``Tk - Tq``
            (bottom-right alignment, as in decoding with a KV cache). Needs ``q_offset + Tq <= Tk``.
        scale: score scale, default ``1 / sqrt(D)``.
        block_size: query block size of the sliding-window path (default :func:`default_block_size`).
        prefix_len: ``P <= Tk``: key positions ``< P`` form a bidirectional prefix: a query at position
            ``i < P`` sees every key ``j < P`` besides its causal/window keys (module docstring). 0 = off.

    Returns:
        ``o: [B, Tq, H, Dv]``, ``o = softmax(q k^T * scale + mask) v``.

    Paths (all exact):
        * full, ``Tq == Tk`` and ``q_offset == 0``: SDPA ``is_causal=True`` (fast path);
        * full, a single query at the last key position: no mask;
        * full, otherwise: explicit bottom-right-aligned causal mask ``[Tq, Tk]``;
        * window: query blocks of size ``Bq`` each attend only to the ``Bq + W - 1`` keys they can
          reach, with a small band mask ``[Bq, Bq + W - 1]``; no ``Tq x Tk`` mask is built. A window
          that covers every reachable key falls back to the full path.
        * prefix: only when some query lies in the prefix (``q_offset < P``) is a mask with the prefix
          block built (full path: ``[Tq, max(last + 1, P)]``; window path: blocks holding prefix queries
          also take keys ``0 .. P-1``); otherwise the paths above run unchanged.
    """
    B, Tq, Tk, H = _check_attn_inputs(q, k, v)
    _check_window(window)
    off = _resolve_offset(q_offset, Tq, Tk)
    P = _check_prefix(prefix_len, Tk)
    if off >= P:  # no query lies in the prefix: it changes nothing
        P = 0
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size < 1):
        raise ValueError(f"block_size must be None or an int >= 1, got {block_size!r}")

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    last = off + Tq - 1  # key position of the last query
    if window is None or window > last:
        # Every visible key is within the window: plain causal attention over keys 0..last.
        nk = max(last + 1, P)
        kt, vt = kt[:, :, :nk], vt[:, :, :nk]
        if P > 0:
            i = torch.arange(Tq, device=q.device)[:, None] + off
            j = torch.arange(nk, device=q.device)[None, :]
            o = _sdpa(qt, kt, vt, _visible(i, j, None, P), False, scale)
        elif off == 0:  # then Tq == nk
            o = _sdpa(qt, kt, vt, None, True, scale)
        elif Tq == 1:
            o = _sdpa(qt, kt, vt, None, False, scale)
        else:
            i = torch.arange(Tq, device=q.device)[:, None] + off
            j = torch.arange(nk, device=q.device)[None, :]
            o = _sdpa(qt, kt, vt, j <= i, False, scale)
        return o.transpose(1, 2)

    bq = default_block_size(window) if block_size is None else block_size
    outs = []
    for s in range(0, Tq, bq):
        e = min(s + bq, Tq)
        p0, p1 = off + s, off + e - 1  # key positions of the block's first and last query
        k0 = max(0, p0 - window + 1)  # first key any query of the block can see
        k1 = p1 + 1  # one past the last key any query of the block can see
        if p0 < P:  # the block holds prefix queries: they also see keys 0 .. P-1
            k0, k1 = 0, max(k1, P)
        qi = torch.arange(p0, p1 + 1, device=q.device)[:, None]
        kj = torch.arange(k0, k1, device=q.device)[None, :]
        band = _visible(qi, kj, window, P)  # [e-s, k1-k0]
        outs.append(_sdpa(qt[:, :, s:e], kt[:, :, k0:k1], vt[:, :, k0:k1], band, False, scale))
    return torch.cat(outs, dim=2).transpose(1, 2)


class _HeadRMSNorm(nn.Module):
    """RMSNorm over the last (head) dimension with a learned gain: ``x / rms(x) * g``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


class Attention(TokenMixer):
    """Multi-head causal softmax attention with RoPE; full or sliding-window.

    ``x: [B, T, D] -> y: [B, T, D]``:

        q, k, v = x W_q, x W_k, x W_v            # each [B, T, H, Dh]
        q, k = RMSNorm(q), RMSNorm(k)             # only if qk_norm
        q, k = RoPE(q, pos), RoPE(k, pos)         # absolute positions pos = p0 .. p0+T-1
        o = softmax(q k^T / sqrt(Dh) + mask) v    # per head, see :func:`attention_op`
        y = concat_heads(o) W_o

    Args:
        d_model: model width ``D``.
        num_heads: number of heads ``H >= 1``.
        head_dim: per-head size ``Dh`` (even, for RoPE); default ``d_model // num_heads`` (then
            ``d_model`` must be divisible by ``num_heads``).
        window: ``None`` = full causal attention; ``W >= 1`` = sliding window (query ``i`` sees keys
            ``i-W < j <= i``).
        rope_base: RoPE frequency base.
        qk_norm: RMS-normalize q and k per head (with learned gains) before RoPE.
        bias: use biases in the q/k/v/o projections.

    Cache (``use_cache=True``): ``{"k": [B, Tc, H, Dh], "v": [B, Tc, H, Dh], "pos": int}``; ``k`` is
    stored after RoPE, ``pos`` is the absolute number of tokens seen. Full attention keeps all
    ``Tc = pos`` keys; sliding window keeps only the last ``Tc = min(pos, W - 1)`` (constant memory).
    Cached tensors are not detached: call under ``torch.no_grad()`` when decoding.
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int | None = None, window: int | None = None,
                 rope_base: float = 10000.0, qk_norm: bool = False, bias: bool = False) -> None:
        super().__init__()
        for name, val in (("d_model", d_model), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"{name} must be an int, got {type(val).__name__}")
            if val < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        if head_dim is None:
            if d_model % num_heads != 0:
                raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads} "
                                 "when head_dim is not given")
            head_dim = d_model // num_heads
        if isinstance(head_dim, bool) or not isinstance(head_dim, int):
            raise TypeError(f"head_dim must be None or an int, got {type(head_dim).__name__}")
        if head_dim < 2 or head_dim % 2 != 0:
            raise ValueError(f"head_dim must be a positive even integer (RoPE), got {head_dim}")
        _check_window(window)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.window = window
        self.qk_norm = bool(qk_norm)
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=bias)
        self.k_proj = nn.Linear(d_model, inner, bias=bias)
        self.v_proj = nn.Linear(d_model, inner, bias=bias)
        self.o_proj = nn.Linear(inner, d_model, bias=bias)
        self.rope = RotaryEmbedding(head_dim, base=rope_base)
        if self.qk_norm:
            self.q_norm: nn.Module = _HeadRMSNorm(head_dim)
            self.k_norm: nn.Module = _HeadRMSNorm(head_dim)
        else:
            self.q_norm = nn.Identity()
            self.k_norm = nn.Identity()

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"window={self.window}, qk_norm={self.qk_norm}")

    def _check_cache(self, cache: Cache, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        if not isinstance(cache, dict) or not {"k", "v", "pos"} <= cache.keys():
            raise TypeError("attention cache must be a dict with keys 'k', 'v', 'pos' made by this layer")
        ck, cv, pos = cache["k"], cache["v"], cache["pos"]
        if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
            raise ValueError(f"cache['pos'] must be an int >= 0, got {pos!r}")
        want = (x.shape[0], self.num_heads, self.head_dim)
        for name, t in (("k", ck), ("v", cv)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise TypeError(f"cache['{name}'] must be a tensor [B, Tc, H, Dh]")
            if t.shape[0] != x.shape[0]:
                raise ValueError(f"cache batch size {t.shape[0]} does not match input batch size "
                                 f"{x.shape[0]}")
            if (t.shape[0], t.shape[2], t.shape[3]) != want:
                raise ValueError(f"cache['{name}'] must have shape [B, Tc, {want[1]}, {want[2]}], "
                                 f"got {tuple(t.shape)}")
            if t.dtype != x.dtype or t.device != x.device:
                raise TypeError(f"cache['{name}'] has dtype/device {t.dtype}/{t.device}, input has "
                                f"{x.dtype}/{x.device}")
        expect_len = pos if self.window is None else min(pos, self.window - 1)
        if ck.shape[1] != expect_len or cv.shape[1] != expect_len:
            raise ValueError(f"inconsistent cache: {ck.shape[1]} cached keys for pos={pos}, "
                             f"expected {expect_len}")
        return ck, cv, pos

    def forward(self, x: torch.Tensor, cache: Cache | None = None, use_cache: bool = False,
                prefix_len: int = 0) -> tuple[torch.Tensor, Cache | None]:
        """``x: [B, T, D] -> (y: [B, T, D], cache | None)``; see the class docstring for the cache.

        ``prefix_len = P``: the stream's first ``P`` positions attend to each other bidirectionally
        (:func:`attention_op`). The call holding them must start the stream and hold the whole prefix
        (``pos == 0`` and ``T >= P``); once ``pos >= P`` the argument changes nothing, so a cache
        filled with a prefix decodes exactly like the parallel call.
        """
        self.check_input(x, self.d_model)
        B, T, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        if cache is not None:
            ck, cv, pos = self._check_cache(cache, x)
        else:
            ck = cv = None
            pos = 0
        if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
            raise ValueError(f"prefix_len must be an int >= 0, got {prefix_len!r}")
        if pos < prefix_len and (pos != 0 or prefix_len > T):
            raise ValueError(f"a bidirectional prefix of {prefix_len} positions must be given whole in the call "
                             f"that starts the stream; got a call at pos={pos} with {T} tokens")
        prefix = prefix_len if prefix_len > pos else 0
        q = self.q_norm(self.q_proj(x).view(B, T, H, Dh))
        k = self.k_norm(self.k_proj(x).view(B, T, H, Dh))
        v = self.v_proj(x).view(B, T, H, Dh)
        q = self.rope(q, offset=pos)
        k = self.rope(k, offset=pos)
        if ck is not None and ck.shape[1] > 0:
            k = torch.cat((ck, k), dim=1)
            v = torch.cat((cv, v), dim=1)
        o = attention_op(q, k, v, window=self.window, q_offset=k.shape[1] - T, prefix_len=prefix)
        y = self.o_proj(o.reshape(B, T, H * Dh))
        if not use_cache:
            return y, None
        if self.window is not None:
            # Keep the last W-1 keys/values; clone so a long prefill's buffer is not kept alive.
            start = max(0, k.shape[1] - (self.window - 1))
            k, v = k[:, start:].clone(), v[:, start:].clone()
        return y, {"k": k, "v": v, "pos": pos + T}
