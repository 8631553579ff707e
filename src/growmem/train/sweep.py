"""Sweeps: a grid of overrides over a base experiment, run serially or as parallel processes (one
thread each), resumable (finished runs are skipped, unfinished ones resume from their checkpoint),
collected into one results table (CSV + markdown).

Sweep file::

    name: mqar_sweep
    base: {model: {...}, task: {...}, train: {...}}   # an experiment, inline (or `base_file: path.yaml`)
    grid:
      model.mixer: [la, la+grm, attn]
      task.options.num_kv_pairs: [8, 16]
    out_dir: runs/{name}
    parallel: 2

Named variants compare models that differ in more than one key: the grid key ``variant`` picks one of
``variants`` (a name -> a mapping of override keys to values), applied before the other grid keys::

    variants:
      rmt: {model.mixer: attn, model.rmt: {num_mem_tokens: 4, segment_len: 32}}
      swa: {model.mixer: swa, model.window: 32}
    grid:
      variant: [rmt, swa]

Several variant axes (``variant.<axis>``, run names ``<axis>=<variant>``) cross, e.g. models with tasks::

    grid:
      variant.model: [rmt, attn]
      variant.task: [copy, reverse]
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from growmem.train.config import ExperimentConfig, apply_overrides, yaml_load


@dataclass
class SweepConfig:
    name: str = "sweep"
    base: dict[str, Any] = field(default_factory=dict)
    base_file: str | None = None
    grid: dict[str, list[Any]] = field(default_factory=dict)
    out_dir: str = "runs/{name}"
    parallel: int = 1
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.grid or not all(isinstance(v, list) and v for v in self.grid.values()):
            raise ValueError("sweep.grid must map override keys to non-empty lists")
        if self.parallel < 1:
            raise ValueError(f"sweep.parallel must be >= 1, got {self.parallel}")
        if not isinstance(self.variants, dict) or not all(isinstance(v, dict) for v in self.variants.values()):
            raise ValueError("sweep.variants must map names to mappings of override keys to values")
        for key in filter(is_variant_key, self.grid):
            unknown = [v for v in self.grid[key] if v not in self.variants]
            if unknown:
                raise ValueError(f"sweep.grid.{key} names {unknown} not in sweep.variants {sorted(self.variants)}")


VARIANT = "variant"


def is_variant_key(key: str) -> bool:
    """``variant`` or ``variant.<axis>`` (several named axes, e.g. ``variant.model`` x ``variant.task``)."""
    return key == VARIANT or key.startswith(VARIANT + ".")


def _overrides(sweep: SweepConfig, keys: list[str], values: tuple[Any, ...]) -> list[str]:
    """``key=json`` overrides of one grid point; a ``variant`` expands to its overrides, applied first."""
    out: list[str] = []
    for k, v in zip(keys, values, strict=True):
        if is_variant_key(k):
            out = [f"{vk}={json.dumps(vv)}" for vk, vv in sweep.variants[v].items()] + out
        else:
            out.append(f"{k}={json.dumps(v)}")
    return out


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"sweep file {str(p)!r} does not exist")
    try:
        d = yaml_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"malformed YAML in {str(p)!r}: {err}") from None
    d = apply_overrides(d, overrides or [])
    known = set(SweepConfig.__dataclass_fields__)
    if not isinstance(d, dict) or set(d) - known:
        raise ValueError(f"unknown sweep fields {sorted(set(d) - known) if isinstance(d, dict) else d!r}")
    cfg = SweepConfig(**d)
    if cfg.base_file:
        base = yaml_load((p.parent / cfg.base_file).read_text()) or {}
        cfg.base = apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in _flat(cfg.base)])
    return cfg


def _flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += _flat(v, key + ".")
        else:
            out.append((key, v))
    return out


def expand(sweep: SweepConfig) -> list[tuple[str, ExperimentConfig]]:
    """Every grid point as (run name, validated experiment config)."""
    keys = list(sweep.grid)
    runs = []
    root = sweep.out_dir.format(name=sweep.name)
    for values in itertools.product(*(sweep.grid[k] for k in keys)):
        tag = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values, strict=True))
        d = apply_overrides(sweep.base, _overrides(sweep, keys, values))
        d["name"] = tag
        d["out_dir"] = str(Path(root) / "{name}")
        runs.append((tag, ExperimentConfig.from_dict(d)))
    return runs


def run_sweep(sweep: SweepConfig, quiet: bool = False) -> list[dict[str, Any]]:
    """Run every grid point not finished yet; return the collected rows (also written to results.*)."""
    from growmem.train.trainer import Trainer

    runs = expand(sweep)
    todo = [(n, c) for n, c in runs if not (c.run_dir / "final.json").exists()]
    if not quiet:
        print(f"sweep {sweep.name}: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to run")
    if sweep.parallel == 1:
        for name, cfg in todo:
            if not quiet:
                print(f"== {name}")
            Trainer(cfg, quiet=quiet).fit()
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        pending = list(todo)
        active: list[tuple[str, subprocess.Popen]] = []
        failed = []
        while pending or active:
            while pending and len(active) < sweep.parallel:
                name, cfg = pending.pop(0)
                cfg.run_dir.mkdir(parents=True, exist_ok=True)
                cfg_path = cfg.run_dir / "experiment.json"
                d = cfg.to_dict()
                d["train"]["threads"] = 1
                d["train"]["progress"] = False
                cfg_path.write_text(json.dumps(d))
                log = (cfg.run_dir / "stdout.log").open("a")
                proc = subprocess.Popen([sys.executable, "-m", "growmem.cli", "train", "--config", str(cfg_path)],
                                        stdout=log, stderr=subprocess.STDOUT, env=env)
                active.append((name, proc))
            for item in list(active):
                name, proc = item
                if proc.poll() is not None:
                    active.remove(item)
                    if proc.returncode != 0:
                        failed.append(name)
                    elif not quiet:
                        print(f"== {name} done")
            if active:
                time.sleep(0.5)
        if failed:
            raise RuntimeError(f"sweep runs failed (see their stdout.log): {failed}")
    return collect(sweep)


def collect(sweep: SweepConfig) -> list[dict[str, Any]]:
    """One row per finished run: the grid values, final metrics, parameter count."""
    rows = []
    root = Path(sweep.out_dir.format(name=sweep.name))
    points = itertools.product(*sweep.grid.values())  # the order of expand()
    for (name, cfg), values in zip(expand(sweep), points, strict=True):
        fin = cfg.run_dir / "final.json"
        if not fin.exists():
            continue
        final = json.loads(fin.read_text())
        row: dict[str, Any] = {"run": name}
        for k, value in zip(sweep.grid, values, strict=True):
            if is_variant_key(k):
                row[k] = value
                continue
            node: Any = cfg.to_dict()
            for part in k.split("."):
                node = node[part]
            row[k] = node
        row.update({k: v for k, v in final.get("metrics", {}).items() if k != "step"})
        row["steps"] = final["step"]
        row["params"] = final.get("params")
        rows.append(row)
    if rows:
        root.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with (root / "results.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        (root / "results.md").write_text(markdown_table(rows))
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"
