"""Memory recurrent units: the parallel scan against its loop, the BMRU's hysteresis and persistent
memory, the LRU's equations, the mixers' decoding, the BMRU memory under Memory Caching, validation."""

from __future__ import annotations

import math

import pytest
import torch

from growmem.caching import CachedMemory, MCConfig, MCState
from growmem.caching.reference import naive_memory_caching
from growmem.layers.mru import BMRUCell, BMRUMixer, HybridMRUMixer, LRUCell, LRUMixer, MRUMixer
from growmem.memories.mru import BMRUMemory
from growmem.models import mixer_names
from growmem.ops.mru import bmru_coefficients, lru_eigenvalues, lru_init, naive_bmru
from growmem.ops.scan import SCAN_METHODS, naive_scan, parallel_scan, step_scan
from helpers import rel_err

F64, C128 = torch.float64, torch.complex128


def rand(*shape, dtype=F64, seed=0, zeros=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=F64)
    if dtype.is_complex:
        x = torch.complex(x, torch.randn(*shape, generator=g, dtype=F64))
    if zeros:
        x = torch.where(torch.rand(*shape, generator=g) < zeros, torch.zeros_like(x), x)
    return x


# ---- the scan ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", SCAN_METHODS)
@pytest.mark.parametrize("dtype", [F64, C128])
@pytest.mark.parametrize("T", [1, 2, 3, 7, 64, 133])
@pytest.mark.parametrize("with_h0", [False, True])
def test_scan_equals_loop(method, dtype, T, with_h0):
    a = 0.9 * rand(2, T, 3, 4, dtype=dtype, seed=1, zeros=0.3)
    b = rand(2, T, 3, 4, dtype=dtype, seed=2)
    h0 = rand(2, 3, 4, dtype=dtype, seed=3) if with_h0 else None
    ref = naive_scan(a, b, h0)
    for cs in (1, 3, 16, 1000):
        h = parallel_scan(a, b, h0, method=method, chunk_size=cs)
        assert h.shape == b.shape and h.dtype == dtype
        assert rel_err(h, ref) < 1e-13


@pytest.mark.parametrize("method", SCAN_METHODS)
@pytest.mark.parametrize("dtype", [F64, C128])
@pytest.mark.parametrize("T", [1, 2, 3, 6, 37])
def test_scan_gradients_equal_loop(method, dtype, T):
    a = (0.9 * rand(2, T, 5, dtype=dtype, seed=4, zeros=0.3)).requires_grad_()
    b = rand(2, T, 5, dtype=dtype, seed=5).requires_grad_()
    h0 = rand(2, 5, dtype=dtype, seed=6).requires_grad_()
    w = rand(2, T, 5, dtype=dtype, seed=7)
    g_ref = torch.autograd.grad((naive_scan(a, b, h0) * w).real.sum(), (a, b, h0))
    g = torch.autograd.grad((parallel_scan(a, b, h0, method=method, chunk_size=4) * w).real.sum(), (a, b, h0))
    for x, y in zip(g, g_ref, strict=True):
        assert rel_err(x, y) < 1e-12


@pytest.mark.parametrize("dtype", [F64, C128])
def test_scan_in_cache_sized_blocks_equals_loop(monkeypatch, dtype):
    import growmem.ops.scan as scan_mod

    monkeypatch.setattr(scan_mod, "_CPU_BLOCK_BYTES", 1)  # blocks of 256 tokens
    a = (0.95 * rand(2, 1000, 3, dtype=dtype, seed=29, zeros=0.05)).requires_grad_()
    b = rand(2, 1000, 3, dtype=dtype, seed=30).requires_grad_()
    h0 = rand(2, 3, dtype=dtype, seed=31).requires_grad_()
    h, ref = parallel_scan(a, b, h0), naive_scan(a, b, h0)
    assert rel_err(h, ref) < 1e-12
    w = rand(2, 1000, 3, dtype=dtype, seed=32)
    g = torch.autograd.grad((h * w).real.sum(), (a, b, h0))
    g_ref = torch.autograd.grad((ref * w).real.sum(), (a, b, h0))
    assert all(rel_err(x, y) < 1e-11 for x, y in zip(g, g_ref, strict=True))


def test_scan_gradcheck_and_double_backward():
    a = (0.8 * rand(1, 7, 2, seed=8, zeros=0.3)).requires_grad_()
    b = rand(1, 7, 2, seed=9).requires_grad_()
    h0 = rand(1, 2, seed=10).requires_grad_()
    assert torch.autograd.gradcheck(parallel_scan, (a, b, h0))
    assert torch.autograd.gradgradcheck(parallel_scan, (a, b, h0))
    ac = rand(1, 5, 2, dtype=C128, seed=11).requires_grad_()
    bc = rand(1, 5, 2, dtype=C128, seed=12).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: parallel_scan(a, b, h0), (ac, bc))


def test_scan_broadcasting_and_mixed_dtypes():
    lam = (0.9 * torch.exp(1j * rand(6, seed=13))).to(C128).requires_grad_()  # a time-constant complex decay [N]
    b = rand(2, 11, 6, dtype=C128, seed=14)
    h0 = rand(6, dtype=C128, seed=15)  # broadcast over the batch
    h = parallel_scan(lam, b, h0)
    ref = naive_scan(lam.expand(2, 11, 6), b, h0.expand(2, 6))
    assert rel_err(h, ref) < 1e-13
    (gl,) = torch.autograd.grad(h.abs().sum(), lam)
    (gr,) = torch.autograd.grad(ref.abs().sum(), lam)
    assert gl.shape == (6,) and rel_err(gl, gr) < 1e-12
    a_real = rand(2, 11, 6, seed=16).requires_grad_()  # real decays, complex inputs
    h = parallel_scan(a_real, b)
    assert h.dtype == C128 and rel_err(h, naive_scan(a_real, b)) < 1e-13
    (ga,) = torch.autograd.grad(h.abs().sum(), a_real)
    assert not ga.is_complex() and torch.isfinite(ga).all()
    assert parallel_scan(rand(2, 3, 1).float(), rand(2, 3, 1)).dtype == F64


def test_scan_special_values():
    b = rand(2, 50, 3, seed=17)
    assert torch.equal(parallel_scan(torch.zeros_like(b), b), b)  # a = 0: no memory at all
    assert rel_err(parallel_scan(torch.ones_like(b), b), b.cumsum(1)) < 1e-13  # a = 1: cumulative sum
    a = torch.ones_like(b)
    a[:, 20] = 0  # one reset
    h = parallel_scan(a, b, h0=rand(2, 3, seed=18))
    assert rel_err(h[:, 20:], b[:, 20:].cumsum(1)) < 1e-13
    assert torch.equal(step_scan(a[:, 0], b[:, 0], None), b[:, 0])


def test_scan_float32_close_to_float64():
    a, b = 0.99 * torch.rand(2, 4096, 8, dtype=F64), rand(2, 4096, 8, seed=19)
    ref = parallel_scan(a, b)
    for m in SCAN_METHODS:
        assert rel_err(parallel_scan(a.float(), b.float(), method=m).double(), ref) < 1e-5


@pytest.mark.parametrize("bad", [
    dict(a=torch.ones(2, 5, 4), b=torch.ones(2, 5, 3)),  # a does not broadcast to b
    dict(a=torch.ones(2, 5, 3, 1), b=torch.ones(2, 5, 3)),  # a would enlarge b
    dict(a=torch.ones(5), b=torch.ones(5)),  # b without a batch dim
    dict(a=torch.ones(2, 0, 3), b=torch.ones(2, 0, 3)),  # empty
    dict(a=torch.full((2, 5, 3), float("nan")), b=torch.ones(2, 5, 3)),
    dict(a=torch.ones(2, 5, 3), b=torch.full((2, 5, 3), float("inf"))),
    dict(a=torch.ones(2, 5, 3), b=torch.ones(2, 5, 3), h0=torch.full((2, 3), float("nan"))),
    dict(a=torch.ones(2, 5, 3), b=torch.ones(2, 5, 3), h0=torch.ones(2, 4)),
    dict(a=torch.ones(2, 5, 3), b=torch.ones(2, 5, 3), method="kogge"),
    dict(a=torch.ones(2, 5, 3), b=torch.ones(2, 5, 3), chunk_size=0),
])
def test_scan_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        parallel_scan(**bad)


def test_scan_rejects_bad_types():
    with pytest.raises(TypeError):
        parallel_scan(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5))
    with pytest.raises(TypeError):
        parallel_scan([1.0], torch.ones(2, 5))


# ---- the BMRU: hysteresis and persistence -------------------------------------------------------

def hard_states(z, theta, amp, h0=None, method="blelloch"):
    a, b = bmru_coefficients(z, z, theta, amp, "hard")
    return parallel_scan(a, b, h0, method=method)


def test_bmru_hysteresis_on_a_hand_made_drive():
    theta, amp = torch.tensor([1.0], dtype=F64), torch.tensor([2.0], dtype=F64)
    z = torch.tensor([0.5, 1.5, 0.2, -0.9, -1.1, 0.99, 1.0, 1.01, 0.0, -1.0, -3.0], dtype=F64)[None, :, None]
    want = torch.tensor([-2, 2, 2, 2, -2, -2, -2, 2, 2, 2, -2], dtype=F64)[None, :, None]
    h0 = torch.tensor([[-2.0]], dtype=F64)
    for m in SCAN_METHODS:
        assert torch.equal(hard_states(z, theta, amp, h0, m), want)  # holds inside the band, switches outside
    assert torch.equal(naive_bmru(z, theta, amp, h0), want)
    # from a zero state the unit stays at 0 until the drive first leaves the band
    assert hard_states(z, theta, amp)[0, 0, 0] == 0


@pytest.mark.parametrize("method", SCAN_METHODS)
def test_bmru_scan_equals_definition_on_random_drives(method):
    z = 1.5 * rand(3, 97, 6, seed=20)
    theta, amp = torch.linspace(0.5, 2.0, 6, dtype=F64), torch.linspace(0.3, 3.0, 6, dtype=F64)
    h0 = amp * torch.tensor([1, -1, 1, -1, 1, -1], dtype=F64)
    h = hard_states(z, theta, amp, h0.expand(3, 6), method)
    assert torch.equal(h, naive_bmru(z, theta, amp, h0.expand(3, 6)))
    assert torch.equal(h.abs(), amp.expand_as(h))


def test_bmru_holds_forever():
    T = 100_000
    theta, amp = torch.tensor([0.5, 0.5], dtype=F64), torch.tensor([1.0, 1.0], dtype=F64)
    z = 0.49 * (2 * torch.rand(1, T, 2, dtype=F64) - 1)  # always inside the band ...
    z[0, 0] = torch.tensor([3.0, -3.0], dtype=F64)  # ... but for one write at t = 0
    for m in SCAN_METHODS:
        h = hard_states(z, theta, amp, method=m)
        assert torch.equal(h[0, :, 0], torch.ones(T, dtype=F64)) and torch.equal(h[0, :, 1], -torch.ones(T, dtype=F64))
    z[0, -1, 0] = -0.51  # a switch at the very end
    assert hard_states(z, theta, amp)[0, -1, 0] == -1


def test_bmru_straight_through_is_hard_forward_with_finite_nonzero_gradients():
    z = (1.2 * rand(2, 40, 5, seed=21)).requires_grad_()
    log_theta = torch.zeros(5, dtype=F64, requires_grad=True)
    log_amp = torch.zeros(5, dtype=F64, requires_grad=True)
    hard = hard_states(z.detach(), log_theta.exp().detach(), log_amp.exp().detach())
    a, b = bmru_coefficients(z, z, log_theta.exp(), log_amp.exp(), "ste", tau=0.3)
    h = parallel_scan(a, b)
    assert torch.equal(h, hard)
    grads = torch.autograd.grad((h * rand(2, 40, 5, seed=22)).sum(), (z, log_theta, log_amp))
    for g in grads:
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    a, b = bmru_coefficients(z, z, log_theta.exp(), log_amp.exp(), "soft", tau=0.3)
    h = parallel_scan(a, b)
    assert not torch.equal(h, hard)  # the relaxation is not quantized
    grads = torch.autograd.grad(h.sum(), (z, log_theta, log_amp))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_bmru_cell_eval_states_are_exactly_plus_minus_a_and_train_gives_gradients():
    torch.manual_seed(0)
    cell = BMRUCell(8, 6).double()
    with torch.no_grad():
        cell.log_amplitude.copy_(torch.linspace(-1, 1, 6))
    x = rand(2, 50, 8, seed=23)
    h = cell.eval()(x)
    assert torch.equal(h.abs(), cell.amplitude.detach().expand_as(h))
    assert (h[:, 1:] != h[:, :-1]).any()  # it does switch
    h_train = cell.train()(x)
    assert torch.equal(h_train, h)  # straight-through: same forward
    h_train.square().mul(rand(2, 50, 6, seed=24)).sum().backward()
    for name, p in cell.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    zeros = BMRUCell(8, 6, init_state="zeros").double().eval()
    hz = zeros(x)
    assert set(hz.unique().abs().tolist()) <= {0.0, 1.0} and (hz[:, 0] == 0).any()


# ---- the LRU ------------------------------------------------------------------------------------

def test_lru_matches_its_equations_and_init():
    torch.manual_seed(0)
    cell = LRUCell(5, 7, r_min=0.5, r_max=0.9, max_phase=math.pi).double()
    lam = cell.eigenvalues
    assert ((lam.abs() >= 0.5 - 1e-12) & (lam.abs() <= 0.9 + 1e-12)).all()
    assert ((lam.angle() >= 0) & (lam.angle() <= math.pi)).all()
    x = rand(2, 13, 5, seed=25)
    y, h = cell(x)
    gamma = torch.sqrt(1 - lam.abs() ** 2)
    Bc, Cc = torch.complex(cell.B_re, cell.B_im), torch.complex(cell.C_re, cell.C_im)
    s = torch.zeros(2, 7, dtype=C128)
    for t in range(13):
        s = lam * s + gamma * (x[:, t].to(C128) @ Bc.T)
        assert rel_err(h[:, t], s) < 1e-12
        assert rel_err(y[:, t], (s @ Cc.T).real + cell.D * x[:, t]) < 1e-12
    nu, th = lru_init(1000, 0.9, 0.999, 0.1)
    r = lru_eigenvalues(nu.double(), th.double()).abs()
    assert r.min() >= 0.9 - 1e-6 and r.max() <= 0.999 + 1e-6 and r.mean() > 0.94


# ---- the mixers ---------------------------------------------------------------------------------

MIXERS = {"bmru": lambda: BMRUMixer(16, 12), "lru": lambda: LRUMixer(16, 10),
          "hybrid": lambda: HybridMRUMixer(16, 12, bmru_fraction=0.25),
          "no_gate": lambda: MRUMixer(16, 4, 6, use_output_gate=False)}


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("training", [False, True])
def test_mixer_pieces_and_steps_equal_one_call(name, training):
    torch.manual_seed(0)
    mixer = MIXERS[name]().double().train(training)
    x = rand(2, 31, 16, seed=26)
    full, _ = mixer(x)
    pieces, cache, pos = [], None, 0
    for n in (7, 1, 1, 13, 9):
        y, cache = mixer(x[:, pos: pos + n], cache=cache, use_cache=True)
        pieces.append(y)
        pos += n
    assert rel_err(torch.cat(pieces, 1), full) < 1e-12
    steps, cache = [], None
    for t in range(31):
        y, cache = mixer(x[:, t: t + 1], cache=cache, use_cache=True)
        steps.append(y)
    assert rel_err(torch.cat(steps, 1), full) < 1e-12
    # causal
    x2 = x.clone()
    x2[:, 20:] += 1
    assert torch.equal(mixer(x2)[0][:, :20], full[:, :20])


def test_hybrid_split_and_gradients():
    m = HybridMRUMixer(16, 12, bmru_fraction=0.25)
    assert (m.n_bmru, m.n_lru) == (3, 9)
    assert (HybridMRUMixer(16, 4, bmru_fraction=0.01).n_bmru, HybridMRUMixer(16, 4, bmru_fraction=0.99).n_lru) == (1, 1)
    m = m.double().train()
    m(rand(2, 20, 16, seed=27))[0].square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_half_precision_inputs_run_the_recurrences_in_float32():
    torch.manual_seed(0)
    mixer = HybridMRUMixer(16, 12).eval().bfloat16()
    x = rand(2, 40, 16, seed=28).bfloat16()
    y, cache = mixer(x, use_cache=True)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert cache["bmru"].dtype == torch.float32 and cache["lru"].dtype == torch.complex64
    y2, _ = mixer(x[:, 25:], cache=mixer(x[:, :25], use_cache=True)[1], use_cache=True)
    assert rel_err(y2.float(), y[:, 25:].float()) < 1e-2
    mem = make_mem().bfloat16()
    q, k, v, _ = (t.bfloat16() for t in mem_inputs())
    o, h = mem(q, k, v, {}, output_final_state=True)
    assert o.dtype == torch.bfloat16 and h.dtype == torch.float32


def test_registry_names():
    names = set(mixer_names())
    assert {"bmru", "lru", "bmru+lru", "bmru-mem", "bmru+res", "bmru+grm", "bmru+soup", "bmru+ssc"} <= names


# ---- the BMRU memory and Memory Caching ---------------------------------------------------------

def mem_inputs(H=2, K=4, B=2, T=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    q, k, v, u = r(B, T, H, K), r(B, T, H, K), r(B, T, H, K), r(B, T, H, K)
    return torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1), v, u


def make_mem(mode="eval", chunk=4, **kw):
    """mode: "eval" (hard), or the training surrogate "ste" / "soft"."""
    torch.manual_seed(0)
    mem = BMRUMemory(2, 4, 4, chunk, surrogate="soft" if mode == "soft" else "ste", **kw).double()
    return mem.train(mode != "eval")


@pytest.mark.parametrize("mode", ["eval", "ste", "soft"])
@pytest.mark.parametrize("drive", ["kv", "v"])
def test_bmru_memory_forward_equals_steps_and_definition(mode, drive):
    mem = make_mem(mode, drive=drive)
    q, k, v, _ = mem_inputs()
    o, final, (chunks,) = mem(q, k, v, {}, output_final_state=True, return_chunk_states=True)
    state, outs = None, []
    for t in range(23):
        ot, state = mem.step(q[:, t], k[:, t], v[:, t], {}, state)
        outs.append(ot)
    assert rel_err(torch.stack(outs, 1), o) < 1e-13 and rel_err(state, final) < 1e-13
    assert chunks.shape == (2, 6, 2, 4) and torch.equal(chunks[:, -1], final)
    if mode != "soft":  # exact latch (the straight-through forward is the hard one): every state +-A;
        # the chunk states are the states at t = 3, 7, ...
        z = k * 2 if drive == "kv" else v
        theta, amp = mem.log_theta.exp(), mem.log_amplitude.exp()
        h = naive_bmru(z.flatten(2), theta.flatten(), amp.flatten(),
                       mem.initial_state(2, F64, q.device).flatten(1), v.flatten(2)).view(2, 23, 2, 4)
        assert torch.equal(o, q * h) and torch.equal(chunks[:, :5], h[:, 3::4])
        assert torch.equal(h.abs(), amp.expand_as(h).detach())
        assert (h[:, 1:] != h[:, :-1]).any()  # the latches do switch on these inputs
    # continuing from a state equals one call
    o1, s1 = mem(q[:, :10], k[:, :10], v[:, :10], {}, output_final_state=True)
    o2, _ = mem(q[:, 10:], k[:, 10:], v[:, 10:], {}, initial_state=s1, output_final_state=True)
    assert rel_err(torch.cat([o1, o2], 1), o) < 1e-13


AGGS = ["res", "grm", "soup", "ssc", "avg"]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("init", ["checkpoint", "restart"])
@pytest.mark.parametrize("mode", ["eval", "soft"])
def test_cached_bmru_equals_per_token_reference(agg, init, mode):
    mem = CachedMemory(make_mem(mode), agg, MCConfig(segment_size=8, init=init, top_k=2)).double()
    q, k, v, u = mem_inputs()
    y, _ = mem(q, k, v, {"u": u} if "u" in mem.input_projections else {})
    ref = naive_memory_caching(mem.base, agg, mem.config, q, k, v, {}, u)
    assert rel_err(y, ref) < 1e-12


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seg", [dict(segment_size=5), dict(segmentation="log"), dict(segment_size=4, init="restart")])
def test_cached_bmru_streaming_equals_parallel(agg, seg):
    mem = CachedMemory(make_mem(), agg, MCConfig(top_k=1, **seg)).double()
    q, k, v, u = mem_inputs(T=19)
    gates = {"u": u} if "u" in mem.input_projections else {}
    y, _ = mem(q, k, v, gates)
    state, outs = mem.new_state(2, total_length=19), []
    for lo, hi in [(0, 7), *[(t, t + 1) for t in range(7, 12)], (12, 19)]:
        o, state = mem(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], {n: g[:, lo:hi] for n, g in gates.items()},
                       initial_state=state, output_final_state=True)
        outs.append(o)
    assert isinstance(state, MCState) and state.pos == 19
    assert rel_err(torch.cat(outs, 1), y) < 1e-12


def test_cached_bmru_soup_equals_grm_and_cached_states_are_quantized():
    grm = CachedMemory(make_mem(), "grm", MCConfig(segment_size=5)).double()
    soup = CachedMemory(make_mem(), "soup", MCConfig(segment_size=5)).double()
    q, k, v, u = mem_inputs()
    assert rel_err(soup(q, k, v, {"u": u})[0], grm(q, k, v, {"u": u})[0]) < 1e-13
    _, st = grm(q, k, v, {"u": u}, output_final_state=True)
    (cached,) = st.cached
    amp = grm.base.log_amplitude.exp().detach()
    assert cached.shape == (2, 4, 2, 4) and torch.equal(cached.abs(), amp.expand_as(cached))


# ---- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(surrogate="gumbel"), dict(tau=0.0), dict(tau=float("nan")),
                                dict(theta_range=(2.0, 1.0)), dict(theta_range=(0.0, 1.0)), dict(init_state="random")])
def test_bad_bmru_options_raise(kw):
    with pytest.raises(ValueError):
        BMRUCell(4, 4, **kw)
    with pytest.raises(ValueError):
        BMRUMemory(2, 4, 4, **kw)


def test_bad_options_and_inputs_raise():
    with pytest.raises(ValueError, match="head_k_dim == head_v_dim"):
        BMRUMemory(2, 4, 8)
    with pytest.raises(ValueError):
        BMRUMemory(2, 4, 4, drive="q")
    with pytest.raises(ValueError):
        LRUCell(4, 4, r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError):
        LRUCell(4, 4, r_max=1.0)
    with pytest.raises(ValueError):
        LRUCell(4, 4, max_phase=0.0)
    with pytest.raises(ValueError):
        HybridMRUMixer(8, 4, bmru_fraction=1.0)
    with pytest.raises(ValueError):
        HybridMRUMixer(8, 1)
    with pytest.raises(ValueError):
        MRUMixer(8, 0, 0)
    with pytest.raises(ValueError):
        bmru_coefficients(torch.ones(3), torch.ones(3), torch.ones(3), torch.ones(3), mode="sharp")
    mixer = HybridMRUMixer(8, 4).double()
    with pytest.raises(ValueError):
        mixer(torch.ones(2, 5, 7, dtype=F64))
    with pytest.raises(TypeError):
        mixer(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        mixer(torch.full((2, 5, 8), float("nan"), dtype=F64))
    _, cache = mixer(torch.ones(2, 5, 8, dtype=F64), use_cache=True)
    with pytest.raises(ValueError):
        mixer(torch.ones(3, 1, 8, dtype=F64), cache=cache)  # batch size changed
    with pytest.raises(ValueError):
        mixer(torch.ones(2, 1, 8, dtype=F64), cache={"bmru": cache["bmru"], "lru": cache["lru"].real})
    mem = make_mem()
    q, k, v, _ = mem_inputs()
    with pytest.raises(ValueError):
        mem(q, k, v, {}, initial_state=torch.zeros(2, 2, 5, dtype=F64))
    with pytest.raises(ValueError):
        mem(q[..., :3], k[..., :3], v[..., :3], {})
    with pytest.raises(ValueError, match="NaN"):
        mem(q, k, v.masked_fill(v > 1, float("nan")), {})
