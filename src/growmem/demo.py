"""The README's demo: MQAR with a base recurrent memory, its Memory-Caching (GRM) version and a
Transformer of the same width, trained side by side on the CPU; prints the accuracy table and writes
a plot of accuracy against training step.

Setting (chosen so that the base memory's fixed state is the bottleneck): MQAR (Zoology format,
random filler) with 8 key-value pairs in 64 tokens, vocabulary 256; 2-layer models of width 64 with
8 heads (an 8 x 8 state per head for the recurrent memory: with 4 heads of 16 x 16 the base memory
learned the task with one of two seeds, see docs/results.md); MC caches a state every 16 tokens and
mixes them with GRM. AdamW, lr 1e-2, batch 64, at most 1500 steps, stopping early at 99% accuracy.
The three models train at once, one process (one thread) each.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

DEMO_MODELS = ("gdn", "gdn+grm", "attn")

DEMO_BASE: dict[str, Any] = {
    "model": {"vocab_size": 256, "d_model": 64, "n_layers": 2, "num_heads": 8, "chunk_size": 16,
              "mc": {"segment_size": 16, "top_k": 2}},
    "task": {"name": "mqar", "options": {"vocab_size": 256, "seq_len": 64, "num_kv_pairs": 8}},
    "train": {"steps": 1500, "batch_size": 64, "lr": 1e-2, "warmup_steps": 50, "eval_every": 100,
              "eval_samples": 512, "eval_batch_size": 128, "checkpoint_every": 500, "log_every": 25,
              "early_stop_metric": "accuracy", "early_stop_target": 0.99, "seed": 0},
}


def run_demo(out_dir: str = "runs/demo", steps: int | None = None, parallel: int = 3,
             models: tuple[str, ...] = DEMO_MODELS) -> list[dict[str, Any]]:
    """Train the demo models (``parallel`` processes of one thread each), print the table, plot."""
    from growmem.train.plot import plot_curves
    from growmem.train.sweep import SweepConfig, markdown_table, run_sweep

    base = copy.deepcopy(DEMO_BASE)
    if steps is not None:
        base["train"]["steps"] = steps
    sweep = SweepConfig(name="mqar", base=base, grid={"model.mixer": list(models)}, out_dir=f"{out_dir}/{{name}}",
                        parallel=parallel)
    t0 = time.perf_counter()
    rows = run_sweep(sweep)
    cols = ["model.mixer", "params", "steps", "accuracy"]
    table = markdown_table([{k: r.get(k) for k in cols} for r in rows])
    print(f"\nMQAR (seq 64, 8 key-value pairs, vocab 256), width 64, 2 layers; {time.perf_counter() - t0:.0f} s\n")
    print(table)
    root = Path(out_dir) / "mqar"
    runs = [root / f"mixer={m}" for m in models]
    plot = plot_curves(runs, root / "accuracy.png", file="eval.jsonl", key="accuracy", logy=False,
                       title="MQAR accuracy (held-out)")
    print(f"plot: {plot}\nresults: {root / 'results.csv'}")
    return rows
