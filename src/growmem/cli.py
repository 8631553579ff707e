"""The ``growmem`` command line. ``growmem demo`` trains a tiny byte-level LM for a few seconds."""

from __future__ import annotations

import argparse
import importlib
import time

import torch

from growmem.models import CausalLM, ModelConfig, mixer_names

# Stdlib modules whose docstrings give a small English corpus that exists on every Python install.
_DOC_MODULES = ("argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
                "decimal", "difflib", "email", "functools", "heapq", "http", "inspect", "itertools",
                "json", "logging", "math", "os", "pathlib", "pickle", "random", "re", "shutil", "socket",
                "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
                "typing", "unittest", "urllib", "uuid", "warnings", "zipfile")


def stdlib_doc_text() -> bytes:
    """Docstrings of stdlib modules and their public members, as UTF-8 bytes (a few hundred KB)."""
    parts: list[str] = []
    for name in _DOC_MODULES:
        mod = importlib.import_module(name)
        if mod.__doc__:
            parts.append(mod.__doc__)
        for attr in sorted(getattr(mod, "__all__", []) or []):
            doc = getattr(getattr(mod, attr, None), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 80:
                parts.append(doc)
    return "\n\n".join(parts).encode("utf-8", errors="replace")


def run_demo(mixer: str, seconds: float, seq_len: int, batch: int, seed: int) -> list[tuple[int, float]]:
    """Train a tiny byte-level LM on stdlib docstrings for ``seconds``; return (step, loss) pairs."""
    torch.manual_seed(seed)
    data = torch.tensor(list(stdlib_doc_text()), dtype=torch.long)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, num_heads=2, mixer=mixer, chunk_size=32)
    model = CausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    print(f"demo: mixer={mixer} params={model.num_parameters():,} corpus={len(data):,} bytes "
          f"seq_len={seq_len} batch={batch} budget={seconds:.0f}s")
    g = torch.Generator().manual_seed(seed)
    curve: list[tuple[int, float]] = []
    start, step, ema = time.perf_counter(), 0, None
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g)
        seq = torch.stack([data[i: i + seq_len + 1] for i in idx.tolist()])
        out = model(seq[:, :-1], targets=seq[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = out.loss.item() if ema is None else 0.9 * ema + 0.1 * out.loss.item()
        if step % 10 == 0:
            curve.append((step, ema))
            bar = "#" * max(1, int(ema * 8))
            print(f"step {step:4d}  {time.perf_counter() - start:5.1f}s  loss {ema:.3f} "
                  f"({ema / 0.6931:.2f} bits/byte)  {bar}")
    model.eval()
    prompt = torch.tensor([list(b"The ")])
    text = model.generate(prompt, 60, temperature=0.0)[0].tolist()
    print("greedy sample:", repr(bytes(text).decode("utf-8", errors="replace")))
    return curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="growmem", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="train a tiny byte-level LM for a few seconds, print its loss curve")
    demo.add_argument("--mixer", default="gdn", choices=mixer_names())
    demo.add_argument("--seconds", type=float, default=20.0)
    demo.add_argument("--seq-len", type=int, default=128)
    demo.add_argument("--batch", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("mixers", help="list the registered token mixers")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        run_demo(args.mixer, args.seconds, args.seq_len, args.batch, args.seed)
    elif args.cmd == "mixers":
        from growmem.models.registry import get_mixer_spec
        for n in mixer_names():
            spec = get_mixer_spec(n)
            print(f"{n:10s} {'O(1)' if spec.constant_memory else 'O(T)'} decode memory  {spec.description}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
