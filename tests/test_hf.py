"""Hugging Face integration (growmem.hf): config round trip, save/load, Auto classes, generate, clear load
errors, run <-> HF conversion, the lm-evaluation-harness adapter, and the wheel's dependencies."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import growmem.hf as gh  # noqa: E402
from growmem.caching.config import MCConfig  # noqa: E402
from growmem.hf.lm_eval_adapter import HAVE_LM_EVAL, GrowMemLM  # noqa: E402
from growmem.models import CausalLM, ModelConfig  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()



def tiny(mixer, **kw) -> ModelConfig:
    d = {"vocab_size": 256, "d_model": 16, "num_heads": 2, "n_layers": 2, "chunk_size": 8,
         "mc": MCConfig(segment_size=4), **kw}
    return ModelConfig(mixer=mixer, **d)


def hf_model(cfg: ModelConfig, seed: int = 0) -> gh.GrowMemForCausalLM:
    torch.manual_seed(seed)
    return gh.GrowMemForCausalLM(gh.GrowMemConfig(growmem=cfg)).eval()


def ids(B: int, T: int, seed: int = 1, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# -- config -----------------------------------------------------------------------------------------------

def test_config_round_trip_and_views(tmp_path):
    mc = MCConfig(segmentation="explicit", segment_lengths=(3, 5), top_k=1, pooling="mean")
    cfg = tiny(["gdn", "attn", "swla+ssc"], n_layers=3, mc=mc, tie_embeddings=False, expand_v=2.0)
    hc = gh.GrowMemConfig(growmem=cfg)
    hc.save_pretrained(tmp_path)
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, gh.GrowMemConfig) and back.model_type == "growmem"
    assert back.to_model_config() == cfg  # nested MCConfig (tuple of segment lengths) included
    assert json.loads((tmp_path / "config.json").read_text())["growmem"]["mc"]["segment_lengths"] == [3, 5]
    assert (back.vocab_size, back.hidden_size, back.num_hidden_layers, back.num_attention_heads) == (256, 16, 3, 2)
    assert back.tie_word_embeddings is False
    with pytest.raises(AttributeError, match="read-only"):
        back.hidden_size = 32
    with pytest.raises(ValueError, match="contradicts"):
        gh.GrowMemConfig(growmem=cfg, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="unknown mixer"):
        gh.GrowMemConfig(growmem={"mixer": "gdnn"})
    with pytest.raises(ValueError, match="unknown ModelConfig"):
        gh.GrowMemConfig(growmem={"widht": 3})


def test_auto_registration():
    gh.register()  # idempotent
    cfg = transformers.AutoConfig.for_model("growmem", growmem=tiny("gdn").to_dict())
    assert isinstance(cfg, gh.GrowMemConfig)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    assert isinstance(m, gh.GrowMemForCausalLM)
    assert isinstance(transformers.AutoModel.from_config(cfg), gh.GrowMemForCausalLM)


# -- save / load -------------------------------------------------------------------------------------------

MIXERS = ["gdn", "gdn+grm", "attn", "swla+ssc", "titans", "loglinear++", ["gdn", "attn", "swla+ssc"]]


@pytest.mark.parametrize("mixer", MIXERS, ids=lambda m: m if isinstance(m, str) else "hybrid")
def test_save_load_round_trip(tmp_path, mixer):
    cfg = tiny(mixer, n_layers=3 if isinstance(mixer, list) else 2)
    m = hf_model(cfg)
    ref = CausalLM(cfg).eval()
    ref.load_state_dict(m.model.state_dict())
    x = ids(2, 19)
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "pytorch_model.bin").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, gh.GrowMemForCausalLM)
    assert loaded.model.lm_head.weight is loaded.model.embed.weight
    with torch.no_grad():
        a, b, c = m(x).logits, loaded(x).logits, ref(x).logits
    assert torch.equal(a, b) and torch.equal(a, c)
    # the same parameter names as growmem's CausalLM, under "model."
    assert {f"model.{k}" for k in ref.state_dict()} == set(loaded.state_dict())


def test_untied_embeddings_round_trip(tmp_path):
    m = hf_model(tiny("gdn", tie_embeddings=False))
    m.save_pretrained(tmp_path)
    loaded = gh.GrowMemForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.lm_head.weight is not loaded.model.embed.weight
    assert torch.equal(loaded.model.lm_head.weight, m.model.lm_head.weight)
    x = ids(1, 9)
    with torch.no_grad():
        assert torch.equal(m(x).logits, loaded(x).logits)
    # sharded folders (model.safetensors.index.json) load and are checked too
    m.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert torch.equal(gh.GrowMemForCausalLM.from_pretrained(tmp_path / "sharded")(x).logits, m(x).logits)


def _saved(tmp_path: Path) -> Path:
    d = tmp_path / "good"
    hf_model(tiny("gdn")).save_pretrained(d)
    return d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_load_errors_are_clear(tmp_path):
    good = _saved(tmp_path)
    for field, value in (("d_model", 32), ("n_layers", 3), ("num_heads", 4)):
        bad = _copy(good, tmp_path / f"bad-{field}")
        c = json.loads((bad / "config.json").read_text())
        c["growmem"][field] = value
        (bad / "config.json").write_text(json.dumps(c))
        with pytest.raises(ValueError, match="do not fit the model its config.json describes"):
            transformers.AutoModelForCausalLM.from_pretrained(bad)
    bad = _copy(good, tmp_path / "bad-mixer")
    c = json.loads((bad / "config.json").read_text())
    c["growmem"]["mixer"] = "attn"  # another mixer: other parameter names
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="unexpected"):
        gh.GrowMemForCausalLM.from_pretrained(bad)
    c["growmem"]["mixer"] = "nope"
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        transformers.AutoModelForCausalLM.from_pretrained(bad)
    for name, corrupt in (("header", lambda b: b"\xff" * 8 + b[8:]), ("truncated", lambda b: b[: len(b) // 2]),
                          ("garbage", lambda b: b"not a safetensors file")):
        bad = _copy(good, tmp_path / f"bad-{name}")
        w = bad / "model.safetensors"
        w.write_bytes(corrupt(w.read_bytes()))
        with pytest.raises(ValueError, match="corrupted or unreadable weights file"):
            transformers.AutoModelForCausalLM.from_pretrained(bad)
    bad = _copy(good, tmp_path / "bad-missing")
    (bad / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        gh.GrowMemForCausalLM.from_pretrained(bad)


# -- forward conventions --------------------------------------------------------------------------------------

def test_forward_hf_conventions():
    m = hf_model(tiny(["gdn", "attn"]))
    x = ids(2, 12)
    with torch.no_grad():
        full = m(x, attention_mask=torch.ones_like(x))
        assert full.past_key_values is None and full.loss is None
        # labels are shifted inside; -100 ignored
        labels = x.clone()
        labels[0, 5] = -100
        out = m(x, labels=labels)
        targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
        assert torch.allclose(out.loss, m.model(x, targets=targets).loss)
        # incremental forward with the cache equals one pass
        a = m(x[:, :7], use_cache=True)
        assert a.past_key_values.get_seq_length() == 7
        b = m(x[:, 7:], past_key_values=a.past_key_values, use_cache=True,
              attention_mask=torch.ones(2, 12, dtype=torch.long))
        assert torch.allclose(torch.cat([a.logits, b.logits], 1), full.logits, atol=1e-5)
        assert b.past_key_values.get_seq_length() == 12
        # tuples, hidden states
        tup = m(x, labels=x, return_dict=False)
        assert len(tup) == 2 and torch.equal(tup[1], full.logits)
        hs = m(x, output_hidden_states=True)
        assert len(hs.hidden_states) == 3 and torch.equal(hs.logits, full.logits)
        assert torch.equal(m.model.lm_head(hs.hidden_states[-1]), full.logits)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="all-ones attention_mask"):
        m(x, attention_mask=mask)
    with pytest.raises(ValueError, match="inputs_embeds"):
        m(inputs_embeds=torch.zeros(1, 2, 16))
    with pytest.raises(TypeError, match="unsupported arguments"):
        m(x, foo=1)
    ll = hf_model(tiny("loglinear++", n_layers=1))
    with pytest.raises(ValueError, match="new_cache"):
        ll(x, use_cache=True)
    with pytest.raises(ValueError, match="new_cache"):
        ll.new_cache(2)
    with torch.no_grad():  # with a planned total length, pieces equal one pass
        a = ll(x[:, :5], past_key_values=ll.new_cache(2, 12), use_cache=True)
        b = ll(x[:, 5:], past_key_values=a.past_key_values, use_cache=True)
        assert torch.allclose(torch.cat([a.logits, b.logits], 1), ll(x).logits, atol=1e-5)


# -- generation -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mixer", ["gdn", "attn", "loglinear++", ["swla+ssc", "attn"], "titans+grm"],
                         ids=lambda m: m if isinstance(m, str) else "hybrid")
def test_generate_greedy_equals_growmem(mixer):
    m = hf_model(tiny(mixer))
    x = ids(2, 9)
    want = m.model.generate(x, 11)
    fed: list[int] = []
    hook = m.model.register_forward_pre_hook(lambda mod, args: fed.append(args[0].shape[1]))
    got = m.generate(x, max_new_tokens=11, do_sample=False)
    hook.remove()
    assert torch.equal(got, want)
    assert fed[0] == 9 and set(fed[1:]) == {1}  # the prompt once, then only the new token with the cache
    got = m.generate(x, max_length=20, do_sample=False, attention_mask=torch.ones_like(x))
    assert torch.equal(got, want)


def test_generate_sampling_with_seed_and_limits():
    m = hf_model(tiny("gdn+grm"))
    x = ids(2, 6)
    torch.manual_seed(3)
    a = m.generate(x, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(3)
    b = m.generate(x, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8)
    assert a.shape == (2, 14) and torch.equal(a, b) and torch.equal(a[:, :6], x)
    assert int(a.min()) >= 0 and int(a.max()) < 256
    with pytest.raises(NotImplementedError, match="beam search"):
        m.generate(x, max_new_tokens=2, num_beams=2)


# -- conversion -----------------------------------------------------------------------------------------------

def test_run_hf_run_round_trip(tmp_path):
    from growmem.cli import main as cli_main
    from growmem.hf.convert import hf_to_run, run_to_hf
    from growmem.hf.convert import main as convert_main
    from growmem.train.checkpoint import latest_checkpoint, load_checkpoint, read_state
    from growmem.train.config import ExperimentConfig
    from growmem.train.trainer import Trainer

    cfg = ExperimentConfig.from_dict({
        "name": "src", "out_dir": str(tmp_path / "{name}"),
        "model": {"vocab_size": 64, "d_model": 16, "n_layers": 2, "num_heads": 2, "mixer": ["gdn", "attn"],
                  "chunk_size": 8},
        "task": {"name": "mqar", "options": {"vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4}},
        "train": {"steps": 2, "batch_size": 4, "eval_every": 2, "eval_samples": 8, "eval_batch_size": 8,
                  "checkpoint_every": 2, "log_every": 1, "warmup_steps": 1, "progress": False}})
    trainer = Trainer(cfg, quiet=True)
    trainer.fit()
    x = ids(2, 15, vocab=64)
    with torch.no_grad():
        want = trainer.model.eval()(x).logits

    hf_dir = run_to_hf(cfg.run_dir, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert hf.config.growmem_experiment["step"] == 2
    with torch.no_grad():
        assert torch.equal(hf(x).logits, want)

    ckpt = hf_to_run(hf_dir, tmp_path / "back")
    assert ckpt.name == "ckpt-000002" and latest_checkpoint(tmp_path / "back") == ckpt
    saved = read_state(ckpt)["config"]
    exp = ExperimentConfig.from_dict(saved)
    for part in ("model", "task", "train"):
        assert saved[part] == cfg.to_dict()[part]
    model = CausalLM(exp.model).eval()
    load_checkpoint(ckpt, model, restore_rng=False)
    with torch.no_grad():
        assert torch.equal(model(x).logits, want)
    # the trainer and `growmem eval` accept the converted run
    assert cli_main(["eval", "--run", str(tmp_path / "back"), "--samples", "8"]) == 0
    resumed = Trainer(exp, quiet=True)
    assert resumed.step == 2
    # a run -> hf round trip of the converted run gives the same HF weights
    hf2 = gh.GrowMemForCausalLM.from_pretrained(run_to_hf(tmp_path / "back", tmp_path / "hf2"))
    for (k1, v1), (k2, v2) in zip(hf.state_dict().items(), hf2.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    with pytest.raises(ValueError, match="no checkpoint"):
        run_to_hf(tmp_path / "hf", tmp_path / "x")
    # command line
    assert convert_main(["hf-to-run", str(hf_dir), str(tmp_path / "back2"), "--step", "5"]) == 0
    assert latest_checkpoint(tmp_path / "back2").name == "ckpt-000005"
    assert convert_main(["run-to-hf", str(tmp_path / "back2"), str(tmp_path / "hf3")]) == 0
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf3").growmem_experiment["step"] == 5


# -- lm-evaluation-harness adapter --------------------------------------------------------------------------------

def req(*args):
    return SimpleNamespace(args=args)


def direct_loglikelihood(model: CausalLM, context: str, continuation: str, prefix: int = 10):
    ctx = list(context.encode()) if context else [prefix]
    cont = list(continuation.encode())
    seq = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = F.log_softmax(model(seq[:, :-1]).logits[0].double(), -1)
    rows = lp[len(ctx) - 1:]
    tgt = torch.tensor(cont)
    return float(rows.gather(1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all())


REQUESTS = [("The cat", " sat"), ("", "hello"), ("naïve ", "café ☕"), ("a", "bcdefgh" * 3), ("xyz", ""),
            ("Long context " * 4, "!")]


@pytest.mark.parametrize("mixer", ["gdn", "loglinear++"])
def test_adapter_loglikelihood_equals_direct(mixer):
    torch.manual_seed(0)
    model = CausalLM(tiny(mixer)).eval()
    lm = GrowMemLM(model=model, batch_size=4)
    got = lm.loglikelihood([req(c, x) for c, x in REQUESTS])
    for (c, x), (lp, greedy) in zip(REQUESTS, got, strict=True):
        if not x:
            assert (lp, greedy) == (0.0, True)
            continue
        want_lp, want_greedy = direct_loglikelihood(model, c, x)
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
    # rolling: every byte scored after the "\n" prefix; streamed in pieces == one pass
    texts = ["hello world", "naïve café ☕ " * 5, ""]
    rolled = lm.loglikelihood_rolling([req(t) for t in texts])
    lm_small = GrowMemLM(model=model, chunk_tokens=5)
    rolled_small = lm_small.loglikelihood_rolling([req(t) for t in texts])
    for t, a, b in zip(texts, rolled, rolled_small, strict=True):
        want = direct_loglikelihood(model, "\n", t)[0] if t else 0.0
        assert a == pytest.approx(want, abs=1e-4) and b == pytest.approx(want, abs=1e-4)


def successor_model() -> CausalLM:
    """A hand-made byte model whose greedy next byte is always ``byte + 1`` (blocks add nothing; the
    output row of byte c is the normalized embedding of byte c - 1)."""
    torch.manual_seed(0)
    m = CausalLM(tiny("gdn", d_model=64, n_layers=1, tie_embeddings=False)).eval()
    with torch.no_grad():
        for layer in m.layers:
            layer.mixer.o_proj.weight.zero_()
            layer.mlp.down.weight.zero_()
        E = torch.randn(256, 64)
        m.embed.weight.copy_(E)
        m.lm_head.weight.copy_(torch.roll(E / E.pow(2).mean(-1, keepdim=True).sqrt(), 1, 0))
    return m


def test_adapter_known_answers_and_generation():
    model = successor_model()
    lm = GrowMemLM(model=model)
    res = lm.loglikelihood([req("abc", "d"), req("abc", "x"), req("mn", "opq"), req("", "\x0b")])
    assert [g for _, g in res] == [True, False, True, True]
    assert res[0][0] > res[1][0]
    assert lm.generate_until([req("abc", {"until": ["g"], "max_gen_toks": 10}),
                              req("pq", {"until": "u", "max_gen_toks": 3}),
                              req("", {"until": [], "max_gen_toks": 2})]) == ["def", "rst", "\x0b\x0c"]
    out = lm.generate_until([req("abc", {"until": ["zz"], "max_gen_toks": 4, "do_sample": True, "temperature": 0.5})])
    assert len(out[0]) == 4


def test_adapter_loads_folders_and_rejects_non_byte_models(tmp_path):
    m = hf_model(tiny("gdn"))
    m.save_pretrained(tmp_path / "hf")
    lm = GrowMemLM(pretrained=str(tmp_path / "hf"), batch_size="auto", dtype="float32")
    want = direct_loglikelihood(m.model, "ab", "cd")[0]
    assert lm.loglikelihood([req("ab", "cd")])[0][0] == pytest.approx(want, abs=1e-4)
    small = CausalLM(tiny("gdn", vocab_size=64)).eval()
    with pytest.raises(ValueError, match="not byte-level"):
        GrowMemLM(model=small)

    class CharTok:  # any object with encode / decode works as a tokenizer
        def encode(self, text):
            return [ord(c) % 64 for c in text]

        def decode(self, ids):
            return "".join(chr(i + 64) for i in ids)

    lm = GrowMemLM(model=small, tokenizer=CharTok(), prefix_token_id=0)
    seq = torch.tensor([[ord(c) % 64 for c in "hello"]])
    with torch.no_grad():
        lp = F.log_softmax(small(seq[:, :-1]).logits[0], -1)
    want = float(lp[2:].gather(1, seq[0, 3:, None]).sum())
    assert lm.loglikelihood([req("hel", "lo")])[0][0] == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="prefix token"):
        GrowMemLM(model=small, tokenizer=CharTok()).loglikelihood([req("", "lo")])
    with pytest.raises(ValueError, match="exactly one"):
        GrowMemLM()
    with pytest.raises(ValueError, match="neither an HF folder"):
        GrowMemLM(pretrained=str(tmp_path))
    with pytest.raises(TypeError, match="unknown arguments"):
        GrowMemLM(model=m, max_lenght=3)


@pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval is not installed (pip install 'growmem[eval]')")
def test_lm_eval_simple_evaluate_offline(tmp_path, monkeypatch):
    """lm-eval's evaluator on three local tasks (json files, no download) with the hand-made model."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    model = successor_model()
    cfg = model.config
    hf = gh.GrowMemForCausalLM(gh.GrowMemConfig(growmem=cfg))
    hf.model.load_state_dict(model.state_dict())
    hf.save_pretrained(tmp_path / "model")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = {"mc": [{"context": "abc", "choices": ["d", "x", "q"], "label": 0},
                   {"context": "mno", "choices": ["z", "p"], "label": 1}],
            "roll": [{"text": "hello world"}, {"text": "abcdefg"}],
            "gen": [{"context": "abc", "target": "def"}, {"context": "pq", "target": "rst"}]}
    for name, docs in rows.items():
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (tasks / "gm_mc.yaml").write_text(
        "task: gm_mc\n" + head.format(tasks / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: label\ndoc_to_choice: "{{choices}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "gm_roll.yaml").write_text(
        "task: gm_roll\n" + head.format(tasks / "roll.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n'
        "    aggregation: bits_per_byte\n    higher_is_better: false\n")
    (tasks / "gm_gen.yaml").write_text(
        "task: gm_gen\n" + head.format(tasks / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\ntarget_delimiter: ""\n'
        'generation_kwargs:\n  until: ["g", "u"]\n  max_gen_toks: 10\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    out = lm_eval.simple_evaluate(model="growmem", model_args=f"pretrained={tmp_path / 'model'}",
                                  tasks=["gm_mc", "gm_roll", "gm_gen"],
                                  task_manager=TaskManager(include_path=str(tasks)),
                                  bootstrap_iters=0, log_samples=False)
    res = out["results"]
    assert res["gm_mc"]["acc,none"] == 1.0
    assert res["gm_gen"]["exact_match,none"] == 1.0
    texts = ["hello world", "abcdefg"]
    total = sum(direct_loglikelihood(model, "\n", t)[0] for t in texts)
    want_bpb = -total / sum(len(t.encode()) for t in texts) / math.log(2)
    assert res["gm_roll"]["bits_per_byte,none"] == pytest.approx(want_bpb, rel=1e-5)
