"""The installed wheel runs on its own: every file fedpeft reads at run time is package data.

The wheel is built from a copy of the checkout, installed with ``pip install --target``, and
run from a folder outside the checkout, so nothing is imported or read from the source tree.
``fedpeft demo`` reads ``fedpeft/configs/demo.yaml`` and ``builtin:sample`` reads
``fedpeft/data/sample.jsonl``: a tiny demo run needs both inside the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The demo job, made tiny: the shipped config and sample data still come from the wheel.
TINY_DEMO = ["model.name=tiny-random-llama", "peft.r=4", "data.max_seq_len=64", "federation.rounds=1",
             "train.local_epochs=1", "train.max_steps=1", "eval.zero_shot=false", "eval.max_samples=2",
             "eval.max_new_tokens=4", "eval.heldout_loss=false"]


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """``(site folder, environment)`` of the wheel installed with ``pip install --target``."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building in the checkout would write build/ into others' tree
    shutil.copytree(ROOT / "fedpeft", src / "fedpeft", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    pip = [sys.executable, "-m", "pip", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)], tmp, env)
    (wheel,) = (tmp / "dist").glob("fedpeft-*.whl")
    site = tmp / "site"
    _run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], tmp, env)
    env["PYTHONPATH"] = str(site)  # ahead of the venv's editable install of the checkout
    return site, env


def test_the_installed_wheel_runs_the_demo_outside_the_checkout(installed, tmp_path) -> None:
    site, env = installed
    where = _run([sys.executable, "-c", "import fedpeft; print(fedpeft.__file__)"], tmp_path, env)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
    assert "demo" in _run([sys.executable, "-m", "fedpeft.cli", "--help"], tmp_path, env).stdout
    _run([str(site / "bin" / "fedpeft"), "demo", "--help"], tmp_path, env)
    _run([str(site / "bin" / "fedpeft"), "demo", f"workspace={tmp_path / 'ws'}", *TINY_DEMO], tmp_path, env)
    (run,) = (tmp_path / "ws" / "demo").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_parameters"] > 0
    assert (run / "adapter").is_dir() and (run / "metrics.jsonl").is_file()


def test_every_file_of_the_package_is_in_the_wheel(installed) -> None:
    site, _ = installed
    data = [p.relative_to(ROOT) for p in (ROOT / "fedpeft").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert data, "expected data files in fedpeft/ (configs, sample data)"
    missing = [str(p) for p in data if not (site / p).is_file()]
    assert not missing, f"not package data (pyproject [tool.setuptools.package-data]): {missing}"
