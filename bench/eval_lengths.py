"""Evaluate trained runs at other task lengths (e.g. long-delay memory at delays 10^2..10^4).

    .venv/bin/python bench/eval_lengths.py --runs runs/long_delay/* --key delay --values 100 1000 10000 \
        --also min_delay --metric accuracy

For each run folder and value v: load the latest checkpoint, set ``task.options.<key> = v`` (and each
``--also`` key to v), evaluate ``--samples`` held-out samples; print a markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from growmem.models.rmt import build_model
from growmem.tasks import make_task
from growmem.train.checkpoint import latest_checkpoint, load_checkpoint, read_state
from growmem.train.config import ExperimentConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--values", nargs="+", type=int, required=True)
    p.add_argument("--also", nargs="*", default=[])
    p.add_argument("--metric", default="accuracy")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--plot", default=None, help="also write a PNG: the metric against the value, one line per run")
    a = p.parse_args()
    curves: dict[str, list[float]] = {}
    lines = ["| run | params | " + " | ".join(f"{a.key}={v}" for v in a.values) + " |",
             "|---|---:|" + "---:|" * len(a.values)]
    for run in a.runs:
        ckpt = latest_checkpoint(Path(run))
        if ckpt is None:
            continue
        cfg = ExperimentConfig.from_dict(read_state(ckpt)["config"])
        model = build_model(cfg.model)
        load_checkpoint(ckpt, model, restore_rng=False)
        model.eval()
        cells = []
        for v in a.values:
            opts = dict(cfg.task.options, **{a.key: v}, **{k: v for k in a.also})
            task = make_task(cfg.task.name, **opts)
            with torch.no_grad():
                m = task.evaluate(model, n_samples=a.samples, batch_size=a.batch_size, seed=777)
            cells.append(f"{m[a.metric]:.3f}")
            curves.setdefault(Path(run).name, []).append(float(m[a.metric]))
        lines.append(f"| {Path(run).name} | {model.num_parameters()} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
        for name, ys in curves.items():
            ax.plot(a.values, ys, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel(a.key)
        ax.set_ylabel(a.metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.plot)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
