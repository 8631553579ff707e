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


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def plot_metric(results_csv: str | Path | list[str | Path], x: str, y: str | list[str], series: str,
                out: str | Path, title: str | None = None, logx: bool = False,
                filters: dict[str, str] | None = None) -> Path:
    """One line per value of ``series`` (e.g. ``model.mixer``): ``y`` (e.g. ``accuracy``) against ``x``
    (e.g. ``task.options.num_kv_pairs``), from one or more sweeps' results.csv, keeping the rows that match
    ``filters`` (column -> value); points repeated over other columns (e.g. seeds) are averaged. A
    non-numeric ``x`` (e.g. a task variant) gives grouped bars instead; a list ``y`` takes, per run, the
    first of those columns it reports (tasks with different metrics)."""
    from growmem.train.tables import mean_by, read_results, select

    rows = select(read_results(results_csv), filters or {})
    if not rows:
        raise ValueError(f"no rows of {results_csv} match {filters}")
    ys = [y] if isinstance(y, str) else list(y)
    for col in (x, series):
        if not any(col in r for r in rows):
            raise ValueError(f"column {col!r} not in {results_csv} (columns: {list(rows[0])})")
    if not any(c in r for r in rows for c in ys):
        raise ValueError(f"none of the columns {ys} is in {results_csv} (columns: {list(rows[0])})")
    means = mean_by(rows, (series, x), ys)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    groups: dict[str, dict[str, float]] = {}
    for (name, xv), yv in means.items():
        groups.setdefault(name, {})[xv] = yv
    cats = list(dict.fromkeys(xv for _, xv in means))
    if all(_is_number(c) for c in cats):
        for name, pts in groups.items():
            xy = sorted((float(a), b) for a, b in pts.items())
            ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", label=name)
        if logx:
            ax.set_xscale("log", base=2)
    else:
        width = 0.8 / max(1, len(groups))
        for i, (name, pts) in enumerate(groups.items()):
            pos = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(cats))]
            ax.bar(pos, [pts.get(c, 0.0) for c in cats], width=width, label=name)
        ax.set_xticks(range(len(cats)), cats)
    ax.set_xlabel(x.split(".")[-1])
    ax.set_ylabel(" / ".join(ys))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{ys[0]} vs {x.split('.')[-1]}")
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
