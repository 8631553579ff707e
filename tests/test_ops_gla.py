"""Tests of gated / plain linear attention: chunked vs naive vs step-loop, states, stability, errors.

Every test runs twice: with the fused CPU kernel (growmem.ops._native: no or scalar decay, float32 /
float64) and with the eager PyTorch form (``GROWMEM_NATIVE=0``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import growmem.ops.gla as gla_mod
from growmem.ops.gla import chunk_gla, naive_gla, step_gla
from growmem.ops.linear_attn import chunk_linear_attn, naive_linear_attn, step_linear_attn
from growmem.ops.utils import check_finite
from helpers import use_backend

F64 = torch.float64


@pytest.fixture(autouse=True, params=["native", "eager"])
def forward_backend(request, monkeypatch):
    """Run the test with the fused CPU kernels, then with the PyTorch path."""
    use_backend(request.param, monkeypatch)
    return request.param


GATES = ["none", "scalar", "key", "norm"]  # "norm": normalized linear attention (no gate)
SHAPES = [  # (B, T, H, K, V, chunk)
    (2, 37, 3, 4, 5, 8),  # T not a multiple of the chunk, K != V
    (1, 1, 2, 3, 3, 64),  # T = 1
    (1, 10, 2, 4, 6, 64),  # T < chunk
    (2, 64, 1, 8, 8, 16),  # exact multiple
    (1, 50, 2, 4, 6, 7),  # odd chunk (per-key sub-chunk of 1)
    (1, 40, 1, 6, 3, 12),  # chunk 12 -> per-key sub-chunk 3, K > V
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make(B, T, H, K, V, gate, dtype=F64, seed=0, state=True):
    """Random inputs; positive q, k for the normalized variant; state has V + 1 columns there."""
    gen = torch.Generator().manual_seed(seed)
    if gate == "norm":
        q = torch.rand(B, T, H, K, generator=gen, dtype=dtype) + 0.1
        k = torch.rand(B, T, H, K, generator=gen, dtype=dtype) + 0.1
    else:
        q = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
        k = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g = None
    if gate == "scalar":
        g = -torch.rand(B, T, H, generator=gen, dtype=dtype) - 0.01
    elif gate == "key":
        g = -2 * torch.rand(B, T, H, K, generator=gen, dtype=dtype) - 0.01
    s0 = None
    if state:
        Vs = V + 1 if gate == "norm" else V
        s0 = torch.randn(B, H, K, Vs, generator=gen, dtype=dtype)
        if gate == "norm":
            s0[..., -1] = s0[..., -1].abs() + 0.5  # a positive normalizer
    return q, k, v, g, s0


def run_naive(q, k, v, g, s0, gate):
    if gate == "norm":
        return naive_linear_attn(q, k, v, initial_state=s0, output_final_state=True, normalize=True)
    return naive_gla(q, k, v, g, initial_state=s0, output_final_state=True)


def run_chunk(q, k, v, g, s0, gate, chunk, **kw):
    if gate == "norm":
        return chunk_linear_attn(q, k, v, initial_state=s0, output_final_state=True, chunk_size=chunk,
                                 normalize=True, **kw)
    return chunk_gla(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=chunk, **kw)


def run_step(q, k, v, g, s0, gate):
    S, outs = s0, []
    for t in range(q.shape[1]):
        if gate == "norm":
            o, S = step_linear_attn(q[:, t], k[:, t], v[:, t], S, normalize=True)
        else:
            o, S = step_gla(q[:, t], k[:, t], v[:, t], None if g is None else g[:, t], S)
        outs.append(o)
    return torch.stack(outs, 1), S


def outputs_and_grads(fn, inputs):
    """Forward with grads enabled; returns (o, final_state, grads of every non-None input)."""
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in inputs]
    o, f = fn(*leaves)[:2]
    gen = torch.Generator().manual_seed(123)
    wo = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    wf = torch.randn(f.shape, generator=gen, dtype=f.dtype)
    ((o * wo).sum() + (f * wf).sum()).backward()
    return o.detach(), f.detach(), [x.grad for x in leaves if x is not None]


# ----------------------------------------------------------------------------------------------
# equivalence
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", SHAPES)
def test_chunk_naive_step_agree(gate, shape):
    B, T, H, K, V, C = shape
    inputs = make(B, T, H, K, V, gate)
    o_n, f_n, g_n = outputs_and_grads(lambda *x: run_naive(*x, gate), inputs)
    o_c, f_c, g_c = outputs_and_grads(lambda *x: run_chunk(*x, gate, C), inputs)
    o_s, f_s, g_s = outputs_and_grads(lambda *x: run_step(*x, gate), inputs)
    assert o_c.shape == (B, T, H, V)
    assert f_c.shape == (B, H, K, V + (gate == "norm"))
    for o, f, grads in ((o_c, f_c, g_c), (o_s, f_s, g_s)):
        assert rel(o, o_n) < 1e-10
        assert rel(f, f_n) < 1e-10
        assert len(grads) == len(g_n) == (5 if inputs[3] is not None else 4)
        for a, b in zip(grads, g_n, strict=True):
            assert rel(a, b) < 1e-10


@pytest.mark.parametrize("gate", GATES)
def test_float32(gate):
    B, T, H, K, V, C = 2, 100, 2, 16, 8, 32
    inputs = make(B, T, H, K, V, gate, dtype=torch.float32)
    o, f = run_chunk(*inputs, gate, C)
    assert o.dtype == f.dtype == torch.float32
    o_ref, f_ref = run_naive(*[None if x is None else x.double() for x in inputs], gate)
    assert rel(o.double(), o_ref) < 1e-5
    assert rel(f.double(), f_ref) < 1e-5


@pytest.mark.parametrize("gate", GATES)
def test_chunk_states(gate):
    B, T, H, K, V, C = 1, 29, 2, 4, 3, 8
    inputs = make(B, T, H, K, V, gate)
    q, k, v, g, s0 = inputs
    o, f, cs = run_chunk(*inputs, gate, C, return_chunk_states=True)
    assert cs.shape == (B, 4, H, K, V + (gate == "norm"))
    assert torch.equal(cs[:, -1], f)
    for n, end in enumerate([8, 16, 24, 29]):
        ref = run_naive(q[:, :end], k[:, :end], v[:, :end], None if g is None else g[:, :end], s0, gate)[1]
        assert rel(cs[:, n], ref) < 1e-12


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("split", [16, 21])  # on / off a chunk boundary (chunk 8)
def test_chaining(gate, split):
    B, T, H, K, V, C = 2, 45, 2, 4, 5, 8
    q, k, v, g, s0 = make(B, T, H, K, V, gate)
    o, f = run_chunk(q, k, v, g, s0, gate, C)
    a, b = slice(None, split), slice(split, None)
    o1, f1 = run_chunk(q[:, a], k[:, a], v[:, a], None if g is None else g[:, a], s0, gate, C)
    o2, f2 = run_chunk(q[:, b], k[:, b], v[:, b], None if g is None else g[:, b], f1, gate, C)
    assert rel(torch.cat([o1, o2], 1), o) < 1e-12
    assert rel(f2, f) < 1e-12


@pytest.mark.parametrize("gate", ["none", "scalar", "key"])
def test_gradcheck(gate):
    q, k, v, g, s0 = make(1, 5, 1, 3, 2, gate, seed=3)
    inputs = tuple(x.requires_grad_(True) for x in (q, k, v, g, s0) if x is not None)

    def fn(*xs):
        q, k, v = xs[:3]
        g = xs[3] if gate != "none" else None
        s0 = xs[-1]
        o, f = chunk_gla(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=4)
        return o, f

    assert torch.autograd.gradcheck(fn, inputs)


# (the backend fixture only sets an environment variable, the same for every example)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 40), chunk=st.integers(1, 20), gate=st.sampled_from(GATES), seed=st.integers(0, 99))
def test_random_padding(T, chunk, gate, seed):
    q, k, v, g, s0 = make(1, T, 2, 4, 3, gate, seed=seed, state=seed % 2 == 0)
    o_n, f_n = run_naive(q, k, v, g, s0, gate)
    o_c, f_c, cs = run_chunk(q, k, v, g, s0, gate, chunk, return_chunk_states=True)
    assert cs.shape[1] == -(-T // chunk)
    assert rel(o_c, o_n) < 1e-10
    assert rel(f_c, f_n) < 1e-10


def test_no_initial_state_and_no_final_state():
    q, k, v, g, _ = make(1, 9, 1, 2, 2, "scalar", state=False)
    o, f = chunk_gla(q, k, v, g)
    assert f is None
    assert rel(o, naive_gla(q, k, v, g)[0]) < 1e-12
    o1, s1 = step_gla(q[:, 0], k[:, 0], v[:, 0], g[:, 0], None)
    assert rel(o1, o[:, 0]) < 1e-12


def test_scale():
    q, k, v, g, s0 = make(1, 9, 1, 4, 2, "key")
    o1 = chunk_gla(q, k, v, g, scale=0.3, initial_state=s0, chunk_size=4)[0]
    o2 = naive_gla(q, k, v, g, scale=0.3, initial_state=s0)[0]
    o3 = chunk_gla(0.6 * q, k, v, g, initial_state=s0, chunk_size=4)[0]  # default K**-0.5 = 0.5
    assert rel(o1, o2) < 1e-12
    assert rel(o1, o3) < 1e-12


# ----------------------------------------------------------------------------------------------
# numerical stability
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate", ["scalar", "key"])
def test_long_strong_decay(gate):
    """T = 65536 at g ~ -5: finite, and (decay e^-5 per token) equal to a run on the last tokens only."""
    B, T, H, K, V = 1, 65536, 1, 8, 8
    q, k, v, _, _ = make(B, T, H, K, V, "none", state=False)
    gshape = (B, T, H) if gate == "scalar" else (B, T, H, K)
    g = torch.full(gshape, -5.0, dtype=F64)
    if gate == "key":
        g = g - torch.rand(gshape, dtype=F64)
    o, f = chunk_gla(q, k, v, g, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(f).all()
    w = 96  # tokens older than ~16 steps contribute < e^-80 relative
    tail = slice(T - w, None)
    o_s, f_s = chunk_gla(q[:, tail], k[:, tail], v[:, tail], g[:, tail], output_final_state=True)
    assert rel(o[:, -64:], o_s[:, -64:]) < 1e-12
    assert rel(f, f_s) < 1e-12
    o32 = chunk_gla(q.float(), k.float(), v.float(), g.float())[0]
    assert torch.isfinite(o32).all()
    assert rel(o32[:, -64:].double(), o_s[:, -64:]) < 1e-5


@pytest.mark.parametrize("gate", ["scalar", "key"])
def test_big_chunk_strong_decay_grads_finite(gate):
    """chunk 256 at g = -5: the in-chunk log decay reaches -1280, exp(+1280) would overflow float64."""
    B, T, H, K, V = 1, 600, 1, 4, 4
    q, k, v, _, _ = make(B, T, H, K, V, "none", state=False)
    g = torch.full((B, T, H) if gate == "scalar" else (B, T, H, K), -5.0, dtype=F64)
    xs = [x.requires_grad_(True) for x in (q, k, v, g)]
    o, f = chunk_gla(*xs, chunk_size=256, output_final_state=True)
    (o.sum() + f.sum()).backward()
    for x in [o, f] + [x.grad for x in xs]:
        assert torch.isfinite(x).all()
    o_ref = naive_gla(q.detach()[:, -40:], k.detach()[:, -40:], v.detach()[:, -40:], g.detach()[:, -40:])[0]
    assert rel(o.detach()[:, -20:], o_ref[:, -20:]) < 1e-12


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------

def test_bad_inputs():
    q, k, v, g, s0 = make(1, 6, 2, 4, 3, "scalar")
    with pytest.raises(ValueError, match="shape"):
        chunk_gla(q[0], k[0], v[0])  # wrong rank
    with pytest.raises(ValueError, match="same shape"):
        chunk_gla(q, k[..., :3], v)
    with pytest.raises(ValueError, match="v must have shape"):
        chunk_gla(q, k, v[:, :5])
    bad = k.clone()
    bad[0, 2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        chunk_gla(q, bad, v)
    with pytest.raises(ValueError, match="g must have shape"):
        chunk_gla(q, k, v, g[..., None])
    with pytest.raises(ValueError, match="g must have shape"):
        chunk_gla(q, k, v, g[:, :5])
    with pytest.raises(ValueError, match="<= 0"):
        chunk_gla(q, k, v, g.abs())
    with pytest.raises(ValueError, match="<= 0"):
        naive_gla(q, k, v, g.abs())
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gla(q, k, v, g, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_linear_attn(q, k, v, chunk_size=2.0)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gla(q, k, v, g, initial_state=s0[..., :2])
    with pytest.raises(ValueError, match="V \\+ 1"):
        chunk_linear_attn(q, k, v, initial_state=s0, normalize=True)
    with pytest.raises(TypeError, match="floating"):
        chunk_gla(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="dtype"):
        chunk_gla(q, k.float(), v)
    with pytest.raises(ValueError, match="empty"):
        chunk_gla(q[:, :0], k[:, :0], v[:, :0])
    # decoding step
    with pytest.raises(ValueError, match="shape"):
        step_gla(q, k, v, None, None)
    with pytest.raises(ValueError, match="g must have shape"):
        step_gla(q[:, 0], k[:, 0], v[:, 0], g[:, :2], None)
    with pytest.raises(ValueError, match="<= 0"):
        step_gla(q[:, 0], k[:, 0], v[:, 0], g[:, 0].abs(), None)
    with pytest.raises(ValueError, match="initial_state"):
        step_gla(q[:, 0], k[:, 0], v[:, 0], g[:, 0], s0[..., :2])
    with pytest.raises(ValueError, match="V \\+ 1"):
        step_linear_attn(q[:, 0], k[:, 0], v[:, 0], s0, normalize=True)


# ----------------------------------------------------------------------------------------------
# blocked form: factored vs masked decay, chunk-state grads, low precision, validation fast path
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunks_per_block", [1, 2, 5])
def test_mixed_factored_and_masked_decay_blocks(monkeypatch, chunks_per_block):
    """One chunk decays beyond the factoring limit (log decay 8 * 30 = 240 > 177 in float64): its
    block builds the masked decay matrix, the others factor the decay through the chunk end. Outputs,
    states and every grad must still match the naive loop."""
    B, T, H, K, V, C = 2, 37, 2, 4, 5, 8
    monkeypatch.setattr(gla_mod, "_BLOCK_ELEMS", chunks_per_block * B * H * C * max(C, K, V))
    q, k, v, g, s0 = make(B, T, H, K, V, "scalar", seed=5)
    g = g * 0.2
    g[:, 8:16] = -30.0  # chunk 1
    assert gla_mod._factor_limit(F64) < 8 * 30
    inputs = (q, k, v, g, s0)
    o_n, f_n, g_n = outputs_and_grads(lambda *x: run_naive(*x, "scalar"), inputs)
    o_c, f_c, g_c = outputs_and_grads(lambda *x: run_chunk(*x, "scalar", C), inputs)
    assert rel(o_c, o_n) < 1e-10
    assert rel(f_c, f_n) < 1e-10
    for a, b in zip(g_c, g_n, strict=True):
        assert rel(a, b) < 1e-10


@pytest.mark.parametrize("gate", ["none", "scalar", "norm"])
@pytest.mark.parametrize("chunks_per_block", [1, 3])
def test_several_blocks(monkeypatch, gate, chunks_per_block):
    """States and their grads carried across blocks of chunks (forward and backward)."""
    B, T, H, K, V, C = 2, 45, 2, 4, 5, 8
    monkeypatch.setattr(gla_mod, "_BLOCK_ELEMS", chunks_per_block * B * H * C * max(C, K, V + 1))
    inputs = make(B, T, H, K, V, gate, seed=11)
    o_n, f_n, g_n = outputs_and_grads(lambda *x: run_naive(*x, gate), inputs)
    o_c, f_c, g_c = outputs_and_grads(lambda *x: run_chunk(*x, gate, C), inputs)
    assert rel(o_c, o_n) < 1e-10
    assert rel(f_c, f_n) < 1e-10
    for a, b in zip(g_c, g_n, strict=True):
        assert rel(a, b) < 1e-10


@pytest.mark.parametrize("gate", ["none", "scalar", "key"])
def test_grads_through_chunk_states(gate):
    """A loss on o, the chunk states and the final state: grads equal those of naive runs on prefixes."""
    B, T, H, K, V, C = 2, 29, 2, 4, 3, 8
    inputs = make(B, T, H, K, V, gate, seed=7)
    ends = [8, 16, 24, 29]
    gen = torch.Generator().manual_seed(9)
    wo = torch.randn(B, T, H, V, generator=gen, dtype=F64)
    wc = torch.randn(B, len(ends), H, K, V, generator=gen, dtype=F64)
    wf = torch.randn(B, H, K, V, generator=gen, dtype=F64)

    def grads(loss_fn):
        leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in inputs]
        loss_fn(*leaves).backward()
        return [x.grad for x in leaves if x is not None]

    def chunked(q, k, v, g, s0):
        o, f, cs = run_chunk(q, k, v, g, s0, gate, C, return_chunk_states=True)
        return (o * wo).sum() + (cs * wc).sum() + (f * wf).sum()

    def naive(q, k, v, g, s0):
        o, f = run_naive(q, k, v, g, s0, gate)
        loss = (o * wo).sum() + (f * wf).sum()
        for n, end in enumerate(ends):
            gp = None if g is None else g[:, :end]
            loss = loss + (run_naive(q[:, :end], k[:, :end], v[:, :end], gp, s0, gate)[1] * wc[:, n]).sum()
        return loss

    for a, b in zip(grads(chunked), grads(naive), strict=True):
        assert rel(a, b) < 1e-10


@pytest.mark.parametrize("gate", ["none", "scalar"])
def test_bfloat16_runs(gate):
    q, k, v, g, s0 = make(1, 50, 2, 8, 8, gate, seed=2)
    xs = [None if x is None else x.bfloat16().requires_grad_(True) for x in (q, k, v, g, s0)]
    o, f = chunk_gla(*xs[:4], initial_state=xs[4], output_final_state=True, chunk_size=16)
    assert o.dtype == f.dtype == torch.bfloat16
    o_ref = naive_gla(q, k, v, g, initial_state=s0)[0]
    assert rel(o.double(), o_ref) < 5e-2
    (o.float().sum() + f.float().sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in xs if x is not None)


def test_check_finite_fast_path_is_exact():
    x = torch.full((3, 4), 1e308, dtype=F64)  # finite entries whose sum overflows
    check_finite("x", x)
    x[1, ::2] = -1e308  # the sum is now inf - inf = nan, the entries are still finite
    check_finite("x", x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = torch.zeros(5, dtype=torch.float32)
        y[3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            check_finite("y", y)
