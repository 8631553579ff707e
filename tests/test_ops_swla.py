"""SWLA (c = 2): chunked form vs per-token reference vs step loop; states, grads, chaining, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from growmem.ops.swla import chunk_swla, naive_swla, step_swla
from helpers import rel_err


def make(B, T, H, K, V, dtype=torch.float64, seed=0, state=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    gate = F.logsigmoid(r(B, T, H) + 2)
    b, c = torch.sigmoid(r(B, T, H)), torch.sigmoid(r(B, T, H))
    s0 = (r(B, H, K, V), r(B, H, K), r(B, H, V)) if state else None
    return q, k, v, gate, b, c, s0


@pytest.mark.parametrize("B,T,H,K,V,C", [(2, 37, 2, 8, 6, 16), (1, 1, 1, 4, 4, 8), (1, 5, 3, 4, 5, 16),
                                         (2, 64, 2, 8, 8, 16)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_equals_naive_and_step(B, T, H, K, V, C, with_state):
    q, k, v, g, b, c, s0 = make(B, T, H, K, V, state=with_state)
    o_ref, s_ref = naive_swla(q, k, v, g, b, c, initial_state=s0, output_final_state=True)
    o, s = chunk_swla(q, k, v, g, b, c, initial_state=s0, output_final_state=True, chunk_size=C)
    assert rel_err(o, o_ref) < 1e-11
    for x, y in zip(s, s_ref, strict=True):
        assert rel_err(x, y) < 1e-11
    state, outs = s0, []
    for t in range(T):
        o_t, state = step_swla(q[:, t], k[:, t], v[:, t], g[:, t], b[:, t], c[:, t], state)
        outs.append(o_t)
    assert rel_err(torch.stack(outs, 1), o_ref) < 1e-11
    assert rel_err(state[0], s_ref[0]) < 1e-11


def test_gradients_match_naive():
    q, k, v, g, b, c, s0 = make(2, 29, 2, 6, 5, state=True)
    inputs = [q, k, v, g, b, c, *s0]
    for x in inputs:
        x.requires_grad_(True)
    w = torch.randn(2, 29, 2, 5, dtype=torch.float64)

    def loss(fn, **kw):
        o, s = fn(q, k, v, g, b, c, initial_state=tuple(s0), output_final_state=True, **kw)
        return (o * w).sum() + s[0].square().sum() + s[1].sum() + s[2].sum()

    g_ref = torch.autograd.grad(loss(naive_swla), inputs)
    g_chk = torch.autograd.grad(loss(chunk_swla, chunk_size=8), inputs)
    for a, r in zip(g_chk, g_ref, strict=True):
        assert rel_err(a, r) < 1e-10


def test_gradcheck_tiny():
    q, k, v, g, b, c, s0 = make(1, 6, 1, 3, 2, state=True)
    ins = [x.requires_grad_(True) for x in (q, k, v, g, b, c, *s0)]

    def f(q, k, v, g, b, c, S, kl, vl):
        o, s = chunk_swla(q, k, v, g, b, c, initial_state=(S, kl, vl), output_final_state=True, chunk_size=4)
        return o, s[0]

    assert torch.autograd.gradcheck(f, ins)


def test_chunk_states_are_states_after_each_chunk():
    q, k, v, g, b, c, s0 = make(1, 21, 2, 4, 3, state=True)
    _, _, cs = chunk_swla(q, k, v, g, b, c, initial_state=s0, chunk_size=8, return_chunk_states=True)
    assert cs.shape == (1, 3, 2, 4, 3)
    for i, end in enumerate([8, 16, 21]):
        _, s = naive_swla(q[:, :end], k[:, :end], v[:, :end], g[:, :end], b[:, :end], c[:, :end],
                          initial_state=s0, output_final_state=True)
        assert rel_err(cs[:, i], s[0]) < 1e-11


def test_chaining_two_halves():
    q, k, v, g, b, c, _ = make(2, 50, 2, 4, 4)
    o_full, s_full = chunk_swla(q, k, v, g, b, c, output_final_state=True, chunk_size=16)
    cut = 23  # not on a chunk boundary
    sl = lambda x, a, z: x[:, a:z]  # noqa: E731
    o1, s1 = chunk_swla(*(sl(x, 0, cut) for x in (q, k, v, g, b, c)), output_final_state=True, chunk_size=16)
    o2, s2 = chunk_swla(*(sl(x, cut, 50) for x in (q, k, v, g, b, c)), initial_state=s1,
                        output_final_state=True, chunk_size=16)
    assert rel_err(torch.cat([o1, o2], 1), o_full) < 1e-12
    assert rel_err(s2[0], s_full[0]) < 1e-12


def test_long_strong_decay_stays_finite():
    T = 65536
    q, k, v = (torch.randn(1, T, 1, 8) for _ in range(3))
    g = torch.full((1, T, 1), -5.0)
    b = c = torch.full((1, T, 1), 0.5)
    o, s = chunk_swla(q, k, v, g, b, c, output_final_state=True, chunk_size=64)
    assert torch.isfinite(o).all() and torch.isfinite(s[0]).all()
    # strong decay: the last outputs depend only on the last few tokens
    o_tail, _ = chunk_swla(q[:, -64:], k[:, -64:], v[:, -64:], g[:, -64:], b[:, -64:], c[:, -64:])
    assert rel_err(o[:, -32:], o_tail[:, -32:]) < 1e-5


def test_bad_inputs():
    q, k, v, g, b, c, _ = make(1, 4, 1, 4, 4)
    with pytest.raises(ValueError):
        chunk_swla(q, k, v, g[:, :3], b, c)
    with pytest.raises(ValueError):
        chunk_swla(q, k, v, g, b, c, chunk_size=0)
    with pytest.raises(TypeError):
        chunk_swla(q, k, v, g, b, c, initial_state=torch.zeros(1, 1, 4, 4, dtype=torch.float64))
    bad = k.clone()
    bad[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        chunk_swla(q, bad, v, g, b, c)
