"""Multi-query associative recall (MQAR), as in Zoology (Arora et al. 2023, "Zoology: measuring and
improving recall in efficient language models", ``zoology/data/multiquery_ar.py``).

Format of one sequence of length ``T = seq_len`` with ``n = num_kv_pairs``, ``q = num_queries``,
``V = vocab_size``, ``C = 2 n`` (the key-value prefix)::

    position   0   1   2   3  ...  C-2  C-1 | C ..................................... T-1
    input      k1  v1  k2  v2 ...  kn   vn  | filler, with query keys at C + 2*gap_j
    target    -100 everywhere except at a query position C + 2*gap_j, where it is the value of that key

* keys: ``n`` distinct tokens from ``[1, V // 2)`` (0 is the filler placeholder, never a key);
  values: ``n`` distinct tokens from ``[V // 2, V)``; pair i is (k_i, v_i).
* the part after the prefix is cut into ``S = (T - C) // 2`` two-token slots; the q queries take q
  distinct slots ``gap_1..gap_q`` drawn without replacement with probability ``p(g) ~ (g + 1) ** (power_a - 1)``
  (g = 0..S-1; ``power_a = 0.01``: a power law, mostly short gaps; ``power_a = 1``: uniform). The query key
  sits at the first token of its slot, ``C + 2*gap``; the model predicts the value *at the key's position*
  (``targets[C + 2*gap] = value``), as Zoology's labels (shifted by one) do.
* queried keys: with ``q == n`` (the default, Zoology's MQAR) every key is queried once, the j-th key of
  the prefix in the j-th drawn slot (the draw order, as Zoology's ``put_along_axis(queries, gaps*2, keys)``);
  with ``q < n`` a random subset of q keys, kept in prefix order.
* filler (every position that is neither prefix nor query key): uniform random tokens from ``[0, V)``
  (``random_non_queries=True``, Zoology's default; they may collide with keys or values, as in Zoology),
  else the token 0.
* ``value_after_query=True`` (not Zoology) writes the value token into the input right after each query
  key (position ``C + 2*gap + 1``, the second token of the slot), i.e. the answer is teacher-forced in the
  input as in ordinary LM text. Zoology leaves that position as filler; the targets are the same either way.

Mixtures: ``num_kv_pairs`` may be a list (e.g. ``[4, 8, 16]``); each sample draws its component with
probabilities ``mix_weights`` (default uniform), like Zoology's list of train configs mixed into one data
set. Every component shares ``seq_len`` and ``vocab_size``; ``num_queries`` (if given) applies to all.

Batch metadata: ``"num_kv_pairs"`` and ``"num_queries"``, LongTensor ``[B]``.
Metrics (``evaluate``): ``accuracy`` (argmax == value over all query positions, Zoology's metric),
``accuracy/num_kv_pairs=<n>`` for each component, ``example_accuracy`` (all queries of a sample right),
``n_queries``, ``n_samples``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from growmem.tasks.base import (
    IGNORE_INDEX,
    SeedLike,
    Task,
    as_rng,
    check_bool,
    check_float,
    check_int,
    eval_mode,
    model_device,
    model_logits,
    sample_distinct,
    scored_predictions,
    to_batch,
)


@dataclass
class MQARConfig:
    """Config of :class:`MQARTask` (see the module docstring for the exact format).

    seq_len: T. num_kv_pairs: n, or a list of n's mixed per sample. vocab_size: V (keys from [1, V//2),
    values from [V//2, V)). num_queries: q per sample (default n, i.e. every key queried once; must be <= n).
    power_a: exponent of the gap distribution p(g) ~ (g+1)^(power_a-1). random_non_queries: random filler
    (else 0). mix_weights: sampling weights of the num_kv_pairs components. value_after_query: put the
    value in the input after each query key (not Zoology).
    """

    seq_len: int = 64
    num_kv_pairs: int | tuple[int, ...] = 4
    vocab_size: int = 8192
    num_queries: int | None = None
    power_a: float = 0.01
    random_non_queries: bool = True
    mix_weights: tuple[float, ...] | None = None
    value_after_query: bool = False

    def __post_init__(self) -> None:
        own = "MQARConfig"
        check_int(own, "seq_len", self.seq_len, 1)
        check_int(own, "vocab_size", self.vocab_size, 2)
        kv = self.num_kv_pairs
        if isinstance(kv, (list, tuple)):
            if len(kv) == 0:
                raise ValueError("MQARConfig.num_kv_pairs must be an int or a non-empty list of ints")
            for n in kv:
                check_int(own, "num_kv_pairs", n, 1)
            if len(set(kv)) != len(kv):
                raise ValueError(f"MQARConfig.num_kv_pairs has duplicates: {list(kv)}")
            self.num_kv_pairs = tuple(int(n) for n in kv)
        else:
            check_int(own, "num_kv_pairs", kv, 1)
            self.num_kv_pairs = int(kv)
        if self.num_queries is not None:
            check_int(own, "num_queries", self.num_queries, 1)
        check_float(own, "power_a", self.power_a, lo=0.0, lo_open=True)
        check_bool(own, "random_non_queries", self.random_non_queries)
        check_bool(own, "value_after_query", self.value_after_query)
        comps = self.components
        if self.mix_weights is not None:
            w = tuple(float(x) for x in self.mix_weights)
            if len(w) != len(comps):
                raise ValueError(f"MQARConfig.mix_weights has {len(w)} entries for {len(comps)} num_kv_pairs "
                                 f"components {list(comps)}")
            if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
                raise ValueError(f"MQARConfig.mix_weights must be finite, >= 0 and not all 0, got {list(w)}")
            self.mix_weights = w
        half = self.vocab_size // 2
        for n in comps:
            q = self.queries_for(n)
            if q > n:
                raise ValueError(f"MQARConfig.num_queries={q} > num_kv_pairs={n}: each query asks a distinct key")
            if 2 * n + 2 * q > self.seq_len:
                raise ValueError(
                    f"MQAR needs seq_len >= 2*num_kv_pairs + 2*num_queries = {2 * n + 2 * q} (a {2 * n}-token "
                    f"key-value prefix, then each query takes its own 2-token slot), got seq_len={self.seq_len} "
                    f"for num_kv_pairs={n}, num_queries={q}")
            if half - 1 < n or self.vocab_size - half < n:
                raise ValueError(
                    f"MQAR needs vocab_size >= {2 * n + 2} for num_kv_pairs={n}: keys are {n} distinct tokens "
                    f"from [1, vocab_size//2) and values {n} distinct tokens from [vocab_size//2, vocab_size); "
                    f"got vocab_size={self.vocab_size}")

    @property
    def components(self) -> tuple[int, ...]:
        """The num_kv_pairs values mixed in the data (one for a plain config)."""
        return self.num_kv_pairs if isinstance(self.num_kv_pairs, tuple) else (self.num_kv_pairs,)

    def queries_for(self, num_kv_pairs: int) -> int:
        """q for a component: ``num_queries`` if set, else ``num_kv_pairs``."""
        return num_kv_pairs if self.num_queries is None else self.num_queries


def _mqar_rows(rng: np.random.Generator, rows: int, cfg: MQARConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` MQAR sequences with n pairs -> (input_ids, targets), int64 ``[rows, T]``."""
    T, V, q = cfg.seq_len, cfg.vocab_size, cfg.queries_for(n)
    half, C = V // 2, 2 * n
    keys = sample_distinct(rng, rows, half - 1, n) + 1  # [rows, n] from [1, V//2)
    values = sample_distinct(rng, rows, V - half, n) + half  # [rows, n] from [V//2, V)
    # q slots out of S, drawn sequentially without replacement with p ~ (g+1)^(a-1): Gumbel top-q, ordered
    # by score, has exactly the law of sequential (Plackett-Luce) sampling, which np.random.choice does.
    S = (T - C) // 2
    score = (cfg.power_a - 1.0) * np.log(np.arange(1, S + 1, dtype=np.float64)) + rng.gumbel(size=(rows, S))
    top = np.argpartition(-score, q - 1, axis=1)[:, :q]
    gaps = np.take_along_axis(top, np.argsort(-np.take_along_axis(score, top, axis=1), axis=1), axis=1)
    if q == n:
        kidx = np.broadcast_to(np.arange(n), (rows, n))
    else:
        kidx = np.sort(sample_distinct(rng, rows, n, q), axis=1)
    qkeys = np.take_along_axis(keys, kidx, axis=1)
    qvals = np.take_along_axis(values, kidx, axis=1)
    qpos = C + 2 * gaps  # [rows, q]
    r = np.arange(rows)[:, None]

    ids = np.zeros((rows, T), dtype=np.int64)
    ids[:, 0:C:2] = keys
    ids[:, 1:C:2] = values
    filler = np.ones((rows, T), dtype=bool)
    filler[:, :C] = False
    filler[r, qpos] = False
    if cfg.value_after_query:
        filler[r, qpos + 1] = False
    if cfg.random_non_queries:
        ids[filler] = rng.integers(0, V, size=int(filler.sum()), dtype=np.int64)
    ids[r, qpos] = qkeys
    if cfg.value_after_query:
        ids[r, qpos + 1] = qvals
    tgt = np.full((rows, T), IGNORE_INDEX, dtype=np.int64)
    tgt[r, qpos] = qvals
    return ids, tgt


class MQARTask(Task):
    """Zoology's multi-query associative recall; see :mod:`growmem.tasks.mqar` for the exact format.

    ``batch(B, seed)`` -> ``{"input_ids": [B, T], "targets": [B, T], "num_kv_pairs": [B], "num_queries": [B]}``.
    """

    name = "mqar"
    Config = MQARConfig
    config: MQARConfig

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def batch(self, batch_size: int, seed_or_generator: SeedLike) -> dict[str, torch.Tensor]:
        self._check_batch_size(batch_size)
        rng = as_rng(seed_or_generator)
        cfg = self.config
        comps = cfg.components
        if len(comps) == 1:
            which = np.zeros(batch_size, dtype=np.int64)
        else:
            w = np.asarray(cfg.mix_weights if cfg.mix_weights is not None else [1.0] * len(comps))
            which = rng.choice(len(comps), size=batch_size, p=w / w.sum())
        ids = np.empty((batch_size, cfg.seq_len), dtype=np.int64)
        tgt = np.empty_like(ids)
        for c, n in enumerate(comps):
            rows = np.flatnonzero(which == c)
            if rows.size:
                ids[rows], tgt[rows] = _mqar_rows(rng, rows.size, cfg, n)
        nkv = np.asarray(comps, dtype=np.int64)[which]
        nq = np.asarray([cfg.queries_for(n) for n in comps], dtype=np.int64)[which]
        return to_batch(ids, tgt, num_kv_pairs=nkv, num_queries=nq)

    def evaluate(self, model: Any, n_samples: int = 1000, batch_size: int = 64, seed: int = 0) -> dict[str, float]:
        """Accuracy of the argmax at the query positions: ``accuracy``, ``accuracy/num_kv_pairs=<n>`` per
        component, ``example_accuracy`` (fraction of samples with every query right), ``n_queries``,
        ``n_samples``."""
        comps = self.config.components
        correct = dict.fromkeys(comps, 0)
        total = dict.fromkeys(comps, 0)
        ex_ok = n = 0
        dev = model_device(model)
        with eval_mode(model):
            for b in self.eval_batches(n_samples, batch_size, seed):
                logits = model_logits(model, b["input_ids"].to(dev))
                ok, mask = scored_predictions(logits, b["targets"])
                ok_row, tot_row = ok.sum(1).cpu(), mask.sum(1).cpu()
                ex_ok += int((ok_row == tot_row).sum())
                n += ok_row.numel()
                for c in comps:
                    sel = b["num_kv_pairs"] == c
                    correct[c] += int(ok_row[sel].sum())
                    total[c] += int(tot_row[sel].sum())
        all_total = sum(total.values())
        out = {"accuracy": sum(correct.values()) / max(all_total, 1)}
        for c in comps:
            if total[c]:
                out[f"accuracy/num_kv_pairs={c}"] = correct[c] / total[c]
        out.update(example_accuracy=ex_ok / max(n, 1), n_queries=float(all_total), n_samples=float(n))
        return out
