"""Reproduce the deployment checks by hand: ``python -m fedpeft.deploy.demo WORKSPACE [options]``.

Options (combine freely):
  --tls               TLS with a fresh loopback CA (fedpeft.deploy.tls)
  --auth              SuperNode authentication (implies --tls); keys registered via the CLI
  --intruder          also start a SuperNode whose key was never registered (with --auth)
  --secagg            SecAgg+ instead of plain weighted mean
  --kill NODE         SIGKILL that SuperNode (c0, c1 or c2) once round 1 is recorded
  --rounds N          number of rounds (default 2)

Three SuperNodes train the placeholder on tiny JSONL files. At the end the demo prints the run
status, where the logs are, and the largest deviation of the final state from the exact weighted
mean that it computes by hand (the deviation shows SecAgg+'s quantisation error).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from pathlib import Path

from safetensors.torch import load_file

from fedpeft.deploy import constants as C
from fedpeft.deploy.launch import Deployment, NodeSpec
from fedpeft.deploy.placeholder import initial_state
from fedpeft.deploy.tls import make_node_keys, make_tls_files

NODE_XS = {"c0": [1.0, 2.0], "c1": [0.0, 0.0, 3.0], "c2": [10.0]}


def _nodes(ws: Path, auth: bool) -> list[NodeSpec]:
    specs = []
    for cid, xs in NODE_XS.items():
        path = ws / "data" / f"{cid}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"x": x}) + "\n" for x in xs), encoding="utf-8")
        specs.append(NodeSpec(cid, path, make_node_keys(ws / "keys", cid) if auth else None))
    return specs


def _kill_after_round1(dep: Deployment, metrics: Path, node: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not metrics.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"killing supernode-{node}")
    dep.stop_process(f"supernode-{node}", grace_s=0.0)


def _expected_shift(rounds: int, killed: str | None) -> float:
    def shift(nodes: dict[str, list[float]]) -> float:
        return sum(sum(xs) for xs in nodes.values()) / sum(len(xs) for xs in nodes.values())
    survivors = {k: v for k, v in NODE_XS.items() if k != killed}
    return shift(NODE_XS) + (rounds - 1) * shift(survivors if killed else NODE_XS)


def main(argv: list[str] | None = None) -> int:
    """Run one demo deployment; return 0 if the run completed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    for flag in ("--tls", "--auth", "--intruder", "--secagg"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--kill", choices=sorted(NODE_XS))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ws = args.workspace.resolve()
    tls = make_tls_files(ws / "certs") if args.tls or args.auth else None
    specs, out = _nodes(ws, args.auth), ws / "out"
    run_config = {C.RUN_NUM_ROUNDS: args.rounds, C.RUN_MIN_NODES: 3, C.RUN_NODE_WAIT_S: 60,
                  C.RUN_ROUND_TIMEOUT_S: 30, C.RUN_MIN_REPLIES: 2, C.RUN_OUTPUT_DIR: str(out),
                  C.RUN_SECAGG: args.secagg, C.RUN_SECAGG_CLIP: 12.0, C.RUN_SECAGG_MAX_WEIGHT: 3.0}
    with Deployment(ws, tls=tls, supernode_auth=args.auth) as dep:
        dep.start_superlink()
        for spec in specs:
            if spec.keys is not None:
                print(f"registered {spec.client_id}: node id {dep.register_node(spec.keys, spec.client_id)}")
            dep.start_supernode(spec)
        if args.intruder:
            dep.start_supernode(NodeSpec("intruder", specs[0].data_path,
                                         make_node_keys(ws / "keys", "intruder")))
        run_id = dep.run(run_config)
        if args.kill:
            threading.Thread(target=_kill_after_round1, daemon=True,
                             args=(dep, out / C.DEPLOY_METRICS_FILE, args.kill, 300)).start()
        status = dep.wait_for_run(run_id, timeout_s=120 + 90 * args.rounds * (1 + 3 * args.secagg))
        print(f"run {run_id}: {status}; ServerApp log: {dep.save_run_log(run_id)}; "
              f"process logs: {ws / 'logs'}")
    if status == "finished:completed":
        final, start = load_file(str(out / C.DEPLOY_STATE_FILE)), initial_state(0)
        shift = _expected_shift(args.rounds, args.kill)
        dev = max((final[k] - start[k] - shift).abs().max().item() for k in start)
        print(f"max |final - exact weighted mean| = {dev:.3g}")
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
