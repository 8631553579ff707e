"""Memory Caching: the parallel wrapper against the per-token reference, analytic identities,
streaming, gradients and option validation, on every linear memory."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from growmem.caching import CachedMemory, MCConfig, MCState, SegmentPlan, log_plan
from growmem.caching.reference import naive_memory_caching
from growmem.caching.wrapper import _ssc_groups
from growmem.memories import (
    DeltaNetMemory,
    GatedDeltaNetMemory,
    GLAMemory,
    LinearAttentionMemory,
    ScalarGLAMemory,
    SWLAMemory,
)
from helpers import rel_err, use_backend

BASES = [LinearAttentionMemory, ScalarGLAMemory, GLAMemory, SWLAMemory, DeltaNetMemory, GatedDeltaNetMemory]
AGGS = ["res", "grm", "soup", "ssc", "avg"]


def inputs(base, B=2, T=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, K, V = base.num_heads, base.head_k_dim, base.head_v_dim
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, u = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V), r(B, T, H, K)
    if base.l2_normalize_qk:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    raw = {n: r(B, T, H, f) for n, f in base.gate_features.items()}
    return q, k, v, u, base.make_gates(raw)


def make(base_cls, agg, chunk=4, **mc):
    torch.manual_seed(0)
    base = base_cls(2, 4, 3, chunk).double()
    return CachedMemory(base, agg, MCConfig(**mc)).double()


def run(mem, q, k, v, u, gates, state=None, final=False):
    gs = dict(gates, u=u) if "u" in mem.input_projections else gates
    return mem(q, k, v, gs, initial_state=state, output_final_state=final)


@pytest.mark.parametrize("base_cls", BASES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("init", ["checkpoint", "restart"])
@pytest.mark.parametrize("backend", ["native", "eager"])
def test_parallel_equals_reference(base_cls, agg, init, backend, monkeypatch):
    use_backend(backend, monkeypatch)  # the fused CPU kernels, or the PyTorch reads and ops
    mem = make(base_cls, agg, segment_size=8, init=init, top_k=2)
    q, k, v, u, gates = inputs(mem.base)
    y, _ = run(mem, q, k, v, u, gates)
    ref = naive_memory_caching(mem.base, agg, mem.config, q, k, v, gates, u)
    assert rel_err(y, ref) < 1e-10


@pytest.mark.parametrize("seg", [dict(segmentation="log"), dict(segmentation="explicit", segment_lengths=(5, 3, 9, 6)),
                                 dict(segment_size=5), dict(segment_size=1), dict(segment_size=100)])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("extra", [dict(), dict(pooling="mean", temperature=0.5, connector="q", init="restart")])
def test_segmentations_and_options_equal_reference(seg, agg, extra):
    mem = make(GatedDeltaNetMemory, agg, **seg, **extra)
    q, k, v, u, gates = inputs(mem.base)
    y, _ = run(mem, q, k, v, u, gates)
    ref = naive_memory_caching(mem.base, agg, mem.config, q, k, v, gates, u)
    assert rel_err(y, ref) < 1e-10


def test_log_plan():
    assert log_plan(37) == [32, 4, 1]
    assert log_plan(1) == [1]
    assert log_plan(64) == [64]
    assert sum(log_plan(1000)) == 1000


@pytest.mark.parametrize("agg", AGGS)
def test_one_segment_equals_base_memory(agg):
    mem = make(GatedDeltaNetMemory, agg, segment_size=64)
    q, k, v, u, gates = inputs(mem.base, T=40)
    y, _ = run(mem, q, k, v, u, gates)
    o, _ = mem.base(q, k, v, gates)
    assert rel_err(y, o) < 1e-13


def test_residual_on_linear_memory_is_one_memory_with_summed_states():
    # y_t = S_t^T q + sum_i S(i)^T q = (S_t + sum_i S(i))^T q   (MC paper Eq. 13)
    mem = make(LinearAttentionMemory, "res", segment_size=6)
    q, k, v, u, gates = inputs(mem.base, T=20)
    y, _ = run(mem, q, k, v, u, gates)
    S = torch.zeros(2, 2, 4, 3, dtype=torch.float64)
    cached_sum = torch.zeros_like(S)
    scale = 4 ** -0.5
    for t in range(20):
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        expect = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S + cached_sum)
        assert rel_err(y[:, t], expect) < 1e-12
        if (t + 1) % 6 == 0:
            cached_sum = cached_sum + S


@pytest.mark.parametrize("base_cls", BASES)
def test_soup_equals_grm_on_linear_memories(base_cls):
    grm, soup = make(base_cls, "grm", segment_size=5), make(base_cls, "soup", segment_size=5)
    soup.load_state_dict(grm.state_dict())
    q, k, v, u, gates = inputs(grm.base)
    assert rel_err(run(soup, q, k, v, u, gates)[0], run(grm, q, k, v, u, gates)[0]) < 1e-12


def test_ssc_with_k_at_least_cached_equals_grm():
    grm = make(GatedDeltaNetMemory, "grm", segment_size=4)
    ssc = make(GatedDeltaNetMemory, "ssc", segment_size=4, top_k=6)
    ssc.load_state_dict(grm.state_dict())
    q, k, v, u, gates = inputs(grm.base, T=24)  # at most 5 cached segments
    assert rel_err(run(ssc, q, k, v, u, gates)[0], run(grm, q, k, v, u, gates)[0]) < 1e-12


def test_ssc_with_small_k_differs_from_grm():
    grm = make(GatedDeltaNetMemory, "grm", segment_size=4)
    ssc = make(GatedDeltaNetMemory, "ssc", segment_size=4, top_k=1)
    q, k, v, u, gates = inputs(grm.base, T=24)
    assert rel_err(run(ssc, q, k, v, u, gates)[0], run(grm, q, k, v, u, gates)[0]) > 1e-3


def test_checkpoint_and_restart_differ_only_after_the_first_segment():
    a, b = make(GatedDeltaNetMemory, "grm", segment_size=8), make(GatedDeltaNetMemory, "grm", segment_size=8,
                                                                   init="restart")
    q, k, v, u, gates = inputs(a.base)
    ya, yb = run(a, q, k, v, u, gates)[0], run(b, q, k, v, u, gates)[0]
    assert rel_err(ya[:, :8], yb[:, :8]) < 1e-14
    assert rel_err(ya[:, 8:], yb[:, 8:]) > 1e-3


@pytest.mark.parametrize("base_cls", BASES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seg", [dict(segment_size=5), dict(segmentation="log"), dict(segment_size=4, init="restart")])
def test_streaming_equals_parallel(base_cls, agg, seg):
    mem = make(base_cls, agg, **seg)
    T = 19
    q, k, v, u, gates = inputs(mem.base, T=T)
    y, _ = run(mem, q, k, v, u, gates)
    state = mem.new_state(2, total_length=T)
    outs = []
    # a prefill piece, then single tokens, then an uneven piece
    for lo, hi in [(0, 7), *[(t, t + 1) for t in range(7, 12)], (12, 19)]:
        sl = lambda x, lo=lo, hi=hi: x[:, lo:hi]  # noqa: E731
        o, state = run(mem, sl(q), sl(k), sl(v), sl(u), {n: sl(g) for n, g in gates.items()}, state, final=True)
        outs.append(o)
    assert isinstance(state, MCState) and state.pos == T
    assert rel_err(torch.cat(outs, 1), y) < 1e-11


def test_step_equals_parallel():
    mem = make(SWLAMemory, "ssc", segment_size=3, top_k=1)
    q, k, v, u, gates = inputs(mem.base, T=11)
    y, _ = run(mem, q, k, v, u, gates)
    state = mem.new_state(2)
    for t in range(11):
        o, state = mem.step(q[:, t], k[:, t], v[:, t], {**{n: g[:, t] for n, g in gates.items()}, "u": u[:, t]}, state)
        assert rel_err(o, y[:, t]) < 1e-11


@pytest.mark.parametrize("agg", AGGS)
def test_causality(agg):
    mem = make(GatedDeltaNetMemory, agg, segment_size=4)
    q, k, v, u, gates = inputs(mem.base, T=20)
    y, _ = run(mem, q, k, v, u, gates)
    t = 9
    q2, k2, v2, u2 = (x.clone() for x in (q, k, v, u))
    for x in (q2, k2, v2, u2):
        x[:, t + 1:] += 1.0
    y2, _ = run(mem, q2, k2, v2, u2, gates)
    assert torch.equal(y[:, : t + 1], y2[:, : t + 1])
    assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:])


@pytest.mark.parametrize("agg", ["res", "grm", "ssc"])
def test_gradcheck_tiny(agg):
    mem = make(GatedDeltaNetMemory, agg, segment_size=3, chunk=2, top_k=1)
    q, k, v, u, gates = inputs(mem.base, B=1, T=8)
    q, v, u = (x.detach().requires_grad_(True) for x in (q, v, u))
    g = {n: x.detach().requires_grad_(True) for n, x in gates.items()}

    def f(q, v, u, gg, beta):
        return run(mem, q, k, v, u, {"g": gg, "beta": beta})[0]

    assert torch.autograd.gradcheck(f, (q, v, u, g["g"], g["beta"]))


def test_gradients_match_reference_and_detach_option():
    mem = make(GatedDeltaNetMemory, "grm", segment_size=5)
    q, k, v, u, gates = inputs(mem.base)
    v = v.requires_grad_(True)
    (gy,) = torch.autograd.grad(run(mem, q, k, v, u, gates)[0].square().sum(), v)
    (gr,) = torch.autograd.grad(naive_memory_caching(mem.base, "grm", mem.config, q, k, v, gates, u).square().sum(), v)
    assert rel_err(gy, gr) < 1e-10
    det = make(GatedDeltaNetMemory, "grm", segment_size=5, detach_cached=True)
    (gd,) = torch.autograd.grad(run(det, q, k, v, u, gates)[0].square().sum(), v)
    assert rel_err(gd, gy) > 1e-4  # same forward, fewer gradient paths
    assert rel_err(run(det, q, k, v, u, gates)[0], run(mem, q, k, v, u, gates)[0]) < 1e-14


@pytest.mark.parametrize("bad", [dict(segment_size=0), dict(top_k=0), dict(init="warm"), dict(pooling="max"),
                                 dict(temperature=0.0), dict(connector="x"), dict(segmentation="explicit"),
                                 dict(segmentation="fib"), dict(segment_lengths=(3, 0))])
def test_bad_options_raise(bad):
    with pytest.raises(ValueError):
        MCConfig(**bad)


def test_bad_usage_raises():
    with pytest.raises(ValueError, match="aggregation"):
        CachedMemory(LinearAttentionMemory(2, 4, 4), "sum")
    mem = make(LinearAttentionMemory, "grm")
    q, k, v, u, gates = inputs(mem.base)
    with pytest.raises(ValueError, match="connector"):
        mem(q, k, v, gates)
    with pytest.raises(ValueError, match="beyond"):
        m2 = make(LinearAttentionMemory, "res", segmentation="explicit", segment_lengths=(4, 4))
        run(m2, q, k, v, u, gates)
    log = make(LinearAttentionMemory, "res", segmentation="log")
    st = dataclasses.replace(log.new_state(2), pos=3)
    with pytest.raises(ValueError, match="total"):
        run(log, q, k, v, u, gates, state=st)
    with pytest.raises(ValueError, match="total"):
        SegmentPlan("log")


# ---- the layer and the model -------------------------------------------------------------------

def _lm(mixer, **kw):
    from growmem.models import CausalLM, ModelConfig

    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=40, d_model=16, n_layers=2, num_heads=2, mixer=mixer, chunk_size=4,
                                **kw)).double().eval()


def test_plain_linear_memory_layer_has_exactly_the_paper_projections():
    model = _lm("la+grm", plain_linear=True)
    names = {n for n, _ in model.layers[0].mixer.named_parameters()}
    assert names == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "u_proj.weight", "o_proj.weight"}
    mixer = model.layers[0].mixer
    # number for number: the layer is o_proj(MC(q_proj x, k_proj x, v_proj x, u_proj x))
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    B, T, H = 2, 13, 2
    q, k, v, u = (getattr(mixer, f"{n}_proj")(x).view(B, T, H, 8) for n in "qkvu")
    ref = naive_memory_caching(mixer.memory.base, "grm", mixer.memory.config, q, k, v, {}, u)
    assert rel_err(mixer(x)[0], mixer.o_proj(ref.reshape(B, T, -1))) < 1e-12


def test_connector_q_has_no_u_proj():
    model = _lm("gdn+grm", mc=MCConfig(connector="q"))
    assert not hasattr(model.layers[0].mixer, "u_proj")
    assert hasattr(_lm("gdn+grm").layers[0].mixer, "u_proj")
    assert not hasattr(_lm("gdn+res").layers[0].mixer, "u_proj")


def test_post_training_mc_keeps_short_sequences_and_extends_long_ones():
    from growmem.models.post_training import apply_post_training_mc

    model = _lm("gdn")
    x = torch.randint(0, 40, (2, 30))
    before = model(x).logits
    assert apply_post_training_mc(model, segment_size=12) == 2
    after = model(x).logits
    assert rel_err(after[:, :12], before[:, :12]) < 1e-13  # one segment: unchanged
    assert rel_err(after[:, 12:], before[:, 12:]) > 1e-4  # cached memories now contribute
    gen = model.generate(x[:, :5], 20)  # streaming works on the wrapped model
    assert torch.equal(gen[:, 5:], model(gen).logits[:, 4:-1].argmax(-1))
    with pytest.raises(ValueError):
        apply_post_training_mc(model, segment_size=12)  # nothing left to wrap


@pytest.mark.parametrize("base_cls", [LinearAttentionMemory, SWLAMemory, GatedDeltaNetMemory])
@pytest.mark.parametrize("agg,top_k", [("ssc", 1), ("ssc", 2), ("ssc", 9), ("grm", 2)])
@pytest.mark.parametrize("backend", ["native", "eager"])
def test_all_gradients_match_reference(base_cls, agg, top_k, backend, monkeypatch):
    # every input (q, k, v, connector u, gates), through the batched selection and the hand-written
    # backward of the grouped reads (_SelectedRead) or the gated reads (_GatedRead), or their fused
    # CPU kernels (_FusedSelectedRead, _FusedGatedRead)
    use_backend(backend, monkeypatch)
    mem = make(base_cls, agg, segment_size=5, top_k=top_k)
    q, k, v, u, gates = inputs(mem.base)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v, u, *gates.values())]
    names = list(gates)

    def loss(fn):
        q, k, v, u, *gs = leaves
        y = fn(q, k, v, u, dict(zip(names, gs, strict=True)))
        return (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum()

    gy = torch.autograd.grad(loss(lambda q, k, v, u, g: run(mem, q, k, v, u, g)[0]), leaves)
    gr = torch.autograd.grad(loss(lambda q, k, v, u, g: naive_memory_caching(mem.base, agg, mem.config, q, k, v,
                                                                                  g, u)), leaves)
    for a, b in zip(gy, gr, strict=True):
        assert rel_err(a, b) < 1e-10


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 9), H=st.integers(1, 3), k=st.integers(1, 3), N=st.integers(1, 5),
       seed=st.integers(0, 10_000))
def test_ssc_groups_cover_every_selection_once(B, T, H, k, N, seed):
    # random selections: distinct memory ids per (b, t, h) or -1 (unused slot)
    g = torch.Generator().manual_seed(seed)
    sel = torch.full((B, T, H, k), -1, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                n = int(torch.randint(0, min(k, N) + 1, (1,), generator=g))
                sel[b, t, h, :n] = torch.randperm(N, generator=g)[:n]
    want = {((b * T + t) * H + h, j, int(sel[b, t, h, j])) for b in range(B) for t in range(T) for h in range(H)
            for j in range(k) if sel[b, t, h, j] >= 0}
    got = []
    for i, c, rq, rw, ok in _ssc_groups(sel, N):
        assert rq.shape == rw.shape == ok.shape == (B, H, c) and ok.any()
        for row_q, row_w in zip(rq[ok].tolist(), rw[ok].tolist(), strict=True):
            assert row_w // k == row_q  # the weight row belongs to the same (b, t, h)
            got.append((row_q, row_w % k, i))
        assert all(r // (T * H) == b for b in range(B) for r in rq[b][ok[b]].tolist())
        assert all(r % H == h for h in range(H) for r in rq[:, h][ok[:, h]].tolist())  # stays in its head
    assert len(got) == len(set(got)) and set(got) == want
