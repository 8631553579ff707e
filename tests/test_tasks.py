"""growmem.tasks: determinism, shapes, exact label placement, config validation, and evaluate() on an
oracle (100%) and a constant model (chance)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from growmem.tasks import (
    TASKS,
    AssociativeRecallTask,
    CopyTask,
    LongDelayTask,
    MQARConfig,
    MQARTask,
    NIAHTask,
    ReverseTask,
    TextTask,
    corpus_info,
    english_corpus,
    greedy_decode,
    make_task,
)
from growmem.tasks.niah import NOISE_FILLER, needle_text, question_text

SMALL = {
    "mqar": dict(seq_len=64, num_kv_pairs=4, vocab_size=64),
    "niah": dict(seq_len=200, variant=2),
    "copy": dict(length=6, n_symbols=5),
    "reverse": dict(length=6, n_symbols=5),
    "assoc_recall": dict(num_pairs=4, n_keys=8, n_values=5),
    "long_delay": dict(delay=20, distractor="noise"),
    "text": dict(seq_len=32),
}


# ----------------------------------------------------------------------------------------------- helpers
class Oracle(nn.Module):
    """Logits one-hot (scale 50) on the target of the stored row whose prefix matches each input row."""

    def __init__(self, batches, vocab_size):
        super().__init__()
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for b in batches:
            T = b["input_ids"].shape[1]
            ids, tgt = self.rows.get(T, (b["input_ids"][:0], b["targets"][:0]))
            self.rows[T] = (torch.cat([ids, b["input_ids"]]), torch.cat([tgt, b["targets"]]))
        self.vocab_size = vocab_size

    def forward(self, input_ids):
        B, L = input_ids.shape
        out = torch.zeros(B, L, self.vocab_size)
        for i in range(B):
            for ids, tgt in self.rows.values():
                if ids.shape[1] < L:
                    continue
                match = (ids[:, :L] == input_ids[i]).all(1).nonzero()
                if len(match):
                    t = tgt[match[0, 0], :L]
                    pos = (t != -100).nonzero()[:, 0]
                    out[i, pos, t[pos]] = 50.0
                    break
            else:
                raise AssertionError("oracle: unknown input row")
        return out


class Constant(nn.Module):
    """Logits that always favour ``token`` (uniform when token is None)."""

    def __init__(self, vocab_size, token=None):
        super().__init__()
        self.vocab_size, self.token = vocab_size, token

    def forward(self, input_ids):
        out = torch.zeros(*input_ids.shape, self.vocab_size)
        if self.token is not None:
            out[..., self.token] = 1.0
        return out


def scored(b):
    return b["targets"] != -100


# ----------------------------------------------------------------------------------------------- common
@pytest.mark.parametrize("name", sorted(SMALL))
def test_shapes_dtypes_ranges_and_determinism(name):
    task = make_task(name, **SMALL[name])
    b = task.batch(5, 7)
    assert b["input_ids"].shape == b["targets"].shape == (5, task.seq_len)
    assert b["input_ids"].dtype == b["targets"].dtype == torch.long
    assert int(b["input_ids"].min()) >= 0 and int(b["input_ids"].max()) < task.vocab_size
    t = b["targets"][scored(b)]
    assert t.numel() > 0 and int(t.min()) >= 0 and int(t.max()) < task.vocab_size
    assert ((b["targets"] == -100) | scored(b)).all()
    for k, v in b.items():
        assert isinstance(v, torch.Tensor) and v.shape[0] == 5, k
    # same seed -> same batch; different seed -> different; numpy / torch generators reproducible
    b2 = task.batch(5, 7)
    assert all(torch.equal(b[k], b2[k]) for k in b)
    assert not torch.equal(task.batch(5, 8)["input_ids"], b["input_ids"])
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    assert torch.equal(task.batch(4, g1)["input_ids"], task.batch(4, g2)["input_ids"])
    assert torch.equal(task.batch(4, g1)["input_ids"], task.batch(4, g2)["input_ids"])  # streams advance alike
    t1, t2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x1, x2 = task.batch(3, t1)["input_ids"], task.batch(3, t2)["input_ids"]
    assert torch.equal(x1, x2)
    assert not torch.equal(task.batch(3, t1)["input_ids"], x1)  # the torch generator was advanced


def test_registry_and_make_task_errors():
    assert set(TASKS) == set(SMALL)
    assert isinstance(make_task("mqar"), MQARTask)
    with pytest.raises(ValueError, match=r"unknown task 'nope'; known tasks: \['assoc_recall'"):
        make_task("nope")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_pairs'\] for task 'mqar'; valid options"):
        make_task("mqar", num_pairs=3)
    with pytest.raises(ValueError, match="either"):
        MQARTask(MQARConfig(), seq_len=64)
    with pytest.raises(ValueError, match="batch_size"):
        make_task("copy").batch(0, 0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        make_task("copy").batch(2, -1)
    with pytest.raises(TypeError, match="seed_or_generator"):
        make_task("copy").batch(2, None)


@pytest.mark.parametrize("name, options, message", [
    ("mqar", dict(seq_len=20, num_kv_pairs=6), r"seq_len >= 2\*num_kv_pairs \+ 2\*num_queries = 24"),
    ("mqar", dict(seq_len=64, num_kv_pairs=8, vocab_size=16), r"vocab_size >= 18 for num_kv_pairs=8"),
    ("mqar", dict(num_kv_pairs=4, num_queries=5), r"num_queries=5 > num_kv_pairs=4"),
    ("mqar", dict(num_kv_pairs=[2, 4], mix_weights=[1.0]), r"mix_weights has 1 entries for 2"),
    ("mqar", dict(num_kv_pairs=[2, 2]), r"duplicates"),
    ("mqar", dict(power_a=0.0), r"power_a must be > 0"),
    ("mqar", dict(seq_len=True), r"seq_len must be an int"),
    ("niah", dict(seq_len=100, variant=3), r"needs seq_len >= \d+: the needle, question and answer take"),
    ("niah", dict(variant=4), r"variant must be 1, 2 or 3"),
    ("niah", dict(depth=1.5), r"depth must be <= 1.0"),
    ("niah", dict(unit="char"), r"unit must be 'sentence' or 'word'"),
    ("copy", dict(length=0), r"length must be >= 1"),
    ("copy", dict(n_symbols=1), r"n_symbols must be >= 2"),
    ("assoc_recall", dict(num_pairs=5, n_keys=4), r"n_keys=4 < num_pairs=5"),
    ("long_delay", dict(delay=5, min_delay=6), r"min_delay=6 > delay=5"),
    ("long_delay", dict(distractor="silence"), r"distractor must be 'blank' or 'noise'"),
    ("text", dict(seq_len=10**7), r"training split has"),
    ("text", dict(eval_seq_len=10**6), r"do not fit the validation split"),
    ("text", dict(val_fraction=0.9), r"val_fraction must be <= 0.5"),
])
def test_impossible_configs_raise_with_a_useful_message(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_task(name, **options)


# ----------------------------------------------------------------------------------------------- MQAR
def check_mqar_batch(task: MQARTask, b) -> None:
    cfg = task.config
    V, half = cfg.vocab_size, cfg.vocab_size // 2
    ids, tgt = b["input_ids"], b["targets"]
    for i in range(ids.shape[0]):
        n, q = int(b["num_kv_pairs"][i]), int(b["num_queries"][i])
        assert n in cfg.components and q == cfg.queries_for(n)
        keys, values = ids[i, 0:2 * n:2], ids[i, 1:2 * n:2]
        assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < V)).all()
        assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n
        kv = dict(zip(keys.tolist(), values.tolist(), strict=True))
        pos = (tgt[i] != -100).nonzero()[:, 0]
        assert len(pos) == q  # labels only at the q query positions
        assert ((pos >= 2 * n) & ((pos - 2 * n) % 2 == 0)).all()  # the first token of a 2-token slot
        assert len(set(ids[i, pos].tolist())) == q  # distinct keys queried
        for p in pos.tolist():
            assert int(ids[i, p]) in kv and int(tgt[i, p]) == kv[int(ids[i, p])]
            if cfg.value_after_query:
                assert int(ids[i, p + 1]) == kv[int(ids[i, p])]
        if not cfg.random_non_queries:
            other = torch.ones(cfg.seq_len, dtype=torch.bool)
            other[:2 * n] = False
            other[pos] = False
            if cfg.value_after_query:
                other[pos + 1] = False
            assert (ids[i, other] == 0).all()


def test_mqar_layout_example():
    task = MQARTask(seq_len=16, num_kv_pairs=2, vocab_size=12, random_non_queries=False)
    b = task.batch(64, 0)
    check_mqar_batch(task, b)
    # with q == n every key is queried exactly once
    for i in range(64):
        assert sorted(b["input_ids"][i, scored(b)[i]].tolist()) == sorted(b["input_ids"][i, 0:4:2].tolist())


def test_mqar_random_filler_value_after_query_and_mixture():
    task = MQARTask(seq_len=128, num_kv_pairs=[4, 8, 16], vocab_size=256, mix_weights=[1, 1, 2],
                    value_after_query=True)
    b = task.batch(400, 1)
    check_mqar_batch(task, b)
    counts = torch.bincount(b["num_kv_pairs"], minlength=17)[[4, 8, 16]].float() / 400
    assert abs(counts[2] - 0.5) < 0.1 and abs(counts[0] - 0.25) < 0.1
    filler = b["input_ids"][:, 40:][b["targets"][:, 40:] == -100]
    assert filler.unique().numel() > 200  # uniform random filler over the vocabulary
    sub = MQARTask(seq_len=64, num_kv_pairs=8, num_queries=3, vocab_size=64)
    check_mqar_batch(sub, sub.batch(50, 2))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), data=st.data(), power_a=st.floats(0.01, 2.0), rnq=st.booleans(),
       vaq=st.booleans(), seed=st.integers(0, 2**31))
def test_mqar_property_random_valid_configs(n, data, power_a, rnq, vaq, seed):
    q = data.draw(st.integers(1, n))
    T = data.draw(st.integers(2 * n + 2 * q, 2 * n + 2 * q + 40))
    V = data.draw(st.integers(2 * n + 2, 2 * n + 80))
    task = MQARTask(seq_len=T, num_kv_pairs=n, num_queries=q, vocab_size=V, power_a=power_a,
                    random_non_queries=rnq, value_after_query=vaq)
    b = task.batch(3, seed)
    assert b["input_ids"].shape == (3, T) and int(b["input_ids"].max()) < V
    check_mqar_batch(task, b)


def _gaps(b, n):
    pos = (b["targets"] != -100).nonzero()[:, 1]
    return ((pos - 2 * n) // 2).numpy()


def test_mqar_gaps_follow_the_power_law():
    n, T = 4, 512
    S = (T - 2 * n) // 2
    g = _gaps(MQARTask(seq_len=T, num_kv_pairs=n, vocab_size=64).batch(500, 0), n)
    assert (g < S // 10).mean() > 0.35  # mostly short (uniform: 0.1)
    assert np.median(g) < S / 8
    u = _gaps(MQARTask(seq_len=T, num_kv_pairs=n, vocab_size=64, power_a=1.0).batch(500, 0), n)
    assert abs((u < S // 10).mean() - 0.1) < 0.05  # power_a = 1: uniform


def test_mqar_gap_law_matches_numpy_choice_without_replacement():
    """Zoology draws the gaps with np.random.choice(S, n, replace=False, p) and puts the j-th prefix key in the
    j-th drawn slot; our Gumbel top-n draw must give each prefix key the same gap law (earlier draws are
    shorter: P(gap_j = 0) falls from ~0.2 to ~0.05 over j for n = 8)."""
    n, T, a, N = 8, 256, 0.01, 3000
    S = (T - 2 * n) // 2
    p = a * np.arange(1, S + 1) ** (a - 1)
    p /= p.sum()
    rng = np.random.default_rng(0)
    ref = np.stack([rng.choice(S, n, replace=False, p=p) for _ in range(N)])  # [N, n] in draw order
    b = MQARTask(seq_len=T, num_kv_pairs=n, vocab_size=64).batch(N, 1)
    mask = b["targets"] != -100
    pos = mask.nonzero()[:, 1].reshape(N, n)  # query positions, ascending
    qkeys = b["input_ids"].gather(1, pos)
    keys = b["input_ids"][:, 0:2 * n:2]
    j = (qkeys[:, :, None] == keys[:, None, :]).float().argmax(-1)  # prefix index of each query's key
    ours = torch.zeros(N, n, dtype=torch.long).scatter_(1, j, (pos - 2 * n) // 2).numpy()
    for k in range(n):
        se = np.sqrt(ref[:, k].var() / N + ours[:, k].var() / N)
        assert abs(ref[:, k].mean() - ours[:, k].mean()) < 4 * se, k
        assert abs((ref[:, k] == 0).mean() - (ours[:, k] == 0).mean()) < 0.035, k
    assert (ours[:, 0] == 0).mean() > (ours[:, -1] == 0).mean() + 0.08


def test_mqar_evaluate_oracle_constant_and_slices():
    task = MQARTask(seq_len=64, num_kv_pairs=[2, 4], vocab_size=64)
    oracle = Oracle(task.eval_batches(40, 16, 3), 64)
    m = task.evaluate(oracle, n_samples=40, batch_size=16, seed=3)
    assert m["accuracy"] == 1.0 and m["example_accuracy"] == 1.0
    assert m["accuracy/num_kv_pairs=2"] == 1.0 and m["accuracy/num_kv_pairs=4"] == 1.0
    assert m["n_samples"] == 40
    c = task.evaluate(Constant(64, token=40), n_samples=200, batch_size=50, seed=3)
    assert c["accuracy"] < 0.1 and c["example_accuracy"] < 0.05  # chance is 1/32


# ----------------------------------------------------------------------------------------------- NIAH
def _niah_parts(task: NIAHTask, row: torch.Tensor, p: int):
    cfg = task.config
    raw = bytes(row.tolist())
    a = task.answer_start
    value = raw[a:].decode()
    needle = needle_text(cfg.variant, value).encode()
    assert raw[p:p + len(needle)] == needle
    q = question_text(cfg.variant).encode()
    assert raw[a - len(q):a] == q
    hay = raw[:p] + raw[p + len(needle):a - len(q)]
    assert len(hay) == cfg.haystack_len
    return value, hay


@pytest.mark.parametrize("variant, unit", [(1, "sentence"), (2, "sentence"), (3, "sentence"), (2, "word")])
def test_niah_needle_at_depth_and_answer(variant, unit):
    for depth in (0.0, 0.3, 0.5, 0.9, 1.0):
        task = NIAHTask(seq_len=600, variant=variant, depth=depth, unit=unit, num_digits=5)
        b = task.batch(4, 11)
        a, T = task.answer_start, task.seq_len
        assert (b["answer_start"] == a).all() and torch.allclose(b["depth"], torch.tensor(depth))
        for i in range(4):
            p = int(b["needle_pos"][i])
            value, hay = _niah_parts(task, b["input_ids"][i], p)
            if variant == 3:
                assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", value)
            else:
                assert re.fullmatch(r"[1-9][0-9]{4}", value)
            # targets only on the answer bytes, aligned: position a-1+j predicts answer byte j
            tgt = b["targets"][i]
            assert (tgt[a - 1:T - 1] == b["input_ids"][i, a:]).all()
            assert (tgt[:a - 1] == -100).all() and tgt[T - 1] == -100
            # needle at a boundary adjacent to depth * H: within one filler unit of the requested depth
            sep = r"\. " if unit == "sentence" else " "
            bounds = sorted({0, len(hay)} | {m.end() for m in re.finditer(sep.encode(), hay)})
            target = depth * len(hay)
            lo = max(x for x in bounds if x <= target)
            hi = min(x for x in bounds if x >= target)
            assert p in (lo, hi) and p in bounds
            if variant == 1:
                assert abs(p - target) <= 30
                assert NOISE_FILLER[:40] in hay


def test_niah_essay_differs_between_samples_and_random_depth():
    task = NIAHTask(seq_len=400, variant=2, unit="word")
    b = task.batch(16, 0)
    assert len({bytes(r[:100].tolist()) for r in b["input_ids"]}) > 8
    d = b["depth"]
    assert d.min() >= 0 and d.max() <= 1 and d.std() > 0.1


def test_niah_evaluate_oracle_constant_and_modes():
    task = NIAHTask(seq_len=160, variant=1, num_digits=4)
    kw = dict(n_samples=4, batch_size=3, seed=2, lengths=[160, 240], depths=[0.0, 0.5, 1.0])
    oracle = Oracle(task.eval_batches(**kw), 256)
    for mode in ("teacher_forced", "generate"):
        m = task.evaluate(oracle, mode=mode, **kw)
        assert m["accuracy"] == 1.0 and m["byte_accuracy"] == 1.0, mode
        assert m["accuracy/len=240/depth=0.5"] == 1.0 and m["accuracy/depth=1"] == 1.0 and m["n_samples"] == 24
    c = task.evaluate(Constant(256, token=ord("5")), **kw)
    assert c["accuracy"] == 0.0 and c["byte_accuracy"] < 0.3
    with pytest.raises(ValueError, match="mode"):
        task.evaluate(oracle, mode="beam", **kw)


def test_greedy_decode_with_a_causal_lm_matches_teacher_forced_argmax():
    from growmem.models import CausalLM, ModelConfig

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=256, d_model=32, n_layers=1, num_heads=2, mixer="gdn",
                                 chunk_size=16)).double().eval()
    task = NIAHTask(seq_len=140, variant=1, num_digits=3)
    b = task.batch(2, 0)
    a = task.answer_start
    gen = greedy_decode(model, b["input_ids"][:, :a], 3)
    assert gen.shape == (2, 3)
    tf = model(torch.cat([b["input_ids"][:, :a], gen], 1)).logits[:, a - 1:a + 2].argmax(-1)
    assert torch.equal(gen, tf)  # greedy = argmax along its own prefix
    m = task.evaluate(model, n_samples=2, batch_size=2, depths=[0.5], mode="generate")
    assert 0.0 <= m["accuracy"] <= 1.0
    assert model.training is False


# ----------------------------------------------------------------------------------------------- RMT tasks
@settings(max_examples=30, deadline=None)
@given(length=st.integers(1, 40), n_symbols=st.integers(2, 30), reverse=st.booleans(), seed=st.integers(0, 2**31))
def test_copy_reverse_property(length, n_symbols, reverse, seed):
    task = (ReverseTask if reverse else CopyTask)(length=length, n_symbols=n_symbols)
    b = task.batch(3, seed)
    ids, tgt = b["input_ids"], b["targets"]
    L = length
    assert ids.shape == (3, 2 * L + 1) and task.vocab_size == n_symbols + 1
    assert (ids[:, L] == 0).all() and (ids[:, :L] >= 1).all() and (ids[:, L + 1:] >= 1).all()
    x = ids[:, :L]
    y = x.flip(1) if reverse else x
    assert torch.equal(ids[:, L + 1:], y)
    assert torch.equal(tgt[:, L:2 * L], y)  # SEP predicts y_1, ..., y_{L-1} predicts y_L
    assert (tgt[:, :L] == -100).all() and (tgt[:, 2 * L] == -100).all()


def test_copy_evaluate_oracle_and_constant():
    task = CopyTask(length=8, n_symbols=4)
    m = task.evaluate(Oracle(task.eval_batches(30, 8, 1), task.vocab_size), n_samples=30, batch_size=8, seed=1)
    assert m["token_accuracy"] == 1.0 and m["sequence_accuracy"] == 1.0
    c = task.evaluate(Constant(task.vocab_size, token=2), n_samples=300, batch_size=100, seed=1)
    assert abs(c["token_accuracy"] - 0.25) < 0.05 and c["sequence_accuracy"] < 0.01


def test_associative_recall():
    task = AssociativeRecallTask(num_pairs=5, n_keys=6, n_values=4)
    b = task.batch(200, 0)
    ids, tgt = b["input_ids"], b["targets"]
    assert ids.shape == (200, 12) and task.vocab_size == 11
    keys, vals = ids[:, 0:10:2], ids[:, 1:10:2]
    assert ((keys >= 1) & (keys <= 6)).all() and ((vals >= 7) & (vals <= 10)).all()
    assert (ids[:, 10] == 0).all() and (tgt[:, :11] == -100).all()
    for i in range(200):
        assert len(set(keys[i].tolist())) == 5
        j = int(b["query_index"][i])
        assert ids[i, 11] == keys[i, j] and tgt[i, 11] == vals[i, j]
    m = task.evaluate(Oracle(task.eval_batches(50, 20, 0), 11), n_samples=50, batch_size=20, seed=0)
    assert m["accuracy"] == 1.0
    c = task.evaluate(Constant(11, token=8), n_samples=400, batch_size=100, seed=0)
    assert abs(c["accuracy"] - 0.25) < 0.08


# ----------------------------------------------------------------------------------------------- long delay
@pytest.mark.parametrize("distractor", ["blank", "noise"])
def test_long_delay_target_is_the_first_symbol(distractor):
    task = LongDelayTask(delay=10_000, n_symbols=4, distractor=distractor, n_noise=5)
    b = task.batch(16, 0)
    ids, tgt = b["input_ids"], b["targets"]
    assert ids.shape == (16, 10_002) and task.vocab_size == 6 + (5 if distractor == "noise" else 0)
    assert torch.equal(tgt[:, -1], ids[:, 0]) and torch.equal(b["symbol"], ids[:, 0])
    assert (ids[:, 0] < 4).all() and (ids[:, -1] == task.cue).all() and (tgt[:, :-1] == -100).all()
    mid = ids[:, 1:-1]
    if distractor == "blank":
        assert (mid == task.blank).all()
    else:
        assert (mid >= 6).all() and mid.unique().numel() == 5
    assert (b["delay"] == 10_000).all()


def test_long_delay_variable_delay_and_evaluate():
    task = LongDelayTask(delay=50, min_delay=10, n_symbols=4)
    b = task.batch(64, 1)
    for i in range(64):
        d = int(b["delay"][i])
        assert 10 <= d <= 50
        row = b["input_ids"][i]
        assert int(row[50 - d]) == int(b["targets"][i, -1]) and (row[:-1] < 4).sum() == 1
        assert (row[50 - d + 1:-1] == task.blank).all() and row[-1] == task.cue
    m = task.evaluate(Oracle(task.eval_batches(40, 16, 0), 6), n_samples=40, batch_size=16, seed=0)
    assert m["accuracy"] == 1.0
    c = task.evaluate(Constant(6, token=1), n_samples=400, batch_size=100, seed=0)
    assert abs(c["accuracy"] - 0.25) < 0.08


# ----------------------------------------------------------------------------------------------- text
def test_text_corpus_split_and_windows():
    train, val = english_corpus()
    assert english_corpus() is english_corpus()  # cached
    assert train.size > 300_000 and abs(val.size / (train.size + val.size) - 0.1) < 0.001
    assert not train.flags.writeable
    text = train.tobytes().decode("utf-8", "replace")
    assert text.count(" the ") > 1000  # real English
    task = TextTask(seq_len=64)
    b = task.batch(6, 0)
    assert torch.equal(b["targets"][:, :-1], b["input_ids"][:, 1:])
    for i in range(6):
        s = int(b["start"][i])
        assert torch.equal(b["input_ids"][i], torch.from_numpy(train[s:s + 64].astype(np.int64)))
        assert int(b["targets"][i, -1]) == int(train[s + 64])
    v = task.batch(3, 0, split="val", seq_len=128)
    assert v["input_ids"].shape == (3, 128) and int(v["start"].max()) + 129 <= val.size
    info = corpus_info()
    assert info["train_bytes"] == train.size and len(info["val_sha256"]) == 64
    tn, _ = english_corpus(normalize_whitespace=True)
    assert b"  " not in tn.tobytes()
    td, vd = english_corpus(include_docstrings=True)  # + stdlib docstrings, split per source
    assert td.size > train.size and vd.size > val.size and td[:train.size].tobytes() == train.tobytes()
    assert TextTask(seq_len=16, include_docstrings=True).batch(2, 0)["input_ids"].shape == (2, 16)


def test_text_evaluate_bpb_oracle_uniform_and_extrapolation():
    task = TextTask(seq_len=32, eval_seq_len=64)
    u = task.evaluate(Constant(256), n_samples=4, batch_size=2, seed=0)
    assert abs(u["bpb"] - 8.0) < 1e-6 and u["n_bytes"] == 4 * 64
    assert abs(u["bpb/within_train_len"] - 8.0) < 1e-6 and abs(u["bpb/beyond_train_len"] - 8.0) < 1e-6
    o = task.evaluate(Oracle(task.eval_batches(4, 2, 0), 256), n_samples=4, batch_size=2, seed=0)
    assert o["bpb"] < 1e-6
    short = task.evaluate(Constant(256), n_samples=2, batch_size=2, seed=0, seq_len=32)
    assert "bpb/beyond_train_len" not in short
    full = TextTask(seq_len=4096).evaluate(Constant(256), n_samples=None, batch_size=4)
    _, val = english_corpus()
    assert full["n_samples"] == -(-(val.size - 4096) // 4096) and full["n_bytes"] == full["n_samples"] * 4096


def test_tasks_feed_the_causal_lm():
    from growmem.models import CausalLM, ModelConfig

    torch.manual_seed(0)
    for name in ("mqar", "copy", "long_delay"):
        task = make_task(name, **SMALL[name])
        model = CausalLM(ModelConfig(vocab_size=task.vocab_size, d_model=16, n_layers=1, num_heads=2, mixer="gla",
                                     chunk_size=16))
        b = task.batch(2, 0)
        out = model(b["input_ids"], targets=b["targets"])
        assert torch.isfinite(out.loss)
        out.loss.backward()
        model.train()
        m = task.evaluate(model, n_samples=4, batch_size=2, seed=0)
        assert model.training and all(np.isfinite(v) for v in m.values())
