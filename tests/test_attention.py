"""Tests of growmem.layers.attention and growmem.layers.rope."""

from __future__ import annotations

import pytest
import torch

from growmem.layers.attention import Attention, attention_op, naive_attention
from growmem.layers.rope import RotaryEmbedding

F64 = torch.float64


def _qkv(B=2, Tq=11, Tk=None, H=3, D=8, Dv=None, dtype=F64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    Tk = Tq if Tk is None else Tk
    Dv = D if Dv is None else Dv
    q = torch.randn(B, Tq, H, D, generator=g, dtype=dtype)
    k = torch.randn(B, Tk, H, D, generator=g, dtype=dtype)
    v = torch.randn(B, Tk, H, Dv, generator=g, dtype=dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def _naive_loop(q, k, v, window=None):
    """Per-query loop reference (independent of naive_attention's masking), queries at the end of k."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    out = torch.empty(B, Tq, H, v.shape[-1], dtype=q.dtype)
    for i in range(Tq):
        p = Tk - Tq + i
        lo = 0 if window is None else max(0, p - window + 1)
        s = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, lo : p + 1]) / D**0.5
        out[:, i] = torch.einsum("bhj,bjhd->bhd", s.softmax(-1), v[:, lo : p + 1])
    return out


def _model(window=None, d_model=16, num_heads=2, seed=0, **kw):
    torch.manual_seed(seed)
    return Attention(d_model, num_heads, window=window, **kw).to(F64)


def _x(B=2, T=23, D=16, seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------------- reference itself


@pytest.mark.parametrize("window", [None, 1, 3, 20])
def test_naive_matches_loop(window):
    q, k, v = _qkv(Tq=9, Dv=5)
    torch.testing.assert_close(naive_attention(q, k, v, window=window), _naive_loop(q, k, v, window))
    q, k, v = _qkv(Tq=4, Tk=9)  # bottom-right aligned queries
    torch.testing.assert_close(naive_attention(q, k, v, window=window), _naive_loop(q, k, v, window))


# ----------------------------------------------------------------------------- attention_op


@pytest.mark.parametrize("window", [None, 1, 2, 3, 5, 7, 11, 12, 40])
@pytest.mark.parametrize("block_size", [None, 1, 4, 5])
def test_attention_op_matches_naive(window, block_size):
    q, k, v = _qkv(Tq=11, Dv=6)  # T=11 is not a multiple of the block sizes 4 and 5
    out = attention_op(q, k, v, window=window, block_size=block_size)
    torch.testing.assert_close(out, naive_attention(q, k, v, window=window), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 1, 3, 6, 100])
@pytest.mark.parametrize("Tq", [1, 4, 9])
def test_attention_op_with_offset(window, Tq):
    """Queries at the last Tq of Tk key positions (KV-cache continuation), bottom-right causal."""
    q, k, v = _qkv(Tq=Tq, Tk=13)
    out = attention_op(q, k, v, window=window, block_size=4)
    torch.testing.assert_close(out, _naive_loop(q, k, v, window), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attention_op(q, k, v, window=window, q_offset=13 - Tq), out)


def test_attention_op_explicit_q_offset_ignores_later_keys():
    q, k, v = _qkv(Tq=3, Tk=10)
    for window in (None, 2):
        out = attention_op(q, k, v, window=window, q_offset=4)  # queries at positions 4, 5, 6
        ref = _naive_loop(q, k[:, :7], v[:, :7], window)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_attention_op_long_window_is_blocked():
    """Long T with a small window: exact, and goes through the blocked path (default blocks)."""
    q, k, v = _qkv(B=1, Tq=300, H=2, D=4)
    for window in (1, 17, 64, 100):
        out = attention_op(q, k, v, window=window)
        torch.testing.assert_close(out, naive_attention(q, k, v, window=window), rtol=1e-10, atol=1e-10)


def test_attention_op_float32_close():
    q, k, v = _qkv(Tq=37, dtype=torch.float32)
    for window in (None, 5):
        ref = naive_attention(q.double(), k.double(), v.double(), window=window)
        torch.testing.assert_close(attention_op(q, k, v, window=window).double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [None, 1, 3, 8])
def test_attention_op_grads_match_naive(window):
    q, k, v = _qkv(Tq=13, requires_grad=True)
    dout = torch.randn(2, 13, 3, 8, dtype=F64, generator=torch.Generator().manual_seed(5))
    g1 = torch.autograd.grad((attention_op(q, k, v, window=window, block_size=4) * dout).sum(), (q, k, v))
    g2 = torch.autograd.grad((naive_attention(q, k, v, window=window) * dout).sum(), (q, k, v))
    for a, b in zip(g1, g2, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_attention_op_bad_inputs():
    q, k, v = _qkv(Tq=5)
    with pytest.raises(ValueError):
        attention_op(q, k, v, window=0)
    with pytest.raises(TypeError):
        attention_op(q, k, v, window=2.5)
    with pytest.raises(ValueError):
        attention_op(q[..., :4], k, v)  # head dim mismatch
    with pytest.raises(ValueError):
        attention_op(q, k[:, :3], v)  # k / v length mismatch
    with pytest.raises(ValueError):
        attention_op(q, k[:, :3], v[:, :3])  # fewer keys than queries
    with pytest.raises(ValueError):
        attention_op(q, k, v, q_offset=1)
    with pytest.raises(ValueError):
        attention_op(q[0], k[0], v[0])
    with pytest.raises(TypeError):
        attention_op(q, k.float(), v)
    with pytest.raises(TypeError):
        attention_op(q.long(), k.long(), v.long())
    with pytest.raises(ValueError):
        attention_op(q, k, v, window=2, block_size=0)
    with pytest.raises(ValueError):
        naive_attention(q, k, v, window=-1)


# ----------------------------------------------------------------------------- Attention module


@pytest.mark.parametrize("window", [None, 1, 4, 7])
def test_module_matches_reference(window):
    """Module forward == projections + RoPE + naive attention."""
    m = _model(window)
    x = _x()
    y, c = m(x)
    assert c is None and y.shape == x.shape
    B, T, _ = x.shape
    q = m.rope(m.q_proj(x).view(B, T, 2, 8), 0)
    k = m.rope(m.k_proj(x).view(B, T, 2, 8), 0)
    v = m.v_proj(x).view(B, T, 2, 8)
    ref = m.o_proj(naive_attention(q, k, v, window=window).reshape(B, T, 16))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 1, 2, 5, 30])
def test_prefill_then_decode_equals_full(window):
    m = _model(window, qk_norm=True, bias=True)
    x = _x(T=19)
    full, _ = m(x)
    y0, cache = m(x[:, :6], use_cache=True)
    outs = [y0]
    for t in range(6, 19):
        yt, cache = m(x[:, t : t + 1], cache=cache, use_cache=True)
        outs.append(yt)
        assert cache["pos"] == t + 1
        if window is not None:
            assert cache["k"].shape[1] == min(t + 1, window - 1) <= window - 1
            assert cache["v"].shape[1] == cache["k"].shape[1]
        else:
            assert cache["k"].shape[1] == t + 1
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 1, 3, 4, 50])
def test_uneven_chunked_prefill_equals_full(window):
    m = _model(window)
    x = _x(T=29)
    full, _ = m(x)
    outs, cache = [], None
    for a, b in [(0, 1), (1, 8), (8, 9), (9, 20), (20, 22), (22, 29)]:
        y, cache = m(x[:, a:b], cache=cache, use_cache=True)
        outs.append(y)
        if window is not None:
            assert cache["k"].shape[1] <= window - 1
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    # use_cache=False with a cache: uses the context, returns no cache
    y_last, c = m(x[:, 28:], cache=_prefix_cache(m, x[:, :28]))
    assert c is None
    torch.testing.assert_close(y_last, full[:, 28:], rtol=1e-10, atol=1e-10)


def _prefix_cache(m, x):
    return m(x, use_cache=True)[1]


@pytest.mark.parametrize("window", [None, 3])
def test_causality(window):
    m = _model(window)
    x = _x(T=15)
    y, _ = m(x)
    for t in (0, 6, 13):
        x2 = x.clone()
        x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
        y2, _ = m(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])


def test_window_limits_context():
    """With window W, output at t does not depend on x at positions <= t - W."""
    m = _model(window=4)
    x = _x(T=12)
    y, _ = m(x)
    x2 = x.clone()
    x2[:, :3] += 1.0  # positions 0..2 are out of reach of queries >= 6
    y2, _ = m(x2)
    torch.testing.assert_close(y2[:, 6:], y[:, 6:], rtol=0, atol=1e-12)
    assert not torch.allclose(y2[:, 5], y[:, 5])


def test_module_backward_windowed_blocked_path():
    m = Attention(16, 2, window=3).to(torch.float32)
    x = torch.randn(2, 150, 16, requires_grad=True)  # > default block of 64 queries: several blocks
    y, _ = m(x)
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for p in m.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_module_float32_and_bfloat16_run():
    m = Attention(16, 4, window=5)
    x = torch.randn(1, 9, 16)
    y, cache = m(x, use_cache=True)
    assert y.dtype == torch.float32 and cache["k"].dtype == torch.float32
    mb = Attention(16, 4, qk_norm=True).to(torch.bfloat16)
    yb, _ = mb(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb.float()).all()


def test_explicit_head_dim():
    m = Attention(12, 3, head_dim=6).to(F64)
    assert m.q_proj.out_features == 18 and m.o_proj.in_features == 18
    y, _ = m(_x(T=5, D=12))
    assert y.shape == (2, 5, 12)


def test_module_bad_configs_and_inputs():
    with pytest.raises(ValueError):
        Attention(10, 3)  # not divisible
    with pytest.raises(ValueError):
        Attention(16, 0)
    with pytest.raises(ValueError):
        Attention(16, 2, window=0)
    with pytest.raises(TypeError):
        Attention(16, 2, window=2.0)
    with pytest.raises(TypeError):
        Attention(16, 2, window=True)
    with pytest.raises(ValueError):
        Attention(16, 2, head_dim=5)  # odd head_dim: RoPE needs even
    with pytest.raises(ValueError):
        Attention(6, 2)  # head_dim 3 is odd
    with pytest.raises(TypeError):
        Attention(16.0, 2)
    m = _model(window=3)
    with pytest.raises(ValueError):
        m(_x(D=8))
    with pytest.raises(ValueError):
        m(_x(T=0))
    with pytest.raises(TypeError):
        m(_x().long())
    _, cache = m(_x(B=2, T=5), use_cache=True)
    with pytest.raises(ValueError, match="batch"):
        m(_x(B=3, T=1), cache=cache)
    with pytest.raises(TypeError):
        m(_x(T=1), cache={"k": cache["k"]})
    with pytest.raises(ValueError):
        m(_x(T=1), cache={**cache, "pos": 1})  # inconsistent with 2 cached keys
    with pytest.raises(TypeError):
        m(_x(T=1).float(), cache=cache)  # dtype mismatch with cache


# ----------------------------------------------------------------------------- RoPE


def test_rope_relative_position():
    rope = RotaryEmbedding(8)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 8, generator=g, dtype=F64)
    k = torch.randn(1, 1, 1, 8, generator=g, dtype=F64)

    def score(m, n):
        return (rope(q, offset=m) * rope(k, offset=n)).sum().item()

    for delta in (0, 1, 5, -3):
        ref = score(10, 10 - delta)
        for m in (20, 37, 1000):
            assert score(m, m - delta) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert score(3, 0) != pytest.approx(score(3, 1), rel=1e-6)
    # norm preserved (orthogonal rotation)
    torch.testing.assert_close(rope(q, offset=123).norm(), q.norm())


def test_rope_offset_and_dtype():
    rope = RotaryEmbedding(6, base=500.0)
    x = torch.randn(2, 10, 3, 6, dtype=F64)
    full = rope(x, offset=0)
    torch.testing.assert_close(rope(x[:, 4:], offset=4), full[:, 4:])
    torch.testing.assert_close(rope(x[:, :1], offset=0), x[:, :1])  # position 0: identity
    # position 1, pair 0 (theta = 1): rotation by 1 radian in the (x_0, x_3) plane
    c, s = torch.cos(torch.tensor(1.0, dtype=F64)), torch.sin(torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(full[:, 1, :, 0], x[:, 1, :, 0] * c - x[:, 1, :, 3] * s)
    torch.testing.assert_close(full[:, 1, :, 3], x[:, 1, :, 3] * c + x[:, 1, :, 0] * s)
    y32 = rope(x.float(), offset=0)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), full, rtol=1e-5, atol=1e-5)
    ybf = rope(x.bfloat16(), offset=3)
    assert ybf.dtype == torch.bfloat16
    assert "inv_freq" not in rope.state_dict()


def test_rope_bad_args():
    with pytest.raises(ValueError):
        RotaryEmbedding(7)
    with pytest.raises(ValueError):
        RotaryEmbedding(0)
    with pytest.raises(ValueError):
        RotaryEmbedding(8, base=-1.0)
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError):
        rope(torch.randn(1, 2, 3, 6), offset=0)
    with pytest.raises(ValueError):
        rope(torch.randn(1, 2, 3, 8), offset=-1)
    with pytest.raises(TypeError):
        rope(torch.randn(1, 2, 3, 8), offset=1.5)
    with pytest.raises(TypeError):
        rope(torch.ones(1, 2, 3, 8, dtype=torch.long), offset=0)
