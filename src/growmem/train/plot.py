"""Plots (PNG via matplotlib, imported lazily): a metric against a sweep axis, and loss curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric(results_csv: str | Path | list[str | Path], x: str, y: str, series: str, out: str | Path,
                title: str | None = None, logx: bool = False, filters: dict[str, str] | None = None) -> Path:
    """One line per value of ``series`` (e.g. ``model.mixer``): ``y`` (e.g. ``accuracy``) against ``x``
    (e.g. ``task.options.num_kv_pairs``), from one or more sweeps' results.csv, keeping the rows that match
    ``filters`` (column -> value); points repeated over other columns (e.g. seeds) are averaged."""
    from growmem.train.tables import mean_by, read_results, select

    rows = select(read_results(results_csv), filters or {})
    if not rows:
        raise ValueError(f"no rows of {results_csv} match {filters}")
    for col in (x, y, series):
        if not any(col in r for r in rows):
            raise ValueError(f"column {col!r} not in {results_csv} (columns: {list(rows[0])})")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    groups: dict[str, list[tuple[float, float]]] = {}
    for (name, xv), yv in mean_by(rows, (series, x), y).items():
        groups.setdefault(name, []).append((float(xv), yv))
    for name, pts in groups.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel(x.split(".")[-1])
    ax.set_ylabel(y)
    if logx:
        ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{y} vs {x.split('.')[-1]}")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_curves(run_dirs: list[str | Path], out: str | Path, file: str = "train.jsonl", key: str = "loss",
                logy: bool = True, title: str | None = None) -> Path:
    """``key`` against step for several run folders (reads their ``file``: train.jsonl or eval.jsonl)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    for d in run_dirs:
        path = Path(d) / file
        if not path.exists():
            raise ValueError(f"{path} does not exist")
        rows: list[dict[str, Any]] = [json.loads(line) for line in path.read_text().splitlines() if line]
        rows = [r for r in rows if key in r]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o" if file == "eval.jsonl" else None,
                label=Path(d).name)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or key)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_loss_curves(run_dirs: list[str | Path], out: str | Path, title: str = "training loss") -> Path:
    """Training loss against step for several run folders (reads their train.jsonl)."""
    return plot_curves(run_dirs, out, "train.jsonl", "loss", logy=True, title=title)
