"""The trainer: AdamW, warmup + cosine, clipping, accumulation, optional autocast, periodic evaluation,
early stopping, JSONL/CSV metrics, atomic checkpoints, exact resume, and DDP under ``torchrun``.

Exact resume: the batch of every (step, micro-step, rank) is generated from a seed derived from
those numbers, and model, optimizer, scheduler and RNG states are checkpointed, so a run killed
after a checkpoint and resumed performs bit-for-bit the same updates on CPU as an uninterrupted run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from growmem.models import build_model
from growmem.train.checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from growmem.train.config import ExperimentConfig


def step_seed(seed: int, step: int, micro: int = 0, rank: int = 0) -> int:
    """A deterministic per-(step, micro-step, rank) data seed."""
    return (seed * 1_000_003 + step * 7919 + micro * 104_729 + rank * 15_485_863) % (2**63 - 1)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (>= 2-D) only; not on norms, biases, gate parameters."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MetricsLog:
    """Appends rows to ``<name>.jsonl`` and ``<name>.csv``; on resume drops rows past the resumed step."""

    def __init__(self, run_dir: Path, name: str, resume_step: int | None) -> None:
        self.jsonl = run_dir / f"{name}.jsonl"
        self.csv = run_dir / f"{name}.csv"
        rows = []
        if resume_step is not None and self.jsonl.exists():
            rows = [r for r in (json.loads(line) for line in self.jsonl.read_text().splitlines() if line)
                    if r.get("step", 0) <= resume_step]
        self.rows: list[dict[str, Any]] = rows
        self._rewrite()

    def _rewrite(self) -> None:
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with self.csv.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        if len(keys) == len(self.rows[0]) and len(self.rows) > 1:
            with self.csv.open("a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=keys).writerow(row)
        else:
            self._rewrite()


def _dist_info() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Train ``config.model`` on ``config.task``; writes into ``config.run_dir``.

    ``resume=True`` continues from the newest checkpoint in the run folder (its config must match).
    """

    def __init__(self, config: ExperimentConfig, resume: bool = True, device: str | None = None,
                 quiet: bool = False) -> None:
        from growmem.tasks import make_task

        self.cfg = config
        tc = config.train
        if tc.threads is not None:
            torch.set_num_threads(tc.threads)
        self.rank, self.world = _dist_info()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.quiet = quiet or self.rank != 0
        self.task = make_task(config.task.name, **config.task.options)
        if config.model.vocab_size < self.task.vocab_size:
            raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the task's vocabulary "
                             f"({self.task.vocab_size})")
        self.run_dir = config.run_dir
        if self.rank == 0:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                probe = self.run_dir / ".write-test"
                probe.write_text("")
                probe.unlink()
            except OSError as err:
                raise ValueError(f"cannot write to the output folder {str(self.run_dir)!r}: {err}") from None
        torch.manual_seed(tc.seed)
        self.model = build_model(config.model).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, tc.weight_decay), lr=tc.lr, betas=tc.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, tc.warmup_steps, tc.steps, tc.min_lr_ratio))
        self.step = 0
        self.best: dict[str, Any] = {}
        ckpt = latest_checkpoint(self.run_dir) if resume else None
        if ckpt is not None:
            saved = read_state(ckpt)["config"]
            mine = config.to_dict()
            for part in ("model", "task"):
                if saved.get(part) != mine[part]:
                    raise ValueError(f"checkpoint {str(ckpt)!r} was written with another {part} config; "
                                     f"use a new out_dir or --no-resume")
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
            self.step = int(state["step"])
            self.best = state["extra"].get("best", {})
            if not self.quiet:
                print(f"resuming from {ckpt} at step {self.step}")
        self.train_model: nn.Module = self.model
        if self.world > 1:
            self.train_model = nn.parallel.DistributedDataParallel(self.model)
        resume_step = self.step if ckpt is not None else None
        if self.rank == 0:
            (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
            self.train_log = MetricsLog(self.run_dir, "train", resume_step if resume_step is not None else -1)
            self.eval_log = MetricsLog(self.run_dir, "eval", resume_step if resume_step is not None else -1)

    # -------------------------------------------------------------------------------------------
    def _autocast(self):
        ac = self.cfg.train.autocast
        if ac is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if ac == "bf16" else torch.float16)

    def _apply_curriculum(self) -> None:
        cur = self.cfg.train.curriculum
        if cur and hasattr(self.task, "set_curriculum"):
            stages = [i for i, (s, _) in enumerate(cur) if s <= self.step]
            self._stage = stages[-1]
            self.task.set_curriculum(cur[self._stage][1])

    def evaluate(self) -> dict[str, float]:
        """The task's metrics on held-out samples (fixed seed), in eval mode."""
        tc = self.cfg.train
        self.model.eval()
        with torch.no_grad(), self._autocast():
            metrics = self.task.evaluate(self.model, n_samples=tc.eval_samples, batch_size=tc.eval_batch_size,
                                         seed=10_000_019 + tc.seed)
        self.model.train()
        return {k: float(v) for k, v in metrics.items()}

    def save(self) -> None:
        if self.rank == 0:
            save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler,
                            self.cfg.to_dict(), extra={"best": self.best}, keep=self.cfg.train.keep_checkpoints)

    def _stop_reached(self, metrics: dict[str, float]) -> bool:
        tc = self.cfg.train
        if tc.early_stop_metric is None:
            return False
        if tc.early_stop_metric not in metrics:
            raise ValueError(f"early_stop_metric {tc.early_stop_metric!r} is not reported by the task "
                             f"(it reports {sorted(metrics)})")
        cur = tc.curriculum
        if cur and hasattr(self.task, "set_curriculum") and getattr(self, "_stage", -1) != len(cur) - 1:
            return False  # the task was evaluated at an easier stage: says nothing about the final task
        val, target = metrics[tc.early_stop_metric], tc.early_stop_target
        return val >= target if tc.early_stop_mode == "max" else val <= target

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps`` (or early stop). ``stop_at`` ends the process-local run after that
        step without a final checkpoint, as a kill would (for tests of resumption)."""
        tc = self.cfg.train
        self.model.train()
        bar = None
        if tc.progress and not self.quiet:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=tc.steps, initial=self.step, desc=self.cfg.name, dynamic_ncols=True)
            except ImportError:
                bar = None
        t0 = time.perf_counter()
        last_loss = float("nan")
        stopped_early = False
        while self.step < tc.steps:
            self._apply_curriculum()
            loss_sum = 0.0
            for micro in range(tc.accum_steps):
                batch = self.task.batch(tc.batch_size, step_seed(tc.seed, self.step, micro, self.rank))
                ids, tgt = batch["input_ids"].to(self.device), batch["targets"].to(self.device)
                sync = micro == tc.accum_steps - 1 or self.world == 1
                ctx = nullcontext() if sync else self.train_model.no_sync()  # type: ignore[operator]
                with ctx, self._autocast():
                    out = self.train_model(ids, targets=tgt)
                    loss = out.loss / tc.accum_steps
                loss.backward()
                loss_sum += float(loss.detach())
            grad_norm = None
            if tc.grad_clip is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            last_loss = loss_sum
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"loss became {loss_sum} at step {self.step}; lower train.lr?")
            if self.rank == 0:
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    row = {"step": self.step, "loss": loss_sum, "lr": self.scheduler.get_last_lr()[0],
                           "grad_norm": grad_norm, "elapsed_s": round(time.perf_counter() - t0, 3)}
                    self.train_log.add(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum:.4f}")
            stop = False
            if self.step % tc.eval_every == 0 or self.step == tc.steps:
                if self.rank == 0:
                    metrics = self.evaluate()
                    self.eval_log.add({"step": self.step, **metrics})
                    for k, v in metrics.items():
                        self.best[k] = max(v, self.best.get(k, -math.inf))
                    stop = self._stop_reached(metrics)
                    if bar is not None:
                        bar.write(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                stop = self._broadcast(stop)
            if self.step % tc.checkpoint_every == 0 or self.step == tc.steps or stop:
                self.save()
                self._barrier()
            if stop:
                stopped_early = True
                break
            if stop_at is not None and self.step >= stop_at:
                break
        if bar is not None:
            bar.close()
        final = {"step": self.step, "loss": last_loss, "stopped_early": stopped_early,
                 "metrics": self.eval_log.rows[-1] if self.rank == 0 and self.eval_log.rows else {},
                 "params": self.model.num_parameters()}
        if self.rank == 0 and (self.step >= tc.steps or stopped_early):
            (self.run_dir / "final.json").write_text(json.dumps(final, indent=2))
        return final

    def _broadcast(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def train(config: ExperimentConfig, resume: bool = True, **kw) -> dict[str, Any]:
    """Build a :class:`Trainer` and run it."""
    return Trainer(config, resume=resume, **kw).fit()


def with_overrides(config: ExperimentConfig, **changes: Any) -> ExperimentConfig:
    """A copy of ``config`` with top-level fields replaced."""
    return dataclasses.replace(config, **changes)
