"""Packaging: the wheel builds, declares only torch and numpy as requirements (transformers, lm-eval, ...
are extras), installs, and imports with nothing but its declared dependencies; the core never imports
the optional integrations (growmem.hf, transformers, lm-eval, safetensors, yaml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _marker(text: str) -> bool:
    try:
        from packaging.markers import Marker
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.markers import Marker
    return Marker(text).evaluate()


def _sandbox_site(tmp: Path, roots: list[str]) -> Path:
    """A folder holding links to the installed files of ``roots`` and their (transitive, non-extra)
    requirements only: a site-packages with nothing but the declared dependencies."""
    import importlib.metadata as md
    import re

    site = tmp / "site"
    site.mkdir()
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional, platform-specific requirement that is not installed
        for r in dist.requires or []:
            spec, _, marker = r.partition(";")
            if "extra" in marker:
                continue
            if marker.strip() and not _marker(marker.strip()):
                continue
            todo.append(re.split(r"[\s<>=!~\[(]", spec.strip(), maxsplit=1)[0])
        base = Path(dist.locate_file(""))
        for f in dist.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            src, dst = base / top, site / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    return site


def test_wheel_installs_and_imports_with_declared_dependencies_only(tmp_path):
    src = tmp_path / "src-tree"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(dist), str(src)], capture_output=True, text=True, timeout=120)
    if r.returncode and ("No module named" in r.stderr or "bdist_wheel" in r.stderr):
        pytest.skip(f"cannot build wheels here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = dist.glob("growmem-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "growmem/hf/lm_eval_adapter.py" in names and "growmem/models/lm.py" in names
    assert "growmem/ops/_kernels/delta_rule.cpp" in names  # the fused kernel's source ships
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    core = sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires if "extra ==" not in r)
    assert core == ["numpy", "torch"]
    extras = {line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Provides-Extra:")}
    assert {"dev", "exp", "hf", "eval"} <= extras
    assert any(r.startswith("transformers") and 'extra == "hf"' in r for r in requires)
    assert any(r.startswith("lm-eval") and 'extra == "eval"' in r for r in requires)

    target = tmp_path / "target"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    site = _sandbox_site(tmp_path, ["torch", "numpy"])
    assert not (site / "transformers").exists() and not (site / "growmem").exists()
    code = """
import sys
import growmem, growmem.models, growmem.ops, growmem.caching, growmem.layers, growmem.memories, growmem.cli
import torch
assert growmem.__file__.startswith(sys.argv[1]), growmem.__file__
m = growmem.models.CausalLM(growmem.models.ModelConfig(d_model=16, num_heads=2, n_layers=1, mixer="gdn+grm"))
assert m(torch.zeros(1, 5, dtype=torch.long)).logits.shape == (1, 5, 256)
import shutil
from growmem.ops import _native
assert _native.native_available() or not shutil.which("g++"), _native._error  # the installed kernel source builds
bad = [k for k in sys.modules if k.split(".")[0] in ("transformers", "lm_eval", "safetensors", "yaml")
       or k.startswith("growmem.hf")]
assert not bad, bad
try:
    import growmem.hf
except ImportError as err:
    assert "growmem[hf]" in str(err), err
else:
    raise AssertionError("growmem.hf imported without transformers")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=os.pathsep.join([str(target), str(site)]), PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-S", "-c", code, str(target)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-1000:] + r.stderr[-3000:]
