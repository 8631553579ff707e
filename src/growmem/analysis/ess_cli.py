"""``growmem ess``: Effective State-Size per position of every layer of a model, as JSON and a PNG plot.

Examples::

    growmem ess --model gdn+grm --d-model 64 --n-layers 2 --seq-len 512 --out ess_gdn_grm
    growmem ess --checkpoint run/ckpt-000200/model.safetensors --config run/config.json \\
        --text README.md --seq-len 1024 --stride 8 --out ess_run

The model is either loaded from a checkpoint pair (a safetensors file of the weights and a JSON file of
``ModelConfig.to_dict()``, or of an experiment config / checkpoint state holding it under ``model``) or
freshly initialised from registry names. The input is random tokens (``--input-seed``) or the bytes of
a text file. For every layer the operator of its sequence mixer is materialized
(:func:`growmem.analysis.operators.lm_operators`) and its ESS computed at the chosen split positions
(:mod:`growmem.analysis.ess`); the estimated SVD cost is printed before the work starts.

Outputs in ``--out``: ``ess.json`` (per layer: tolerance-ESS, entropy-ESS and numerical rank, mean over
batch and heads, per head, max; the theoretical state size; operator checks) and ``ess.png`` (needs
matplotlib, imported only here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from growmem.analysis.ess import effective_state_size, estimate_cost, layer_state_size, select_positions
from growmem.analysis.operators import lm_operators
from growmem.caching.config import MCConfig
from growmem.models.config import ModelConfig
from growmem.models.rmt import RMTConfig, build_model

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
ACCOUNTING = ("per value channel (single-input single-output operators, as in the paper); for matrix memories "
              "and attention every channel of a head shares one operator, so per-head ESS and TSS are head_v_dim "
              "times these numbers and ESS/TSS is the same in both accountings")


def _find_model_config(d: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig dict inside a JSON object: itself, or under ``model`` / ``config`` / ``config.model``."""
    if "d_model" in d:
        return d
    for key in ("model", "config"):
        sub = d.get(key)
        if isinstance(sub, dict):
            try:
                return _find_model_config(sub)
            except ValueError:
                continue
    raise ValueError("no ModelConfig found in the JSON (expected ModelConfig.to_dict(), or one under 'model' "
                     "or 'config')")


def load_model_pair(weights: str | Path, config: str | Path) -> torch.nn.Module:
    """Build a :class:`~growmem.models.lm.CausalLM` (or, with ``rmt`` set, a Recurrent Memory Transformer)
    from a config JSON and load its weights from a safetensors
    file (``safetensors.torch.load_model``: no pickle, strict key check, tied weights handled).

    Args:
        weights: path of a ``.safetensors`` file written by ``safetensors.torch.save_model`` (or
            ``save_file`` of a state dict without shared tensors).
        config: path of a JSON file holding ``ModelConfig.to_dict()`` (directly, or under ``model`` /
            ``config``, as in experiment configs and checkpoint states).
    """
    try:
        from safetensors.torch import load_model
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading a checkpoint needs safetensors: pip install 'growmem[exp]' "
                          "(or pip install safetensors)") from e
    d = json.loads(Path(config).read_text())
    if not isinstance(d, dict):
        raise ValueError(f"{config}: expected a JSON object")
    cfg = ModelConfig.from_dict(_find_model_config(d))
    model = build_model(cfg)
    missing, unexpected = load_model(model, str(weights), strict=True)
    if missing or unexpected:  # strict=True raises first; kept for older safetensors versions
        raise ValueError(f"checkpoint does not match the config: missing {missing}, unexpected {unexpected}")
    return model.eval()


def make_input(vocab_size: int, seq_len: int, batch: int, seed: int, text: str | None,
               offset: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token ids ``[batch, seq_len]``: uniform random tokens from ``seed``, or consecutive windows of a
    text file's bytes starting at ``offset`` (bytes taken modulo ``vocab_size`` when it is below 256)."""
    if text is None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g)
        return ids, {"kind": "random", "seed": seed}
    data = Path(text).read_bytes()[offset:]
    need = batch * seq_len
    if len(data) < need:
        raise ValueError(f"{text}: {len(data)} bytes after offset {offset}, need {need} (batch x seq_len)")
    ids = torch.tensor(list(data[:need]), dtype=torch.long).view(batch, seq_len) % vocab_size
    return ids, {"kind": "text", "path": str(text), "offset": offset, "bytes_mod_vocab": vocab_size < 256}


def _curve(x: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in x]


def analyse(model: torch.nn.Module, ids: torch.Tensor, positions: list[int], tol: float, relative: bool,
            dtype: torch.dtype, method: str, jacobian_channels: list[int] | None,
            log: Any = print) -> dict[str, Any]:
    """Operators and ESS of every layer; returns the JSON-ready result (see the module docstring)."""
    L = ids.shape[1]
    t0 = time.perf_counter()
    layer_ops = lm_operators(model, ids, method=method, dtype=dtype, jacobian_channels=jacobian_channels)
    t_ops = time.perf_counter() - t0
    n_ops = sum(lo.operator.matrix[..., 0, 0].numel() for lo in layer_ops)
    cost = estimate_cost(n_ops, L, positions)
    log(f"operators: {len(layer_ops)} layers, {n_ops} operators of {L}x{L} in {t_ops:.1f}s; ESS at "
        f"{len(positions)} positions: {cost}")
    layers = []
    t1 = time.perf_counter()
    for lo in layer_ops:
        op = lo.operator
        r = effective_state_size(op, positions, tol=tol, relative=relative)
        others = [n for n in r.dims if n != "head"]
        per_head = r.reduce("mean", others) if "head" in r.dims else None
        mean, mx = r.reduce("mean"), r.reduce("max")
        tss = layer_state_size(lo, positions)
        entry: dict[str, Any] = {
            "layer": lo.layer, "mixer": lo.mixer, "kind": lo.kind, "method": op.method, "exact": op.exact,
            "residual": op.residual, "coupling": op.coupling, "dims": list(op.dims), "meta": lo.meta,
            "tss": None if tss is None else _curve(tss),
        }
        for metric in ("tolerance", "entropy", "rank"):
            entry[metric] = {"mean": _curve(getattr(mean, metric)), "max": _curve(getattr(mx, metric))}
            if per_head is not None:
                entry[metric]["per_head"] = [_curve(h) for h in getattr(per_head, metric)]
        layers.append(entry)
        res = "" if op.residual is None else f", |Tv - o|/|o| = {op.residual:.1e}"
        log(f"  layer {lo.layer} {lo.mixer:>12s} [{lo.kind}, {op.method}{res}]: mean tolerance-ESS at s="
            f"{positions[len(positions) // 2]}: {float(mean.tolerance[len(positions) // 2]):.2f}"
            + ("" if tss is None else f" (TSS {float(tss[len(positions) // 2]):.0f})"))
    t_ess = time.perf_counter() - t1
    stack = {m: torch.stack([torch.tensor(e[m]["mean"]) for e in layers]).mean(0) for m in ("tolerance", "entropy",
                                                                                           "rank")}
    tss_all = [e["tss"] for e in layers]
    return {
        "length": L, "batch": ids.shape[0], "positions": positions, "tol": tol, "relative": relative,
        "dtype": str(dtype).replace("torch.", ""), "accounting": ACCOUNTING, "layers": layers,
        "model_mean": {**{m: _curve(v) for m, v in stack.items()},
                       "tss": None if any(t is None for t in tss_all) else
                       _curve(torch.tensor(tss_all, dtype=torch.float64).mean(0))},
        "cost": str(cost), "timing_s": {"operators": round(t_ops, 3), "ess": round(t_ess, 3)},
    }


def plot(result: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Per-position tolerance-ESS and entropy-ESS of every layer (solid), TSS (dashed) and the trivial
    bound ``min(s, L - s)`` (dotted), log scale. Imports matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = result["positions"]
    L = result["length"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    names = {"tolerance": f"tolerance-ESS (tol {result['tol']:g}{', rel' if result['relative'] else ''})",
             "entropy": "entropy-ESS"}
    for ax, metric in zip(axes, ("tolerance", "entropy"), strict=True):
        for i, e in enumerate(result["layers"]):
            color = f"C{i % 10}"
            ax.plot(pos, e[metric]["mean"], color=color, lw=1.4, label=f"layer {e['layer']} {e['mixer']}")
            if e["tss"] is not None:
                ax.plot(pos, e["tss"], color=color, lw=1.0, ls="--")
        ax.plot(pos, [min(s, L - s) for s in pos], color="0.6", lw=0.8, ls=":", label="min(s, L - s)")
        ax.set_yscale("log")
        ax.set_xlabel("split position s (past tokens)")
        ax.set_title(names[metric], fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("per-channel ESS (dashed: TSS)")
    axes[0].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="growmem ess", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model (a checkpoint pair, or a fresh model from registry names)")
    src.add_argument("--checkpoint", help="safetensors file of the weights (needs --config)")
    src.add_argument("--config", help="JSON of ModelConfig.to_dict() (or holding it under 'model' / 'config')")
    src.add_argument("--model", help="registry mixer name(s) for a fresh model, comma-separated for a hybrid "
                                     "(see `growmem mixers`)")
    src.add_argument("--d-model", type=int, default=64)
    src.add_argument("--n-layers", type=int, default=2)
    src.add_argument("--num-heads", type=int, default=4)
    src.add_argument("--vocab-size", type=int, default=256)
    src.add_argument("--chunk-size", type=int, default=64)
    src.add_argument("--window", type=int, default=64, help="sliding-window attention width")
    src.add_argument("--segment-size", type=int, default=64, help="Memory Caching segment length")
    src.add_argument("--segmentation", choices=("constant", "log"), default="constant")
    src.add_argument("--rmt", metavar="M,L", help="wrap the fresh model in a Recurrent Memory Transformer with M "
                     "memory tokens and segments of L tokens (ESS of the whole-model linearization)")
    src.add_argument("--seed", type=int, default=0, help="initialisation seed of a fresh model")
    inp = p.add_argument_group("input")
    inp.add_argument("--seq-len", type=int, default=512)
    inp.add_argument("--batch", type=int, default=1)
    inp.add_argument("--input-seed", type=int, default=0, help="seed of the random tokens")
    inp.add_argument("--text", help="use this file's bytes as the input instead of random tokens")
    inp.add_argument("--text-offset", type=int, default=0)
    ess = p.add_argument_group("ESS")
    where = ess.add_mutually_exclusive_group()
    where.add_argument("--stride", type=int, help="every stride-th split position")
    where.add_argument("--num-positions", type=int, help="this many evenly spaced split positions")
    where.add_argument("--positions", help="comma-separated split positions")
    ess.add_argument("--tol", type=float, default=1e-3, help="tolerance-ESS threshold")
    ess.add_argument("--absolute", action="store_true", help="absolute tolerance (default: relative to the "
                                                              "largest singular value of each block)")
    ess.add_argument("--dtype", choices=tuple(_DTYPES), default="float64")
    ess.add_argument("--method", choices=("auto", "closed", "basis", "jacobian"), default="auto")
    ess.add_argument("--jacobian-channels", type=int, default=8,
                     help="channels materialized by Jacobian paths (linearized layers); 0 = all")
    p.add_argument("--out", default="ess_out", help="output folder (ess.json, ess.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the cost estimate and stop")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.checkpoint or args.config:
        if not (args.checkpoint and args.config) or args.model:
            print("error: give --checkpoint and --config together, or --model (not both)")
            return 2
        model = load_model_pair(args.checkpoint, args.config)
        source: dict[str, Any] = {"checkpoint": args.checkpoint, "config": args.config}
    elif args.model:
        names = [n.strip() for n in args.model.split(",") if n.strip()]
        torch.manual_seed(args.seed)
        try:
            cfg = ModelConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers,
                              num_heads=args.num_heads, mixer=names[0] if len(names) == 1 else names,
                              chunk_size=args.chunk_size, window=args.window,
                              mc=MCConfig(segment_size=args.segment_size, segmentation=args.segmentation))
            if args.rmt:
                parts = args.rmt.split(",")
                if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
                    raise ValueError(f"--rmt must look like M,L (memory tokens, segment length), got {args.rmt!r}")
                cfg = dataclasses.replace(cfg, rmt=RMTConfig(num_mem_tokens=int(parts[0]), segment_len=int(parts[1])))
        except ValueError as e:
            print(f"error: {e}")
            return 2
        model = build_model(cfg).eval()
        source = {"fresh": names, "seed": args.seed}
    else:
        print("error: give --model NAME or --checkpoint FILE --config FILE")
        return 2
    cfg = model.config
    ids, input_info = make_input(cfg.vocab_size, args.seq_len, args.batch, args.input_seed, args.text,
                                 args.text_offset)
    L = ids.shape[1]
    if args.positions:
        positions = select_positions(L, [int(s) for s in args.positions.split(",") if s.strip()])
    else:
        positions = select_positions(L, stride=args.stride, num=args.num_positions)
    heads_guess = cfg.n_layers * cfg.num_heads * args.batch
    wrap = "" if cfg.rmt is None else f" in an RMT (m={cfg.rmt.num_mem_tokens}, segments of {cfg.rmt.segment_len})"
    print(f"model {cfg.layer_mixers}{wrap} d_model={cfg.d_model} heads={cfg.num_heads}; input {input_info['kind']} "
          f"L={L} batch={args.batch}")
    print(f"estimated cost (one operator per head): {estimate_cost(heads_guess, L, positions)}")
    if args.dry_run:
        return 0
    chans = None if args.jacobian_channels == 0 else list(range(min(args.jacobian_channels, cfg.d_model)))
    result = analyse(model, ids, positions, args.tol, not args.absolute, _DTYPES[args.dtype], args.method, chans)
    result["model"] = cfg.to_dict()
    result["source"] = source
    result["input"] = {**input_info, "seq_len": L, "batch": args.batch}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ess.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'ess.json'}")
    if not args.no_plot:
        try:
            plot(result, out / "ess.png", title=f"{', '.join(cfg.layer_mixers)}  L={L}  ({input_info['kind']} input)")
            print(f"wrote {out / 'ess.png'}")
        except ImportError:
            print("matplotlib is not installed: skipped the plot (pip install matplotlib)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
