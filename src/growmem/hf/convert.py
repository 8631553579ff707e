"""Conversion between growmem trainer run folders and Hugging Face folders, both ways.

* :func:`run_to_hf` reads a run folder (its ``latest`` checkpoint, or one ``ckpt-XXXXXX`` folder) and
  writes ``config.json`` + ``model.safetensors`` (+ ``generation_config.json``) that
  ``AutoModelForCausalLM.from_pretrained`` loads. The experiment config (task, train, name) and the step
  are kept in ``config.json`` under ``growmem_experiment``.
* :func:`hf_to_run` reads an HF folder and writes a run folder (``ckpt-XXXXXX/`` + ``latest`` +
  ``config.json``) that ``growmem eval --run`` and the trainer load. HF folders hold weights only, so the
  checkpoint has no optimizer or scheduler state: a trainer resuming from it starts them afresh.

Any run converts, Recurrent Memory Transformer runs (``model.rmt`` set) included: a checkpoint holds the
trainer's model's parameters under growmem's names (``embed.weight``, ...; for an RMT ``backbone.*`` and
``memory``), which the HF folder keeps under the prefix ``model.``.

Command line: ``python -m growmem.hf.convert run-to-hf RUN_DIR OUT_DIR`` / ``hf-to-run HF_DIR OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from growmem.hf.configuration import GrowMemConfig
from growmem.hf.modeling import GrowMemForCausalLM
from growmem.train.checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from growmem.train.config import ExperimentConfig


def _find_checkpoint(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    if (p / "state.json").is_file():
        return p
    if not p.is_dir():
        raise ValueError(f"run folder {str(p)!r} does not exist")
    ckpt = latest_checkpoint(p)
    if ckpt is None:
        raise ValueError(f"no checkpoint in {str(p)!r} (expected a 'latest' pointer or a ckpt-XXXXXX folder)")
    return ckpt


def load_run_model(run_dir: str | Path) -> tuple[GrowMemForCausalLM, dict[str, Any]]:
    """The HF model of a run folder's newest checkpoint (or of one checkpoint folder), and its state dict
    (``step``, ``config``, ...)."""
    ckpt = _find_checkpoint(run_dir)
    state = read_state(ckpt)
    try:
        exp = ExperimentConfig.from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {str(ckpt)!r} has no valid experiment config: {err}") from None
    meta = exp.to_dict()
    meta.pop("model")
    config = GrowMemConfig(growmem=exp.model, growmem_experiment={"config": meta, "step": int(state["step"])})
    model = GrowMemForCausalLM(config)
    load_checkpoint(ckpt, model.model, restore_rng=False)
    model.eval()
    return model, state


def run_to_hf(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the HF folder of a trainer run (its ``latest`` checkpoint) or of one checkpoint folder."""
    model, _ = load_run_model(run_dir)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def hf_to_run(hf_dir: str | Path, out_dir: str | Path, step: int | None = None,
              experiment: dict[str, Any] | None = None) -> Path:
    """Write a run folder (``ckpt-XXXXXX/``, ``latest``, ``config.json``) from an HF folder.

    ``step``: the checkpoint's step (default: the one recorded by :func:`run_to_hf`, else 0).
    ``experiment``: the experiment config dict (``ExperimentConfig.to_dict()`` shape) to record; default:
    the one recorded by :func:`run_to_hf`, else defaults (``task``/``train`` of ``ExperimentConfig()``);
    its ``model`` part is always the HF folder's model. Returns the checkpoint folder.
    """
    model = GrowMemForCausalLM.from_pretrained(str(hf_dir))
    cfg: GrowMemConfig = model.config
    recorded = cfg.growmem_experiment or {}
    d = dict(experiment if experiment is not None else recorded.get("config") or {})
    d["model"] = cfg.growmem
    out = Path(out_dir)
    d["out_dir"] = str(out)  # where this run lives now
    exp = ExperimentConfig.from_dict(d)  # validates
    if step is None:
        step = int(recorded.get("step", 0))
    ckpt = save_checkpoint(out, step, model.model, None, None, exp.to_dict(), extra={"source": str(hf_dir)})
    (out / "config.json").write_text(json.dumps(exp.to_dict(), indent=2))
    return ckpt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m growmem.hf.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("run-to-hf", help="trainer run folder (or ckpt folder) -> HF folder")
    a.add_argument("run_dir")
    a.add_argument("out_dir")
    b = sub.add_parser("hf-to-run", help="HF folder -> trainer run folder")
    b.add_argument("hf_dir")
    b.add_argument("out_dir")
    b.add_argument("--step", type=int, default=None)
    args = p.parse_args(argv)
    if args.cmd == "run-to-hf":
        print(run_to_hf(args.run_dir, args.out_dir))
    else:
        print(hf_to_run(args.hf_dir, args.out_dir, step=args.step))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
