"""Benchmark the chunked ops against their per-token loops and causal SDPA attention.

    .venv/bin/python bench/ops.py                       # full table (T = 1024, 4096, 16384)
    .venv/bin/python bench/ops.py --T 1024 --reps 1     # quick look

For every op: forward and forward+backward wall time (best of ``--reps``), and the achieved GFLOP/s
of the chunked algorithm (its matmul FLOPs counted analytically, see ``flops_*``) next to an fp32
matmul peak measured in the same run (best of several 2048^3 ``torch.mm``). Layout [B, T, H, 64].
The naive loops are timed forward only above T = 4096 (their backward is minutes there).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from common import backward_with_random_grad, best_time
from growmem.ops.delta_rule import chunk_gated_delta_rule, naive_gated_delta_rule
from growmem.ops.gla import chunk_gla, naive_gla
from growmem.ops.linear_attn import chunk_linear_attn, naive_linear_attn


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n x n matmul on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9



def flops_la(T: int, K: int, V: int, C: int) -> float:
    """Chunked linear attention per (batch, head): intra q k^T, (A) v; inter q S; state k^T v."""
    return T * (2 * C * K + 2 * C * V + 4 * K * V)


def flops_gdn(T: int, K: int, V: int, C: int) -> float:
    """Chunked gated delta rule per (batch, head): k k^T, triangular solve for W and U,
    W S, q k^T, (A) v_new, q S, state update."""
    return T * (2 * C * K + C * (K + V) + 2 * C * K + 2 * C * V + 6 * K * V)


def flops_sdpa(T: int, K: int, V: int, C: int) -> float:
    """Causal attention per (batch, head): half of q k^T and of (P) v."""
    return T * T * (K + V)


def run(Ts: list[int], B: int, H: int, D: int, C: int, reps: int, naive_max_bwd: int) -> list[dict]:
    rows = []
    for T in Ts:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
        k = F.normalize(k, dim=-1)
        gate = F.logsigmoid(torch.randn(B, T, H, generator=g) + 4)
        beta = torch.sigmoid(torch.randn(B, T, H, generator=g))
        ops = {
            "linear_attn": (lambda q, k, v, gate, beta: chunk_linear_attn(q, k, v, chunk_size=C)[0],
                            lambda q, k, v, gate, beta: naive_linear_attn(q, k, v)[0], flops_la),
            "gla_scalar": (lambda q, k, v, gate, beta: chunk_gla(q, k, v, gate, chunk_size=C)[0],
                           lambda q, k, v, gate, beta: naive_gla(q, k, v, gate)[0], flops_la),
            "gated_delta": (lambda q, k, v, gate, beta: chunk_gated_delta_rule(q, k, v, gate, beta,
                                                                               chunk_size=C)[0],
                            lambda q, k, v, gate, beta: naive_gated_delta_rule(q, k, v, gate, beta)[0],
                            flops_gdn),
            "sdpa_causal": (lambda q, k, v, gate, beta: F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True), None, flops_sdpa),
        }
        for name, (fast, naive, flops) in ops.items():
            ins = [x.clone().requires_grad_(True) for x in (q, k, v, gate, beta)]

            def fwd(fn=fast, ins=ins):
                with torch.no_grad():
                    return fn(*ins)

            def fwd_bwd(fn=fast, ins=ins):
                out = fn(*ins)
                backward_with_random_grad(out)

            row = {"op": name, "T": T, "B": B, "H": H, "D": D, "chunk": C,
                   "fwd_s": best_time(fwd, reps), "fwd_bwd_s": best_time(fwd_bwd, reps)}
            n_flop = flops(T, D, D, C) * B * H
            row["fwd_gflops"] = n_flop / row["fwd_s"] / 1e9
            if naive is not None:
                row["naive_fwd_s"] = best_time(lambda fn=naive, ins=ins: fwd(fn, ins), 1) if T <= 16384 else None
                row["naive_fwd_bwd_s"] = (best_time(lambda fn=naive, ins=ins: fwd_bwd(fn, ins), 1)
                                          if naive_max_bwd >= T else None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def to_markdown(rows: list[dict], peak: float) -> str:
    def f(x):
        return "-" if x is None else f"{x * 1e3:.1f}"

    lines = [f"fp32 matmul peak measured in this run: **{peak:.0f} GFLOP/s** "
             f"(threads: {torch.get_num_threads()})", "",
             "| op | T | fwd ms | fwd+bwd ms | fwd GFLOP/s | % of peak | naive fwd ms | naive fwd+bwd ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['T']} | {f(r['fwd_s'])} | {f(r['fwd_bwd_s'])} | {r['fwd_gflops']:.0f} | "
                     f"{100 * r['fwd_gflops'] / peak:.0f}% | {f(r.get('naive_fwd_s'))} | "
                     f"{f(r.get('naive_fwd_bwd_s'))} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--naive-max-bwd", type=int, default=4096)
    p.add_argument("--out", type=str, default=None, help="write the markdown table here")
    a = p.parse_args()
    peak = matmul_peak()
    rows = run(a.T, a.batch, a.heads, a.head_dim, a.chunk, a.reps, a.naive_max_bwd)
    peak = max(peak, matmul_peak())
    md = to_markdown(rows, peak)
    print(md)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(md + "\n")


if __name__ == "__main__":
    main()
