"""Byte-level language modelling on real English text available offline.

Corpus: the Python documentation's topics, ``pydoc_data.topics.topics`` (the text ``help("TOPIC")``
prints: the language reference's prose, with its grammar snippets and code examples), shipped with
CPython. Licence: Python Software Foundation License (PSF-2.0), like the rest of the standard library.
Optionally (``include_docstrings=True``) the docstrings of a fixed list of standard-library modules and of
their public classes/functions (:data:`DOCSTRING_MODULES`), also PSF-licensed. The text is UTF-8 encoded;
the vocabulary is the 256 byte values.

The corpus is whatever the running Python ships: it differs (slightly) between Python versions. Log
:func:`corpus_info` (sizes and SHA-256) with results to make them reproducible.

Split (deterministic, by position): each source text (topics; docstrings) is cut at
``(1 - val_fraction)`` of its bytes; the first parts, concatenated, are the training split, the last parts
the validation split. Sources are joined in sorted key order with blank lines between documents.

Batches: random windows of ``seq_len + 1`` bytes ``w`` of a split; ``input_ids = w[:-1]``,
``targets = w[1:]`` (every position scored; ``targets[:, t] == input_ids[:, t + 1]`` for t < T-1).
Metadata ``"start"``: LongTensor ``[B]``, the window's offset in the split.

Evaluation: bits per byte (``bpb`` = mean cross-entropy in nats / ln 2) on validation windows of
``eval_seq_len`` (default ``seq_len``) bytes; when ``eval_seq_len > seq_len`` (length extrapolation)
``bpb/within_train_len`` (positions < seq_len) and ``bpb/beyond_train_len`` (positions >= seq_len) too.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from growmem.tasks.base import (
    SeedLike,
    Task,
    as_rng,
    batch_sizes,
    check_bool,
    check_float,
    check_int,
    eval_mode,
    model_device,
    model_logits,
    to_batch,
)

#: Standard-library modules whose docstrings ``include_docstrings=True`` adds (all import without side effects).
DOCSTRING_MODULES = (
    "abc", "argparse", "array", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "heapq", "hmac", "inspect",
    "io", "ipaddress", "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "shlex", "shutil", "statistics", "string", "struct",
    "subprocess", "tempfile", "textwrap", "threading", "timeit", "typing", "unittest", "uuid", "warnings",
    "weakref", "zipfile",
)


@functools.cache
def topics_text() -> str:
    """The Python docs' topics (``pydoc_data.topics``, PSF licence), joined in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n"


@functools.cache
def docstrings_text() -> str:
    """Docstrings of :data:`DOCSTRING_MODULES` and their public classes/functions (PSF licence)."""
    with warnings.catch_warnings():  # e.g. the deprecated typing.io / typing.re pseudo-modules
        warnings.simplefilter("ignore")
        return _collect_docstrings()


def _collect_docstrings() -> str:
    docs: list[str] = []
    for name in DOCSTRING_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # pragma: no cover - every listed module is in the standard library
            continue
        doc = inspect.getdoc(mod)
        if doc:
            docs.append(f"{name}\n\n{doc}")
        for attr in sorted(vars(mod)):
            obj = vars(mod)[attr]
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if getattr(obj, "__module__", None) != name:
                continue
            d = inspect.getdoc(obj)
            if d and len(d) > 40:
                docs.append(f"{name}.{attr}\n\n{d}")
    return "\n\n".join(docs) + "\n"


def _normalize(text: str) -> str:
    text = re.sub(r"([*=~^-])\1{2,}", " ", text)  # reST underlines / rules
    return re.sub(r"\s+", " ", text).strip() + " "


@functools.cache
def english_corpus(include_docstrings: bool = False, normalize_whitespace: bool = False,
                   val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` read-only uint8 arrays of corpus bytes (cached in memory); see the module docstring."""
    sources = [topics_text()] + ([docstrings_text()] if include_docstrings else [])
    train, val = [], []
    for s in sources:
        if normalize_whitespace:
            s = _normalize(s)
        b = np.frombuffer(s.encode("utf-8"), dtype=np.uint8)
        cut = int(round(len(b) * (1.0 - val_fraction)))
        train.append(b[:cut])
        val.append(b[cut:])
    out = (np.concatenate(train), np.concatenate(val))
    for a in out:
        a.flags.writeable = False
    return out


@functools.cache
def essay_bytes() -> np.ndarray:
    """The topics text with whitespace collapsed and reST rules removed (prose-like, one line), read-only
    uint8: the "essay" haystack of :mod:`growmem.tasks.niah`."""
    b = np.frombuffer(_normalize(topics_text()).encode("utf-8"), dtype=np.uint8)
    b.flags.writeable = False
    return b


def corpus_info(include_docstrings: bool = False, normalize_whitespace: bool = False,
                val_fraction: float = 0.1) -> dict[str, Any]:
    """Sizes and SHA-256 of the splits (the corpus depends on the Python version; log this with results)."""
    import sys

    tr, va = english_corpus(include_docstrings, normalize_whitespace, val_fraction)
    return {"python": sys.version.split()[0], "train_bytes": int(tr.size), "val_bytes": int(va.size),
            "train_sha256": hashlib.sha256(tr.tobytes()).hexdigest(),
            "val_sha256": hashlib.sha256(va.tobytes()).hexdigest()}


@dataclass
class TextConfig:
    """Config of :class:`TextTask`.

    seq_len: training window length T. eval_seq_len: evaluation window length (default seq_len; longer
    for length extrapolation). val_fraction: the last fraction of each source held out. include_docstrings:
    add stdlib docstrings. normalize_whitespace: collapse whitespace runs (and drop reST rules).
    """

    seq_len: int = 256
    eval_seq_len: int | None = None
    val_fraction: float = 0.1
    include_docstrings: bool = False
    normalize_whitespace: bool = False

    def __post_init__(self) -> None:
        own = "TextConfig"
        check_int(own, "seq_len", self.seq_len, 1)
        if self.eval_seq_len is not None:
            check_int(own, "eval_seq_len", self.eval_seq_len, 1)
        check_float(own, "val_fraction", self.val_fraction, lo=0.0, hi=0.5, lo_open=True)
        check_bool(own, "include_docstrings", self.include_docstrings)
        check_bool(own, "normalize_whitespace", self.normalize_whitespace)
        train, val = english_corpus(self.include_docstrings, self.normalize_whitespace, self.val_fraction)
        if self.seq_len + 1 > train.size:
            raise ValueError(f"TextConfig.seq_len={self.seq_len} needs windows of {self.seq_len + 1} bytes but the "
                             f"training split has {train.size}")
        L = self.eval_seq_len or self.seq_len
        if val.size < L + 1:
            raise ValueError(f"evaluation windows of {L + 1} bytes (eval_seq_len + 1) do not fit the validation "
                             f"split of {val.size} bytes; lower eval_seq_len/seq_len or raise val_fraction")


class TextTask(Task):
    """Byte-level LM on the Python docs' English text (see :mod:`growmem.tasks.text`).

    ``batch(B, seed, split="train", seq_len=None)`` -> ``{"input_ids": [B, L], "targets": [B, L], "start": [B]}``
    with L = seq_len (default ``config.seq_len``).
    """

    name = "text"
    Config = TextConfig
    config: TextConfig

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def eval_seq_len(self) -> int:
        return self.config.eval_seq_len or self.config.seq_len

    def split(self, name: str) -> np.ndarray:
        """The bytes of split ``"train"`` or ``"val"`` (read-only uint8)."""
        train, val = english_corpus(self.config.include_docstrings, self.config.normalize_whitespace,
                                    self.config.val_fraction)
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return train if name == "train" else val

    def windows(self, starts: np.ndarray, split: str, seq_len: int) -> dict[str, torch.Tensor]:
        """The windows starting at ``starts [B]`` of ``split``: ids/targets ``[B, seq_len]``."""
        data = self.split(split)
        starts = np.asarray(starts, dtype=np.int64)
        if starts.size and (starts.min() < 0 or starts.max() + seq_len + 1 > data.size):
            raise ValueError(f"window starts out of range for a {split} split of {data.size} bytes")
        w = data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
        return to_batch(w[:, :-1], w[:, 1:], start=starts)

    def batch(self, batch_size: int, seed_or_generator: SeedLike, split: str = "train",
              seq_len: int | None = None) -> dict[str, torch.Tensor]:
        self._check_batch_size(batch_size)
        L = self.seq_len if seq_len is None else seq_len
        check_int("TextTask", "batch(seq_len)", L, 1)
        data = self.split(split)
        if data.size < L + 1:
            raise ValueError(f"windows of {L + 1} bytes do not fit the {split} split of {data.size} bytes")
        starts = as_rng(seed_or_generator).integers(0, data.size - L, size=batch_size, dtype=np.int64)
        return self.windows(starts, split, L)

    def eval_batches(self, n_samples: int | None, batch_size: int, seed: SeedLike,
                     seq_len: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Validation windows of ``seq_len`` (default ``eval_seq_len``) bytes in batches: ``n_samples``
        random windows drawn from ``seed``, or (``n_samples=None``) every non-overlapping window in order."""
        L = self.eval_seq_len if seq_len is None else seq_len
        check_int("TextTask", "eval seq_len", L, 1)
        val = self.split("val")
        if val.size < L + 1:
            raise ValueError(f"evaluation windows of {L + 1} bytes do not fit the validation split of {val.size}")
        if n_samples is None:
            starts = np.arange(0, val.size - L, L, dtype=np.int64)
        else:
            check_int("TextTask", "evaluate(n_samples)", n_samples, 1)
            starts = as_rng(seed).integers(0, val.size - L, size=n_samples, dtype=np.int64)
        i = 0
        for b in batch_sizes(len(starts), batch_size):
            yield self.windows(starts[i:i + b], "val", L)
            i += b

    def evaluate(self, model: Any, n_samples: int | None = 64, batch_size: int = 8, seed: int = 0,
                 seq_len: int | None = None) -> dict[str, float]:
        """Bits per byte on the windows of :meth:`eval_batches` (length ``seq_len``, default ``eval_seq_len``).
        Metrics: ``bpb``, ``loss`` (nats/byte), ``n_bytes``, ``n_samples``, and when the windows are longer
        than the training ``seq_len``: ``bpb/within_train_len`` (positions < seq_len) and
        ``bpb/beyond_train_len`` (positions >= seq_len)."""
        L = self.eval_seq_len if seq_len is None else seq_len
        k = min(self.seq_len, L)
        nll_sum = [0.0, 0.0]  # [within, beyond]
        count = [0, 0]
        n = 0
        dev = model_device(model)
        with eval_mode(model):
            for batch in self.eval_batches(n_samples, batch_size, seed, L):
                logits = model_logits(model, batch["input_ids"].to(dev)).float()
                b = logits.shape[0]
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].to(dev).reshape(-1),
                                      reduction="none").reshape(b, L).double()
                nll_sum[0] += float(nll[:, :k].sum())
                nll_sum[1] += float(nll[:, k:].sum())
                count[0] += b * k
                count[1] += b * (L - k)
                n += b
        n_bytes = count[0] + count[1]
        loss = (nll_sum[0] + nll_sum[1]) / n_bytes
        out = {"bpb": loss / math.log(2), "loss": loss, "n_bytes": float(n_bytes), "n_samples": float(n)}
        if self.seq_len < L:
            out["bpb/within_train_len"] = nll_sum[0] / count[0] / math.log(2)
            out["bpb/beyond_train_len"] = nll_sum[1] / count[1] / math.log(2)
        return out
