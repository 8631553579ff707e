"""Relate Effective State-Size to task accuracy across trained runs (e.g. an MQAR sweep or the demo).

    .venv/bin/python bench/ess_vs_accuracy.py --runs runs/demo/mqar/* --stride 4
    .venv/bin/python bench/ess_vs_accuracy.py --runs runs/mqar_sweep/*        # after `growmem sweep`

For every run folder: load the latest checkpoint, draw ``--samples`` inputs from the run's own task
(held-out seed), materialize every layer's operator (:func:`growmem.analysis.operators.lm_operators`),
compute tolerance- and entropy-ESS at every ``--stride``-th split, average over positions, heads,
layers and samples, and print one markdown row with the run's final accuracy, its parameter count and
ESS divided by the model width (ESS/d_model, the paper's "ESS per unit of state" reading). The ESS of
attention layers is measured on the softmax matrix, of linear memories on the value -> output map,
of anything else on a per-channel Jacobian (a linearization; marked in the ``kinds`` column).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from growmem.analysis.ess import combine_results, effective_state_size
from growmem.analysis.operators import lm_operators
from growmem.models import build_model
from growmem.tasks import make_task
from growmem.train.checkpoint import latest_checkpoint, load_checkpoint, read_state
from growmem.train.config import ExperimentConfig


def run_ess(run: Path, samples: int, stride: int, tol: float) -> dict | None:
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        return None
    cfg = ExperimentConfig.from_dict(read_state(ckpt)["config"])
    model = build_model(cfg.model)
    load_checkpoint(ckpt, model, restore_rng=False)
    model.eval()
    task = make_task(cfg.task.name, **cfg.task.options)
    ids = task.batch(samples, 4242)["input_ids"]
    L = ids.shape[1]
    positions = list(range(stride, L, stride))
    layer_ops = lm_operators(model, ids)
    results = [effective_state_size(lo.operator, positions=positions, tol=tol) for lo in layer_ops]
    res = combine_results(results, "mean")
    final = json.loads((run / "final.json").read_text()) if (run / "final.json").exists() else {}
    acc = final.get("metrics", {}).get("accuracy", float("nan"))
    return {"run": run.name, "accuracy": acc, "params": model.num_parameters() if hasattr(model, "num_parameters")
            else sum(p.numel() for p in model.parameters()),
            "ess_tol": float(res.tolerance.mean()), "ess_entropy": float(res.entropy.mean()),
            "ess_per_width": float(res.tolerance.mean()) / cfg.model.d_model,
            "kinds": ",".join(sorted({lo.kind for lo in layer_ops}))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--tol", type=float, default=1e-3)
    a = p.parse_args()
    rows = [r for r in (run_ess(Path(d), a.samples, a.stride, a.tol) for d in a.runs) if r]
    lines = ["| run | accuracy | params | tolerance-ESS | entropy-ESS | ESS / d_model | operator kinds |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['accuracy']:.3f} | {r['params']} | {r['ess_tol']:.2f} | "
                     f"{r['ess_entropy']:.2f} | {r['ess_per_width']:.3f} | {r['kinds']} |")
    print("\n".join(lines))
    ok = [r for r in rows if r["accuracy"] == r["accuracy"]]  # not NaN
    if len(ok) >= 3:
        acc = [r["accuracy"] for r in ok]
        print(f"\nSpearman rank correlation with accuracy over {len(ok)} runs: "
              + ", ".join(f"{name} {spearman([r[key] for r in ok], acc):+.2f}"
                          for name, key in (("tolerance-ESS", "ess_tol"), ("entropy-ESS", "ess_entropy"),
                                            ("ESS/d_model", "ess_per_width"), ("params", "params"))))


def _ranks(x: list[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the ranks)."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx) ** 0.5
    vy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (vx * vy) if vx and vy else float("nan")


if __name__ == "__main__":
    main()
