"""Tests of growmem.ops.delta_rule: chunked (WY) vs naive loop vs single-token steps.

Every test runs twice: with the fused CPU kernels (growmem.ops._native; forward and backward, float32 /
float64) and with the eager PyTorch forward and backward (``GROWMEM_NATIVE=0``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import growmem.ops.gla as gla_mod
from growmem.ops.delta_rule import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    naive_delta_rule,
    naive_gated_delta_rule,
    step_delta_rule,
    step_gated_delta_rule,
)
from helpers import use_backend

F64 = torch.float64


@pytest.fixture(autouse=True, params=["native", "eager"])
def forward_backend(request, monkeypatch):
    """Run the test with the fused CPU kernels, then with the PyTorch path."""
    use_backend(request.param, monkeypatch)
    return request.param


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make(B, T, H, K, V, dtype=F64, seed=0, requires_grad=False, init=True):
    gen = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=gen, dtype=dtype)

    t = {
        "q": rn(B, T, H, K),
        "k_raw": rn(B, T, H, K),
        "v": rn(B, T, H, V),
        "g_raw": rn(B, T, H),
        "b_raw": rn(B, T, H),
        "initial_state": rn(B, H, K, V) if init else None,
    }
    if requires_grad:
        for x in t.values():
            if x is not None:
                x.requires_grad_(True)
    return t


def inputs(t, gated):
    """Layer-style inputs: L2-normalized k, beta = sigmoid, g = -softplus (log-decay <= 0)."""
    k = F.normalize(t["k_raw"], dim=-1)
    beta = torch.sigmoid(t["b_raw"])
    g = -F.softplus(t["g_raw"]) if gated else None
    return t["q"], k, t["v"], g, beta


def run_chunk(t, gated, chunk_size, **kw):
    q, k, v, g, beta = inputs(t, gated)
    if gated:
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=t["initial_state"],
                                      output_final_state=True, chunk_size=chunk_size, **kw)
    return chunk_delta_rule(q, k, v, beta, initial_state=t["initial_state"], output_final_state=True,
                            chunk_size=chunk_size, **kw)


def run_naive(t, gated, T=None):
    q, k, v, g, beta = inputs(t, gated)
    if T is not None:
        q, k, v, beta = q[:, :T], k[:, :T], v[:, :T], beta[:, :T]
        g = g[:, :T] if gated else None
    if gated:
        return naive_gated_delta_rule(q, k, v, g, beta, initial_state=t["initial_state"],
                                      output_final_state=True)
    return naive_delta_rule(q, k, v, beta, initial_state=t["initial_state"], output_final_state=True)


def run_steps(t, gated):
    q, k, v, g, beta = inputs(t, gated)
    S = t["initial_state"]
    outs = []
    for i in range(q.shape[1]):
        if gated:
            o, S = step_gated_delta_rule(q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], S)
        else:
            o, S = step_delta_rule(q[:, i], k[:, i], v[:, i], beta[:, i], S)
        outs.append(o)
    return torch.stack(outs, dim=1), S


def grads(t, out):
    o, S = out[0], out[1]
    gen = torch.Generator().manual_seed(123)
    wo = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    wS = torch.randn(S.shape, generator=gen, dtype=S.dtype)
    loss = (o * wo).sum() + (S * wS).sum()
    names = [n for n, x in t.items() if x is not None]
    gs = torch.autograd.grad(loss, [t[n] for n in names], allow_unused=True)
    return {n: gr for n, gr in zip(names, gs, strict=True) if gr is not None}


# (B, T, H, K, V, chunk): T multiple of chunk, not a multiple, T < chunk, T = 1, K != V, chunk = 1
CONFIGS = [
    (2, 32, 2, 8, 8, 8),
    (2, 37, 3, 5, 7, 8),
    (1, 10, 2, 6, 4, 16),
    (2, 1, 2, 4, 6, 4),
    (1, 19, 1, 9, 3, 5),
    (1, 6, 2, 3, 3, 1),
]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_chunk_vs_naive_vs_step_f64(cfg, gated):
    B, T, H, K, V, C = cfg
    t = make(B, T, H, K, V, requires_grad=True, seed=sum(cfg))
    out_c = run_chunk(t, gated, C)
    out_n = run_naive(t, gated)
    out_s = run_steps(t, gated)
    assert out_c[0].shape == (B, T, H, V) and out_c[1].shape == (B, H, K, V)
    for a, b in zip(out_c, out_n, strict=True):
        assert rel(a, b) < 1e-9
    for a, b in zip(out_s, out_n, strict=True):
        assert rel(a, b) < 1e-9
    gc, gn, gs = grads(t, out_c), grads(t, out_n), grads(t, out_s)
    expected = {"q", "k_raw", "v", "b_raw", "initial_state"} | ({"g_raw"} if gated else set())
    assert set(gc) == set(gn) == set(gs) == expected
    for name in gn:
        assert rel(gc[name], gn[name]) < 1e-9, name
        assert rel(gs[name], gn[name]) < 1e-9, name


@pytest.mark.parametrize("gated", [False, True])
def test_no_initial_state_and_no_final_state(gated):
    t = make(2, 21, 2, 4, 5, init=False, seed=3)
    q, k, v, g, beta = inputs(t, gated)
    if gated:
        o, S = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=8)
        o_ref, _ = naive_gated_delta_rule(q, k, v, g, beta)
        o1, S1 = step_gated_delta_rule(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], None)
    else:
        o, S = chunk_delta_rule(q, k, v, beta, chunk_size=8)
        o_ref, _ = naive_delta_rule(q, k, v, beta)
        o1, S1 = step_delta_rule(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], None)
    assert S is None
    assert rel(o, o_ref) < 1e-9
    assert rel(o1, o_ref[:, 0]) < 1e-9
    assert S1.shape == (2, 2, 4, 5)


@pytest.mark.parametrize("gated", [False, True])
def test_float32(gated):
    t64 = make(2, 45, 2, 16, 12, seed=7)
    t32 = {n: (x.float() if x is not None else None) for n, x in t64.items()}
    o32, S32 = run_chunk(t32, gated, 16)
    o64, S64 = run_naive(t64, gated)
    assert o32.dtype == torch.float32 and S32.dtype == torch.float32
    assert rel(o32.double(), o64) < 1e-5
    assert rel(S32.double(), S64) < 1e-5


def test_bfloat16_runs():
    t = {n: (x.bfloat16() if x is not None else None) for n, x in make(1, 20, 2, 8, 8, seed=2).items()}
    o, S = run_chunk(t, True, 8)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.bfloat16
    o_ref, _ = run_naive(make(1, 20, 2, 8, 8, seed=2), True)
    assert rel(o.double(), o_ref) < 5e-2


def test_scale():
    t = make(1, 13, 2, 4, 4, seed=4)
    q, k, v, g, beta = inputs(t, True)
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, scale=0.3, chunk_size=4)
    o_ref, _ = naive_gated_delta_rule(q, k, v, g, beta, scale=0.3)
    o_def, _ = naive_gated_delta_rule(q * (0.3 * 2.0), k, v, g, beta)  # default scale 1/sqrt(4)
    assert rel(o, o_ref) < 1e-9
    assert rel(o_def, o_ref) < 1e-9


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T,C", [(32, 8), (29, 8), (5, 8)])
def test_chunk_states(gated, T, C):
    t = make(2, T, 2, 4, 6, seed=T)
    o, S, cs = run_chunk(t, gated, C, return_chunk_states=True)
    NC = -(-T // C)
    assert cs.shape == (2, NC, 2, 4, 6)
    assert torch.equal(cs[:, -1], S)
    for n in range(NC):
        _, S_ref = run_naive(t, gated, T=min((n + 1) * C, T))
        assert rel(cs[:, n], S_ref) < 1e-9


@pytest.mark.parametrize("gated", [False, True])
def test_padding_does_not_change_state(gated):
    # The same 13 tokens with chunk sizes that need 0, 3 and 19 padded tokens give the same state.
    t = make(1, 13, 2, 4, 4, seed=9)
    ref = run_chunk(t, gated, 13)
    for C in (8, 32):
        o, S = run_chunk(t, gated, C)
        assert rel(S, ref[1]) < 1e-12
        assert rel(o, ref[0]) < 1e-12


def test_gradcheck():
    t = make(1, 5, 1, 3, 2, requires_grad=True, seed=11)

    def f_gated(q, k_raw, v, g_raw, b_raw, s0):
        tt = {"q": q, "k_raw": k_raw, "v": v, "g_raw": g_raw, "b_raw": b_raw, "initial_state": s0}
        return run_chunk(tt, True, 2)

    def f_plain(q, k_raw, v, b_raw, s0):
        tt = {"q": q, "k_raw": k_raw, "v": v, "g_raw": None, "b_raw": b_raw, "initial_state": s0}
        return run_chunk(tt, False, 2)

    # raw g (not through softplus) too, so that g itself is checked
    def f_rawg(q, k, v, g, beta, s0):
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                      chunk_size=3)

    args = [t[n] for n in ("q", "k_raw", "v", "g_raw", "b_raw", "initial_state")]
    assert torch.autograd.gradcheck(f_gated, args)
    assert torch.autograd.gradcheck(f_plain, [t[n] for n in ("q", "k_raw", "v", "b_raw", "initial_state")])
    q, k, v, g, beta = (x.detach().requires_grad_(True) for x in inputs(t, True))
    s0 = t["initial_state"].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(f_rawg, [q, k, v, g, beta, s0])


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("split", [16, 13])
def test_chaining(gated, split):
    C = 8
    t = make(2, 30, 2, 4, 5, seed=split)
    q, k, v, g, beta = inputs(t, gated)

    def run(sl, s0):
        if gated:
            return chunk_gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl],
                                          initial_state=s0, output_final_state=True, chunk_size=C)
        return chunk_delta_rule(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], initial_state=s0,
                                output_final_state=True, chunk_size=C)

    o_full, S_full = run(slice(None), t["initial_state"])
    o1, S1 = run(slice(None, split), t["initial_state"])
    o2, S2 = run(slice(split, None), S1)
    assert rel(torch.cat([o1, o2], dim=1), o_full) < 1e-12
    assert rel(S2, S_full) < 1e-12


def test_long_strong_decay_finite():
    T = 65536
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, 1, 8, generator=gen)
    k = F.normalize(torch.randn(1, T, 1, 8, generator=gen), dim=-1)
    v = torch.randn(1, T, 1, 8, generator=gen)
    beta = torch.sigmoid(torch.randn(1, T, 1, generator=gen))
    g = torch.full((1, T, 1), -5.0)
    o, S = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    # with decay e^-5 per step the state only remembers the last few tokens
    _, S_tail = naive_gated_delta_rule(q[:, -16:], k[:, -16:], v[:, -16:], g[:, -16:], beta[:, -16:],
                                       output_final_state=True)
    assert rel(S, S_tail) < 1e-5


def _bad_cases():
    q = torch.randn(1, 4, 2, 3)
    k = F.normalize(torch.randn(1, 4, 2, 3), dim=-1)
    v = torch.randn(1, 4, 2, 5)
    g = -torch.rand(1, 4, 2)
    b = torch.rand(1, 4, 2)
    nan_v = v.clone()
    nan_v[0, 1, 0, 0] = float("nan")
    inf_g = g.clone()
    inf_g[0, 0, 0] = float("-inf")
    return {
        "rank": dict(q=q[0], k=k[0], v=v[0], g=g[0], beta=b[0]),
        "qk_shape": dict(q=q, k=k[..., :2], v=v, g=g, beta=b),
        "v_shape": dict(q=q, k=k, v=v[:, :3], g=g, beta=b),
        "beta_shape": dict(q=q, k=k, v=v, g=g, beta=b[..., :1]),
        "beta_per_key": dict(q=q, k=k, v=v, g=g, beta=b[..., None].expand(1, 4, 2, 3)),
        "g_shape": dict(q=q, k=k, v=v, g=g[:, :3], beta=b),
        "nan": dict(q=q, k=k, v=nan_v, g=g, beta=b),
        "inf_g": dict(q=q, k=k, v=v, g=inf_g, beta=b),
        "int_dtype": dict(q=q.long(), k=k.long(), v=v.long(), g=g, beta=b),
        "int_beta": dict(q=q, k=k, v=v, g=g, beta=b.long()),
        "mixed_dtype": dict(q=q, k=k.double(), v=v, g=g, beta=b),
        "empty": dict(q=q[:, :0], k=k[:, :0], v=v[:, :0], g=g[:, :0], beta=b[:, :0]),
        "chunk_size_0": dict(q=q, k=k, v=v, g=g, beta=b, chunk_size=0),
        "chunk_size_float": dict(q=q, k=k, v=v, g=g, beta=b, chunk_size=8.0),
        "init_shape": dict(q=q, k=k, v=v, g=g, beta=b, initial_state=torch.zeros(1, 2, 5, 3)),
        "init_nan": dict(q=q, k=k, v=v, g=g, beta=b, initial_state=torch.full((1, 2, 3, 5), float("nan"))),
    }


def _applicable(case: str, fn: str) -> bool:
    """Cases about g do not apply to the ungated rule; chunk_size cases do not apply to the loops."""
    if fn.endswith("plain") and case in ("g_shape", "inf_g"):
        return False
    return not (fn.startswith("naive") and case.startswith("chunk_size"))


@pytest.mark.parametrize("case,fn", [(c, f) for c in _bad_cases()
                                     for f in ("chunk", "naive", "chunk_plain", "naive_plain") if _applicable(c, f)])
def test_bad_inputs_raise(case, fn):
    kw = dict(_bad_cases()[case])
    if fn.endswith("plain"):
        kw.pop("g")
    if fn.startswith("naive"):
        kw.pop("chunk_size", None)
    f = {"chunk": chunk_gated_delta_rule, "naive": naive_gated_delta_rule,
         "chunk_plain": chunk_delta_rule, "naive_plain": naive_delta_rule}[fn]
    args = [kw.pop(n) for n in ("q", "k", "v", "g", "beta") if n in kw]
    with pytest.raises((ValueError, TypeError)):
        f(*args, **kw)


def test_step_bad_inputs_raise():
    q = torch.randn(2, 3, 4)
    k = F.normalize(torch.randn(2, 3, 4), dim=-1)
    v = torch.randn(2, 3, 5)
    g, b = -torch.rand(2, 3), torch.rand(2, 3)
    S = torch.zeros(2, 3, 4, 5)
    step_gated_delta_rule(q, k, v, g, b, S)  # fine
    with pytest.raises(ValueError):
        step_gated_delta_rule(q[None], k[None], v[None], g, b, S)
    with pytest.raises(ValueError):
        step_gated_delta_rule(q, k, v, g[:, :1], b, S)
    with pytest.raises(ValueError):
        step_delta_rule(q, k, v, b[:1], S)
    with pytest.raises(ValueError):
        step_delta_rule(q, k, v, b, S[..., :4])
    with pytest.raises(ValueError):
        step_delta_rule(q, k, v * float("nan"), b, S)
    with pytest.raises(TypeError):
        step_delta_rule(q.int(), k.int(), v.int(), b, S)


@pytest.mark.parametrize("chunks_per_block", [1, 2, 5])
def test_mixed_factored_and_masked_decay_blocks(monkeypatch, chunks_per_block):
    """One chunk decays beyond the factoring limit (log decay 8 * 30 = 240 > 177 in float64): its
    block builds the masked decay matrix, the others factor the decay through the chunk end. Outputs,
    final state and every grad must still match the naive loop."""
    B, T, H, K, V, C = 2, 37, 2, 5, 7, 8
    monkeypatch.setattr(gla_mod, "_BLOCK_ELEMS", chunks_per_block * B * H * C * max(C, K + V))
    t = make(B, T, H, K, V, requires_grad=True, seed=4)
    with torch.no_grad():
        t["g_raw"][:, 8:16] = 30.0  # g = -softplus(30) ~ -30 on chunk 1
    assert gla_mod._factor_limit(F64) < 8 * 29
    out_c, out_n = run_chunk(t, True, C), run_naive(t, True)
    for a, b in zip(out_c, out_n, strict=True):
        assert rel(a, b) < 1e-9
    gc, gn = grads(t, out_c), grads(t, out_n)
    assert set(gc) == set(gn)
    for name in gn:
        assert rel(gc[name], gn[name]) < 1e-9, name


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunks_per_block", [1, 3])
def test_several_blocks(monkeypatch, gated, chunks_per_block):
    """States and their grads carried across blocks of chunks (forward and backward)."""
    B, T, H, K, V, C = 2, 45, 2, 4, 5, 8
    monkeypatch.setattr(gla_mod, "_BLOCK_ELEMS", chunks_per_block * B * H * C * max(C, K + V))
    t = make(B, T, H, K, V, requires_grad=True, seed=21)
    out_c, out_n = run_chunk(t, gated, C), run_naive(t, gated)
    for a, b in zip(out_c, out_n, strict=True):
        assert rel(a, b) < 1e-9
    gc, gn = grads(t, out_c), grads(t, out_n)
    for name in gn:
        assert rel(gc[name], gn[name]) < 1e-9, name


@pytest.mark.parametrize("gated", [False, True])
def test_grads_through_chunk_states(gated):
    """A loss on o, the chunk states and the final state: grads equal those of naive runs on prefixes."""
    T, C = 29, 8
    ends = [8, 16, 24, 29]
    t = make(2, T, 2, 4, 6, requires_grad=True, seed=12)
    gen = torch.Generator().manual_seed(3)
    wo = torch.randn(2, T, 2, 6, generator=gen, dtype=F64)
    wc = torch.randn(2, len(ends), 2, 4, 6, generator=gen, dtype=F64)
    wS = torch.randn(2, 2, 4, 6, generator=gen, dtype=F64)
    o, S, cs = run_chunk(t, gated, C, return_chunk_states=True)
    loss_c = (o * wo).sum() + (cs * wc).sum() + (S * wS).sum()
    o_n, S_n = run_naive(t, gated)
    loss_n = (o_n * wo).sum() + (S_n * wS).sum()
    for n, end in enumerate(ends):
        loss_n = loss_n + (run_naive(t, gated, T=end)[1] * wc[:, n]).sum()
    names = [n for n, x in t.items() if x is not None and (gated or n != "g_raw")]
    g_c = torch.autograd.grad(loss_c, [t[n] for n in names])
    g_n = torch.autograd.grad(loss_n, [t[n] for n in names])
    for name, a, b in zip(names, g_c, g_n, strict=True):
        assert rel(a, b) < 1e-9, name


def test_chunk_sizes_around_the_inverse_blocking():
    """Chunk sizes where the unit-lower-triangular inverse doubles from 16-blocks (32, 64) or falls
    back to one triangular solve (24, 48)."""
    t = make(1, 100, 2, 4, 4, seed=8)
    ref = run_naive(t, True)
    for C in (24, 32, 48, 64):
        out = run_chunk(t, True, C)
        for a, b in zip(out, ref, strict=True):
            assert rel(a, b) < 1e-9, C
