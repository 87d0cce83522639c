"""Real deployments on loopback: ``fedpeft server`` and three ``fedpeft client`` processes.

Each test starts the SuperLink (through ``fedpeft server``) and one SuperNode per site (through
``fedpeft client``) on 127.0.0.1 and runs the tiny model: TLS with site keys (an unregistered
site is refused) must give the simulation's adapter bit for bit; SecAgg+ must stay within its
documented error; a site killed mid-round must leave the round to the other two. Every wait is
bounded and every process is stopped at the end; about 1.5-2 minutes each on 2 busy cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from deploy_helpers import SITE_ENV, checkpoint, max_abs_diff, tiny_job, torch_threads
from safetensors.torch import load_file

from fedpeft.adapters import state_nbytes
from fedpeft.config import dump_config, validate_tree
from fedpeft.deploy.loopback import Loopback
from fedpeft.deploy.secagg import error_bound
from fedpeft.deploy.settings import SecAggConfig
from fedpeft.deploy.tls import fingerprint, make_node_keys
from fedpeft.io_utils import read_jsonl
from fedpeft.simulation import run_job

RUN_TIMEOUT_S = 300  # bound on one deployment, on a loaded 2-core machine
SECAGG_FINAL_TOLERANCE = 1e-4  # docs/deploy-notes.md, section 5: two rounds of this job


def _server_job(sites, test) -> dict:
    """The simulation's job without the site files: the server never learns them."""
    job = tiny_job(sites, test)
    job["data"] = {k: v for k, v in job["data"].items() if k != "client_files"}
    return job


def _run(lb: Loopback) -> str:
    """Wait for the server; return its output (for assertion messages)."""
    code = lb.wait_server(RUN_TIMEOUT_S)
    output = lb.log("server").read_text(errors="replace")
    assert code == 0, f"fedpeft server exited with {code}:\n{output[-4000:]}"
    return output


def _simulated_and_deployed(sites, test, tmp_path: Path, **sections: dict):  # noqa: ANN001
    """The simulation of the tiny job with ``sections`` merged in, and its run folder deployed on loopback."""
    job, server_job = tiny_job(sites, test), _server_job(sites, test)
    for tree in (job, server_job):
        for key, update in sections.items():
            tree[key].update(update)
    with torch_threads(1):
        sim = run_job(validate_tree({**job, "workspace": str(tmp_path / "sim-ws"), "run_id": "sim"}))
    with Loopback(tmp_path, server_job, sites, env=SITE_ENV,
                  deploy={"round_timeout_s": 150, "wait_for_sites_s": 150}) as lb:
        lb.start()
        _run(lb)
    return sim, lb.run_dir


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
def test_tls_with_site_keys_equals_the_simulation_bit_for_bit_and_refuses_an_unknown_site(
        sites_and_test, simulation, tmp_path):
    sites, test = sites_and_test
    intruder = make_node_keys(tmp_path / "intruder-keys", "intruder")
    deploy = {"round_timeout_s": 150, "wait_for_sites_s": 150}
    with Loopback(tmp_path, _server_job(sites, test), sites, tls=True, authenticate=True, env=SITE_ENV,
                  deploy=deploy) as lb:
        lb.start()
        lb.start_site("intruder", data=sites["site-a"], key=intruder)
        output = _run(lb)
    assert all(p.poll() is not None for p in lb.procs.values()), "processes left running"
    # The unregistered site was refused, on both sides, with a line that says so.
    assert "the server refused site intruder: its public key is not registered" in " ".join(
        lb.log("intruder").read_text().split())
    assert f"refused a site whose public key is not registered ({fingerprint(intruder.public_key.read_bytes())})" \
        in " ".join(output.split())
    assert "INSECURE" not in output

    run = lb.run_dir
    for rnd in (1, 2):
        assert max_abs_diff(checkpoint(simulation.path, rnd), checkpoint(run, rnd)) == 0.0, rnd
    ours = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(simulation.path / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert {p.name for p in simulation.path.iterdir()} <= {p.name for p in run.iterdir()}

    sim_rounds = [r for r in read_jsonl(simulation.metrics_file) if r["event"] == "round"]
    state_bytes = state_nbytes(checkpoint(run, 1))
    for s, d in zip(sim_rounds, read_jsonl(run / "metrics.jsonl"), strict=True):
        assert [c["client_id"] for c in d["clients"]] == list(sites)
        assert [c["train_loss"] for c in d["clients"]] == [c["train_loss"] for c in s["clients"]]
        for site in d["clients"]:  # each site's traffic: the fp32 state plus headers, both ways
            assert state_bytes < site["bytes_down"] < 1.2 * state_bytes + 4096
            assert state_bytes < site["bytes_up"] < 1.2 * state_bytes + 4096
        assert d["bytes_down"] == sum(c["bytes_down"] for c in d["clients"])

    # Nothing of a site's data reached the server: no path, no row.
    site_text = [str(p) for p in sites.values()]
    site_text += [json.loads(line)["question"] for line in sites["site-a"].read_text().splitlines()]
    for path in _files_under(run):
        text = path.read_text(errors="replace") if path.suffix in {".json", ".jsonl", ".yaml", ".log", ".toml"} else ""
        assert not any(t in text for t in site_text), path
    # Flower's files stayed in the run folder and the sites' workspaces.
    assert any((run / "flower" / "flwr-home" / "superlink" / "apps").iterdir())
    for name in sites:
        assert any((tmp_path / "sites" / name / "flwr-home" / "apps").iterdir())


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
def test_plain_deployment_with_compressed_updates_equals_the_simulation_bit_for_bit(sites_and_test, tmp_path):
    # nf4 updates up, fp16 adapter down: the codecs' arrays (uint8, float16) cross Flower and the
    # site's trainer process as they are; plain fp32 is the TLS test's.
    # Per-site scores too (data.client_test_ratio): each site scores its own slice and sends numbers.
    sites, test = sites_and_test
    compression = {"up": {"name": "nf4"}, "down": {"name": "fp16"}}
    sim, deployed = _simulated_and_deployed(sites, test, tmp_path, federation={"compression": compression},
                                            data={"client_test_ratio": 0.25},
                                            eval={"zero_shot": True, "site_finetune_steps": 1})  # personalised too
    for rnd in (1, 2):
        assert max_abs_diff(checkpoint(sim.path, rnd), checkpoint(deployed, rnd)) == 0.0, rnd
    measured = ("eval_seconds", "peak_memory_bytes")
    scores = [{n: {k: v for k, v in s.items() if k not in measured} for n, s in r["sites"].items()}
              for r in read_jsonl(deployed / "metrics.jsonl") if "sites" in r]
    expected = [{n: {k: v for k, v in s.items() if k not in measured} for n, s in r["sites"].items()}
                for r in read_jsonl(sim.metrics_file) if "sites" in r]
    # zero-shot and after round 2, site i as client i, bit for bit
    assert len(scores) == 2 and [list(r.values()) for r in scores] == [list(r.values()) for r in expected]
    assert list(scores[0]) == list(sites) and all(s["heldout_loss"] > 0 and s["n"] > 0 for s in scores[1].values())
    assert all("personal/heldout_loss" in s for s in scores[1].values())  # trained and scored on the site
    records = [r for r in read_jsonl(deployed / "metrics.jsonl") if r["event"] == "round"]
    assert [r["dropped"] for r in records] == [[], []] and not any(r["secure_aggregation"] for r in records)
    fp32 = 3 * state_nbytes(checkpoint(sim.path, 1))  # three sites, each way
    # as Flower counts them (message bytes: .npy headers and the job's config weigh on the tiny model's
    # small tensors): below the bare fp32 payload both ways, the nf4 updates below the fp16 broadcast
    assert records[0]["bytes_up"] < records[0]["bytes_down"] < fp32


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
@pytest.mark.parametrize("federation", [
    # FlexLoRA: ranks 1, 2, 4 per site, the exact mean product refactorised to each rank; top-k 50 %
    # updates with the residual kept on each site (error feedback across the two rounds). The rules
    # that hold every update (median, ...) are equal bit for bit in test_server_loop.py, without Flower.
    {"aggregation": {"name": "svd"}, "client_ranks": [1, 2, 4], "compression": {"up": {"name": "topk", "fraction": 0.5}}},
], ids=["svd-ranks-topk"])
def test_lora_aware_rules_ranks_and_codecs_over_flower_equal_the_simulation_bit_for_bit(sites_and_test, tmp_path,
                                                                                          federation):
    sites, test = sites_and_test
    sim, deployed = _simulated_and_deployed(sites, test, tmp_path, federation=federation)
    for rnd in (1, 2):
        assert max_abs_diff(checkpoint(sim.path, rnd), checkpoint(deployed, rnd)) == 0.0, rnd
    records = [r for r in read_jsonl(deployed / "metrics.jsonl") if r["event"] == "round"]
    assert [len(r["clients"]) for r in records] == [3, 3] and [r["dropped"] for r in records] == [[], []]
    if "client_ranks" in federation:  # the rank-1 site sent a quarter of the rank-4 site's values
        up = {c["client_id"]: c["bytes_up"] for c in records[0]["clients"]}
        assert up["site-a"] < up["site-b"] < up["site-c"]


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
def test_a_site_crashing_mid_round_leaves_the_round_to_the_other_two(sites_and_test, tmp_path):
    sites, test = sites_and_test
    job = _server_job(sites, test)
    job["federation"] = {**job["federation"], "rounds": 1}
    deploy = {"round_timeout_s": 45, "wait_for_sites_s": 150}  # the crashed site costs one timeout
    with Loopback(tmp_path, job, sites, env=SITE_ENV, deploy=deploy) as lb:
        lb.start()
        # site-c has pulled its task: crash it (client, SuperNode, trainer) before it can answer.
        assert lb.wait_for_log("site-c", "Receiving: train message", RUN_TIMEOUT_S)
        lb.kill_site("site-c")
        _run(lb)
    (record,) = read_jsonl(lb.run_dir / "metrics.jsonl")
    assert [c["client_id"] for c in record["clients"]] == ["site-a", "site-b"]
    (dropped,) = record["dropped"]
    assert dropped["client"] == "site-c" and "no reply within 45s" in dropped["reason"]
    assert (lb.run_dir / "adapter" / "adapter_model.safetensors").is_file()


def _replay_round_two(job: dict, deployed: Path, workspace: Path) -> Path:
    """The simulation's round 2 started from the deployment's round-1 checkpoint (exact means)."""
    cfg = validate_tree({**job, "workspace": str(workspace), "run_id": "replay"})
    run = workspace / job["job"] / "replay"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    shutil.copytree(deployed / "checkpoints" / "round-0001", run / "checkpoints" / "round-0001")
    (run / "checkpoints" / "latest").write_text("round-0001\n")
    meta_file = run / "checkpoints" / "round-0001" / "checkpoint.json"  # a replay on the sites' files, on purpose:
    meta = json.loads(meta_file.read_text())  # drop the deployment's config and data fingerprints
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("config", "data")}))
    with torch_threads(1):
        return run_job(None, resume=run).path


@pytest.mark.timeout(RUN_TIMEOUT_S + 180)
def test_secure_aggregation_stays_within_the_documented_error(sites_and_test, simulation, tmp_path):
    sites, test = sites_and_test
    secagg = SecAggConfig(enabled=True, clipping_range=0.05, max_weight=6)  # 6 = largest site
    deploy = {"round_timeout_s": 150, "wait_for_sites_s": 150,
              "secure_aggregation": secagg.model_dump(mode="json")}
    with Loopback(tmp_path, _server_job(sites, test), sites, env=SITE_ENV, deploy=deploy) as lb:
        lb.start()
        _run(lb)
    records = read_jsonl(lb.run_dir / "metrics.jsonl")
    sizes = [c["num_examples"] for c in records[0]["clients"]]
    assert sizes == [4, 6, 3] and all(r["secure_aggregation"] for r in records)
    assert all(c["secagg_clipped"] == 0 for r in records for c in r["clients"])
    # |w_i * delta| <= clip for every value (nothing clipped), so |delta| <= clip * max_weight / n_i.
    max_delta = secagg.clipping_range * secagg.max_weight / min(sizes)

    def bound(state: dict) -> float:
        return error_bound(secagg, sizes, max_delta, max(v.abs().max().item() for v in state.values()))

    # Each round's secure mean is within the bound of the exact mean of the same updates.
    sim1 = checkpoint(simulation.path, 1)
    assert max_abs_diff(checkpoint(lb.run_dir, 1), sim1) <= bound(sim1)
    replay2 = checkpoint(_replay_round_two(tiny_job(sites, test), lb.run_dir, tmp_path / "replay"), 2)
    assert max_abs_diff(checkpoint(lb.run_dir, 2), replay2) <= bound(replay2)
    # Round 2 trains from a slightly different state, so the final adapter may drift further.
    assert max_abs_diff(checkpoint(lb.run_dir, 2), checkpoint(simulation.path, 2)) <= SECAGG_FINAL_TOLERANCE
    state_bytes = state_nbytes(sim1)
    for site in records[0]["clients"]:  # masked int64 vectors: about twice the fp32 state
        assert site["bytes_up"] > 1.5 * state_bytes


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 180)
@pytest.mark.parametrize("privacy, secure", [
    ({"level": "client", "target_epsilon": 8.0, "clip_norm": 0.05}, True),  # noise shares under SecAgg+
    ({"level": "example", "target_epsilon": 8.0}, False),  # DP-SGD on every site
], ids=["client-level-secagg", "example-level"])
def test_a_dp_deployment_reports_the_epsilon_of_the_simulation(sites_and_test, tmp_path, privacy, secure):
    sites, test = sites_and_test
    deploy = {"round_timeout_s": 150, "wait_for_sites_s": 150}
    if secure:
        deploy["secure_aggregation"] = SecAggConfig(enabled=True, clipping_range=0.5, max_weight=1).model_dump(
            mode="json")
    with Loopback(tmp_path / "lb", {**_server_job(sites, test), "privacy": privacy}, sites, env=SITE_ENV,
                  deploy=deploy) as lb:
        lb.start()
        _run(lb)
    sim = run_job(validate_tree({**tiny_job(sites, test), "privacy": privacy, "workspace": str(tmp_path / "sim")}))
    deployed, simulated = read_jsonl(lb.run_dir / "metrics.jsonl"), read_jsonl(sim.metrics_file)
    assert [r["epsilon"] for r in deployed] == pytest.approx([r["epsilon"] for r in simulated])
    assert json.loads((lb.run_dir / "summary.json").read_text())["epsilon"] == pytest.approx(
        sim.read_summary()["epsilon"]) and 7.9 < sim.read_summary()["epsilon"] <= 8.0
    assert all(r["secure_aggregation"] == secure and not r["dropped"] for r in deployed)
    if privacy["level"] == "client":  # equal weights; each site clipped its own delta
        assert all(c["num_examples"] == 1 for r in deployed for c in r["clients"])
    else:
        assert all(c["dp_steps"] > 0 for r in deployed for c in r["clients"])
