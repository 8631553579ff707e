"""Effective State-Size: analytic cases for the operators (growmem.analysis.operators) and the metrics
(growmem.analysis.ess), the language-model hooks and the ``growmem ess`` command (ess_cli.main)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from growmem.analysis import (
    apply_operator,
    attention_operator,
    combine_results,
    conv_operator,
    effective_state_size,
    ess_from_svdvals,
    estimate_cost,
    gla_operator,
    la_operator,
    layer_jacobian_operator,
    layer_state_size,
    lm_operators,
    memory_operator,
    past_future_svdvals,
    select_positions,
    short_conv_operator,
    state_size_curve,
    swla_operator,
    value_jacobian_operator,
)
from growmem.analysis.ess_cli import load_model_pair, main
from growmem.caching import CachedMemory, MCConfig
from growmem.layers.attention import naive_attention
from growmem.layers.base import TokenMixer
from growmem.layers.conv import ShortConvolution
from growmem.memories import (
    DeltaNetMemory,
    GatedDeltaNetMemory,
    GLAMemory,
    LinearAttentionMemory,
    ScalarGLAMemory,
    SWLAMemory,
)
from growmem.models import CausalLM, ModelConfig
from helpers import rel_err

DT = torch.float64


def _inputs(mem, B=2, L=37, seed=0, qk_scale=1.0):
    """Random float64 q, k, v, gates (raw gates mapped by the memory; MC connector u included)."""
    g = torch.Generator().manual_seed(seed)
    H, K, V = mem.num_heads, mem.head_k_dim, mem.head_v_dim
    q = torch.randn(B, L, H, K, generator=g, dtype=DT) * qk_scale
    k = torch.randn(B, L, H, K, generator=g, dtype=DT) * qk_scale
    v = torch.randn(B, L, H, V, generator=g, dtype=DT)
    if mem.l2_normalize_qk:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    raw = {n: torch.randn(B, L, H, f, generator=g, dtype=DT) for n, f in mem.gate_features.items()}
    gates = mem.make_gates(raw)
    for n, f in mem.input_projections.items():
        gates[n] = torch.randn(B, L, H, f, generator=g, dtype=DT)
    return q, k, v, gates


def _memory(name: str, H=2, K=4, V=3, chunk=16, segment=8):
    bases = {"la": LinearAttentionMemory, "sgla": ScalarGLAMemory, "gla": GLAMemory, "swla": SWLAMemory,
             "deltanet": DeltaNetMemory, "gdn": GatedDeltaNetMemory}
    base, _, agg = name.partition("+")
    torch.manual_seed(0)
    mem = bases[base](H, K, V, chunk)
    if agg:
        mem = CachedMemory(mem, agg, MCConfig(segment_size=segment))
    return mem.double()


def _min_past_future(pos: torch.Tensor, L: int) -> torch.Tensor:
    return torch.minimum(pos, L - pos).to(DT)


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------
def test_tolerance_and_entropy_agree_on_equal_singular_values():
    # a pure delay by d (a shift register of d cells): every H_s is a partial permutation whose
    # min(d, s, L - d - s + d ...) singular values all equal 1, so both metrics give the count exactly
    L, d = 30, 5
    weight = torch.zeros(1, d + 1, dtype=DT)
    weight[0, 0] = 1.0  # T[t, j] = weight[0, d - (t - j)] = 1 iff t - j = d
    T = conv_operator(weight, L)
    assert torch.equal(T[0], torch.diag(torch.ones(L - d, dtype=DT), -d))
    r = effective_state_size(T)
    s = r.positions
    expect = (torch.minimum(s - 1, torch.tensor(L - 1 - d)) - torch.clamp(s - d, min=0) + 1).clamp(min=0).to(DT)
    assert torch.equal(r.tolerance[0], expect)
    assert torch.equal(r.rank[0], expect)
    assert torch.allclose(r.entropy[0], expect, atol=1e-9)
    assert float(expect.max()) == d

    # any matrix with r equal nonzero singular values: tolerance-ESS = entropy-ESS = r
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(20, 6, generator=g, dtype=DT))
    W, _ = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=DT))
    sv = torch.linalg.svdvals(U @ (2.5 * torch.eye(6, dtype=DT)) @ W.T)[None, None]  # [1, P=1, 12]
    m = ess_from_svdvals(sv, torch.tensor([12]), 32)
    assert float(m["tolerance"]) == 6 and float(m["rank"]) == 6
    assert abs(float(m["entropy"]) - 6) < 1e-9
    # unequal singular values: entropy-ESS is strictly smaller; a zero block has ESS 0
    m2 = ess_from_svdvals(torch.tensor([[[4.0, 1.0, 0.0]]], dtype=DT), torch.tensor([3]), 6)
    assert float(m2["tolerance"]) == 2 and 1 < float(m2["entropy"]) < 2
    m0 = ess_from_svdvals(torch.zeros(1, 1, 3, dtype=DT), torch.tensor([3]), 6)
    assert float(m0["entropy"]) == 0 and float(m0["tolerance"]) == 0


def test_tolerance_options():
    sv = torch.tensor([[[1.0, 1e-2, 1e-5]]], dtype=DT)
    pos = torch.tensor([5])
    assert float(ess_from_svdvals(sv, pos, 10, tol=1e-3)["tolerance"]) == 2
    assert float(ess_from_svdvals(sv, pos, 10, tol=1e-6)["tolerance"]) == 3
    assert float(ess_from_svdvals(sv * 100, pos, 10, tol=1e-2, relative=False)["tolerance"]) == 2
    assert float(ess_from_svdvals(sv * 100, pos, 10, tol=1e-4, relative=False)["tolerance"]) == 3
    assert float(ess_from_svdvals(sv, pos, 10, tol=1e-2, relative=False)["tolerance"]) == 1


def test_batched_svdvals_match_direct():
    g = torch.Generator().manual_seed(2)
    T = torch.randn(3, 2, 41, 41, generator=g, dtype=DT).tril()
    for kw in ({}, {"pad_frac": 0.5}, {"pad_frac": 0.0}, {"max_elems": 100}):
        pos, sv = past_future_svdvals(T, **kw)
        assert sv.shape == (3, 2, 40, 20)
        for i, s in enumerate(pos.tolist()):
            ref = torch.linalg.svdvals(T[..., s:, :s])
            r = min(s, 41 - s)
            assert torch.allclose(sv[..., i, :r], ref, atol=1e-12)
            assert torch.all(sv[..., i, r:] == 0)
    pos, sv = past_future_svdvals(T, positions=[30, 3, 17], dtype=torch.float32)
    assert pos.tolist() == [3, 17, 30] and sv.dtype == torch.float32


def test_positions_cost_and_reduce():
    assert select_positions(10) == list(range(1, 10))
    assert select_positions(10, stride=4) == [4, 8]
    assert select_positions(101, num=5) == [1, 26, 50, 75, 100]
    with pytest.raises(ValueError):
        select_positions(10, [0, 3])
    c = estimate_cost(4, 100, [10, 50])
    assert c.num_svds == 8 and c.largest == (50, 50) and c.gflop > 0 and "SVDs" in str(c)
    T = la_operator(*(torch.randn(2, 20, 3, 2, dtype=DT) for _ in range(2)))
    r = effective_state_size(T)
    assert r.dims == ("d0", "d1") and r.tolerance.shape == (2, 3, 19)
    assert r.reduce("max", ["d1"]).tolerance.shape == (2, 19)
    assert torch.equal(r.reduce("max").rank, torch.clamp(_min_past_future(r.positions, 20), max=2))
    r1 = effective_state_size(T[:, :1] * 0)
    both = combine_results([r, r1])
    assert both.dims == () and torch.allclose(both.rank, r.reduce().rank / 2)
    assert torch.equal(combine_results([r, r1], "max").rank, r.reduce("max").rank)


# ---------------------------------------------------------------------------------------------------
# analytic ESS of operators
# ---------------------------------------------------------------------------------------------------
def test_fir_convolution_ess_is_taps_minus_one():
    L, C, w = 24, 3, 4
    conv = ShortConvolution(C, w, activation=False).double()
    x = torch.randn(1, L, C, dtype=DT)
    T = short_conv_operator(conv, L)
    assert torch.allclose(torch.einsum("ctj,bjc->btc", T, x), conv(x)[0], atol=1e-14)
    r = effective_state_size(T)
    expect = torch.clamp(_min_past_future(r.positions, L), max=w - 1)
    assert torch.equal(r.rank, expect.expand(C, -1))
    assert torch.equal(state_size_curve(conv, L, r.positions.tolist()), torch.clamp(r.positions, max=w - 1).to(DT))


def test_recurrence_with_state_dim_n_has_ess_n():
    # input-invariant diagonal SSM x_t = a * x_{t-1} + b u_t, y_t = <c, x_t>, state dimension n = 4:
    # T is Toeplitz with impulse response sum_m c_m a_m^lag b_m; ESS = min(n, s, L - s) exactly
    L, n = 40, 4
    a = torch.tensor([0.95, 0.8, 0.6, 0.35], dtype=DT)
    b, c = torch.tensor([1.0, -0.7, 0.5, 1.3], dtype=DT), torch.tensor([0.9, 1.1, -0.8, 0.6], dtype=DT)
    ones = torch.ones(1, L, 1, 1, dtype=DT)
    T = gla_operator(c * ones, b * ones, a.log() * ones, scale=1.0)  # per-key decays = diagonal A
    lag = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    ref = ((c * b) * a ** lag.clamp(min=0)[..., None]).sum(-1) * (lag >= 0)
    assert torch.allclose(T[0, 0], ref, atol=1e-14)
    r = effective_state_size(T, rank_rtol=1e-10)
    assert torch.equal(r.rank[0, 0], torch.clamp(_min_past_future(r.positions, L), max=n))
    # input-varying: scalar-gated linear attention with K = n, random inputs: ESS = min(n, s, L - s)
    mem = _memory("sgla", H=2, K=n)
    q, k, v, gates = _inputs(mem, L=L)
    op = memory_operator(mem, q, k, v, gates)
    r = effective_state_size(op, rank_rtol=1e-10)
    expect = torch.clamp(_min_past_future(r.positions, L), max=n)
    assert torch.equal(r.rank, expect.expand_as(r.rank))
    assert torch.equal(state_size_curve(mem, L, r.positions.tolist()), torch.full((L - 1,), float(n), dtype=DT))


@pytest.mark.parametrize("name", ["la", "gla", "swla", "deltanet", "gdn"])
def test_matrix_memories_bounded_by_key_dim(name):
    L, K = 36, 3
    mem = _memory(name, K=K, V=5)
    q, k, v, gates = _inputs(mem, L=L)
    r = effective_state_size(memory_operator(mem, q, k, v, gates))
    bound = torch.clamp(_min_past_future(r.positions, L), max=K)
    assert torch.all(r.rank <= state_size_curve(mem, L, r.positions.tolist()))
    assert torch.equal(r.rank, bound.expand_as(r.rank))  # generic inputs reach the bound K


def test_softmax_attention_ess_grows_with_position():
    L, H, D = 48, 2, 8
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, L, H, D, generator=g, dtype=DT) * 1.5 for _ in range(2))
    r = effective_state_size(attention_operator(q, k))
    past = r.positions.to(DT)
    assert torch.all(r.rank <= past)
    assert torch.equal(r.rank, _min_past_future(r.positions, L).expand_as(r.rank))
    W = 6  # sliding window: the past reaches the future through the last W - 1 tokens only
    r = effective_state_size(attention_operator(q, k, window=W))
    assert torch.equal(r.rank, torch.clamp(_min_past_future(r.positions, L), max=W - 1).expand_as(r.rank))


def test_memory_caching_grows_ess_within_its_bound():
    L, K, C = 64, 3, 8
    base = _memory("la", K=K)
    q, k, v, gates = _inputs(base, L=L, B=1)
    r_base = effective_state_size(memory_operator(base, q, k, v, gates))
    for agg in ("grm", "ssc", "res"):
        mem = _memory(f"la+{agg}", K=K, segment=C)
        gates_u = dict(gates)
        if "u" in mem.input_projections:
            gates_u["u"] = torch.randn(1, L, 2, K, dtype=DT, generator=torch.Generator().manual_seed(4))
        r = effective_state_size(memory_operator(mem, q, k, v, gates_u))
        pos = r.positions
        tss = state_size_curve(mem, L, pos.tolist())
        assert torch.equal(tss, (1 + pos // C).to(DT) * K)  # (1 + cached segments) * K
        assert torch.all(r.rank <= tss)
        if agg == "res":
            # Residual over a linear memory reads sum_i M(i): cached states collapse into one, ESS <= 2 K
            assert float(r.rank.max()) <= 2 * K and float(tss.max()) > 2 * K
            continue
        later = (pos > C) & (L - pos > K)  # a cached segment, a token after it, room for more than K
        assert torch.all(r.rank[..., later] > r_base.rank[..., later])
        # far from a segment start (>= K tokens in the online segment) and from the end: the bound is reached
        full = (pos % C >= K) & (L - pos >= tss + C)
        assert int(full.sum()) >= 6
        assert torch.equal(r.rank[..., full], tss[full].expand_as(r.rank[..., full]))
    res_gdn = _memory("gdn+res", K=K, segment=C)
    q2, k2, v2, g2 = _inputs(res_gdn, L=L, B=1)
    assert float(effective_state_size(memory_operator(res_gdn, q2, k2, v2, g2)).rank.max()) <= 2 * K


def test_state_size_of_log_segmented_caching():
    mem = CachedMemory(LinearAttentionMemory(1, 4, 4), "grm", MCConfig(segmentation="log"))
    # L = 37 = 32 + 4 + 1: segments end at 32, 36, 37
    tss = state_size_curve(mem, 37, [1, 31, 32, 35, 36])
    assert tss.tolist() == [4.0, 4.0, 8.0, 8.0, 12.0]
    assert state_size_curve(torch.nn.Linear(2, 2), 10, [1]) is None


# ---------------------------------------------------------------------------------------------------
# exactness of the materialized operators
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["la", "sgla", "gla", "swla", "deltanet", "gdn", "gdn+grm", "la+ssc", "gla+res"])
def test_operator_reproduces_memory_output(name):
    mem = _memory(name)
    q, k, v, gates = _inputs(mem)  # L = 37: not a multiple of the chunk (16) nor of the segment (8)
    o = mem(q, k, v, gates)[0]
    methods = ["auto", "basis", "jacobian"] + (["closed"] if name in ("la", "sgla", "gla", "swla") else [])
    for method in methods:
        op = memory_operator(mem, q, k, v, gates, method=method)
        assert op.exact
        assert op.residual < 1e-13, (method, op.residual)
        T = op.matrix if op.matrix.dim() == 4 else op.matrix[:, :, 0]
        assert rel_err(apply_operator(T, v), o) < 1e-13
        assert torch.all(T.triu(1) == 0)
        if method == "jacobian":
            assert op.coupling == 0.0  # the same unmixed operator on every channel


@pytest.mark.parametrize("name", ["la", "sgla", "gla", "swla"])
def test_jacobian_equals_closed_form(name):
    mem = _memory(name)
    q, k, v, gates = _inputs(mem, L=29)
    closed = memory_operator(mem, q, k, v, gates, method="closed").matrix
    jac = memory_operator(mem, q, k, v, gates, method="jacobian", channels=[0, 2])
    assert jac.matrix.shape == (2, 2, 2, 29, 29) and jac.channels == [0, 2]
    for c in range(2):
        assert rel_err(jac.matrix[:, :, c], closed) < 1e-13
    # the closed forms themselves, against a direct evaluation of their definitions
    if name == "swla":
        a, b, c = gates["g"].exp(), gates["b"], gates["c"]
        S = torch.zeros(2, 2, 29, 29, dtype=DT)  # weight of v_j's k_j term in S_t, by the recurrence
        for j in range(29):
            S[:, :, j, j] = c[:, j]
            if j + 1 < 29:
                w = a[:, j + 1] * c[:, j] + b[:, j + 1]
                S[:, :, j + 1, j] = w
                for t in range(j + 2, 29):
                    w = w * a[:, t]
                    S[:, :, t, j] = w
        ref = la_operator(q, k, mem.scale) * S
        assert rel_err(swla_operator(q, k, gates["g"], gates["b"], gates["c"], mem.scale), ref) < 1e-13


class _TanhMemory(LinearAttentionMemory):
    """A memory that is nonlinear in v: o = tanh(linear attention)."""

    name = "tanh-la"

    def forward(self, q, k, v, gates, initial_state=None, output_final_state=False, return_chunk_states=False):
        o, s = super().forward(q, k, v, gates, initial_state, output_final_state)
        return torch.tanh(o), s


def test_jacobian_of_a_nonlinear_memory_is_its_linearization():
    mem = _TanhMemory(2, 3, 4, 16).double()
    q, k, v, gates = _inputs(mem, L=21)
    with pytest.raises(ValueError):
        memory_operator(mem, q, k, v, gates, method="basis")
    op = memory_operator(mem, q, k, v, gates)  # auto -> jacobian
    assert op.method == "jacobian" and not op.exact and op.residual is None and op.coupling == 0.0
    o = mem(q, k, v, gates)[0]  # d tanh(T v)[t, c] / d v[j, c] = (1 - o[t, c]^2) T[t, j]
    ref = (1 - o ** 2).permute(0, 2, 3, 1)[..., None] * la_operator(q, k, mem.scale)[:, :, None]
    assert rel_err(op.matrix, ref) < 1e-13


def test_attention_operator_matches_its_jacobian_and_output():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 30, 3, 4, generator=g, dtype=DT) for _ in range(3))
    for window in (None, 7):
        T = attention_operator(q, k, window=window)
        assert rel_err(apply_operator(T, v), naive_attention(q, k, v, window=window)) < 1e-14

        def fn(vv, n, window=window):
            return naive_attention(q.repeat(n, 1, 1, 1), k.repeat(n, 1, 1, 1), vv, window=window)

        J, coupling, _ = value_jacobian_operator(fn, v, channels=[1])
        assert coupling == 0.0 and rel_err(J[:, :, 0], T) < 1e-14


def test_layer_jacobian_of_a_linear_mixer_is_its_operator():
    conv = ShortConvolution(5, 3, activation=False).double()
    x = torch.randn(2, 20, 5, dtype=DT)
    op = layer_jacobian_operator(conv, x, channels=[0, 3, 4], chunk=7)
    ref = short_conv_operator(conv, 20)[[0, 3, 4]]
    assert op.dims == ("batch", "channel") and not op.exact and op.coupling == 0.0
    assert torch.allclose(op.matrix, ref.expand(2, -1, -1, -1), atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# language models and the command
# ---------------------------------------------------------------------------------------------------
class _TanhConv(TokenMixer):
    """A small nonlinear causal mixer that is neither a memory layer nor attention (-> layer Jacobian)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d_model = d
        self.conv = ShortConvolution(d, 3, activation=False)
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x, cache=None, use_cache=False):
        return torch.tanh(self.proj(self.conv(x)[0])), None


def test_lm_operators_of_a_hybrid():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=4, num_heads=2, mixer=["gdn+grm", "attn", "swa", "la"],
                      chunk_size=16, window=8, mc=MCConfig(segment_size=8))
    model = CausalLM(cfg)
    model.layers[3].mixer = _TanhConv(16)
    ids = torch.randint(0, 50, (2, 40))
    ops = lm_operators(model, ids, jacobian_channels=[0, 5])
    assert [o.kind for o in ops] == ["memory", "attention", "attention", "layer_jacobian"]
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched
    pos = list(range(1, 40))
    for lo in ops[:3]:
        assert lo.operator.matrix.shape == (2, 2, 40, 40) and lo.operator.residual < 1e-12
        r = effective_state_size(lo.operator, pos)
        assert torch.all(r.rank <= layer_state_size(lo, pos))
    jac = ops[3].operator
    assert jac.matrix.shape == (2, 2, 40, 40) and jac.channels == [0, 5] and not jac.exact
    assert torch.all(jac.matrix.triu(1) == 0) and layer_state_size(ops[3], pos) is None


def test_ess_command_fresh_and_checkpoint(tmp_path):
    out = tmp_path / "fresh"
    argv = ["--model", "la+grm,attn", "--d-model", "16", "--num-heads", "2", "--seq-len", "40", "--segment-size",
            "8", "--chunk-size", "16", "--stride", "3", "--out", str(out)]
    plot = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plot = False
        argv.append("--no-plot")
    assert main(argv) == 0
    res = json.loads((out / "ess.json").read_text())
    assert res["positions"] == list(range(3, 40, 3))
    assert [e["mixer"] for e in res["layers"]] == ["la+grm", "attn"]
    assert res["layers"][0]["tss"][:3] == [8.0, 8.0, 16.0]
    assert len(res["layers"][1]["tolerance"]["per_head"]) == 2
    assert (out / "ess.png").exists() == plot
    assert main(["--model", "nope"]) == 2 and main([]) == 2

    pytest.importorskip("safetensors")
    from safetensors.torch import save_model

    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=256, d_model=16, n_layers=1, num_heads=2, mixer="gdn", chunk_size=16)
    model = CausalLM(cfg)
    save_model(model, str(tmp_path / "model.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"model": cfg.to_dict(), "seed": 1}))
    loaded = load_model_pair(tmp_path / "model.safetensors", tmp_path / "cfg.json")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    text = tmp_path / "input.txt"
    text.write_bytes(b"the quick brown fox jumps over the lazy dog " * 3)
    assert main(["--checkpoint", str(tmp_path / "model.safetensors"), "--config", str(tmp_path / "cfg.json"),
                 "--text", str(text), "--seq-len", "32", "--num-positions", "5", "--no-plot",
                 "--out", str(tmp_path / "ck")]) == 0
    res = json.loads((tmp_path / "ck" / "ess.json").read_text())
    assert res["input"]["kind"] == "text" and len(res["positions"]) == 5 and res["layers"][0]["tss"] == [8.0] * 5


def test_ess_vs_accuracy_script_on_trained_runs(tmp_path):
    import importlib.util
    import sys as _sys

    from growmem.train.config import ExperimentConfig
    from growmem.train.trainer import Trainer

    spec = importlib.util.spec_from_file_location("ess_vs_accuracy", Path(__file__).parent.parent / "bench" /
                                                  "ess_vs_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    _sys.modules["ess_vs_accuracy"] = mod
    spec.loader.exec_module(mod)
    rows = []
    for mixer in ("gdn", "gdn+grm"):
        cfg = ExperimentConfig.from_dict({
            "name": mixer, "out_dir": str(tmp_path / "{name}"),
            "model": {"vocab_size": 64, "d_model": 16, "n_layers": 1, "num_heads": 2, "mixer": mixer,
                      "chunk_size": 8, "mc": {"segment_size": 8}},
            "task": {"name": "mqar", "options": {"vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4}},
            "train": {"steps": 2, "batch_size": 4, "eval_every": 2, "eval_samples": 8, "progress": False}})
        Trainer(cfg, quiet=True).fit()
        rows.append(mod.run_ess(cfg.run_dir, samples=1, stride=4, tol=1e-3))
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["kinds"] == "memory"
        assert 0 < r["ess_tol"] <= 8 * 4  # per channel: <= (1 + cached segments) * K with K = 8, <= 3 cached
    assert rows[1]["ess_tol"] > rows[0]["ess_tol"]  # caching grows the effective state on generic inputs


def test_rmt_operator_is_the_whole_model_linearization():
    from growmem.models.rmt import RMTConfig, build_model

    torch.manual_seed(0)
    base = dict(vocab_size=30, d_model=8, n_layers=2, num_heads=2, mixer="attn")
    ids = torch.randperm(30)[:20][None]  # distinct tokens: an embedding row belongs to one position
    pos = [4, 8, 12, 16]  # splits at the segment boundaries (segments of 4)
    ess = {}
    for m in (0, 2):
        model = build_model(ModelConfig(**base, rmt=RMTConfig(num_mem_tokens=m, segment_len=4)))
        (lo,) = lm_operators(model, ids, jacobian_channels=[0, 3])
        J = lo.operator.matrix
        assert lo.kind == "model_jacobian" and J.shape == (1, 2, 20, 20) and not lo.operator.exact
        assert torch.all(J.triu(1) == 0)  # causal
        assert layer_state_size(lo, pos) is None
        # column j = 5 of channel 3 equals a central difference of the model in that embedding entry
        m64 = model.double().eval()
        w = m64.backbone.embed.weight

        def h(delta, w=w, m64=m64):
            with torch.no_grad():
                w[ids[0, 5], 3] += delta
                out = m64(ids, output_hidden_states=True).hidden_states[-1][0, :, 3]
                w[ids[0, 5], 3] -= delta
            return out

        fd = (h(1e-5) - h(-1e-5)) / 2e-5
        assert torch.allclose(J[0, 1, :, 5], fd, atol=1e-7)
        ess[m] = effective_state_size(lo.operator, pos, tol=1e-8).rank.mean().item()
    assert ess[0] == 0.0  # without memory tokens nothing crosses a segment boundary
    assert ess[2] > 0.0


def test_ess_command_wraps_a_fresh_model_in_an_rmt(tmp_path, capsys):
    out = tmp_path / "rmt"
    assert main(["--model", "attn", "--rmt", "2,8", "--d-model", "16", "--num-heads", "2", "--seq-len", "24",
                 "--stride", "8", "--jacobian-channels", "2", "--no-plot", "--out", str(out)]) == 0
    res = json.loads((out / "ess.json").read_text())
    assert [e["kind"] for e in res["layers"]] == ["model_jacobian"]
    assert main(["--model", "attn", "--rmt", "2", "--seq-len", "24", "--out", str(tmp_path / "bad")]) == 2
    assert "--rmt must look like M,L" in capsys.readouterr().out
