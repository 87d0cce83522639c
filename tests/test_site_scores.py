"""Per-site scores (data.client_test_ratio) in the simulation: each client's own held-out slice,
scored at zero-shot and every evaluation; mean and worst site in the eval record and summary."""

from __future__ import annotations

import json

import pytest

from fedpeft.config import validate_tree
from fedpeft.data.federated import prepare_data
from fedpeft.errors import ConfigError
from fedpeft.simulation import run_job
from fedpeft.site_scores import summarize
from tests.tiny_jobs import tiny_job

SITE_EVAL = {"every": 1, "zero_shot": True, "max_new_tokens": 2, "metrics": ["rougeL"], "heldout_loss": True,
             "max_samples": 1, "site_max_samples": 1}


def _job(tmp_path, **data):  # noqa: ANN001, ANN202
    job = tiny_job("sites", eval=SITE_EVAL)
    job["data"].update(data)
    return validate_tree({**job, "workspace": str(tmp_path)})


def test_each_client_holds_out_a_slice_of_its_own_rows(tmp_path):
    without = prepare_data(_job(tmp_path))
    data = prepare_data(_job(tmp_path, client_test_ratio=0.25))
    assert without.client_test_rows == []
    for whole, train, held in zip(without.client_rows, data.client_rows, data.client_test_rows):
        assert held and abs(len(held) - len(whole) * 0.25) <= 3  # about a quarter (whole focus groups)
        assert sorted(map(json.dumps, train + held)) == sorted(map(json.dumps, whole))  # a split of that client's rows
        assert {r["focus"] for r in train}.isdisjoint({r["focus"] for r in held})  # by data.split_by, like data.test


@pytest.fixture(scope="module")
def site_runs(tmp_path_factory):
    """The same job run twice with per-site scores: global only, and with 3 personalisation steps."""
    tmp = tmp_path_factory.mktemp("sites")
    job = tiny_job("sites", eval=SITE_EVAL)
    job["data"]["client_test_ratio"] = 0.25
    plain = run_job(validate_tree({**job, "workspace": str(tmp / "a")}))
    job["eval"] = {**SITE_EVAL, "site_finetune_steps": 3}
    return plain, run_job(validate_tree({**job, "workspace": str(tmp / "b")}))


def test_sites_are_scored_at_zero_shot_and_every_evaluation(site_runs):
    run = site_runs[0]
    records = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "sites" in r]
    assert [r["round"] for r in evaluated] == [0, 1, 2]
    for r in evaluated:
        sites = r["sites"]
        assert sorted(sites) == ["client-0", "client-1"]
        assert all(s["n"] > 0 and s["heldout_loss"] > 0 and "rougeL" in s for s in sites.values())
        losses = [s["heldout_loss"] for s in sites.values()]
        assert r["eval"]["site_worst/heldout_loss"] == max(losses)
        assert r["eval"]["site_mean/heldout_loss"] == pytest.approx(sum(losses) / 2)
        assert r["eval"]["site_worst/rougeL"] == min(s["rougeL"] for s in sites.values())
        assert "heldout_loss" in r["eval"]  # the global test set is scored as before
    assert evaluated[0]["sites"] != evaluated[-1]["sites"]  # the adapter trained in between
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["final"]["site_worst/heldout_loss"] == evaluated[-1]["eval"]["site_worst/heldout_loss"]
    assert summarize(evaluated[-1]["sites"]) == {k: v for k, v in evaluated[-1]["eval"].items() if k.startswith("site_")}


def test_without_the_ratio_nothing_is_scored_per_site(tmp_path):
    job = tiny_job("sites", eval={**SITE_EVAL, "every": 0})
    run = run_job(validate_tree({**job, "workspace": str(tmp_path)}))
    records = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert not any("sites" in r or any(k.startswith("site_") for k in r.get("eval", {})) for r in records)


def test_a_ratio_with_nothing_to_score_is_a_config_error(tmp_path):
    job = tiny_job("sites", eval={**SITE_EVAL, "heldout_loss": False, "site_max_samples": 0})
    job["data"]["client_test_ratio"] = 0.2
    with pytest.raises(ConfigError, match="client_test_ratio"):
        validate_tree({**job, "workspace": str(tmp_path)})


def test_personalised_scores_leave_the_global_run_as_it_was(site_runs, tmp_path):
    plain, personal = site_runs
    last = [[json.loads(x) for x in (r.path / "metrics.jsonl").read_text().splitlines()][-1] for r in site_runs]
    for before, after in zip(last[0]["sites"].values(), last[1]["sites"].values()):
        assert after["heldout_loss"] == before["heldout_loss"]  # the global adapter is scored as without
        assert after["personal/heldout_loss"] != after["heldout_loss"]  # 3 local steps changed the adapter
        assert "personal/rougeL" in after and "personal/eval_seconds" not in after
    assert last[1]["eval"]["site_worst/personal/heldout_loss"] == max(
        s["personal/heldout_loss"] for s in last[1]["sites"].values())
    adapters = [(r.path / "adapter" / "adapter_model.safetensors").read_bytes() for r in (plain, personal)]
    assert adapters[0] == adapters[1]  # the personalised adapters stay where they were made
    job = tiny_job("sites", eval={**SITE_EVAL, "site_finetune_steps": 3})
    job["data"]["client_test_ratio"] = 0.0
    with pytest.raises(ConfigError, match="site_finetune_steps"):
        validate_tree({**job, "workspace": str(tmp_path)})


def test_a_site_whose_score_does_not_come_back_is_named_beside_the_summary(tmp_path):
    from types import SimpleNamespace

    from fedpeft.rounds import score_sites

    cfg = SimpleNamespace(data=SimpleNamespace(client_test_ratio=0.25))
    pool = SimpleNamespace(client_ids=["a", "b", "c"],
                           evaluate_sites=lambda rnd, state: {"a": {"n": 2, "heldout_loss": 1.0},
                                                              "c": {"n": 2, "heldout_loss": 3.0}})
    record: dict = {}
    summary = score_sites(cfg, pool, 1, None, record)
    assert record["sites_missing"] == summary["sites_missing"] == ["b"]  # in metrics.jsonl and summary.json
    assert summary["site_worst/heldout_loss"] == 3.0 and summary["site_mean/heldout_loss"] == 2.0
    full = {}
    pool.evaluate_sites = lambda rnd, state: {n: {"n": 2, "heldout_loss": 1.0} for n in "abc"}
    assert "sites_missing" not in score_sites(cfg, pool, 1, None, full) and "sites_missing" not in full
