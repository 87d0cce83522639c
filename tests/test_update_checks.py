"""Faulty client updates are dropped with a reason, never averaged into the global adapter."""

from __future__ import annotations

import math

import pytest
import torch

import fedpeft.simulation as simulation
from fedpeft.config import validate_tree
from fedpeft.errors import AggregationError, RoundError
from fedpeft.io_utils import read_jsonl
from fedpeft.simulation import run_job
from fedpeft.fold import Fold
from fedpeft.state import ClientUpdate
from fedpeft.update_checks import check_global, check_secure_mean
from tiny_jobs import tiny_job

G = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}


def _fold(*states, max_norm=None) -> Fold:
    fold = Fold(G, [f"c{i}" for i in range(len(states))], max_norm=max_norm, where="[round 1/1]")
    for i, s in enumerate(states):
        fold.add(ClientUpdate(f"c{i}", s, 10))
    return fold


def test_the_fold_drops_each_kind_of_faulty_update_and_keeps_the_good_ones():
    good = {"a": torch.ones(2, 2), "b": torch.ones(3)}
    nan = {"a": torch.full((2, 2), math.nan), "b": torch.ones(3)}
    inf = {"a": torch.ones(2, 2), "b": torch.tensor([1.0, math.inf, 0.0])}
    shape = {"a": torch.ones(2, 3), "b": torch.ones(3)}
    missing = {"a": torch.ones(2, 2)}
    huge = {"a": torch.full((2, 2), 1e12), "b": torch.ones(3)}
    fold = _fold(good, nan, inf, shape, missing, huge, max_norm=100.0)
    assert fold.accepted == ["c0"]
    assert torch.equal(fold.result()[1]["a"], torch.ones(2, 2))  # only the good one was summed
    reasons = {d["client"]: d["reason"] for d in fold.dropped}
    assert set(reasons) == {"c1", "c2", "c3", "c4", "c5"}
    assert "non-finite" in reasons["c1"] and "non-finite" in reasons["c2"]
    assert "shape" in reasons["c3"] and "missing ['b']" in reasons["c4"]
    assert "exceeds federation.max_update_norm=100" in reasons["c5"]


def test_without_a_norm_bound_a_large_finite_update_passes():
    huge = {"a": torch.full((2, 2), 1e12), "b": torch.ones(3)}
    assert _fold(huge).accepted == ["c0"]


def test_a_non_finite_secure_mean_or_global_state_stops_the_run():
    with pytest.raises(AggregationError, match="securely aggregated mean"):
        check_secure_mean({"a": torch.full((2, 2), math.nan), "b": torch.zeros(3)}, "r")
    with pytest.raises(AggregationError, match="last good checkpoint is round 2"):
        check_global({"a": torch.tensor([math.inf])}, 3)


JOB = tiny_job("faulty", seed=1, clients=3)


def _nan_client(monkeypatch, bad: str, value: float = math.nan):
    real = simulation.fit

    def fit(model, examples, cfg, state, **kw):
        update = real(model, examples, cfg, state, **kw)
        if kw["client_id"] == bad:
            update.state = {k: torch.full_like(v, value) for k, v in update.state.items()}
        return update

    monkeypatch.setattr(simulation, "fit", fit)


@pytest.mark.parametrize("aggregation", ["fedavg", "fedavgm", "fedadam"])
def test_a_client_sending_nan_is_dropped_and_the_run_stays_finite(tmp_path, monkeypatch, aggregation):
    _nan_client(monkeypatch, "client-1")
    job = {**JOB, "workspace": str(tmp_path), "federation": {**JOB["federation"], "aggregation": {"name": aggregation}}}
    run = run_job(validate_tree(job))
    records = [r for r in read_jsonl(run.metrics_file) if r["event"] == "round"]
    for r in records:
        assert [c["client_id"] for c in r["clients"]] == ["client-0", "client-2"]
        (dropped,) = r["dropped"]
        assert dropped["client"] == "client-1" and "non-finite" in dropped["reason"]
    from safetensors.torch import load_file

    final = load_file(str(run.path / "checkpoints" / "round-0002" / "global_state.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


def test_too_few_usable_updates_stop_the_run_naming_the_clients(tmp_path, monkeypatch):
    _nan_client(monkeypatch, "client-1")
    job = {**JOB, "workspace": str(tmp_path), "federation": {**JOB["federation"], "min_clients": 3}}
    with pytest.raises(RoundError, match=r"only 2 usable update\(s\).*client-1: rejected update: non-finite"):
        run_job(validate_tree(job))


def test_a_nan_training_loss_is_an_error_naming_the_client(tiny_model, tokenizer):
    from fedpeft.adapters import get_trainable_state
    from fedpeft.config import TrainConfig
    from fedpeft.data.prompts import tokenize_examples
    from fedpeft.errors import TrainingError
    from fedpeft.peft_methods import build_peft_method, wrap_model
    from fedpeft.trainer import fit

    model = wrap_model(tiny_model, build_peft_method("lora", {"r": 2}))
    state = get_trainable_state(model)
    state = {k: torch.full_like(v, math.nan) if "lora_A" in k else v for k, v in state.items()}
    examples = tokenize_examples(tokenizer, [{"question": "q?", "answer": "a."}] * 2, 32)
    with pytest.raises(TrainingError, match="client site-x: the training loss is nan"):
        fit(model, examples, TrainConfig(max_steps=1, batch_size=2), state, seed=0,
            pad_token_id=tokenizer.pad_token_id, client_id="site-x", progress=False)
