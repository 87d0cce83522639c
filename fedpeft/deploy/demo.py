"""A 3-site deployment on loopback next to its simulation: wall time, bytes, same adapter?

``python -m fedpeft.deploy.demo WORKSPACE [--model NAME] [--rows-per-site 30] [--secagg] [--tls]``

Carves three sites' files from a JSONL file (default: the shipped sample, reused if short),
runs the job in-process (``fedpeft run``'s loop) and then as a deployment (``fedpeft server``
plus three ``fedpeft client`` processes on 127.0.0.1), and prints per round the wall time and
the bytes each way of both, and the largest difference between the two final adapters.
Everything is written under WORKSPACE; ``comparison.json`` holds the numbers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path

import torch

from fedpeft.config import validate_tree
from fedpeft.data.io import SAMPLE_PATH, load_examples
from fedpeft.deploy.loopback import Loopback
from fedpeft.io_utils import read_jsonl, write_json
from fedpeft.simulation import run_job
from fedpeft.models import SMOLLM2

SITES = ("site-a", "site-b", "site-c")


def write_site_files(root: Path, source: Path, rows_per_site: int) -> tuple[dict[str, Path], Path]:
    """Three sites' files of ``rows_per_site`` rows each and a 2-row server test file."""
    rows = load_examples(source)
    stream = itertools.cycle(rows)
    root.mkdir(parents=True, exist_ok=True)
    sites = {}
    for name in SITES:
        sites[name] = root / f"{name}.jsonl"
        part = [next(stream) for _ in range(rows_per_site)]
        sites[name].write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    test = root / "server-test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[-2:]), encoding="utf-8")
    return sites, test


def demo_job(args: argparse.Namespace, sites: dict[str, Path], test: Path) -> dict:
    """LoRA (fedpeft defaults: r=16, all linear layers), FedAvg, tiny evaluation."""
    return {
        "job": "deploy-demo", "seed": 0, "model": {"name": args.model},
        "peft": {"method": "lora"},
        "data": {"client_files": [str(p) for p in sites.values()], "test": str(test),
                 "max_seq_len": args.max_seq_len},
        "federation": {"num_clients": 3, "rounds": args.rounds, "min_clients": 2},
        "train": {"learning_rate": 1e-3, "batch_size": 4},
        "eval": {"every": 0, "zero_shot": False, "max_samples": 1, "max_new_tokens": 1,
                 "heldout_loss": False, "batch_size": 1},
    }


def simulate(job: dict, workspace: Path, threads: int) -> tuple[Path, float]:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    run = run_job(validate_tree({**job, "workspace": str(workspace), "run_id": "simulation"}))
    return run.path, time.perf_counter() - start


def deploy(job: dict, root: Path, sites: dict[str, Path], args: argparse.Namespace) -> tuple[Path, float]:
    server_job = {**job, "data": {k: v for k, v in job["data"].items() if k != "client_files"}}
    extra = {"round_timeout_s": 1800, "wait_for_sites_s": 600}
    if args.secagg:
        extra["secure_aggregation"] = {"enabled": True, "clipping_range": args.clip,
                                       "max_weight": args.rows_per_site}
    env = {"OMP_NUM_THREADS": str(args.threads)}
    with Loopback(root, server_job, sites, tls=args.tls, authenticate=args.tls, env=env, deploy=extra) as lb:
        start = time.perf_counter()
        lb.start()
        code = lb.wait_server(args.timeout)
        wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"the deployment failed ({code}); see {lb.log('server')}")
    return lb.run_dir, wall


def _rounds(run: Path) -> list[dict]:
    return [{"round": r["round"], "seconds": r["seconds"], "bytes_down": r["bytes_down"],
             "bytes_up": r["bytes_up"]} for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "round"]


def _max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    y = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    return max((x[k] - y[k]).abs().max().item() for k in x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--data", type=Path, default=SAMPLE_PATH, help="JSONL to carve the sites from")
    parser.add_argument("--rows-per-site", type=int, default=30)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per site and simulation")
    parser.add_argument("--secagg", action="store_true")
    parser.add_argument("--clip", type=float, default=0.1, help="SecAgg+ clipping range")
    parser.add_argument("--tls", action="store_true", help="TLS and site keys")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = args.workspace.resolve()
    sites, test = write_site_files(root / "data", args.data, args.rows_per_site)
    job = demo_job(args, sites, test)
    sim, sim_wall = simulate(job, root / "sim-ws", args.threads)
    dep, dep_wall = deploy(job, root / "deployment", sites, args)
    result = {"simulation": {"wall_s": sim_wall, "rounds": _rounds(sim)},
              "deployment": {"wall_s": dep_wall, "rounds": _rounds(dep)},
              "max_abs_adapter_diff": _max_diff(sim, dep), "secure_aggregation": args.secagg,
              "tls": args.tls, "model": args.model, "rows_per_site": args.rows_per_site}
    write_json(root / "comparison.json", result)
    for kind in ("simulation", "deployment"):
        print(f"{kind}: {result[kind]['wall_s']:.1f} s wall")
        for r in result[kind]["rounds"]:
            print(f"  round {r['round']}: {r['seconds']:.1f} s, {r['bytes_down'] / 1e6:.2f} MB down, "
                  f"{r['bytes_up'] / 1e6:.2f} MB up")
    print(f"max |adapter difference| = {result['max_abs_adapter_diff']:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
