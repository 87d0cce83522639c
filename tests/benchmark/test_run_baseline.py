"""``fedpeft run JOB --baseline NAME``: one baseline arm alone, in normal run folders named after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_jobs import tiny_job

from fedpeft.cli import main
from fedpeft.io_utils import read_jsonl

EVAL = {"every": 0, "zero_shot": True, "max_new_tokens": 2, "metrics": ["rougeL"], "heldout_loss": True}


@pytest.fixture
def job(tmp_path: Path) -> Path:
    """2 clients x 1 round, one optimizer step per client: the federated run takes 2 steps in all."""
    tree = {**tiny_job("base", eval=EVAL), "workspace": str(tmp_path / "ws")}
    tree["federation"] = {**tree["federation"], "rounds": 1}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(tree))
    return tmp_path / "job.yaml"


def _runs(job: Path, prefix: str) -> list[Path]:
    return sorted(p for p in (job.parent / "ws" / "base").iterdir() if p.name.startswith(prefix))


def test_centralized_run_trains_all_rows_as_one_client_with_the_federated_step_budget(job, capsys):
    assert main(["run", str(job), "--baseline", "centralized"]) == 0
    (run,) = _runs(job, "centralized-")
    partitions = json.loads((run / "partitions.json").read_text())
    (record,) = read_jsonl(run / "metrics.jsonl")  # no zero-shot round: that is the zero_shot baseline's
    (client,) = record["clients"]
    assert client["client_id"] == "central" and client["steps"] == 2  # both clients' one step each
    assert client["num_examples"] == partitions[0]["size"] > 0
    assert record["eval"]["heldout_loss"] > 0 and len(read_jsonl(run / "predictions.jsonl")) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_clients"] == 1 and summary["final"]["rougeL"] == record["eval"]["rougeL"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert f"fedpeftresults:{run}" in "".join(capsys.readouterr().out.split())  # rich wraps long lines


def test_local_only_makes_one_run_per_client_and_prints_the_mean_and_worst_client(job, capsys):
    assert main(["run", str(job), "--baseline", "local_only"]) == 0
    runs = _runs(job, "local_only-")
    assert [r.name.rsplit("-", 2)[-2:] for r in runs] == [["client", "0"], ["client", "1"]]
    losses = []
    for i, run in enumerate(runs):
        (record,) = read_jsonl(run / "metrics.jsonl")
        assert [c["client_id"] for c in record["clients"]] == [f"client-{i}"]
        losses.append(json.loads((run / "summary.json").read_text())["final"]["heldout_loss"])
    assert losses[0] != losses[1]  # premise: the clients' runs differ
    rows = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.count("│") > 2}
    assert f"{max(losses):.4f}" in rows["worst"] and f"{sum(losses) / 2:.4f}" in rows["mean"]


def test_zero_shot_run_scores_the_base_model_under_the_jobs_run_id(job, capsys):
    tree = yaml.safe_load(job.read_text())
    job.write_text(yaml.safe_dump({**tree, "run_id": "r7"}))
    assert main(["run", str(job), "--baseline", "zero_shot"]) == 0
    (run,) = _runs(job, "r7")
    assert run.name == "r7-zero_shot"
    (record,) = read_jsonl(run / "metrics.jsonl")
    assert record["round"] == 0 and record["zero_shot"] and record["eval"]["heldout_loss"] > 0
    assert len(read_jsonl(run / "predictions_zero_shot.jsonl")) == 2
    assert "zero-shot" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--baseline", "centralised"], "--baseline: unknown baseline 'centralised'; did you mean 'centralized'?"),
    (["--baseline", "local_only", "--resume", "ws/base/r1"], "to continue one, give its folder alone"),
])
def test_baseline_errors_are_one_line(job, capsys, args, message):
    assert main(["run", str(job), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0
    assert not (job.parent / "ws").exists()


def test_baselines_are_scored_on_the_sites_own_slices(job, tmp_path):
    tree = yaml.safe_load(job.read_text())
    tree["data"]["client_test_ratio"] = 0.25  # per-site scores
    job.write_text(yaml.safe_dump(tree))
    assert main(["run", str(job), "--baseline", "centralized"]) == 0
    assert main(["run", str(job), "--baseline", "local_only"]) == 0
    (central,) = _runs(job, "centralized-")
    (record,) = read_jsonl(central / "metrics.jsonl")
    assert sorted(record["sites"]) == ["client-0", "client-1"]  # one client, scored on every site's slice
    for i, run in enumerate(_runs(job, "local_only-")):  # each client alone, on its own slice only
        (own,) = read_jsonl(run / "metrics.jsonl")
        assert list(own["sites"]) == [f"client-{i}"]
        assert own["sites"][f"client-{i}"]["n"] == record["sites"][f"client-{i}"]["n"] > 0
        final = json.loads((run / "summary.json").read_text())["final"]
        assert final["site_worst/heldout_loss"] == own["sites"][f"client-{i}"]["heldout_loss"]


@pytest.mark.parametrize("name, prefix", [("centralized", "centralized-"), ("local_only", "local_only-")])
def test_a_baseline_run_resumes_on_its_arms_data_bit_for_bit(job, name, prefix):
    import shutil

    from safetensors.torch import load_file

    tree = yaml.safe_load(job.read_text())
    tree["federation"]["rounds"] = 2
    job.write_text(yaml.safe_dump(tree))
    assert main(["run", str(job), "--baseline", name]) == 0
    assert main(["run", str(job), "--baseline", name]) == 0
    runs = _runs(job, prefix)  # timestamps sort; local_only: client-0, client-1 of each
    part, full = runs[0], runs[len(runs) // 2]  # the first client of each
    assert json.loads((part / "baseline.json").read_text())["baseline"] == name
    (part / "checkpoints" / "latest").write_text("round-0001\n")  # a crash after round 1
    shutil.rmtree(part / "checkpoints" / "round-0002")
    assert main(["run", "--resume", str(part)]) == 0  # a one-client config alone would fail: "data differ"
    a, b = (load_file(str(r / "checkpoints" / "round-0002" / "global_state.safetensors")) for r in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["round"] for r in read_jsonl(part / "metrics.jsonl")] == [1, 2]


def test_a_zero_shot_baseline_has_nothing_to_resume(job, capsys):
    assert main(["run", str(job), "--baseline", "zero_shot"]) == 0
    (run,) = _runs(job, "zero_shot-")
    assert main(["run", "--resume", str(run)]) == 2
    assert "nothing to resume" in capsys.readouterr().err
