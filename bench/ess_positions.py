"""Effective State-Size vs position: base memories, their Memory Caching variants and attention.

    .venv/bin/python bench/ess_positions.py                 # L = 1024, every 8th split, ~5 min on one core
    .venv/bin/python bench/ess_positions.py --L 256 --stride 4 --out /tmp/ess.png   # quick look

Two settings, same split positions s (number of past tokens):

* **LM**: a freshly initialised CausalLM per mixer (d_model 64, 4 heads -> K = V = 16, 2 layers, MC
  segments of 64, untrained), all on the same input (the first L bytes of the stdlib docstring corpus of
  ``growmem demo``). Per layer the operator of its memory / attention is materialized
  (:func:`growmem.analysis.operators.lm_operators`); ESS is averaged over heads and layers.
* **memory**: the memories alone on random inputs (q, k, v, u ~ N(0, 1), keys L2-normalized for gdn,
  raw gates ~ N(0, 1) through each memory's own gate map; attention with random q, k), 4 heads of
  K = V = 16: the "generic input" regime of the analytic bounds.

Prints markdown tables (cells: tolerance-ESS / entropy-ESS (TSS), per value channel, mean over heads
and layers; tolerance 1e-3 relative to the largest singular value) and writes a two-panel PNG.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from growmem.analysis import (
    attention_operator,
    effective_state_size,
    estimate_cost,
    layer_state_size,
    lm_operators,
    memory_operator,
    select_positions,
    state_size_curve,
)
from growmem.caching import CachedMemory, MCConfig
from growmem.cli import stdlib_doc_text
from growmem.memories import GatedDeltaNetMemory, LinearAttentionMemory
from growmem.models import CausalLM, ModelConfig

MODELS = ["la", "la+res", "la+grm", "gdn", "gdn+res", "gdn+grm", "attn"]
BASES = {"la": LinearAttentionMemory, "gdn": GatedDeltaNetMemory}


def lm_curves(name: str, ids: torch.Tensor, pos: list[int], args) -> dict[str, torch.Tensor]:
    torch.manual_seed(args.seed)
    cfg = ModelConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers, num_heads=args.heads, mixer=name,
                      chunk_size=64, mc=MCConfig(segment_size=args.segment))
    ops = lm_operators(CausalLM(cfg), ids)
    worst = max(o.operator.residual for o in ops)
    assert worst < 1e-10, f"{name}: operator does not reproduce the layer output ({worst:.1e})"
    rs = [effective_state_size(o.operator, pos, tol=args.tol).reduce("mean") for o in ops]
    tss = torch.stack([layer_state_size(o, pos) for o in ops]).mean(0)
    return {m: torch.stack([getattr(r, m) for r in rs]).mean(0) for m in ("tolerance", "entropy", "rank")} | {
        "tss": tss}


def memory_curves(name: str, L: int, pos: list[int], args) -> dict[str, torch.Tensor]:
    H = args.heads
    K = args.d_model // H
    g = torch.Generator().manual_seed(args.seed)
    dt = torch.float64
    q, k, v, u = (torch.randn(1, L, H, K, generator=g, dtype=dt) for _ in range(4))
    if name == "attn":
        T = attention_operator(q, k)
        r = effective_state_size(T, pos, tol=args.tol).reduce("mean")
        tss = torch.tensor(pos, dtype=dt)
    else:
        base_name, _, agg = name.partition("+")
        torch.manual_seed(args.seed)
        mem = BASES[base_name](H, K, K, 64)
        if agg:
            mem = CachedMemory(mem, agg, MCConfig(segment_size=args.segment))
        mem = mem.double()
        if mem.l2_normalize_qk:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        raw = {n: torch.randn(1, L, H, f, generator=g, dtype=dt) for n, f in mem.gate_features.items()}
        gates = mem.make_gates(raw)
        if "u" in mem.input_projections:
            gates["u"] = u
        op = memory_operator(mem, q, k, v, gates)
        assert op.residual < 1e-10, f"{name}: operator does not reproduce the memory output ({op.residual:.1e})"
        r = effective_state_size(op, pos, tol=args.tol).reduce("mean")
        tss = state_size_curve(mem, L, pos)
    return {"tolerance": r.tolerance, "entropy": r.entropy, "rank": r.rank, "tss": tss}


def table(title: str, curves: dict[str, dict[str, torch.Tensor]], pos: list[int], cols: list[int]) -> str:
    idx = [pos.index(c) for c in cols]
    lines = [f"**{title}** (cells: tolerance-ESS / entropy-ESS (TSS), per channel)", "",
             "| model | " + " | ".join(f"s={c}" for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, c in curves.items():
        cells = [f"{float(c['tolerance'][i]):.1f} / {float(c['entropy'][i]):.1f} ({float(c['tss'][i]):.0f})"
                 for i in idx]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: str, panels: list[tuple[str, dict[str, dict[str, torch.Tensor]]]], pos: list[int], L: int,
         tol: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4.2), sharey=True)
    for ax, (title, curves) in zip(axes, panels, strict=True):
        for i, (name, c) in enumerate(curves.items()):
            color = f"C{i}"
            ax.plot(pos, c["tolerance"].tolist(), color=color, lw=1.5, label=name)
            if name in ("la", "la+grm", "gdn+grm", "attn"):
                ax.plot(pos, c["tss"].tolist(), color=color, lw=0.9, ls="--")
        ax.plot(pos, [min(s, L - s) for s in pos], color="0.6", lw=0.8, ls=":", label="min(s, L-s)")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("split position s (past tokens)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"tolerance-ESS per channel (tol {tol:g} rel.)\ndashed: TSS of la, la+grm, gdn+grm, attn")
    axes[-1].legend(fontsize=7, loc="lower center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--L", type=int, default=1024)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--segment", type=int, default=64)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cols", default="32,96,224,480,736,928,992",
                   help="table positions (mid-segment by default: at a segment end the newest cached state equals "
                        "the online one)")
    p.add_argument("--out", default="docs/ess_positions.png")
    args = p.parse_args()
    torch.set_num_threads(1)
    L = args.L
    pos = select_positions(L, stride=args.stride)
    cols = [c for c in (int(x) for x in args.cols.split(",")) if c in pos]
    models = args.models.split(",")
    data = stdlib_doc_text()
    ids = torch.tensor(list(data[:L]), dtype=torch.long)[None]
    n_ops = len(models) * args.heads * (args.layers + 1)
    print(f"L={L}, {len(pos)} split positions, {len(models)} models; cost: {estimate_cost(n_ops, L, pos)}")
    t0 = time.perf_counter()
    lm, mem = {}, {}
    for name in models:
        t = time.perf_counter()
        lm[name] = lm_curves(name, ids, pos, args)
        mem[name] = memory_curves(name, L, pos, args)
        print(f"  {name}: {time.perf_counter() - t:.1f}s")
    print(f"total {time.perf_counter() - t0:.0f}s\n")
    print(table(f"Fresh LM (d_model {args.d_model}, {args.heads} heads, {args.layers} layers, MC segment "
                f"{args.segment}), text input, L={L}", lm, pos, cols))
    print()
    print(table(f"Memories alone, random q/k/v/u, {args.heads} heads of K=V={args.d_model // args.heads}, L={L}",
                mem, pos, cols))
    plot(args.out, [("fresh LM, text input (mean over heads and layers)", lm),
                    ("memory alone, random inputs (mean over heads)", mem)], pos, L, args.tol)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
