"""Benchmark Memory Caching: forward+backward time and activation memory vs sequence length.

    .venv/bin/python bench/mc.py                         # L = 1024, 4096, 16384; base memories la, gdn
    .venv/bin/python bench/mc.py --L 4096 --bases gdn    # quick look
    .venv/bin/python bench/mc.py --L 1024 4096 --bases dla titans   # deep (MLP) memories, E = 4 * 64
    .venv/bin/python bench/mc.py --L 4096 --ratios 15    # cost over the base memory, timed round-robin

For each base memory: the base alone, Residual, GRM, Soup and SSC (top_k = 2) with constant segments
(C = 256) and with logarithmic segments, plus causal SDPA attention. B = 1, 4 heads of dim 64,
fp32. Time: best of ``--reps`` forward+backward passes (backward from a fixed random output
gradient). Memory: bytes of the tensors autograd saves for the backward pass (deduplicated by
storage), a deterministic proxy for training memory.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from common import backward_with_random_grad, best_time
from growmem.caching import CachedMemory, MCConfig
from growmem.memories import GatedDeltaNetMemory, LinearAttentionMemory
from growmem.memories.deep import DLAMemory, TitansMemory

BASES = {"la": LinearAttentionMemory, "gdn": GatedDeltaNetMemory, "dla": DLAMemory, "titans": TitansMemory}


def saved_bytes(fn) -> int:
    """Bytes autograd saves for backward while running ``fn`` (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())



def make_inputs(L: int, H: int, D: int, mem):
    g = torch.Generator().manual_seed(0)
    q, k, v, u = (torch.randn(1, L, H, D, generator=g) for _ in range(4))
    if mem.l2_normalize_qk:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    raw = {n: torch.randn(1, L, H, f, generator=g) for n, f in mem.gate_features.items()}
    return [x.requires_grad_(True) for x in (q, k, v, u)], {n: x.requires_grad_(True) for n, x in raw.items()}


def variants(base_name: str, H: int, D: int, chunk: int, seg: int, top_k: int):
    cls = BASES[base_name]
    yield f"{base_name}", cls(H, D, D, chunk)
    for segmentation in ("constant", "log"):
        tag = f"C={seg}" if segmentation == "constant" else "log"
        for agg in ("res", "grm", "soup", "ssc"):
            cfg = MCConfig(segmentation=segmentation, segment_size=seg, top_k=top_k)
            yield f"{base_name}+{agg} ({tag})", CachedMemory(cls(H, D, D, chunk), agg, cfg)


def forward_fn(mem, L: int, H: int, D: int):
    """A closure running ``mem`` forward on fixed random inputs of length ``L`` (fresh MC state each call)."""
    (q, k, v, u), raw = make_inputs(L, H, D, mem)

    def fwd():
        gates = mem.make_gates(raw)
        if "u" in mem.input_projections:
            gates["u"] = u
        cache = mem.new_state(1, L) if isinstance(mem, CachedMemory) else None
        return mem(q, k, v, gates, initial_state=cache)[0]

    return fwd


def run(Ls, bases, H, D, chunk, seg, top_k, reps) -> list[dict]:
    rows = []
    for L in Ls:
        for base_name in bases:
            for name, mem in variants(base_name, H, D, chunk, seg, top_k):
                fwd = forward_fn(mem, L, H, D)

                def fwd_bwd(fwd=fwd):
                    backward_with_random_grad(fwd())

                row = {"L": L, "model": name, "fwd_bwd_s": best_time(fwd_bwd, reps),
                       "saved_MB": saved_bytes(fwd) / 2**20}
                rows.append(row)
                print(json.dumps(row), flush=True)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, L, D, generator=g).requires_grad_(True) for _ in range(3))

        def sdpa(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        row = {"L": L, "model": "sdpa (causal)",
               "fwd_bwd_s": best_time(lambda: backward_with_random_grad(sdpa()), reps),
               "saved_MB": saved_bytes(sdpa) / 2**20}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def ratios(Ls, bases, H, D, chunk, seg, top_k, rounds) -> list[dict]:
    """Cost of each Memory Caching variant (constant segments) relative to its base memory, measured
    round-robin: every round times the base and each variant once, back to back, and the ratio of a
    round is variant / base of that round. Reports the median over rounds (robust to the machine's
    drift, which moves sequential best-of-n timings by up to 1.5x between rows)."""
    rows = []
    for L in Ls:
        for base_name in bases:
            fns = {}
            for name, mem in variants(base_name, H, D, chunk, seg, top_k):
                if "(log)" in name:
                    continue
                fwd = forward_fn(mem, L, H, D)

                def fwd_bwd(fwd=fwd):
                    backward_with_random_grad(fwd())

                fwd_bwd()  # warm-up
                fns[name] = fwd_bwd
            times: dict[str, list[float]] = {n: [] for n in fns}
            for _ in range(rounds):
                for n, fn in fns.items():
                    times[n].append(best_time(fn, 1))
            for n, ts in times.items():
                per_round = sorted(t / b for t, b in zip(ts, times[base_name], strict=True))
                row = {"L": L, "model": n, "median_ms": 1e3 * sorted(ts)[len(ts) // 2],
                       "ratio_median": per_round[len(per_round) // 2], "ratio_min": per_round[0],
                       "ratio_max": per_round[-1]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def ratios_markdown(rows: list[dict]) -> str:
    lines = ["| L | model | median ms | / base: median (min-max over rounds) |", "|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['L']} | {r['model']} | {r['median_ms']:.0f} | {r['ratio_median']:.2f} "
                     f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
    return "\n".join(lines)


def to_markdown(rows: list[dict]) -> str:
    Ls = sorted({r["L"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["L"]): r for r in rows}
    head = "| model | " + " | ".join(f"L={L} ms" for L in Ls) + " | " + " | ".join(f"L={L} MB" for L in Ls) + " |"
    lines = [head, "|---" + "|---:" * (2 * len(Ls)) + "|"]
    for m in models:
        t = [f"{by[(m, L)]['fwd_bwd_s'] * 1e3:.0f}" if (m, L) in by else "-" for L in Ls]
        mb = [f"{by[(m, L)]['saved_MB']:.0f}" if (m, L) in by else "-" for L in Ls]
        lines.append(f"| {m} | " + " | ".join(t) + " | " + " | ".join(mb) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--L", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--bases", nargs="+", default=["la", "gdn"], choices=sorted(BASES))
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--segment", type=int, default=256)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--ratios", type=int, default=0, metavar="ROUNDS",
                   help="instead: each variant's cost relative to its base, timed round-robin over ROUNDS rounds")
    a = p.parse_args()
    if a.ratios:
        md = ratios_markdown(ratios(a.L, a.bases, a.heads, a.head_dim, a.chunk, a.segment, a.top_k, a.ratios))
        print(md)
        if a.out:
            with open(a.out, "w") as fh:
                fh.write(md + "\n")
        return
    rows = run(a.L, a.bases, a.heads, a.head_dim, a.chunk, a.segment, a.top_k, a.reps)
    md = to_markdown(rows)
    print(f"\nthreads={torch.get_num_threads()}, B=1, H={a.heads}, D={a.head_dim}, chunk={a.chunk}\n")
    print(md)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(md + "\n")


if __name__ == "__main__":
    main()
