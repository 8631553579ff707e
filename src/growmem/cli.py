"""The ``growmem`` command line (``growmem --help``)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from growmem.models import CausalLM, ModelConfig, mixer_names


def run_demo(mixer: str, seconds: float, seq_len: int, batch: int, seed: int) -> list[tuple[int, float]]:
    """Train a tiny byte-level LM on the Python docs' text for ``seconds``; return (step, loss) pairs."""
    from growmem.tasks.text import english_corpus

    torch.manual_seed(seed)
    data = torch.from_numpy(english_corpus()[0].astype("int64"))
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


def _cmd_train(args: argparse.Namespace) -> int:
    from growmem.train.config import load_experiment
    from growmem.train.trainer import Trainer

    overrides = list(args.set or [])
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    if args.config and args.config.endswith(".json"):
        from pathlib import Path

        from growmem.train.config import ExperimentConfig, apply_overrides

        cfg = ExperimentConfig.from_dict(apply_overrides(json.loads(Path(args.config).read_text()), overrides))
    else:
        cfg = load_experiment(args.config, overrides, model=args.model)
    final = Trainer(cfg, resume=not args.no_resume).fit()
    print(f"done: step {final['step']}, loss {final['loss']:.4f}, metrics {final['metrics']}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from growmem.models import build_model
    from growmem.tasks import make_task
    from growmem.train.checkpoint import latest_checkpoint, load_checkpoint, read_state
    from growmem.train.config import ExperimentConfig, apply_overrides

    ckpt = latest_checkpoint(args.run)
    if ckpt is None:
        raise ValueError(f"no checkpoint in {args.run!r}")
    cfg = ExperimentConfig.from_dict(apply_overrides(read_state(ckpt)["config"], args.set or []))
    model = build_model(cfg.model)
    load_checkpoint(ckpt, model, restore_rng=False)
    task = make_task(cfg.task.name, **cfg.task.options)
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model, n_samples=args.samples, batch_size=cfg.train.eval_batch_size, seed=args.seed)
    print(json.dumps({"checkpoint": str(ckpt), "task": cfg.task.name, **{k: float(v) for k, v in metrics.items()}}))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from growmem.train.sweep import load_sweep, markdown_table, run_sweep

    sweep = load_sweep(args.config, args.set)
    if args.parallel:
        sweep.parallel = args.parallel
    rows = run_sweep(sweep)
    print(markdown_table(rows) if rows else "no finished runs")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from growmem.train.plot import plot_loss_curves, plot_metric
    from growmem.train.tables import parse_filters

    if args.results:
        out = plot_metric(args.results, args.x, args.y, args.series, args.out, logx=args.logx,
                          title=args.title, filters=parse_filters(args.filter))
    elif args.runs:
        out = plot_loss_curves(args.runs, args.out)
    else:
        raise ValueError("give --results CSV (metric vs a sweep axis) or --runs DIR [DIR ...] (loss curves)")
    print(f"wrote {out}")
    return 0


def _cmd_table(args: argparse.Namespace) -> int:
    from growmem.train.tables import parse_filters, pivot_markdown, read_results, select

    rows = select(read_results(args.results), parse_filters(args.filter))
    if not rows:
        raise ValueError(f"no rows of {args.results} match the filters {args.filter}")
    print(pivot_markdown(rows, args.rows, args.cols, args.value, digits=args.digits, extra=args.extra), end="")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from growmem.models.registry import get_mixer_spec

    print("models (token mixers):")
    for n in mixer_names():
        spec = get_mixer_spec(n)
        print(f"  {n:16s} {'O(1)' if spec.constant_memory else 'grows':5s}  {spec.description}")
    print("model wrappers (set in the model config, around any mixer above):")
    print(f"  {'rmt':16s} {'O(1)':5s}  Recurrent Memory Transformer: memory tokens carried across segments "
          "(model.rmt: {num_mem_tokens, segment_len, bptt_depth, max_segments})")
    try:
        from growmem.tasks import TASKS
    except ImportError:
        return 0
    print("tasks:")
    for n, cls in sorted(TASKS.items()):
        print(f"  {n:16s} {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    """Versions, threads, and whether the optional fused CPU kernels run here (and why not)."""
    import os
    import platform

    import torch

    import growmem
    from growmem.ops import _native

    print(f"growmem {growmem.__version__}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), "
          f"CUDA available: {torch.cuda.is_available()}")
    if not _native.native_enabled():
        print("fused CPU kernels: off (GROWMEM_NATIVE=0); the PyTorch path runs")
    elif _native.native_available():
        print(f"fused CPU kernels: on ({_native._lib._name})")
    else:
        print(f"fused CPU kernels: unavailable, the PyTorch path runs ({_native._error})")
    return 0


def _cmd_ess(args: argparse.Namespace, rest: list[str]) -> int:
    from growmem.analysis.ess_cli import main as ess_main

    return ess_main(rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="growmem", description="growmem: sequence models whose memory grows.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="MQAR: base memory vs its Memory-Caching version vs a Transformer")
    demo.add_argument("--out-dir", default="runs/demo")
    demo.add_argument("--steps", type=int, default=None, help="at most this many steps per model")
    demo.add_argument("--parallel", type=int, default=3, help="training processes (1 thread each)")
    demo.add_argument("--models", nargs="+", default=None, help="registry names (default: gdn gdn+grm attn)")
    lm = sub.add_parser("demo-lm", help="train a tiny byte-level LM for a few seconds, print its loss curve")
    lm.add_argument("--mixer", default="gdn", choices=mixer_names())
    lm.add_argument("--seconds", type=float, default=20.0)
    lm.add_argument("--seq-len", type=int, default=128)
    lm.add_argument("--batch", type=int, default=16)
    lm.add_argument("--seed", type=int, default=0)
    sub.add_parser("mixers", help="list the registered token mixers")
    sub.add_parser("info", help="versions, threads, and whether the fused CPU kernels run here")
    sub.add_parser("list", help="list models and tasks")
    tr = sub.add_parser("train", help="train one experiment (YAML), resuming from its checkpoint if any")
    tr.add_argument("--config", default=None, help="experiment YAML (or JSON) file")
    tr.add_argument("--model", default=None, help="shortcut for --set model.mixer=NAME")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=1e-3")
    tr.add_argument("--out-dir", default=None)
    tr.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    ev = sub.add_parser("eval", help="evaluate a run's latest checkpoint on its task")
    ev.add_argument("--run", required=True, help="run folder")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. task.options.seq_len=2048")
    ev.add_argument("--samples", type=int, default=512)
    ev.add_argument("--seed", type=int, default=12345)
    sw = sub.add_parser("sweep", help="run a grid of experiments from a sweep YAML (resumable)")
    sw.add_argument("--config", required=True)
    sw.add_argument("--set", action="append", metavar="KEY=VALUE")
    sw.add_argument("--parallel", type=int, default=None, help="processes (1 thread each)")
    pl = sub.add_parser("plot", help="plot a metric against a sweep axis, or loss curves")
    pl.add_argument("--results", nargs="+", default=None, help="one or more sweeps' results.csv")
    pl.add_argument("--filter", action="append", metavar="COLUMN=VALUE", help="keep only matching rows")
    pl.add_argument("--title", default=None)
    pl.add_argument("--x", default="task.options.num_kv_pairs")
    pl.add_argument("--y", nargs="+", default=["accuracy"],
                    help="metric column(s); with several, each run's first reported one")
    pl.add_argument("--series", default="model.mixer")
    pl.add_argument("--logx", action="store_true")
    pl.add_argument("--runs", nargs="+", default=None, help="run folders for loss curves")
    pl.add_argument("--out", required=True)
    tb = sub.add_parser("table", help="a markdown table (rows x columns) of a metric from sweeps' results.csv")
    tb.add_argument("--results", nargs="+", required=True)
    tb.add_argument("--rows", default="model.mixer")
    tb.add_argument("--cols", default="task.options.num_kv_pairs")
    tb.add_argument("--value", nargs="+", default=["accuracy"],
                    help="metric column(s); with several, each cell takes the first one its run reports")
    tb.add_argument("--filter", action="append", metavar="COLUMN=VALUE", help="keep only matching rows")
    tb.add_argument("--extra", nargs="*", default=["params"], help="columns shown beside the row label")
    tb.add_argument("--digits", type=int, default=3)
    sub.add_parser("ess", help="effective state size of a model on an input (see growmem ess --help)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if rest and args.cmd != "ess":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.cmd == "demo":
            from growmem.demo import DEMO_MODELS
            from growmem.demo import run_demo as run_mqar_demo

            run_mqar_demo(args.out_dir, args.steps, args.parallel, tuple(args.models or DEMO_MODELS))
            return 0
        if args.cmd == "demo-lm":
            run_demo(args.mixer, args.seconds, args.seq_len, args.batch, args.seed)
            return 0
        if args.cmd in ("mixers", "list"):
            return _cmd_list(args)
        if args.cmd == "info":
            return _cmd_info(args)
        if args.cmd == "ess":
            return _cmd_ess(args, rest)
        return {"train": _cmd_train, "eval": _cmd_eval, "sweep": _cmd_sweep, "plot": _cmd_plot,
                "table": _cmd_table}[args.cmd](args)
    except ValueError as err:
        print(f"growmem {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
