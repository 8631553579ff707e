"""Checkpoints written atomically and loaded safely (safetensors + JSON, never pickle).

Layout of a run folder::

    ckpt-000200/model.safetensors   model weights (shared/tied tensors handled by safetensors)
    ckpt-000200/train.safetensors   optimizer tensors and the torch RNG state
    ckpt-000200/state.json          step, scheduler, optimizer hyper-parameters, python/numpy RNG, config
    latest                          name of the newest complete checkpoint folder

A checkpoint folder is written under a temporary name and renamed when complete; ``latest`` is
replaced atomically afterwards, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        meta["state"][str(idx)] = {}
        for name, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = val.detach().clone().contiguous()
                meta["state"][str(idx)][name] = "__tensor__"
            else:
                meta["state"][str(idx)][name] = val
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for idx, st in meta["state"].items():
        state[int(idx)] = {name: (tensors[f"optim.{idx}.{name}"] if val == "__tensor__" else val)
                           for name, val in st.items()}
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, config: dict[str, Any], extra: dict[str, Any] | None = None,
                    keep: int = 1) -> Path:
    """Write ``run_dir/ckpt-{step}`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    from safetensors.torch import save_file, save_model

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{name}."))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        meta: dict[str, Any] = {}
        if optimizer is not None:
            t, meta = _flatten_optimizer(optimizer.state_dict())
            tensors.update(t)
        save_file(tensors, str(tmp / "train.safetensors"))
        np_state = np.random.get_state()
        state = {
            "step": step, "config": config, "optimizer": meta,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng_python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "extra": extra or {},
        }
        (tmp / "state.json").write_text(json.dumps(state))
        final = run_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(run_dir / "latest", name)
    ckpts = sorted(p for p in run_dir.glob("ckpt-*") if p.is_dir())
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder named by ``run_dir/latest``, or None."""
    ptr = Path(run_dir) / "latest"
    if not ptr.is_file():
        return None
    path = Path(run_dir) / ptr.read_text().strip()
    if not (path / "state.json").is_file():
        raise ValueError(f"checkpoint pointer {str(ptr)!r} names {path.name!r}, which is missing or incomplete")
    return path


def read_state(ckpt: Path) -> dict[str, Any]:
    """The JSON part of a checkpoint (config, step, ...)."""
    try:
        return json.loads((Path(ckpt) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"unreadable checkpoint state in {str(ckpt)!r}: {err}") from None


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint folder into ``model`` (and optimizer, scheduler, RNGs). Returns its state dict."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    ckpt = Path(ckpt)
    state = read_state(ckpt)
    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupted or missing model weights in {str(ckpt)!r}: {err}") from None
    except RuntimeError as err:
        raise ValueError(f"checkpoint weights do not fit this model (another config?): {err}") from None
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(ckpt)!r} does not fit this model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    try:
        tensors = load_file(str(ckpt / "train.safetensors"))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupted or missing training state in {str(ckpt)!r}: {err}") from None
    if optimizer is not None and state.get("optimizer"):
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        py = state["rng_python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npst = state["rng_numpy"]
        np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    return state
