"""The Flower deployment prototype: real SuperLink + 3 SuperNodes + `flwr run` on loopback.

The end-to-end test starts every Flower process (insecure, loopback only), runs 2 rounds of the
placeholder training and checks the weighted mean that the ServerApp wrote. The other tests are
fast checks of the pieces (record conversion, the generated app, SecAgg+ quantisation error).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedpeft.deploy import constants as C
from fedpeft.deploy.launch import Deployment, NodeSpec, app_pyproject
from fedpeft.deploy.placeholder import initial_state
from fedpeft.deploy.records import record_to_state, state_to_record

# Each node's examples: the placeholder moves every tensor by mean(x), weighted by len(examples).
NODE_XS = {"c0": [1.0, 2.0], "c1": [0.0, 0.0, 3.0], "c2": [10.0]}
# Hand-computed weighted mean shift per round: (2*1.5 + 3*1.0 + 1*10.0) / 6 = 16/6.
SHIFT_PER_ROUND = 16.0 / 6.0


def _write_nodes(root: Path) -> list[NodeSpec]:
    specs = []
    for cid, xs in NODE_XS.items():
        path = root / "data" / f"{cid}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"x": x}) + "\n" for x in xs), encoding="utf-8")
        specs.append(NodeSpec(cid, path))
    return specs


@pytest.mark.timeout(180)
def test_three_supernodes_two_rounds_insecure(tmp_path: Path) -> None:
    workspace, out = tmp_path / "ws", tmp_path / "ws" / "out"
    specs = _write_nodes(workspace)
    run_config = {C.RUN_NUM_ROUNDS: 2, C.RUN_MIN_NODES: 3, C.RUN_NODE_WAIT_S: 45,
                  C.RUN_ROUND_TIMEOUT_S: 60, C.RUN_MIN_REPLIES: 3, C.RUN_AGGREGATION: "fedavg",
                  C.RUN_OUTPUT_DIR: str(out), C.RUN_SECAGG: False, C.RUN_INIT_SEED: 7}
    with Deployment(workspace, startup_timeout_s=45) as dep:
        dep.start_superlink()
        for spec in specs:
            dep.start_supernode(spec)
        run_id = dep.run(run_config)
        status = dep.wait_for_run(run_id, timeout_s=120)
        run_log = dep.save_run_log(run_id).read_text(encoding="utf-8")
    assert status == "finished:completed", run_log
    assert all(p.poll() is not None for p in dep.procs.values()), "processes left running"

    rounds = [json.loads(line) for line in (out / C.DEPLOY_METRICS_FILE).read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert sorted(c["client_id"] for c in r["clients"]) == ["c0", "c1", "c2"]
        assert r["num_examples"] == 6
        assert r["bytes_down"] > 3 * (4 * 16 * 4 * 2) and r["bytes_up"] > 3 * (4 * 16 * 4 * 2)
    assert "[round 2/2] 3 clients" in run_log

    final = load_file(str(out / C.DEPLOY_STATE_FILE))
    start = initial_state(7)
    assert sorted(final) == sorted(start)
    for key, tensor in start.items():
        torch.testing.assert_close(final[key], tensor + 2 * SHIFT_PER_ROUND, atol=1e-5, rtol=0)

    # Every process kept its FLWR_HOME (and the installed FAB) inside the workspace.
    for name in ["superlink", "supernode-c0", "supernode-c1", "supernode-c2"]:
        assert any((workspace / "flwr-home" / name / "apps").iterdir()), name


def test_state_record_round_trip_keeps_names_shapes_and_float32() -> None:
    state = {"a.lora_A": torch.randn(3, 5, dtype=torch.float64), "b": torch.arange(4.0)}
    back = record_to_state(state_to_record(state))
    assert list(back) == ["a.lora_A", "b"]
    assert all(t.dtype == torch.float32 for t in back.values())
    torch.testing.assert_close(back["a.lora_A"], state["a.lora_A"].float())
    torch.testing.assert_close(back["b"], state["b"])


def test_app_pyproject_is_a_valid_flower_app() -> None:
    from flwr.common.config import validate_config

    text = app_pyproject({C.RUN_NUM_ROUNDS: 3, C.RUN_OUTPUT_DIR: "/x/out", C.RUN_SECAGG: True})
    config = tomllib.loads(text)
    ok, errors, _ = validate_config(config, check_module=False)
    assert ok, errors
    assert config["tool"]["flwr"]["app"]["config"] == {
        C.RUN_NUM_ROUNDS: 3, C.RUN_OUTPUT_DIR: "/x/out", C.RUN_SECAGG: True}


def test_secaggplus_quantisation_error_matches_the_documented_bound() -> None:
    """Replays the client/server arithmetic of flwr's SecAgg+ without masks (they cancel)."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    clip, levels, max_weight = 0.05, 2**22, 1000.0
    rng = np.random.default_rng(0)
    deltas = [rng.normal(0, 0.01, size=20000) for _ in range(3)]
    weights = [2, 3, 1]
    q_ratios = [round(n / max_weight * levels) for n in weights]
    summed = sum(quantize([d * (q / levels)], clip, levels)[0].astype(np.int64)
                 for d, q in zip(deltas, q_ratios))
    mean = dequantize([summed], clip, levels)[0] + (len(deltas) - 1) * -clip
    mean *= levels / sum(q_ratios)
    exact = sum(n * d for n, d in zip(weights, deltas)) / sum(weights)
    err = mean - exact
    # Stochastic rounding: variance 1/6 level^2 per client; see docs/deploy-notes.md.
    predicted_std = (2 * clip / levels) * np.sqrt(len(deltas) / 6) * max_weight / sum(weights)
    assert abs(err.mean()) < 5 * predicted_std / np.sqrt(err.size)  # unbiased
    assert 0.7 * predicted_std < err.std() < 1.3 * predicted_std
