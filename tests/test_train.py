"""Trainer, checkpoints, configs, sweeps and the CLI: exact resume, atomic/safe checkpoints, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from growmem.cli import main as cli_main
from growmem.train.checkpoint import latest_checkpoint, load_checkpoint
from growmem.train.config import ExperimentConfig, apply_overrides, load_experiment
from growmem.train.sweep import SweepConfig, collect, run_sweep
from growmem.train.trainer import Trainer, lr_lambda


def tiny_cfg(out: Path, name: str = "run", **train) -> ExperimentConfig:
    d = {
        "name": name, "out_dir": str(out / "{name}"),
        "model": {"vocab_size": 64, "d_model": 16, "n_layers": 1, "num_heads": 2, "mixer": "gdn", "chunk_size": 8},
        "task": {"name": "mqar", "options": {"vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4}},
        "train": {"steps": 8, "batch_size": 4, "eval_every": 4, "eval_samples": 8, "eval_batch_size": 8,
                  "checkpoint_every": 3, "log_every": 1, "warmup_steps": 2, "progress": False, **train},
    }
    return ExperimentConfig.from_dict(d)


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_killed_run_resumes_bitwise(tmp_path):
    full = Trainer(tiny_cfg(tmp_path, "full", accum_steps=2), quiet=True)
    ref = full.fit()
    cfg = tiny_cfg(tmp_path, "killed", accum_steps=2)
    Trainer(cfg, quiet=True).fit(stop_at=5)  # "killed" after step 5: last checkpoint at step 3
    assert latest_checkpoint(cfg.run_dir).name == "ckpt-000003"
    resumed = Trainer(cfg, quiet=True)
    assert resumed.step == 3
    out = resumed.fit()
    assert out["loss"] == ref["loss"]  # bitwise
    assert torch.equal(params(resumed.model), params(full.model))
    rows = [json.loads(line) for line in (cfg.run_dir / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))  # no duplicated rows from the killed attempt
    assert (cfg.run_dir / "train.csv").read_text().count("\n") == 9
    assert json.loads((cfg.run_dir / "final.json").read_text())["step"] == 8


def test_checkpoint_atomicity_and_safe_loading(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=3)
    t = Trainer(cfg, quiet=True)
    t.fit()
    ck = latest_checkpoint(cfg.run_dir)
    # a half-written checkpoint folder (as left by a kill during saving) is never picked up
    (cfg.run_dir / ".ckpt-000009.tmp").mkdir()
    assert latest_checkpoint(cfg.run_dir) == ck
    # corrupted weights give a clear error
    (ck / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(ck, t.model)


def test_resume_with_another_config_is_refused(tmp_path):
    Trainer(tiny_cfg(tmp_path, steps=3), quiet=True).fit()
    other = tiny_cfg(tmp_path, steps=3)
    other.model.d_model = 32
    with pytest.raises(ValueError, match="another model config"):
        Trainer(other, quiet=True)


def test_early_stop_and_metrics(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=50, early_stop_metric="accuracy", early_stop_target=0.0)
    out = Trainer(cfg, quiet=True).fit()
    assert out["stopped_early"] and out["step"] == 4
    assert "accuracy" in out["metrics"]
    with pytest.raises(ValueError, match="not reported"):
        Trainer(tiny_cfg(tmp_path, "x", early_stop_metric="bpb", early_stop_target=1.0), quiet=True).fit()


def test_lr_schedule():
    assert lr_lambda(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert 0.1 < lr_lambda(55, 10, 100, 0.1) < 1.0


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown train"):
        ExperimentConfig.from_dict({"train": {"stpes": 3}})
    with pytest.raises(ValueError, match="unknown ModelConfig"):
        ExperimentConfig.from_dict({"model": {"widht": 3}})
    with pytest.raises(ValueError, match="lr"):
        ExperimentConfig.from_dict({"train": {"lr": -1}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ValueError, match="malformed YAML"):
        load_experiment(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_experiment(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="unknown mixer"):
        load_experiment(None, model="gdnn")
    with pytest.raises(ValueError, match="key.path=value"):
        apply_overrides({}, ["train.lr"])
    assert apply_overrides({}, ["train.lr=1e-3", "model.mixer=[gdn, attn]"]) == {
        "train": {"lr": 1e-3}, "model": {"mixer": ["gdn", "attn"]}}
    with pytest.raises(ValueError, match="unknown task"):
        Trainer(ExperimentConfig.from_dict({"task": {"name": "mqqar"}, "out_dir": str(tmp_path)}), quiet=True)
    with pytest.raises(ValueError, match="vocab"):
        Trainer(ExperimentConfig.from_dict({"model": {"vocab_size": 16}, "out_dir": str(tmp_path),
                                            "task": {"name": "mqar", "options": {"vocab_size": 64}}}), quiet=True)


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = tiny_cfg(tmp_path)
    cfg.out_dir = str(blocker / "sub")
    with pytest.raises(ValueError, match="cannot write"):
        Trainer(cfg, quiet=True)


def test_sweep_serial_resumable_and_collected(tmp_path):
    base = tiny_cfg(tmp_path, steps=2).to_dict()
    base.pop("name")
    base.pop("out_dir")
    sweep = SweepConfig(name="s", base=base, grid={"model.mixer": ["la", "la+grm"]}, out_dir=str(tmp_path / "{name}"))
    rows = run_sweep(sweep, quiet=True)
    assert [r["model.mixer"] for r in rows] == ["la", "la+grm"] and all("accuracy" in r for r in rows)
    assert (tmp_path / "s" / "results.csv").exists() and (tmp_path / "s" / "results.md").exists()
    mtime = (tmp_path / "s" / "mixer=la" / "final.json").stat().st_mtime
    run_sweep(sweep, quiet=True)  # finished runs are skipped
    assert (tmp_path / "s" / "mixer=la" / "final.json").stat().st_mtime == mtime
    assert len(collect(sweep)) == 2


def test_cli_train_eval_plot_list(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, steps=2)
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert cli_main(["train", "--config", str(path), "--set", "train.lr=0.002"]) == 0
    assert cli_main(["eval", "--run", str(cfg.run_dir), "--samples", "8",
                     "--set", "task.options.seq_len=48"]) == 0
    out = capsys.readouterr().out
    assert '"accuracy"' in out
    assert cli_main(["plot", "--runs", str(cfg.run_dir), "--out", str(tmp_path / "loss.png")]) == 0
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert cli_main(["list"]) == 0
    assert "mqar" in capsys.readouterr().out
    assert cli_main(["train", "--model", "nope", "--out-dir", str(tmp_path / "z")]) == 2


def test_ddp_two_cpu_processes(tmp_path):
    cfg = tiny_cfg(tmp_path, "ddp", steps=3, eval_every=3)
    path = tmp_path / "ddp.json"
    path.write_text(json.dumps(cfg.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", "-m", "growmem.cli", "train", "--config", str(path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((cfg.run_dir / "final.json").read_text())
    assert final["step"] == 3
    assert latest_checkpoint(cfg.run_dir).name == "ckpt-000003"


def test_demo_runs_end_to_end(tmp_path, capsys):
    from growmem.demo import run_demo

    rows = run_demo(out_dir=str(tmp_path / "demo"), steps=2, parallel=1, models=("la", "la+grm"))
    assert [r["model.mixer"] for r in rows] == ["la", "la+grm"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 2 for r in rows)
    assert (tmp_path / "demo" / "mqar" / "accuracy.png").stat().st_size > 1000
    assert "| la+grm |" in capsys.readouterr().out
