"""Benchmark the parallel linear scan against the sequential loop.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scan.py                       # T = 1024 ... 65536
    OMP_NUM_THREADS=1 .venv/bin/python bench/scan.py --T 4096 --reps 1     # quick look

h_t = a_t * h_{t-1} + b_t on ``[B, T, N]`` (a with 10% exact zeros, as BMRU switches produce), real
float32 and complex64 (LRU). For each method: forward and forward+backward wall time (best of
``--reps``) and the speed-up over the loop (``naive_scan`` with plain autograd). The loop's backward is
timed up to ``--max-loop-backward`` tokens.
"""

from __future__ import annotations

import argparse
import json

import torch

from common import best_time
from growmem.ops.scan import SCAN_METHODS, naive_scan, parallel_scan


def inputs(B: int, T: int, N: int, dtype: torch.dtype, grad: bool):
    g = torch.Generator().manual_seed(0)
    r = torch.rand(B, T, N, generator=g)
    a = torch.where(r < 0.1, 0.0, 0.5 + 0.5 * r)
    b = torch.randn(B, T, N, generator=g)
    if dtype.is_complex:
        a = a * torch.exp(1j * torch.rand(B, T, N, generator=g))
        b = torch.complex(b, torch.randn(B, T, N, generator=g))
    a, b = a.to(dtype), b.to(dtype)
    return a.requires_grad_(grad), b.requires_grad_(grad)


def bench(B: int, T: int, N: int, dtype: torch.dtype, reps: int, max_loop_backward: int, chunk_size: int) -> dict:
    row: dict = {"B": B, "T": T, "N": N, "dtype": str(dtype).replace("torch.", "")}
    fns = {m: (lambda a, b, m=m: parallel_scan(a, b, method=m, chunk_size=chunk_size)) for m in SCAN_METHODS}
    fns["loop"] = naive_scan
    for name, f in fns.items():
        a, b = inputs(B, T, N, dtype, False)
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = 1e3 * best_time(lambda f=f, a=a, b=b: f(a, b), reps)
        if name == "loop" and max_loop_backward < T:
            row[f"{name}_fwdbwd_ms"] = None
            continue
        a, b = inputs(B, T, N, dtype, True)

        def fb(f=f, a=a, b=b):
            h = f(a, b)
            (h.real if h.is_complex() else h).sum().backward()

        row[f"{name}_fwdbwd_ms"] = 1e3 * best_time(fb, reps)
    for m in SCAN_METHODS:
        row[f"{m}_speedup_fwd"] = row["loop_fwd_ms"] / row[f"{m}_fwd_ms"]
        if row["loop_fwdbwd_ms"] is not None:
            row[f"{m}_speedup_fwdbwd"] = row["loop_fwdbwd_ms"] / row[f"{m}_fwdbwd_ms"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--N", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--max-loop-backward", type=int, default=65536)
    p.add_argument("--dtypes", nargs="+", default=["float32", "complex64"])
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, [B, T, N] = [{args.B}, T, {args.N}]")
    rows = []
    head = f"{'dtype':>9} {'T':>6} | " + " | ".join(f"{n:>26}" for n in ("loop", *SCAN_METHODS))
    print("ms (fwd / fwd+bwd); speed-ups over the loop in brackets (fwd / fwd+bwd)")
    print(head)
    for dt in args.dtypes:
        for T in args.T:
            r = bench(args.B, T, args.N, getattr(torch, dt), args.reps, args.max_loop_backward, args.chunk_size)
            rows.append(r)
            cells = []
            for n in ("loop", *SCAN_METHODS):
                fb = r[f"{n}_fwdbwd_ms"]
                cell = f"{r[f'{n}_fwd_ms']:.1f} / {'-' if fb is None else f'{fb:.1f}'}"
                if n != "loop":
                    sp = r.get(f"{n}_speedup_fwdbwd")
                    cell += f" ({r[f'{n}_speedup_fwd']:.0f}x/{'-' if sp is None else f'{sp:.0f}x'})"
                cells.append(f"{cell:>26}")
            print(f"{r['dtype']:>9} {T:>6} | " + " | ".join(cells), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
