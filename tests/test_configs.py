"""Every shipped config file loads and validates (experiments and sweeps), with its task buildable."""

from __future__ import annotations

from pathlib import Path

import pytest

from growmem.tasks import make_task
from growmem.train.config import load_experiment, yaml_load
from growmem.train.sweep import expand, load_sweep

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_file_validates(path):
    d = yaml_load(path.read_text())
    runs = [c for _, c in expand(load_sweep(path))] if "grid" in d else [load_experiment(path)]
    assert runs
    for cfg in runs:
        task = make_task(cfg.task.name, **cfg.task.options)
        assert task.vocab_size <= cfg.model.vocab_size


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"mqar.yaml", "mqar_sweep.yaml"}
