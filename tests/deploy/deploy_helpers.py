"""Helpers of the deployment tests: three sites' files, a tiny job, its simulation, comparisons."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedpeft.config import validate_tree
from fedpeft.data.io import SAMPLE_PATH
from fedpeft.simulation import run_job
from fedpeft.run_dir import RunDir

SITE_SIZES = {"site-a": 4, "site-b": 6, "site-c": 3}  # unequal: weighting by num_examples matters
SITE_ENV = {"OMP_NUM_THREADS": "1"}  # sites train single-threaded, like the simulation below


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def write_sites(root: Path) -> tuple[dict[str, Path], Path]:
    """One JSONL file per site (disjoint rows of the shipped sample) and a server test file."""
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text(encoding="utf-8").splitlines()]
    root.mkdir(parents=True, exist_ok=True)
    sites, start = {}, 0
    for name, size in SITE_SIZES.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[start:start + size]), encoding="utf-8")
        sites[name], start = path, start + size
    test = root / "server-test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[70:72]), encoding="utf-8")
    return sites, test


def tiny_job(sites: dict[str, Path], test: Path, **federation) -> dict:
    """Tiny random Llama, LoRA r=4, FedAvgM (momentum: the server state must survive too)."""
    return {
        "job": "deploy-test", "seed": 5,
        "model": {"name": "tiny-random-llama"},
        "peft": {"method": "lora", "r": 4},
        "data": {"client_files": [str(p) for p in sites.values()], "test": str(test), "max_seq_len": 64},
        "federation": {"num_clients": len(sites), "rounds": 2, "min_clients": 2,
                       "aggregation": {"name": "fedavgm", "beta": 0.5}, **federation},
        "train": {"learning_rate": 5e-3, "batch_size": 2, "max_steps": 2},
        "eval": {"every": 0, "zero_shot": False, "max_new_tokens": 4, "max_samples": 2, "batch_size": 2},
    }


def simulate(job: dict, workspace: Path, run_id: str = "sim") -> RunDir:
    """The in-process simulation of ``job`` (single-threaded, as the sites train)."""
    with torch_threads(1):
        return run_job(validate_tree({**job, "workspace": str(workspace), "run_id": run_id}))


def checkpoint(run_dir: Path, rnd: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"round-{rnd:04d}" / "global_state.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)
