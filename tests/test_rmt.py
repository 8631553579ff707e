"""Recurrent Memory Transformer: equivalence with the backbone, masks and RoPE positions (reference and
perturbations), truncated BPTT depth, streaming = segment-wise forward, configs, trainer + curriculum,
checkpoints, the bidirectional-prefix attention path."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from growmem.cli import main as cli_main
from growmem.layers.attention import Attention, attention_op, naive_attention
from growmem.layers.rope import rotate_half
from growmem.models import CausalLM, ModelConfig, RecurrentMemoryTransformer, RMTConfig, build_model
from growmem.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from growmem.train.config import ExperimentConfig, load_experiment
from growmem.train.sweep import SweepConfig, expand, load_sweep, run_sweep
from growmem.train.trainer import Trainer
from helpers import rel_err

V = 40


def rmt(mixer="attn", m=3, L=6, k=None, dtype=torch.float64, seed=0, **kw) -> RecurrentMemoryTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=16, n_layers=2, num_heads=2, mixer=mixer, chunk_size=4, window=4,
                      mc={"segment_size": 5, "top_k": 1},
                      rmt={"num_mem_tokens": m, "segment_len": L, "bptt_depth": k, **kw})
    model = build_model(cfg)
    assert isinstance(model, RecurrentMemoryTransformer)
    return model.to(dtype).eval()


def ids(B=2, T=20, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("mixer", ["attn", "swa", "gdn", "gdn+grm"])
def test_one_segment_without_memory_equals_the_backbone(mixer):
    model = rmt(mixer, m=0, L=32)
    x = ids(T=19)
    tgt = torch.roll(x, -1, 1)
    out, ref = model(x, targets=tgt), model.backbone(x, targets=tgt)
    assert rel_err(out.logits, ref.logits) < 1e-13
    assert abs(float(out.loss.detach() - ref.loss.detach())) < 1e-13
    assert out.memory.shape == (2, 0, 16) and model.memory is None
    # several segments without memory: each segment is the backbone on that segment alone
    model = rmt(mixer, m=0, L=7)
    out = model(x).logits
    for s in range(0, 19, 7):
        assert rel_err(out[:, s: s + 7], model.backbone(x[:, s: s + 7]).logits) < 1e-13


def _reference_segment(model: RecurrentMemoryTransformer, mem: torch.Tensor, seg: torch.Tensor):
    """One segment of an attention backbone from scratch: explicit mask, RoPE positions 0 .. 2m+L-1."""
    bb = model.backbone
    x = torch.cat([mem, bb.embed(seg), mem], 1)
    B, T, _ = x.shape
    m, L = mem.shape[1], seg.shape[1]
    pos = torch.arange(T, dtype=torch.float64)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (j <= i) | ((i < m) & (j < m))  # causal, plus the read slots among themselves
    for layer in bb.layers:
        a = layer.mixer
        H, Dh = a.num_heads, a.head_dim
        ang = pos[:, None] * a.rope.inv_freq.double()[None, :]
        cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
        h = layer.norm1(x)
        q, k, v = (p(h).view(B, T, H, Dh) for p in (a.q_proj, a.k_proj, a.v_proj))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(Dh)
        o = torch.einsum("bhij,bjhd->bihd", s.masked_fill(~visible, float("-inf")).softmax(-1), v)
        x = x + a.o_proj(o.reshape(B, T, H * Dh))
        x = x + layer.mlp(layer.norm2(x))
    return bb.lm_head(bb.norm(x[:, m: m + L])), x[:, m + L:]  # memory: the residual stream, before the norm


def test_segments_match_an_explicit_reference():
    model = rmt("attn", m=3, L=6)
    x = ids(T=16)  # segments of 6, 6, 4
    out = model(x)
    mem = model.initial_memory(2)
    logits = []
    for s in range(0, 16, 6):
        lg, mem = _reference_segment(model, mem, x[:, s: s + 6])
        logits.append(lg)
    assert rel_err(out.logits, torch.cat(logits, 1)) < 1e-12
    assert rel_err(out.memory, mem) < 1e-12
    assert out.logits.shape == (2, 16, V) and out.memory.shape == (2, 3, 16) and model.memory.shape == (3, 16)


# ----------------------------------------------------------------------------------------------- masks
def _blocks(model, z):
    return model._blocks(z, None, False)[0]


def test_masks_by_perturbation():
    m, L = 3, 6
    model = rmt("attn", m=m, L=L)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 2 * m + L, 16, generator=g, dtype=torch.float64)
    base = _blocks(model, z)

    def moved(idx):
        z2 = z.clone()
        z2[:, idx] += torch.randn(2, 16, generator=g, dtype=torch.float64)
        return _blocks(model, z2)

    out = moved(m - 1)  # the last read slot ...
    assert rel_err(out[:, :1], base[:, :1]) > 1e-6  # ... is seen by the first read slot (bidirectional)
    for i in range(L - 1):
        out = moved(m + i + 1)  # segment token i+1 ...
        assert rel_err(out[:, : m + i + 1], base[:, : m + i + 1]) < 1e-14  # ... is invisible to token i
        assert rel_err(out[:, m + i + 1:], base[:, m + i + 1:]) > 1e-6
    out = moved(m)  # the first segment token is seen by every write slot
    assert all(rel_err(out[:, m + L + w], base[:, m + L + w]) > 1e-6 for w in range(m))
    out = moved(m + L + 1)  # write slot 1: invisible to the segment and to write slot 0
    assert rel_err(out[:, : m + L + 1], base[:, : m + L + 1]) < 1e-14
    # a recurrent mixer reads the read slots in order
    lin = rmt("gdn", m=m, L=L)
    base = _blocks(lin, z)
    z2 = z.clone()
    z2[:, m - 1] += 1.0
    assert rel_err(_blocks(lin, z2)[:, : m - 1], base[:, : m - 1]) < 1e-14


def test_information_crosses_segments_only_through_memory():
    x = ids(T=18)
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % V  # change a token of segment 0
    for m, crosses in ((2, True), (0, False)):
        model = rmt("attn", m=m, L=6)
        a, b = model(x), model(y)
        assert rel_err(a.logits[:, :2], b.logits[:, :2]) < 1e-14  # causal inside the segment
        assert (rel_err(a.logits[:, 6:], b.logits[:, 6:]) > 1e-6) == crosses
    other = model(x, memory=torch.randn(2, 0, 16, dtype=torch.float64))
    assert rel_err(other.logits, model(x).logits) == 0
    model = rmt("attn", m=2, L=6)
    moved = model(x, memory=model.initial_memory(2) + 0.5)
    assert rel_err(moved.logits[:, :6], model(x).logits[:, :6]) > 1e-6


# ----------------------------------------------------------------------------------------------- truncated BPTT
@pytest.mark.parametrize("mixer", ["attn", "gdn"])
@pytest.mark.parametrize("k", [0, 1, 2, 4, None])
def test_bptt_depth_stops_gradients_exactly(mixer, k):
    n, L = 5, 4
    model = rmt(mixer, m=2, L=L, k=k).train()
    x = ids(T=n * L - 1)  # the last segment is shorter
    store = []
    handle = model.backbone.embed.register_forward_hook(lambda mod, inp, out: store.append(out))
    out = model(x)
    handle.remove()
    emb = store[0]
    emb.retain_grad()
    last = slice((n - 1) * L, None)
    loss = F.cross_entropy(out.logits[:, last].reshape(-1, V), torch.roll(x, -1, 1)[:, last].reshape(-1))
    loss.backward()
    depth = n if k is None else k
    for j in range(n):
        gj = emb.grad[:, j * L: (j + 1) * L]
        if j < n - 1 - depth:
            assert torch.count_nonzero(gj) == 0, (j, k)
        else:
            assert float(gj.abs().min()) > 0, (j, k)  # every token of a segment within depth
    assert (float(model.memory.grad.abs().sum()) > 0) == (n - 1 <= depth)


def test_bptt_full_loss_gives_initial_memory_its_own_segment_gradient():
    model = rmt("attn", m=2, L=4, k=0).train()
    x = ids(T=12)
    model(x, targets=torch.roll(x, -1, 1)).loss.backward()
    assert float(model.memory.grad.abs().sum()) > 0  # segment 0 reads M_0 directly (no transition)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


# ----------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("mixer", ["attn", "swa", "gdn", "gdn+grm"])
@pytest.mark.parametrize("m", [0, 3])
def test_streaming_in_pieces_equals_segment_forward(mixer, m):
    model = rmt(mixer, m=m, L=5)
    x = ids(T=23)
    full = model(x)
    pieces, state, pos = [], None, 0
    with torch.no_grad():
        for n in (3, 1, 1, 9, 5, 1, 3):  # crosses boundaries inside pieces and at their ends
            logits, state = model.feed(x[:, pos: pos + n], state)
            pieces.append(logits)
            pos += n
    assert pos == 23 and state.segments == 5 and state.filled == 3
    assert rel_err(torch.cat(pieces, 1), full.logits) < 1e-10
    # a stream ending on a boundary holds the memory read by its last segment
    with torch.no_grad():
        _, st = model.feed(x[:, :20])
    assert rel_err(st.memory, model(x[:, :15]).memory) < 1e-10 if m else st.memory.shape[1] == 0


@pytest.mark.parametrize("mixer", ["attn", "gdn"])
def test_generate_equals_segment_forward(mixer):
    model = rmt(mixer, m=2, L=4)
    for P in (1, 4, 9):
        prompt = ids(T=P, seed=P)
        out = model.generate(prompt, 13)
        assert out.shape == (2, P + 13) and torch.equal(out[:, :P], prompt)
        ref = model(out).logits
        assert torch.equal(ref[:, P - 1: -1].argmax(-1), out[:, P:])
    g1, g2 = (model.generate(prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
              for _ in range(2))
    assert torch.equal(g1, g2)
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_float32_runs_and_matches_float64():
    m64 = rmt("attn", m=2, L=5)
    m32 = rmt("attn", m=2, L=5, dtype=torch.float32)
    x = ids(T=17)
    assert rel_err(m32(x).logits.double(), m64(x).logits) < 1e-4


# ----------------------------------------------------------------------------------------------- configs, errors
@pytest.mark.parametrize("bad, match", [
    ({"num_mem_tokens": -1}, "num_mem_tokens must be >= 0"),
    ({"segment_len": 0}, "segment_len must be >= 1"),
    ({"bptt_depth": -1}, "bptt_depth must be >= 0"),
    ({"max_segments": 0}, "max_segments must be >= 1"),
    ({"num_mem_tokens": 2.5}, "num_mem_tokens must be an int"),
    ({"segment_len": True}, "segment_len must be an int"),
    ({"memory_init_std": 0}, "memory_init_std"),
    ({"segment_lne": 4}, "unknown RMTConfig fields"),
])
def test_bad_rmt_options_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(mixer="attn", rmt=bad)
    with pytest.raises(ValueError, match=match):
        RMTConfig.from_dict(bad)


def test_config_round_trip_and_yaml(tmp_path):
    cfg = ModelConfig(mixer="attn", rmt={"num_mem_tokens": 4, "segment_len": 16, "bptt_depth": 2})
    assert isinstance(cfg.rmt, RMTConfig) and cfg.rmt.segment_len == 16
    d = cfg.to_dict()
    assert d["rmt"] == {"num_mem_tokens": 4, "segment_len": 16, "bptt_depth": 2, "max_segments": None,
                        "memory_init_std": None}
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert "rmt" not in ModelConfig(mixer="attn").to_dict()  # old configs keep their form
    assert "rmt" not in ExperimentConfig().to_dict()["model"]
    assert isinstance(build_model(ModelConfig(mixer="attn")), CausalLM)
    with pytest.raises(ValueError, match="ModelConfig.rmt"):
        ModelConfig(mixer="attn", rmt=3)
    path = tmp_path / "e.yaml"
    path.write_text("model: {mixer: attn, rmt: {num_mem_tokens: 2, segment_len: 8}}\n")
    exp = load_experiment(path, ["model.rmt.bptt_depth=1"])
    assert exp.model.rmt == RMTConfig(num_mem_tokens=2, segment_len=8, bptt_depth=1)
    assert load_experiment(None, ["model.rmt.segment_len=8"]).model.rmt.segment_len == 8


def test_bad_inputs_and_limits():
    model = rmt("attn", m=2, L=4, max_segments=3)
    with pytest.raises(ValueError, match="max_segments=3"):
        model(ids(T=13))
    model(ids(T=12))
    with pytest.raises(ValueError, match="max_segments=3"):
        model.generate(ids(T=6), 7)
    with pytest.raises(ValueError, match="max_segments=3"), torch.no_grad():
        _, st = model.feed(ids(T=12))
        model.feed(ids(T=1), st)
    with pytest.raises(ValueError, match="memory must be a tensor of shape"):
        model(ids(T=8), memory=torch.zeros(2, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="out of range"):
        model(ids(T=8) + V)
    with pytest.raises(ValueError, match="all -100"):
        model(ids(T=8), targets=torch.full((2, 8), -100))
    with pytest.raises(ValueError, match="shape of input_ids"):
        model(ids(T=8), targets=ids(T=7))
    with pytest.raises(ValueError, match="state must be"):
        model.feed(ids(B=3, T=2), model.new_state(2))
    with pytest.raises(TypeError, match="backbone"):
        RecurrentMemoryTransformer(torch.nn.Linear(2, 2), RMTConfig())
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids(T=2), -1)


# ----------------------------------------------------------------------------------------------- the prefix path
@pytest.mark.parametrize("window", [None, 3, 6])
@pytest.mark.parametrize("Tq", [12, 5, 1])
def test_attention_op_prefix_matches_naive(window, Tq):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    P = 4
    ref = naive_attention(q, k, v, window=window, prefix_len=P)[:, 12 - Tq:]
    out = attention_op(q[:, 12 - Tq:], k, v, window=window, prefix_len=P, block_size=2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # explicit mask check
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    vis = (j <= i) | ((i < P) & (j < P))
    if window is not None:
        vis = ((j <= i) & (j > i - window)) | ((i < P) & (j < P))
    s = torch.einsum("bihd,bjhd->bhij", q, k) / 2.0
    manual = torch.einsum("bhij,bjhd->bihd", s.masked_fill(~vis, float("-inf")).softmax(-1), v)[:, 12 - Tq:]
    torch.testing.assert_close(ref, manual, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(out.sum(), (q, k, v))
    gb = torch.autograd.grad(manual.sum(), (q, k, v))
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # queries at a short offset inside the prefix still see all of it
    torch.testing.assert_close(attention_op(q[:, :2], k, v, window=window, q_offset=0, prefix_len=P),
                               manual[:, :2] if Tq == 12 else naive_attention(q, k, v, window=window,
                                                                              prefix_len=P)[:, :2])


@pytest.mark.parametrize("window", [None, 3])
def test_attention_module_prefix_prefill_then_decode(window):
    torch.manual_seed(0)
    att = Attention(16, 2, window=window).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    full, _ = att(x, prefix_len=4)
    y, cache = att(x[:, :5], use_cache=True, prefix_len=4)
    outs = [y]
    for t in range(5, 11):
        y, cache = att(x[:, t: t + 1], cache=cache, use_cache=True, prefix_len=4)
        outs.append(y)
    assert rel_err(torch.cat(outs, 1), full) < 1e-12
    assert rel_err(att(x, prefix_len=0)[0], att(x)[0]) == 0
    with pytest.raises(ValueError, match="must be given whole"):
        att(x[:, :3], prefix_len=4)
    with pytest.raises(ValueError, match="must be given whole"):
        att(x[:, 3:5], cache=att(x[:, :3], use_cache=True)[1], prefix_len=4)
    with pytest.raises(ValueError, match="prefix_len"):
        att(x, prefix_len=-1)
    with pytest.raises(ValueError, match="prefix_len"):
        attention_op(x.view(2, 11, 2, 8), x.view(2, 11, 2, 8), x.view(2, 11, 2, 8), prefix_len=12)


# ----------------------------------------------------------------------------------------------- training
def _exp(tmp_path, name="rmt", **train):
    return ExperimentConfig.from_dict({
        "name": name, "out_dir": str(tmp_path / "{name}"),
        "model": {"vocab_size": 12, "d_model": 16, "n_layers": 1, "num_heads": 2, "mixer": "attn",
                  "rmt": {"num_mem_tokens": 2, "segment_len": 8, "bptt_depth": 2}},
        "task": {"name": "copy", "options": {"length": 12, "n_symbols": 10}},
        "train": {"steps": 6, "batch_size": 4, "eval_every": 3, "eval_samples": 8, "eval_batch_size": 8,
                  "checkpoint_every": 3, "log_every": 1, "warmup_steps": 1, "progress": False,
                  "curriculum": [[0, 3], [2, 8], [4, 12]], **train},
    })


def test_trainer_with_rmt_and_a_curriculum_resumes_and_checkpoints(tmp_path, capsys):
    cfg = _exp(tmp_path)
    t = Trainer(cfg, quiet=True)
    seen: list[int] = []
    t.model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]) if mod.training else None)
    final = t.fit()
    assert final["step"] == 6 and math.isfinite(final["loss"])
    assert seen == [7, 7, 17, 17, 25, 25]  # copy length 3 -> 8 -> 12: 1 -> 3 -> 4 segments of 8
    assert t.task.config.length == 12 and "token_accuracy" in final["metrics"]
    # resume from the step-3 checkpoint reproduces the run bitwise
    killed = _exp(tmp_path, "killed")
    Trainer(killed, quiet=True).fit(stop_at=4)
    resumed = Trainer(killed, quiet=True)
    assert resumed.step == 3 and isinstance(resumed.model, RecurrentMemoryTransformer)
    assert resumed.fit()["loss"] == final["loss"]
    # checkpoint round trip: a fresh model loads the weights (incl. the memory) and gives the same logits
    fresh = build_model(cfg.model)
    load_checkpoint(latest_checkpoint(cfg.run_dir), fresh, restore_rng=False)
    x = torch.randint(0, 11, (2, 21))
    t.model.eval()
    fresh.eval()
    assert torch.equal(fresh(x).logits, t.model(x).logits)
    assert torch.equal(fresh.memory, t.model.memory)
    other = build_model(cfg.model)
    save_checkpoint(tmp_path / "direct", 1, t.model, None, None, cfg.to_dict())
    load_checkpoint(latest_checkpoint(tmp_path / "direct"), other, restore_rng=False)
    assert torch.equal(other.memory, t.model.memory)
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(latest_checkpoint(cfg.run_dir), CausalLM(dataclasses.replace(cfg.model, rmt=None)),
                        restore_rng=False)
    # the CLI evaluates an RMT run and lists the wrapper
    assert cli_main(["eval", "--run", str(cfg.run_dir), "--samples", "4"]) == 0
    assert "token_accuracy" in capsys.readouterr().out
    assert cli_main(["list"]) == 0
    assert "rmt" in capsys.readouterr().out


def test_curriculum_knobs_of_the_synthetic_tasks():
    from growmem.tasks import make_task

    task = make_task("copy", length=4)
    task.set_curriculum(9)
    assert task.batch(2, 0)["input_ids"].shape == (2, 19)
    task = make_task("assoc_recall", num_pairs=2, n_keys=6)
    task.set_curriculum(5)
    assert task.batch(2, 0)["input_ids"].shape == (2, 12)
    with pytest.raises(ValueError, match="n_keys"):
        task.set_curriculum(7)


def test_early_stop_waits_for_the_last_curriculum_stage(tmp_path):
    # target 0 is met at every evaluation; the one at step 3 measures the task as trained in step 3,
    # i.e. still at the first stage (the last stage starts with step 4), so the stop comes at step 6
    for name, cur in (("a", [[0, 3], [2, 8], [4, 12]]), ("b", [[0, 3], [3, 12]])):
        t = Trainer(_exp(tmp_path, name, steps=9, early_stop_metric="token_accuracy", early_stop_target=0.0,
                         curriculum=cur), quiet=True)
        out = t.fit()
        assert out["stopped_early"] and out["step"] == 6 and t.task.config.length == 12


def test_sweep_variant_axes_and_the_shipped_rmt_sweep(tmp_path):
    from growmem.tasks import make_task

    runs = dict(expand(load_sweep("configs/rmt_tasks.yaml")))
    tasks, models = ["copy", "reverse", "assoc_recall", "mqar"], ["rmt", "segment", "attn", "gdn+grm"]
    assert set(runs) == {f"task={t},model={m}" for t in tasks for m in models}
    for t in tasks:
        rmt, seg, full, mc = (runs[f"task={t},model={m}"] for m in models)
        assert {r.task.name for r in (rmt, seg, full, mc)} == {t}
        assert rmt.model.mixer == seg.model.mixer == full.model.mixer == "attn" and mc.model.mixer == "gdn+grm"
        assert rmt.model.rmt.num_mem_tokens > 0 and seg.model.rmt.num_mem_tokens == 0
        assert seg.model.rmt.segment_len == rmt.model.rmt.segment_len and full.model.rmt is None
        assert make_task(t, **rmt.task.options).seq_len > rmt.model.rmt.segment_len  # several segments
        if rmt.train.curriculum:  # ends at the configured size, where the final metrics are measured
            size = rmt.task.options.get("length", rmt.task.options.get("num_pairs"))
            assert rmt.train.curriculum[-1][1] == size
    base = _exp(tmp_path, steps=1, curriculum=None).to_dict()
    base.pop("name")
    base.pop("out_dir")
    sweep = SweepConfig(name="v", base=base, out_dir=str(tmp_path / "{name}"),
                        variants={"plain": {"model.rmt": None}, "rmt1": {"model.rmt.num_mem_tokens": 1}},
                        grid={"variant": ["plain", "rmt1"]})
    rows = run_sweep(sweep, quiet=True)
    assert [r["variant"] for r in rows] == ["plain", "rmt1"]
    with pytest.raises(ValueError, match="not in sweep.variants"):
        SweepConfig(grid={"variant": ["nope"]})
    with pytest.raises(ValueError, match="variant.task names"):
        SweepConfig(variants={"a": {}}, grid={"variant.model": ["a"], "variant.task": ["a", "nope"]})


@pytest.mark.parametrize("bad, match", [(dict(max_new_tokens=-1), "max_new_tokens"),
                                        (dict(temperature=-0.5), "temperature"), (dict(top_k=0), "top_k")])
def test_generate_refuses_bad_arguments(bad, match):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=12, d_model=16, n_layers=1, num_heads=2, mixer="attn")
    ids = torch.randint(0, 12, (1, 5))
    args = dict(max_new_tokens=2, temperature=1.0, top_k=None) | bad
    for model in (CausalLM(cfg), build_model(dataclasses.replace(cfg, rmt=RMTConfig(num_mem_tokens=1,
                                                                                     segment_len=4)))):
        with pytest.raises(ValueError, match=match):
            model.generate(ids, **args)
