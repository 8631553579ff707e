"""The synthetic tasks of the Recurrent Memory Transformer paper (Bulatov et al. 2022): copy, reverse and
associative retrieval, at any length.

Copy / reverse (``length = L`` symbols from an alphabet of ``n_symbols``; token 0 is the separator,
symbols are ``1..n_symbols``; ``vocab_size = n_symbols + 1``; ``T = 2 L + 1``)::

    position  0 .. L-1        L     L+1 .. 2L
    input     x_1 .. x_L      SEP   y_1 .. y_L          y = x (copy) or reversed x (reverse)
    target    -100 .. -100    y_1   y_2 .. y_L  -100    (targets[L + i] = y_{i+1}, i = 0..L-1; the last is -100)

The answer is teacher-forced in the input (the model predicts y_{i+1} from SEP y_1..y_i). Metrics:
``token_accuracy`` (argmax over the L answer positions) and ``sequence_accuracy`` (all L right, which
equals greedy-decoding exact match). Metadata: ``"length"`` LongTensor [B].

Associative retrieval (``num_pairs = n`` pairs with distinct keys from ``n_keys`` key tokens, values
drawn with replacement from ``n_values`` value tokens; token 0 is the query marker "?", keys are
``1..n_keys``, values ``n_keys+1 .. n_keys+n_values``; ``vocab_size = 1 + n_keys + n_values``;
``T = 2 n + 2``)::

    input   k_1 v_1 k_2 v_2 ... k_n v_n  ?  k_j
    target  -100 ...                   -100  v_j      (only the last position is scored)

Metric: ``accuracy``. Metadata: ``"query_index"`` LongTensor [B] (j - 1, which pair is asked).

Curriculum (``train.curriculum: [[step, value], ...]``; the trainer calls ``task.set_curriculum(value)``):
the value is the copy/reverse ``length`` or the associative-retrieval ``num_pairs``, so the sequence (and
the number of segments a Recurrent Memory Transformer reads) grows during training. Evaluation uses the
current value; end the curriculum at the configured size so the final metrics are measured there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from growmem.tasks.base import (
    IGNORE_INDEX,
    SeedLike,
    Task,
    as_rng,
    check_int,
    eval_mode,
    model_device,
    model_logits,
    sample_distinct,
    scored_predictions,
    to_batch,
)

SEP = 0
QUERY = 0


@dataclass
class CopyConfig:
    """Config of :class:`CopyTask` / :class:`ReverseTask`: ``length`` L of the string (T = 2L + 1),
    ``n_symbols`` in its alphabet (tokens 1..n_symbols; 0 is the separator)."""

    length: int = 32
    n_symbols: int = 10

    def __post_init__(self) -> None:
        check_int("CopyConfig", "length", self.length, 1)
        check_int("CopyConfig", "n_symbols", self.n_symbols, 2)


class CopyTask(Task):
    """Copy: ``x SEP x`` with targets on the second copy (module docstring). ``batch(B, seed)`` ->
    ``{"input_ids": [B, 2L+1], "targets": [B, 2L+1], "length": [B]}``."""

    name = "copy"
    Config = CopyConfig
    config: CopyConfig
    reverse = False

    @property
    def vocab_size(self) -> int:
        return self.config.n_symbols + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.config.length + 1

    def set_curriculum(self, value: int) -> None:
        """Curriculum knob: set the string ``length`` (validated as the config's)."""
        self.config = dataclasses.replace(self.config, length=value)

    def batch(self, batch_size: int, seed_or_generator: SeedLike) -> dict[str, torch.Tensor]:
        self._check_batch_size(batch_size)
        rng = as_rng(seed_or_generator)
        L, T = self.config.length, self.seq_len
        x = rng.integers(1, self.config.n_symbols + 1, size=(batch_size, L), dtype=np.int64)
        y = x[:, ::-1] if self.reverse else x
        ids = np.concatenate([x, np.full((batch_size, 1), SEP, dtype=np.int64), y], axis=1)
        tgt = np.full((batch_size, T), IGNORE_INDEX, dtype=np.int64)
        tgt[:, L:2 * L] = y
        return to_batch(ids, tgt, length=np.full(batch_size, L, dtype=np.int64))

    def evaluate(self, model: Any, n_samples: int = 500, batch_size: int = 50, seed: int = 0) -> dict[str, float]:
        """``token_accuracy``, ``sequence_accuracy`` (= greedy exact match), ``n_samples``."""
        tok_ok = tok_n = seq_ok = n = 0
        dev = model_device(model)
        with eval_mode(model):
            for b in self.eval_batches(n_samples, batch_size, seed):
                ok, mask = scored_predictions(model_logits(model, b["input_ids"].to(dev)), b["targets"])
                tok_ok += int(ok.sum())
                tok_n += int(mask.sum())
                seq_ok += int((ok.sum(1) == mask.sum(1)).sum())
                n += ok.shape[0]
        return {"token_accuracy": tok_ok / tok_n, "sequence_accuracy": seq_ok / n, "n_samples": float(n)}


class ReverseTask(CopyTask):
    """Reverse: ``x SEP reversed(x)`` with targets on the reversed copy (module docstring)."""

    name = "reverse"
    reverse = True


@dataclass
class AssocRecallConfig:
    """Config of :class:`AssociativeRecallTask`: ``num_pairs`` n (T = 2n + 2), ``n_keys`` key tokens
    (>= n, keys within a sample are distinct), ``n_values`` value tokens (values may repeat)."""

    num_pairs: int = 8
    n_keys: int = 26
    n_values: int = 10

    def __post_init__(self) -> None:
        own = "AssocRecallConfig"
        check_int(own, "num_pairs", self.num_pairs, 1)
        check_int(own, "n_keys", self.n_keys, 1)
        check_int(own, "n_values", self.n_values, 2)
        if self.n_keys < self.num_pairs:
            raise ValueError(f"AssocRecallConfig.n_keys={self.n_keys} < num_pairs={self.num_pairs}: the keys of a "
                             "sample are distinct, so n_keys must be >= num_pairs")


class AssociativeRecallTask(Task):
    """RMT's associative retrieval: ``k1 v1 .. kn vn ? kj`` -> ``vj`` at the last position (module docstring).
    ``batch(B, seed)`` -> ``{"input_ids": [B, 2n+2], "targets": [B, 2n+2], "query_index": [B]}``."""

    name = "assoc_recall"
    Config = AssocRecallConfig
    config: AssocRecallConfig

    @property
    def vocab_size(self) -> int:
        return 1 + self.config.n_keys + self.config.n_values

    @property
    def seq_len(self) -> int:
        return 2 * self.config.num_pairs + 2

    def set_curriculum(self, value: int) -> None:
        """Curriculum knob: set ``num_pairs`` (validated as the config's)."""
        self.config = dataclasses.replace(self.config, num_pairs=value)

    def batch(self, batch_size: int, seed_or_generator: SeedLike) -> dict[str, torch.Tensor]:
        self._check_batch_size(batch_size)
        rng = as_rng(seed_or_generator)
        cfg = self.config
        n, T = cfg.num_pairs, self.seq_len
        keys = sample_distinct(rng, batch_size, cfg.n_keys, n) + 1
        values = rng.integers(0, cfg.n_values, size=(batch_size, n), dtype=np.int64) + 1 + cfg.n_keys
        j = rng.integers(0, n, size=batch_size, dtype=np.int64)
        r = np.arange(batch_size)
        ids = np.empty((batch_size, T), dtype=np.int64)
        ids[:, 0:2 * n:2] = keys
        ids[:, 1:2 * n:2] = values
        ids[:, 2 * n] = QUERY
        ids[:, 2 * n + 1] = keys[r, j]
        tgt = np.full((batch_size, T), IGNORE_INDEX, dtype=np.int64)
        tgt[:, T - 1] = values[r, j]
        return to_batch(ids, tgt, query_index=j)

    def evaluate(self, model: Any, n_samples: int = 1000, batch_size: int = 100, seed: int = 0) -> dict[str, float]:
        """``accuracy`` of the argmax at the last position, ``n_samples``."""
        return self.scored_accuracy(model, n_samples, batch_size, seed)
