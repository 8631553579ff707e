"""The common base of growmem's tasks: :class:`Task`, seeding, config validation and scoring helpers.

Every task yields batches as a dict of CPU tensors::

    {"input_ids": LongTensor [B, T],   # token ids in [0, task.vocab_size)
     "targets":   LongTensor [B, T],   # aligned: targets[:, t] is what position t predicts; -100 = not scored
     <metadata>:  Tensor [B] ...}      # task-specific (e.g. "num_kv_pairs", "depth")

which is exactly what :class:`growmem.models.lm.CausalLM` takes (``model(input_ids, targets=targets)``).

Determinism: ``task.batch(batch_size, seed_or_generator)`` is a pure function of the task config and
the seed. The seed may be an ``int`` (a fresh ``numpy.random.default_rng(seed)``), a
``numpy.random.Generator`` (used and advanced in place, so consecutive calls give a reproducible stream),
or a ``torch.Generator`` (one 62-bit integer is drawn from it to seed a numpy generator, so it is
advanced too). See :func:`as_rng`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

IGNORE_INDEX = -100

SeedLike = int | np.random.Generator | torch.Generator


def as_rng(seed_or_generator: SeedLike) -> np.random.Generator:
    """A numpy ``Generator`` from an int seed (>= 0), a numpy ``Generator`` (returned as is) or a
    ``torch.Generator`` (seeds a new numpy generator with one draw from it, advancing it)."""
    if isinstance(seed_or_generator, np.random.Generator):
        return seed_or_generator
    if isinstance(seed_or_generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=seed_or_generator, dtype=torch.long))
        return np.random.default_rng(seed)
    if isinstance(seed_or_generator, (int, np.integer)) and not isinstance(seed_or_generator, bool):
        if seed_or_generator < 0:
            raise ValueError(f"seed must be >= 0, got {seed_or_generator}")
        return np.random.default_rng(int(seed_or_generator))
    raise TypeError("seed_or_generator must be an int seed, a numpy.random.Generator or a torch.Generator, "
                    f"got {type(seed_or_generator).__name__}")


# ----------------------------------------------------------------------------------------------- validation
def check_int(owner: str, name: str, value: Any, minimum: int | None = None) -> None:
    """Raise ValueError unless ``value`` is an int (not bool) and ``>= minimum``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")


def check_float(owner: str, name: str, value: Any, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite real number in ``[lo, hi]`` (``(lo, hi]`` if lo_open)."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool) \
            or not math.isfinite(float(value)):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{owner}.{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{owner}.{name} must be <= {hi}, got {value}")


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{owner}.{name} must be a bool, got {value!r}")


def config_from_options(config_cls: type, options: Mapping[str, Any], task_name: str) -> Any:
    """Build ``config_cls(**options)``, first rejecting unknown option names with the list of valid ones."""
    valid = [f.name for f in dataclasses.fields(config_cls) if f.init]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for task {task_name!r}; valid options: {valid}")
    return config_cls(**options)


# ----------------------------------------------------------------------------------------------- models
def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a parameter-free module/callable)."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device("cpu")


def model_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Call ``model(input_ids [B, T])`` and return its logits ``[B, T, V]``. Accepts an output with a
    ``.logits`` attribute (:class:`growmem.models.lm.LMOutput`), a tuple whose first item is the logits,
    or a plain tensor."""
    out = model(input_ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(input_ids.shape):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model must return logits [B, T, V] for input_ids {tuple(input_ids.shape)}, got {shape}")
    return out


class eval_mode:  # noqa: N801 - used like a function: ``with eval_mode(model):``
    """Context manager: ``model.eval()`` and ``torch.no_grad()`` inside, the training flag restored after."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.was_training = bool(getattr(model, "training", False))
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        if isinstance(self.model, nn.Module):
            self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        if isinstance(self.model, nn.Module):
            self.model.train(self.was_training)


@torch.no_grad()
def greedy_decode(model: Any, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation of ``prompt [B, P]`` by ``max_new_tokens`` tokens -> ``[B, max_new_tokens]``.

    Uses ``model.generate(prompt, max_new_tokens, temperature=0)`` when the model has one (growmem's
    :class:`CausalLM` decodes with its mixers' caches); otherwise re-runs the model on the whole growing
    sequence at every step (exact, quadratic; fine for short answers)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if hasattr(model, "generate"):
        out = model.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        return out[:, prompt.shape[1]:]
    seq = prompt
    for _ in range(max_new_tokens):
        nxt = model_logits(model, seq)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None].to(seq.dtype)], dim=1)
    return seq[:, prompt.shape[1]:]


def scored_predictions(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(correct, mask)``, both bool ``[B, T]``: mask = targets != -100, correct = mask & argmax == target."""
    targets = targets.to(logits.device)
    mask = targets != IGNORE_INDEX
    correct = mask & (logits.argmax(-1) == targets)
    return correct, mask


def sample_distinct(rng: np.random.Generator, rows: int, population: int, k: int) -> np.ndarray:
    """``rows`` independent uniformly random ordered k-subsets of ``range(population)`` -> int64 ``[rows, k]``
    (each row: k distinct values, in uniformly random order). Vectorized: the k smallest of ``population``
    uniform draws, ordered by their draws."""
    if not 0 <= k <= population:
        raise ValueError(f"cannot draw {k} distinct values from {population}")
    if k == 0 or rows == 0:
        return np.zeros((rows, k), dtype=np.int64)
    u = rng.random((rows, population))
    idx = np.argpartition(u, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(u, idx, axis=1), axis=1)
    return np.take_along_axis(idx, order, axis=1).astype(np.int64)


def batch_sizes(n_samples: int, batch_size: int) -> list[int]:
    """Split ``n_samples`` into batches of ``batch_size`` (the last may be smaller)."""
    check_int("evaluate", "n_samples", n_samples, 1)
    check_int("evaluate", "batch_size", batch_size, 1)
    return [min(batch_size, n_samples - s) for s in range(0, n_samples, batch_size)]


# ----------------------------------------------------------------------------------------------- Task
class Task(abc.ABC):
    """A data task: a validated config, a vocabulary, a sequence length, a deterministic batch generator
    and an evaluation.

    Construct with a config object or with the config's fields as keyword options::

        MQARTask(MQARConfig(seq_len=128, num_kv_pairs=8))  ==  MQARTask(seq_len=128, num_kv_pairs=8)

    Subclasses set ``name`` (the registry name) and ``Config`` (a dataclass validated in ``__post_init__``),
    and implement ``vocab_size``, ``seq_len``, ``batch`` and ``evaluate``.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config: Any = None, **options: Any) -> None:
        if config is None:
            config = config_from_options(self.Config, options, self.name or type(self).__name__)
        elif options:
            raise ValueError(f"pass either a {self.Config.__name__} or keyword options, not both")
        elif not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids; every id in a batch is in ``[0, vocab_size)``."""

    @property
    @abc.abstractmethod
    def seq_len(self) -> int:
        """``T``, the length of the ``[B, T]`` tensors of a batch."""

    @abc.abstractmethod
    def batch(self, batch_size: int, seed_or_generator: SeedLike) -> dict[str, torch.Tensor]:
        """A batch ``{"input_ids": [B, T], "targets": [B, T], **metadata}`` (CPU tensors), a pure function
        of the config and the seed (see :func:`as_rng`)."""

    @abc.abstractmethod
    def evaluate(self, model: Any, n_samples: int, batch_size: int, seed: int) -> dict[str, float]:
        """Metrics of ``model`` (``model(input_ids) -> logits [B, T, V]`` or an object with ``.logits``)
        on ``n_samples`` fresh samples drawn from ``seed``. Runs under ``torch.no_grad()`` in eval mode
        (the training flag is restored) on the model's device."""

    def eval_batches(self, n_samples: int, batch_size: int, seed: SeedLike) -> Iterator[dict[str, torch.Tensor]]:
        """The batches :meth:`evaluate` scores: ``n_samples`` samples in batches of ``batch_size`` drawn
        from one generator seeded with ``seed`` (deterministic given all three arguments)."""
        rng = as_rng(seed)
        for b in batch_sizes(n_samples, batch_size):
            yield self.batch(b, rng)

    def scored_accuracy(self, model: Any, n_samples: int, batch_size: int, seed: int) -> dict[str, float]:
        """``accuracy`` of the argmax at every scored position (one per sample for single-answer tasks)
        over :meth:`eval_batches`, and ``n_samples``."""
        ok_n = n = 0
        dev = model_device(model)
        with eval_mode(model):
            for b in self.eval_batches(n_samples, batch_size, seed):
                ok, _ = scored_predictions(model_logits(model, b["input_ids"].to(dev)), b["targets"])
                ok_n += int(ok.sum())
                n += ok.shape[0]
        return {"accuracy": ok_n / n, "n_samples": float(n)}

    def _check_batch_size(self, batch_size: int) -> None:
        check_int(type(self).__name__, "batch(batch_size)", batch_size, 1)


def to_batch(input_ids: np.ndarray, targets: np.ndarray, **metadata: Any) -> dict[str, torch.Tensor]:
    """Pack numpy arrays into the batch dict (ids/targets as int64 tensors, metadata as tensors)."""
    out = {"input_ids": torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)),
           "targets": torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64))}
    for k, v in metadata.items():
        out[k] = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
    return out
