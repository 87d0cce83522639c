"""Client-level DP (clip + noise shares) and a run's privacy budget: per round, in the summary, on resume."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.config import PrivacyConfig, validate_tree
from fedpeft.io_utils import read_jsonl
from fedpeft.privacy.accounting import epsilon
from fedpeft.privacy.client_level import delta_norm, private_seed, release
from fedpeft.privacy.ledger import Ledger, resolve_noise
from fedpeft.simulation import run_job
from tiny_jobs import tiny_job


def _state(scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(40, 30, generator=g) * scale, "b": torch.randn(500, generator=g) * scale}


def test_client_level_clipping_bounds_every_update_and_leaves_small_ones_alone():
    old = {k: torch.zeros_like(v) for k, v in _state(1.0).items()}
    no_noise = PrivacyConfig(level="client", noise_multiplier=0.0, clip_norm=0.5)
    for scale, clipped in ((10.0, True), (0.001, False)):
        new = _state(scale)
        sent, metrics = release(new, old, no_noise, shares=3, seed=1)
        assert metrics["dp_clipped"] == clipped and metrics["dp_update_norm"] == pytest.approx(delta_norm(new, old), rel=1e-4)
        assert delta_norm(sent, old) == pytest.approx(min(0.5, delta_norm(new, old)), rel=1e-5)


def test_client_level_noise_shares_sum_to_the_configured_std():
    old = {"w": torch.zeros(200_000)}
    privacy = PrivacyConfig(level="client", noise_multiplier=2.0, clip_norm=0.5)
    shares = [release(old, old, privacy, shares=4, seed=s)[0]["w"] for s in range(4)]
    one, total = shares[0].std().item(), torch.stack(shares).sum(0).std().item()
    # each share: 2.0 * 0.5 / sqrt(4) = 0.5; their sum: 2.0 * 0.5 = 1.0 (std error ~0.2 %)
    assert one == pytest.approx(0.5, rel=0.01) and total == pytest.approx(1.0, rel=0.01)
    assert abs(shares[0].mean().item()) < 0.005


def test_a_sites_secret_changes_the_noise_seed_deterministically():
    assert private_seed(7, b"k" * 32) == private_seed(7, b"k" * 32) != private_seed(7, b"j" * 32) != 7


def _run(tmp_path, privacy: dict, rounds: int = 3, **extra):
    tree = tiny_job("dp", clients=3)
    tree.update(workspace=str(tmp_path), privacy=privacy, **extra)
    tree["federation"]["rounds"] = rounds
    run = run_job(validate_tree(tree))
    return run, [r for r in read_jsonl(run.metrics_file) if r.get("event") == "round"], run.read_summary()


def test_client_level_run_reports_epsilon_each_round_with_equal_weights(tmp_path):
    run, records, summary = _run(tmp_path, {"level": "client", "noise_multiplier": 1.0, "clip_norm": 0.1})
    eps = [r["epsilon"] for r in records]
    # 3 of 3 clients each round (q = 1): the plain Gaussian mechanism composed 1, 2, 3 times
    assert eps == pytest.approx([epsilon(1.0, 1.0, k, 1e-5) for k in (1, 2, 3)])
    assert summary["epsilon"] == eps[-1] and summary["privacy"]["level"] == "client"
    assert all(c["num_examples"] == 1 and c["dp_update_norm"] > 0 for r in records for c in r["clients"])
    rebuilt = Ledger(validate_tree({**tiny_job("dp", clients=3), "privacy": {"level": "client",
                                                                            "noise_multiplier": 1.0}}))
    for r in records:
        rebuilt.add(r)
    assert rebuilt.epsilon() == pytest.approx(eps[-1])  # what a resumed run rebuilds


def test_target_epsilon_calibrates_the_noise_before_the_run(tmp_path):
    cfg = validate_tree({**tiny_job("dp", clients=4), "privacy": {"level": "client", "target_epsilon": 8.0},
                         "federation": {"num_clients": 4, "rounds": 3, "clients_per_round": 2}})
    noise = resolve_noise(cfg).privacy.noise_multiplier
    assert 7.99 < epsilon(noise, 0.5, 3, 1e-5) <= 8.0
    _, records, summary = _run(tmp_path, {"level": "client", "target_epsilon": 8.0})
    assert 7.99 < summary["epsilon"] <= 8.0 and len(records) == 3


def test_target_epsilon_with_a_fixed_noise_stops_before_the_round_that_would_exceed_it(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        run, records, summary = _run(tmp_path, {"level": "client", "noise_multiplier": 1.0, "target_epsilon": 8.0})
    assert [r["round"] for r in records] == [1, 2] and summary["privacy"]["stopped_before_round"] == 3
    assert summary["epsilon"] <= 8.0 and "stopping before round 3/3" in caplog.text
    assert (run.path / "adapter" / "adapter_model.safetensors").is_file()


def test_example_level_run_accounts_each_clients_steps(tmp_path):
    _, records, summary = _run(tmp_path, {"level": "example", "noise_multiplier": 1.0}, rounds=2)
    client = records[0]["clients"][0]
    steps, rate = client["dp_steps"], client["dp_sample_rate"]
    assert summary["privacy"]["client_epsilon"][client["client_id"]] == pytest.approx(
        epsilon(1.0, rate, 2 * steps, 1e-5))
    assert summary["epsilon"] == max(summary["privacy"]["client_epsilon"].values())
    assert math.isfinite(summary["epsilon"]) and records[0]["epsilon"] < records[1]["epsilon"]


def test_the_budget_of_unequal_rounds_composes_them(caplog):
    from fedpeft.privacy.accounting import composed_epsilon

    same = composed_epsilon([(1.0, 0.5, 3), (1.0, 0.5, 3)], 1e-5)
    assert same == pytest.approx(epsilon(1.0, 0.5, 6, 1e-5))
    less_noise = composed_epsilon([(1.0, 0.5, 3), (0.7, 0.5, 3)], 1e-5)  # a share of the noise went missing
    assert same < less_noise < epsilon(0.7, 0.5, 6, 1e-5)
    assert composed_epsilon([], 1e-5) == 0.0 and composed_epsilon([(0.0, 0.5, 1)], 1e-5) == math.inf
    assert "epsilon computation" not in caplog.text  # dp_accounting's warnings stay out of the run log
