"""Hugging Face integration of the Recurrent Memory Transformer (``ModelConfig.rmt``): config round trip,
save/load (tied and untied, with and without memory), forward/loss/hidden states equal to growmem's RMT,
generate() equal to growmem's RMT generation across several segments (greedy and sampling), clear load
errors, run <-> HF conversion, and the lm-evaluation-harness adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import growmem.hf as gh  # noqa: E402
from growmem.hf.lm_eval_adapter import GrowMemLM  # noqa: E402
from growmem.models import ModelConfig, RecurrentMemoryTransformer, build_model  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V = 32


def tiny(mixer="attn", m: int = 2, L: int = 8, vocab: int = V, **kw) -> ModelConfig:
    rmt = {"num_mem_tokens": m, "segment_len": L, **kw.pop("rmt", {})}
    return ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, num_heads=2, mixer=mixer, chunk_size=4,
                       window=4, mc={"segment_size": 4}, rmt=rmt, **kw)


def pair(cfg: ModelConfig, seed: int = 0) -> tuple[gh.GrowMemForCausalLM, RecurrentMemoryTransformer]:
    """The HF model of ``cfg`` and growmem's own RMT with the same weights."""
    torch.manual_seed(seed)
    hf = gh.GrowMemForCausalLM(gh.GrowMemConfig(growmem=cfg)).eval()
    ref = build_model(cfg).eval()
    assert isinstance(ref, RecurrentMemoryTransformer)
    ref.load_state_dict(hf.model.state_dict())
    return hf, ref


def ids(B: int, T: int, seed: int = 1, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# -- config, save / load --------------------------------------------------------------------------------------

def test_rmt_config_round_trip(tmp_path):
    cfg = tiny(rmt={"bptt_depth": 2, "max_segments": 9, "memory_init_std": 0.5})
    gh.GrowMemConfig(growmem=cfg).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["growmem"]["rmt"]
    assert saved == {"num_mem_tokens": 2, "segment_len": 8, "bptt_depth": 2, "max_segments": 9,
                     "memory_init_std": 0.5}
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert back.to_model_config() == cfg
    with pytest.raises(ValueError, match="RMTConfig.segment_len"):
        gh.GrowMemConfig(growmem={**cfg.to_dict(), "rmt": {"segment_len": 0}})
    with pytest.raises(ValueError, match="unknown RMTConfig fields"):
        gh.GrowMemConfig(growmem={**cfg.to_dict(), "rmt": {"segment_length": 8}})


@pytest.mark.parametrize(("tie", "m"), [(True, 2), (False, 2), (True, 0)], ids=["tied", "untied", "no-memory"])
def test_rmt_save_load_round_trip(tmp_path, tie, m):
    cfg = tiny(m=m, tie_embeddings=tie)
    hf, ref = pair(cfg)
    assert isinstance(hf.growmem_model, RecurrentMemoryTransformer) and hf.is_rmt
    # growmem's RMT parameter names under "model." (backbone.* and memory)
    assert set(hf.state_dict()) == {f"model.{k}" for k in ref.state_dict()}
    assert ("model.memory" in hf.state_dict()) == (m > 0)
    hf.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())  # noqa: SIM118 - safe_open is not iterable
    assert ("model.backbone.lm_head.weight" in keys) == (not tie) and "model.backbone.embed.weight" in keys
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, gh.GrowMemForCausalLM) and isinstance(loaded.model, RecurrentMemoryTransformer)
    assert (loaded.lm.lm_head.weight is loaded.lm.embed.weight) == tie
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    x = ids(2, 21)  # three segments, the last one shorter
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref(x).logits)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(folder: Path, change) -> None:
    c = json.loads((folder / "config.json").read_text())
    change(c["growmem"])
    (folder / "config.json").write_text(json.dumps(c))


def test_rmt_load_errors_are_clear(tmp_path):
    good = tmp_path / "good"
    pair(tiny())[0].save_pretrained(good)
    bad = _copy(good, tmp_path / "more-memory")  # another memory size: mis-shaped model.memory
    _edit(bad, lambda g: g["rmt"].update(num_mem_tokens=3))
    with pytest.raises(ValueError, match=r"do not fit .*mis-shaped.*model\.memory"):
        gh.GrowMemForCausalLM.from_pretrained(bad)
    bad = _copy(good, tmp_path / "no-rmt")  # the RMT's weights under a plain CausalLM config
    _edit(bad, lambda g: g.pop("rmt"))
    with pytest.raises(ValueError, match=r"do not fit .*Recurrent Memory Transformer's weights .*sets no"):
        transformers.AutoModelForCausalLM.from_pretrained(bad)
    plain = tmp_path / "plain"  # a plain CausalLM's weights under an RMT config
    torch.manual_seed(0)
    gh.GrowMemForCausalLM(gh.GrowMemConfig(growmem=ModelConfig(
        **{**tiny().to_dict(), "rmt": None}))).save_pretrained(plain)
    _edit(plain, lambda g: g.update(rmt={"num_mem_tokens": 2, "segment_len": 8}))
    with pytest.raises(ValueError, match=r"do not fit .*plain CausalLM's weights but config.json sets"):
        gh.GrowMemForCausalLM.from_pretrained(plain)
    bad = _copy(good, tmp_path / "bad-rmt-option")
    _edit(bad, lambda g: g["rmt"].update(segment_len=-1))
    with pytest.raises(ValueError, match="segment_len"):
        gh.GrowMemForCausalLM.from_pretrained(bad)
    bad = _copy(good, tmp_path / "truncated")
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted or unreadable weights file"):
        transformers.AutoModelForCausalLM.from_pretrained(bad)


# -- forward ----------------------------------------------------------------------------------------------------

def test_rmt_forward_loss_hidden_and_cache_equal_growmem():
    hf, ref = pair(tiny(["gdn", "attn"]))
    x = ids(2, 21)
    labels = x.clone()
    labels[0, 4] = -100
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    out = hf(x, labels=labels)
    want = ref(x, targets=targets)
    assert out.past_key_values is None
    assert torch.equal(out.logits, want.logits) and torch.equal(out.loss, want.loss)
    out.loss.backward()  # trainable through the HF wrapper, memory included
    assert hf.model.memory.grad is not None and float(hf.model.memory.grad.abs().sum()) > 0
    with torch.no_grad():
        hs = hf(x, output_hidden_states=True)
        assert len(hs.hidden_states) == 3 and all(h.shape == (2, 21, 32) for h in hs.hidden_states)
        assert torch.equal(hs.hidden_states[0], ref.backbone.embed(x))
        assert torch.equal(ref.backbone.lm_head(hs.hidden_states[-1]), want.logits)
        assert torch.equal(hf(x, return_dict=False)[0], want.logits)
        # streaming in pieces (segment boundaries inside and between pieces) equals one pass
        a = hf(x[:, :5], use_cache=True)
        b = hf(x[:, 5:13], past_key_values=a.past_key_values)
        c = hf(x[:, 13:], past_key_values=b.past_key_values, attention_mask=torch.ones(2, 21, dtype=torch.long))
        assert isinstance(c.past_key_values, gh.GrowMemRMTCache)
        assert (a.past_key_values.get_seq_length(), c.past_key_values.get_seq_length()) == (5, 21)
        assert c.past_key_values.state.segments == 3 and len(c.past_key_values) == 2
        assert torch.allclose(torch.cat([a.logits, b.logits, c.logits], 1), want.logits, atol=1e-5)
        # caches are functional: reusing an older one gives the same continuation
        b2 = hf(x[:, 5:13], past_key_values=a.past_key_values)
        assert torch.equal(b2.logits, b.logits)
    with pytest.raises(ValueError, match="output_hidden_states with a cache"):
        hf(x, use_cache=True, output_hidden_states=True)
    with pytest.raises(TypeError, match="GrowMemRMTCache"):
        hf(x, past_key_values=gh.GrowMemCache([None, None], 0))
    plain = gh.GrowMemForCausalLM(gh.GrowMemConfig(growmem=ModelConfig(**{**tiny().to_dict(), "rmt": None})))
    with pytest.raises(TypeError, match="must be a GrowMemCache"):
        plain(x, past_key_values=hf.new_cache(2))
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding
    with pytest.raises(ValueError, match="all-ones attention_mask"):
        hf(x, attention_mask=mask)


# -- generation ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mixer", ["attn", "gdn", "loglinear++", ["swa", "gdn+grm"]],
                         ids=lambda m: m if isinstance(m, str) else "hybrid")
def test_rmt_generate_greedy_equals_growmem(mixer, monkeypatch):
    hf, ref = pair(tiny(mixer))
    x = ids(2, 5)
    want = ref.generate(x, 29)  # 34 tokens: five segments of 8
    fed: list[int] = []
    feed = type(hf.model).feed
    monkeypatch.setattr(hf.model, "feed", lambda i, s: (fed.append(i.shape[1]), feed(hf.model, i, s))[1])
    got = hf.generate(x, max_new_tokens=29, do_sample=False)
    assert torch.equal(got, want)
    assert fed[0] == 5 and set(fed[1:]) == {1} and len(fed) == 29  # the prompt once, then the new token
    assert torch.equal(hf.generate(x, max_length=34, do_sample=False, attention_mask=torch.ones_like(x)), want)


def test_rmt_generate_sampling_equals_growmem_and_limits():
    hf, ref = pair(tiny(rmt={"max_segments": 6}))
    x = ids(2, 11)  # the prompt spans two segments
    torch.manual_seed(3)
    want = ref.generate(x, 30, temperature=0.8, top_k=10)
    torch.manual_seed(3)
    got = hf.generate(x, max_new_tokens=30, do_sample=True, temperature=0.8, top_k=10)
    assert got.shape == (2, 41) and torch.equal(got, want)
    torch.manual_seed(3)
    full = ref.generate(x, 30, temperature=1.0, top_k=None)
    torch.manual_seed(3)
    assert torch.equal(hf.generate(x, max_new_tokens=30, do_sample=True, top_k=0), full)
    greedy = ref.generate(x, 30)
    assert not torch.equal(want, greedy)  # sampling did sample
    with pytest.raises(ValueError, match="max_segments=6"):  # 11 + 38 = 49 tokens: 7 segments
        hf.generate(x, max_new_tokens=38, do_sample=False)
    with pytest.raises(ValueError, match="max_segments=6"):
        hf.new_cache(2, 49)
    with pytest.raises(NotImplementedError, match="beam search"):
        hf.generate(x, max_new_tokens=2, num_beams=2)


# -- conversion ---------------------------------------------------------------------------------------------------

def test_rmt_run_hf_run_round_trip(tmp_path):
    from growmem.cli import main as cli_main
    from growmem.hf.convert import hf_to_run, run_to_hf
    from growmem.train.checkpoint import load_checkpoint, read_state
    from growmem.train.config import ExperimentConfig
    from growmem.train.trainer import Trainer

    cfg = ExperimentConfig.from_dict({
        "name": "src", "out_dir": str(tmp_path / "{name}"),
        "model": {**tiny(vocab=64).to_dict(), "mixer": ["gdn", "attn"]},
        "task": {"name": "mqar", "options": {"vocab_size": 64, "seq_len": 20, "num_kv_pairs": 3}},
        "train": {"steps": 2, "batch_size": 4, "eval_every": 2, "eval_samples": 4, "eval_batch_size": 4,
                  "checkpoint_every": 2, "log_every": 1, "warmup_steps": 1, "progress": False}})
    trainer = Trainer(cfg, quiet=True)
    trainer.fit()
    assert isinstance(trainer.model, RecurrentMemoryTransformer)
    x = ids(2, 19, vocab=64)
    with torch.no_grad():
        want = trainer.model.eval()(x).logits

    hf_dir = run_to_hf(cfg.run_dir, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert isinstance(hf.model, RecurrentMemoryTransformer)
    assert hf.config.to_model_config() == cfg.model and hf.config.growmem_experiment["step"] == 2
    with torch.no_grad():
        assert torch.equal(hf(x).logits, want)
    assert torch.equal(hf.model.memory, trainer.model.memory)

    ckpt = hf_to_run(hf_dir, tmp_path / "back")
    saved = read_state(ckpt)["config"]
    assert saved["model"] == cfg.to_dict()["model"] and saved["model"]["rmt"]["segment_len"] == 8
    model = build_model(ExperimentConfig.from_dict(saved).model).eval()
    load_checkpoint(ckpt, model, restore_rng=False)
    with torch.no_grad():
        assert torch.equal(model(x).logits, want)
    assert cli_main(["eval", "--run", str(tmp_path / "back"), "--samples", "4"]) == 0


# -- lm-evaluation-harness adapter ----------------------------------------------------------------------------------

def req(*args):
    return SimpleNamespace(args=args)


def direct(model: RecurrentMemoryTransformer, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    seq = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = F.log_softmax(model(seq[:, :-1]).logits[0].double(), -1)
    rows, tgt = lp[len(ctx) - 1:], torch.tensor(cont)
    return float(rows.gather(1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all())


def test_adapter_with_rmt(tmp_path):
    hf, ref = pair(tiny(vocab=256))
    lm = GrowMemLM(model=hf, batch_size=4)
    assert lm.model is hf.model
    requests = [("The cat", " sat"), ("", "hello"), ("a", "bcdefgh" * 3), ("Long context " * 3, "!"), ("xyz", "")]
    got = lm.loglikelihood([req(c, x) for c, x in requests])
    for (c, x), (lp, greedy) in zip(requests, got, strict=True):
        if not x:
            assert (lp, greedy) == (0.0, True)
            continue
        want_lp, want_greedy = direct(ref, list(c.encode()) if c else [10], list(x.encode()))
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
    texts = ["hello world, several segments of bytes", "short", ""]
    for chunk in (5, 2048):  # streamed in pieces across segment boundaries == one pass
        rolled = GrowMemLM(model=ref, chunk_tokens=chunk).loglikelihood_rolling([req(t) for t in texts])
        for t, r in zip(texts, rolled, strict=True):
            assert r == pytest.approx(direct(ref, [10], list(t.encode()))[0] if t else 0.0, abs=1e-4)
    # greedy generation equals growmem's own RMT decoding (no stop string: all 20 bytes)
    out = lm.generate_until([req("abc", {"until": [], "max_gen_toks": 20})])[0]
    want = ref.generate(torch.tensor([list(b"abc")]), 20)[0, 3:].tolist()
    assert out == bytes(want).decode("utf-8", errors="replace")
    hf.save_pretrained(tmp_path / "hf")
    from_folder = GrowMemLM(pretrained=str(tmp_path / "hf"))
    assert isinstance(from_folder.model, RecurrentMemoryTransformer)
    assert from_folder.loglikelihood([req("ab", "cd")])[0][0] == pytest.approx(
        direct(ref, list(b"ab"), list(b"cd"))[0], abs=1e-4)
