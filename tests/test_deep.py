"""Deep memories (DLA, Titans): the chunked (mini-batch) pass against per-token references with the
same chunking, online GD at b = 1, decoding, chunk states, chaining, Memory Caching on deep memories
(parallel = per-token reference, streaming = parallel, Soup without per-token weights), gradients
and validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from growmem.caching import CachedMemory, MCConfig
from growmem.caching.reference import naive_memory_caching
from growmem.memories.deep import DLAMemory, TitansMemory
from growmem.ops.deep import DeepState, chunk_deep_memory, naive_deep_memory, step_deep_memory
from helpers import rel_err

MEMS = [DLAMemory, TitansMemory]
# large but stable inner steps (the tests must see the nonlinearity of the updates; with momentum ~0.9
# and chunk 4, Titans at max_lr 0.2 diverges within 40 tokens)
LR = {DLAMemory: 0.2, TitansMemory: 0.05}
AGGS = ["res", "grm", "soup", "ssc", "avg"]
VARIANTS = [dict(loss="dot"), dict(loss="mse"), dict(loss="dot", layer_norm=True), dict(loss="mse", layer_norm=True)]


def make(cls, chunk=4, H=2, K=4, **kw):
    torch.manual_seed(0)
    kw.setdefault("max_lr", LR[cls])
    return cls(H, K, K, chunk, **kw).double()


def inputs(mem, B=2, T=11, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    H, K = mem.num_heads, mem.head_k_dim
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, u = F.normalize(r(B, T, H, K), dim=-1), F.normalize(r(B, T, H, K), dim=-1), r(B, T, H, K), r(B, T, H, K)
    raw = {n: r(B, T, H, f) for n, f in mem.gate_features.items()}
    if grad:
        q, k, v, u = (x.requires_grad_(True) for x in (q, k, v, u))
        raw = {n: x.requires_grad_(True) for n, x in raw.items()}
    return q, k, v, u, raw


def naive(mem, q, k, v, gates, state=None, chunk=None):
    st = state if state is not None else mem.initial_state(q.shape[0], q)
    return naive_deep_memory(q, k, v, gates["eta"], gates.get("log_alpha"), gates.get("log_beta"), st,
                             mem.chunk_size if chunk is None else chunk, mem.loss, mem.layer_norm, mem.norm_eps)


def state_err(a: DeepState, b: DeepState) -> float:
    assert torch.equal(a.phase, b.phase)
    return max(rel_err(x, y) for x, y in zip(a[:6], b[:6], strict=True) if y.numel())


# ---- the chunked pass --------------------------------------------------------------------------

@pytest.mark.parametrize("cls", MEMS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_chunked_equals_naive_with_same_chunking(cls, variant, chunk):
    """Outputs, every state leaf and the gradients of all inputs, raw gates and parameters (learned
    initial weights, gate biases) equal the per-token autograd loop with grads at chunk-start weights."""
    mem = make(cls, chunk, **variant)
    q, k, v, _, raw = inputs(mem, grad=True)
    gen = torch.Generator().manual_seed(5)
    R = torch.randn(2, 11, 2, 4, generator=gen, dtype=torch.float64)
    R1, R2 = torch.randn(2, 2, 4, 16, generator=gen, dtype=torch.float64), torch.randn(2, 2, 16, 4, generator=gen,
                                                                                           dtype=torch.float64)
    wrt = [q, k, v, *raw.values(), *mem.parameters()]
    results = []
    for fn in ("chunk", "naive"):
        gates = mem.make_gates(raw)
        if fn == "chunk":
            o, st = mem(q, k, v, gates, output_final_state=True)
        else:
            o, st = naive(mem, q, k, v, gates)
        obj = (o * R).sum() + (st.w1 * R1).sum() + (st.w2 * R2).sum()
        results.append((o, st, torch.autograd.grad(obj, wrt)))
    (o, st, g), (o_ref, st_ref, g_ref) = results
    assert rel_err(o, o_ref) < 1e-12
    assert state_err(st, st_ref) < 1e-12
    assert int(st.phase[0]) == 11 % chunk
    for a, b in zip(g, g_ref, strict=True):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("cls", MEMS)
def test_chunk_one_is_online_gradient_descent_and_minibatch_differs(cls):
    mem1, mem4 = make(cls, 1), make(cls, 4)
    q, k, v, _, raw = inputs(mem1, T=9)
    gates = mem1.make_gates(raw)
    online, _ = naive(mem1, q, k, v, gates, chunk=1)
    assert rel_err(mem1(q, k, v, gates)[0], online) < 1e-12
    mini = mem4(q, k, v, gates)[0]
    assert rel_err(mini[:, :1], online[:, :1]) < 1e-13  # the first token has no earlier in-chunk gradient
    assert rel_err(mini, online) > 1e-4


@pytest.mark.parametrize("cls", MEMS)
@pytest.mark.parametrize("chunk", [1, 4])
def test_step_loop_equals_forward(cls, chunk):
    mem = make(cls, chunk, layer_norm=True)
    q, k, v, _, raw = inputs(mem, T=10)
    gates = mem.make_gates(raw)
    o, st = mem(q, k, v, gates, output_final_state=True)
    s, outs = None, []
    for t in range(10):
        ot, s = mem.step(q[:, t], k[:, t], v[:, t], {n: x[:, t] for n, x in gates.items()}, s)
        outs.append(ot)
    assert rel_err(torch.stack(outs, 1), o) < 1e-12
    assert state_err(s, st) < 1e-12


@pytest.mark.parametrize("cls", MEMS)
def test_chaining_pieces_equals_one_pass(cls):
    mem = make(cls, 4)
    q, k, v, _, raw = inputs(mem, T=19)
    gates = mem.make_gates(raw)
    o, st = mem(q, k, v, gates, output_final_state=True)
    outs, s = [], None
    for lo, hi in [(0, 7), (7, 8), (8, 9), (9, 16), (16, 19)]:  # mid-chunk starts, single tokens, grid starts
        oj, s = mem(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], {n: x[:, lo:hi] for n, x in gates.items()},
                    initial_state=s, output_final_state=True)
        outs.append(oj)
    assert rel_err(torch.cat(outs, 1), o) < 1e-12
    assert state_err(s, st) < 1e-12
    # a (W1, W2) pair is accepted as initial state: a fresh chunk there, zero momentum
    o2 = mem(q[:, 8:], k[:, 8:], v[:, 8:], {n: x[:, 8:] for n, x in gates.items()},
             initial_state=mem.readable(mem(q[:, :8], k[:, :8], v[:, :8], {n: x[:, :8] for n, x in gates.items()},
                                            output_final_state=True)[1]))[0]
    if cls is DLAMemory:  # no momentum: the pair is the whole state at a chunk boundary
        assert rel_err(o2, o[:, 8:]) < 1e-12
    else:
        assert o2.shape == o[:, 8:].shape


@pytest.mark.parametrize("cls", MEMS)
@pytest.mark.parametrize("T", [1, 3, 12, 13])
@pytest.mark.parametrize("start", [0, 2])
def test_chunk_states(cls, T, start):
    """Readable weights after the call's tokens b, 2b, ... and the last, also when the call starts
    mid-chunk (then they are mid-chunk states, computed in closed form)."""
    mem = make(cls, 4)
    q, k, v, _, raw = inputs(mem, T=start + T)
    gates = mem.make_gates(raw)
    s0 = mem(q[:, :start], k[:, :start], v[:, :start], {n: x[:, :start] for n, x in gates.items()},
             output_final_state=True)[1] if start else None
    sl = lambda x: x[:, start:]  # noqa: E731
    o, fin, (w1s, w2s) = mem(sl(q), sl(k), sl(v), {n: sl(x) for n, x in gates.items()}, initial_state=s0,
                             output_final_state=True, return_chunk_states=True)
    ends = [*range(4, T, 4), T]
    assert w1s.shape == (2, len(ends), 2, 4, 16) and w2s.shape == (2, len(ends), 2, 16, 4)
    for i, e in enumerate(ends):
        _, ref = naive(mem, sl(q)[:, :e], sl(k)[:, :e], sl(v)[:, :e], {n: sl(x)[:, :e] for n, x in gates.items()},
                       state=s0)
        assert rel_err(w1s[:, i], ref.w1) < 1e-12 and rel_err(w2s[:, i], ref.w2) < 1e-12
    assert rel_err(w1s[:, -1], fin.w1) < 1e-14


@pytest.mark.parametrize("cls", MEMS)
def test_float32_matches_float64(cls):
    mem = make(cls, 8, layer_norm=True)
    q, k, v, _, raw = inputs(mem, T=40)
    o64 = mem(q, k, v, mem.make_gates(raw))[0]
    mem32 = mem.float()
    o32 = mem32(q.float(), k.float(), v.float(), mem32.make_gates({n: x.float() for n, x in raw.items()}))[0]
    assert o32.dtype == torch.float32 and rel_err(o32.double(), o64) < 1e-5


def test_gradcheck_tiny_chunk():
    mem = make(TitansMemory, 2, H=1, K=2, layer_norm=True)
    q, k, v, _, raw = inputs(mem, B=1, T=5)
    g = mem.make_gates(raw)
    st = mem.initial_state(1, q)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g["eta"], g["log_alpha"], g["log_beta"],
                                                                 st.w1, st.w2)]

    def f(q, k, v, eta, la, lb, w1, w2):
        z1, z2 = torch.zeros_like(w1), torch.zeros_like(w2)
        s = DeepState(w1, w2, z1, z2, w1, w2, torch.zeros(1, dtype=torch.long))
        o, fin = chunk_deep_memory(q, k, v, eta, la, lb, s, chunk_size=2, loss="mse", layer_norm=True,
                                   output_final_state=True)
        return o, fin.w1, fin.w2, fin.s1

    assert torch.autograd.gradcheck(f, leaves)


def test_step_op_chunk_semantics():
    # the step op itself takes gradients at the stored chunk-start weights
    mem = make(DLAMemory, 3, loss="mse")
    q, k, v, _, raw = inputs(mem, T=5)
    g = mem.make_gates(raw)
    s = mem.initial_state(2, q)
    for t in range(5):
        o, s = step_deep_memory(q[:, t], k[:, t], v[:, t], g["eta"][:, t], None, None, s, chunk_size=3, loss="mse")
    ref, st = naive(mem, q, k, v, g)
    assert rel_err(o, ref[:, -1]) < 1e-12 and state_err(s, st) < 1e-12 and int(s.phase[0]) == 2


# ---- Memory Caching on deep memories -----------------------------------------------------------

def make_mc(cls, agg, chunk=4, layer_norm=False, **mc):
    torch.manual_seed(0)
    return CachedMemory(cls(2, 4, 4, chunk, layer_norm=layer_norm, max_lr=LR[cls]), agg, MCConfig(**mc)).double()


def run(mem, q, k, v, u, gates, state=None, final=False):
    gs = dict(gates, u=u) if "u" in mem.input_projections else gates
    return mem(q, k, v, gs, initial_state=state, output_final_state=final)


@pytest.mark.parametrize("cls", MEMS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("mc", [dict(segment_size=5), dict(segment_size=8, init="restart"), dict(segment_size=8),
                                dict(segment_size=5, init="restart")])
def test_mc_parallel_equals_reference(cls, agg, mc):
    # segment_size=8 on chunk 4: checkpoint takes the one-pass path with chunk states, restart folds segments
    mem = make_mc(cls, agg, top_k=2, **mc)
    q, k, v, u, raw = inputs(mem.base, T=21)
    gates = mem.make_gates(raw)
    y, _ = run(mem, q, k, v, u, gates)
    ref = naive_memory_caching(mem.base, agg, mem.config, q, k, v, gates, u)
    assert rel_err(y, ref) < 1e-11


@pytest.mark.parametrize("cls", MEMS)
@pytest.mark.parametrize("mc", [dict(segmentation="log", pooling="mean", temperature=0.5),
                                dict(segmentation="explicit", segment_lengths=(3, 9, 2, 7), connector="q")])
def test_soup_fast_path_equals_materializing_reference(cls, mc):
    """Soup without per-token weights (per-memory products, online weights in closed form) equals
    the reference that materializes the gamma-mixed weights of every token, values and gradients."""
    mem = make_mc(cls, "soup", layer_norm=True, **mc)
    q, k, v, u, raw = inputs(mem.base, T=21, grad=True)
    wrt = [q, k, v, u, *raw.values(), *mem.parameters()]
    y, _ = run(mem, q, k, v, u, mem.make_gates(raw))
    ref = naive_memory_caching(mem.base, "soup", mem.config, q, k, v, mem.make_gates(raw), u, total_length=21)
    assert rel_err(y, ref) < 1e-11
    R = torch.randn_like(y)
    ga = torch.autograd.grad((y * R).sum(), wrt, allow_unused=True)
    gb = torch.autograd.grad((ref * R).sum(), wrt, allow_unused=True)
    for a, b in zip(ga, gb, strict=True):
        if b is None:  # u when the connector is q
            assert a is None or a.abs().max() == 0
        else:
            assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("cls", MEMS)
@pytest.mark.parametrize("agg", AGGS)
def test_mc_streaming_equals_parallel(cls, agg):
    for mc in (dict(segment_size=5), dict(segment_size=4, init="restart")):
        mem = make_mc(cls, agg, **mc)
        T = 19
        q, k, v, u, raw = inputs(mem.base, T=T)
        gates = mem.make_gates(raw)
        y, _ = run(mem, q, k, v, u, gates)
        state = mem.new_state(2, total_length=T)
        outs = []
        for lo, hi in [(0, 7), *[(t, t + 1) for t in range(7, 12)], (12, 19)]:
            sl = lambda x, lo=lo, hi=hi: x[:, lo:hi]  # noqa: E731
            o, state = run(mem, sl(q), sl(k), sl(v), sl(u), {n: sl(g) for n, g in gates.items()}, state, final=True)
            outs.append(o)
        assert rel_err(torch.cat(outs, 1), y) < 1e-11


@pytest.mark.parametrize("cls", MEMS)
def test_soup_differs_from_grm_on_deep_memories(cls):
    grm, soup = make_mc(cls, "grm", segment_size=5), make_mc(cls, "soup", segment_size=5)
    soup.load_state_dict(grm.state_dict())
    q, k, v, u, raw = inputs(grm.base, T=21)
    gates = grm.make_gates(raw)
    ys, yg = run(soup, q, k, v, u, gates)[0], run(grm, q, k, v, u, gates)[0]
    assert rel_err(ys[:, :5], yg[:, :5]) < 1e-13  # nothing cached yet: both are the online memory
    assert rel_err(ys[:, 5:], yg[:, 5:]) > 1e-3  # a mixture of MLPs is not the MLP of the mixture


def test_mc_gradients_match_reference():
    mem = make_mc(TitansMemory, "grm", segment_size=5)
    q, k, v, u, raw = inputs(mem.base, T=13, grad=True)
    wrt = [q, k, v, u, *raw.values(), *mem.parameters()]
    y, _ = run(mem, q, k, v, u, mem.make_gates(raw))
    ref = naive_memory_caching(mem.base, "grm", mem.config, q, k, v, mem.make_gates(raw), u)
    for a, b in zip(torch.autograd.grad(y.square().sum(), wrt), torch.autograd.grad(ref.square().sum(), wrt),
                    strict=True):
        assert rel_err(a, b) < 1e-10


def test_gradcheck_tiny_soup():
    mem = CachedMemory(TitansMemory(1, 2, 2, 2, max_lr=LR[TitansMemory]), "soup", MCConfig(segment_size=3)).double()
    q, k, v, u, raw = inputs(mem.base, B=1, T=7)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, v, u, raw["eta"], raw["beta"])]

    def f(q, v, u, eta, beta):
        return run(mem, q, k, v, u, mem.make_gates({"eta": eta, "alpha": raw["alpha"], "beta": beta}))[0]

    assert torch.autograd.gradcheck(f, leaves)


# ---- the layer, the registry and validation ------------------------------------------------------

def test_registry_and_layer():
    from growmem.models import CausalLM, ModelConfig, mixer_names

    names = set(mixer_names())
    assert {"dla", "titans"} | {f"{m}+{a}" for m in ("dla", "titans") for a in AGGS} <= names
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=30, d_model=16, n_layers=1, num_heads=2, mixer="titans+soup",
                                 chunk_size=4, mc=MCConfig(segment_size=3)))
    mem = model.layers[0].mixer.memory
    assert isinstance(mem.base, TitansMemory) and mem.base.hidden_dim == 32
    assert mem.state_size() == 2 * 32 * 16
    with pytest.raises(ValueError, match="head_k_dim == head_v_dim"):
        CausalLM(ModelConfig(vocab_size=30, d_model=16, n_layers=1, num_heads=2, mixer="dla", expand_v=2.0))


@pytest.mark.parametrize("bad", [dict(head_v_dim=3), dict(loss="l1"), dict(expansion=0), dict(max_lr=0.0),
                                 dict(chunk_size=0), dict(norm_eps=-1.0)])
def test_bad_configs_raise(bad):
    kw = dict(num_heads=2, head_k_dim=4, head_v_dim=4, chunk_size=4) | bad
    for cls in MEMS:
        with pytest.raises(ValueError):
            cls(**kw)


def test_bad_inputs_raise():
    mem = make(TitansMemory)
    q, k, v, u, raw = inputs(mem)
    gates = mem.make_gates(raw)
    st = mem.initial_state(2, q)
    with pytest.raises(ValueError, match="eta"):
        mem(q, k, v, dict(gates, eta=gates["eta"][..., None]))
    with pytest.raises(ValueError, match="phase"):
        mem(q, k, v, gates, initial_state=st._replace(phase=torch.full((2,), 4)))
    with pytest.raises(ValueError, match="s1"):
        mem(q, k, v, gates, initial_state=st._replace(s1=None))
    with pytest.raises(ValueError, match="w2"):
        mem(q, k, v, gates, initial_state=st._replace(w2=st.w2[..., :3]))
    with pytest.raises(TypeError):
        mem(q, k, v, gates, initial_state=torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="K=4, V=3"):
        chunk_deep_memory(q, k, v[..., :3], gates["eta"], None, None, st)
    with pytest.raises(ValueError, match="NaN"):
        mem(q, k, v.clone().fill_(float("nan")), gates)
    with pytest.raises(ValueError, match="context"):
        mem.soup_read(q, v, gates["eta"][..., None], mem.readable(st), gates["eta"][..., None])
