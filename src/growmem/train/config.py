"""Experiment configuration: typed dataclasses validated in ``__post_init__``, loaded from YAML with
command-line overrides (``--set train.lr=1e-3 task.options.num_kv_pairs=16``)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from growmem.models.config import ModelConfig


@dataclass
class TaskConfig:
    """A task by registry name (see ``growmem.tasks``) and its options."""

    name: str = "mqar"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"task.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.options, dict):
            raise ValueError(f"task.options must be a mapping, got {type(self.options).__name__}")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Steps count optimizer updates; each update sees
    ``batch_size * accum_steps`` sequences per process."""

    steps: int = 1000
    batch_size: int = 32
    accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    autocast: str | None = None  # None or "bf16" / "fp16"
    eval_every: int = 100
    eval_samples: int = 256
    eval_batch_size: int = 64
    early_stop_metric: str | None = None
    early_stop_target: float | None = None
    early_stop_mode: str = "max"
    checkpoint_every: int = 200
    keep_checkpoints: int = 1
    log_every: int = 10
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    curriculum: list[list[int]] | None = None  # [[from_step, value], ...] for the task's curriculum knob

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "accum_steps", "eval_every", "eval_samples", "eval_batch_size",
                     "checkpoint_every", "log_every", "keep_checkpoints"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"train.{name} must be a positive int, got {val!r}")
        if self.warmup_steps < 0 or not isinstance(self.warmup_steps, int):
            raise ValueError(f"train.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("train.weight_decay must be >= 0 and train.min_lr_ratio in [0, 1]")
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"train.grad_clip must be > 0 or null, got {self.grad_clip!r}")
        if self.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"train.autocast must be null, bf16 or fp16, got {self.autocast!r}")
        if self.early_stop_mode not in ("max", "min"):
            raise ValueError(f"train.early_stop_mode must be max or min, got {self.early_stop_mode!r}")
        if (self.early_stop_metric is None) != (self.early_stop_target is None):
            raise ValueError("train.early_stop_metric and train.early_stop_target go together")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"train.threads must be >= 1, got {self.threads!r}")
        if self.curriculum is not None:
            steps = [int(s) for s, _ in self.curriculum]
            if steps != sorted(steps) or (steps and steps[0] != 0):
                raise ValueError("train.curriculum must be [[0, v0], [s1, v1], ...] with increasing steps")


@dataclass
class ExperimentConfig:
    """model + task + train, and where the run writes (``out_dir``; ``{name}`` is substituted)."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/{name}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir.format(name=self.name))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()  # leaves out model.rmt when unset (old configs compare equal)
        d["train"]["betas"] = list(self.train.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        if not isinstance(d, dict):
            raise ValueError(f"an experiment config must be a mapping, got {type(d).__name__}")
        d = copy.deepcopy(d)
        _check_keys("experiment", d, cls)
        model = d.pop("model", {}) or {}
        task = d.pop("task", {}) or {}
        train = d.pop("train", {}) or {}
        for name, sub, kls in (("task", task, TaskConfig), ("train", train, TrainConfig)):
            _check_keys(name, sub, kls)
        return cls(model=ModelConfig.from_dict(model), task=TaskConfig(**task), train=TrainConfig(**train), **d)


def _check_keys(where: str, d: dict[str, Any], kls: type) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(kls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {where} field(s) {unknown}; known: {sorted(known)}")


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that also reads ``1e-3`` as a float (YAML 1.1 would read a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars/lists) to a config dict."""
    d = copy.deepcopy(d)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise ValueError(f"bad override key {path!r}")
        node = d
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {path!r}: {key!r} is not a mapping")
        node[keys[-1]] = yaml_load(raw)
    return d


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None,
                    model: str | None = None) -> ExperimentConfig:
    """Read a YAML experiment file (or start from defaults), apply overrides, validate."""
    import yaml

    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} does not exist")
        try:
            d = yaml_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"malformed YAML in {str(p)!r}: {err}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{str(p)!r} must hold a mapping at the top level")
    if model is not None:
        d.setdefault("model", {})["mixer"] = model
    d = apply_overrides(d, overrides or [])
    return ExperimentConfig.from_dict(d)
