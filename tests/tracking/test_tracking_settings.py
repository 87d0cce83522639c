"""The ``tracking`` section: backend names against the registry, and a whole job that uses it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fedpeft.config import JobConfig
from fedpeft.tracking.settings import TrackingConfig

WIRED = pytest.mark.skipif("tracking" not in JobConfig.model_fields,
                           reason="JobConfig has no tracking section yet (fedpeft/config.py)")


def test_the_list_form_names_the_backends():
    assert TrackingConfig.model_validate(["tensorboard", "mlflow"]).backends == ["tensorboard", "mlflow"]
    assert TrackingConfig().backends == []


def test_an_unknown_backend_says_the_closest_and_every_valid_name():
    with pytest.raises(ValidationError, match=r"unknown tracker 'tensorbord'\. Did you mean 'tensorboard'\?"
                                              r" Valid names: mlflow, tensorboard"):
        TrackingConfig(backends=["tensorbord"])


def test_a_backend_listed_twice_is_refused():
    with pytest.raises(ValidationError, match="'mlflow' listed more than once"):
        TrackingConfig(backends=["mlflow", "tensorboard", "mlflow"])


def test_an_mlflow_uri_without_the_mlflow_backend_is_refused():
    with pytest.raises(ValidationError, match="mlflow_uri is set .* but 'mlflow' is not among the backends"):
        TrackingConfig(backends=["tensorboard"], mlflow_uri="sqlite:///m.db")


@WIRED
def test_a_job_with_a_misspelt_backend_is_one_config_error_with_its_yaml_path():
    from tiny_jobs import tiny_job

    from fedpeft.config import validate_tree
    from fedpeft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tracking.*Did you mean 'mlflow'"):
        validate_tree({**tiny_job("t"), "tracking": {"backends": ["mlfow"]}})


@WIRED
def test_a_tracked_run_killed_before_its_checkpoint_and_resumed(tmp_path, monkeypatch):
    """A real 2-round run with both backends, killed after logging round 2 (before checkpointing
    it) and resumed: each store holds every round once, TensorBoard the values of metrics.jsonl."""
    import json

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tiny_jobs import tiny_job

    import fedpeft.rounds
    from fedpeft.config import validate_tree
    from fedpeft.errors import RunInterrupted
    from fedpeft.io_utils import read_jsonl
    from fedpeft.simulation import run_job

    real = fedpeft.rounds.save_checkpoint

    def killed_at_round_2(path, rnd, *args, **kwargs):
        if rnd == 2:
            raise KeyboardInterrupt
        return real(path, rnd, *args, **kwargs)

    job = {**tiny_job("trk"), "workspace": str(tmp_path), "run_id": "r", "tracking": ["tensorboard", "mlflow"]}
    monkeypatch.setattr(fedpeft.rounds, "save_checkpoint", killed_at_round_2)
    with pytest.raises(RunInterrupted):
        run_job(validate_tree(job))
    monkeypatch.setattr(fedpeft.rounds, "save_checkpoint", real)
    run = run_job(None, resume=tmp_path / "trk" / "r")

    records = read_jsonl(run.metrics_file)
    assert [r["round"] for r in records] == [1, 2]
    acc = EventAccumulator(str(run.path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train_loss")] == [
        (r["round"], pytest.approx(r["train_loss"], rel=1e-6)) for r in records]
    client = MlflowClient((run.path / "mlruns").as_uri())
    mlflow_run = client.get_run(json.loads((run.path / "mlflow_run.json").read_text())["run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "r"
    for key in ("train_loss", "clients/client-0/train_loss", "bytes_up"):
        assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, key)] == [1, 2]
