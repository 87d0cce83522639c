"""TensorBoard and MLflow tracking through RunDir.log_metrics, read back from the stores."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import yaml
from tiny_jobs import tiny_job

from fedpeft.config import JobConfig, dump_config, flatten
from fedpeft.errors import ConfigError
from fedpeft.run_dir import RunDir
from fedpeft.tracking import MLFLOW_RUN_FILE, MLRUNS_DIR, TENSORBOARD_DIR, scalars
from fedpeft.tracking.settings import TrackingConfig

BOTH = TrackingConfig(backends=["tensorboard", "mlflow"])


def _client(i: int, loss: float) -> dict:
    return {"client_id": f"client-{i}", "num_examples": 1, "train_loss": loss, "steps": 1, "seconds": 0.19,
            "tokens_per_s": 1287.9, "device": "cpu", "dp_update_norm": 0.2263, "dp_clipped": 0,
            "dp_shares": 2, "examples": 36 - i, "bytes_down": 16384, "bytes_up": 16384}


def _round(rnd: int, losses: tuple[float, float], epsilon: float, heldout: float) -> dict:
    """A round record as a 2-client run with client-level DP writes it (tiny-random-llama, eval every round)."""
    return {"round": rnd, "event": "round", "seconds": 0.363, "clients": [_client(0, losses[0]), _client(1, losses[1])],
            "dropped": [], "bytes_down": 32768, "bytes_up": 32768, "train_loss": sum(losses) / 2,
            "secure_aggregation": False,
            "privacy": {"level": "client", "delta": 1e-05, "accountant": "rdp", "noise_multiplier": 1.0,
                        "clip_norm": 0.5, "shares": 2, "summed": 2, "effective_noise_multiplier": 1.0},
            "epsilon": epsilon,
            "eval": {"rougeL": 0.25 * rnd, "heldout_loss": heldout, "gen_tokens_per_s": 323.4, "gen_tokens": 4,
                     "eval_seconds": 0.044, "peak_memory_bytes": 726822912}}


ZERO_SHOT = {"round": 0, "event": "eval", "zero_shot": True,
             "eval": {"rougeL": 0.0, "heldout_loss": 10.857765, "gen_tokens_per_s": 97.8, "gen_tokens": 4,
                      "eval_seconds": 0.099, "peak_memory_bytes": 610795520}}
RECORDS = [ZERO_SHOT, _round(1, (10.8168, 10.8185), 4.7285, 10.8040), _round(2, (10.8158, 10.8177), 7.0774, 10.7978)]


@pytest.fixture
def run_path(tmp_path) -> Path:
    """A run folder ``<workspace>/trk/r1`` with the config.yaml of a tiny job (fields checked only:
    the registry checks import every PEFT method)."""
    path = tmp_path / "trk" / "r1"
    path.mkdir(parents=True)
    cfg = JobConfig.model_validate({**tiny_job("trk"), "workspace": str(tmp_path)})
    (path / "config.yaml").write_text(dump_config(cfg))
    return path


def _log(path: Path, records: list[dict], settings: TrackingConfig = BOTH, summary: bool = True) -> RunDir:
    run = RunDir(path, tracking=settings)
    for record in records:
        run.log_metrics(copy.deepcopy(record))
    if summary:
        run.write_summary({})
    run.release()
    return run


def _tensorboard(path: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path / TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow(path: Path, uri: str | None = None):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri or (path / MLRUNS_DIR).as_uri())
    run = client.get_run(json.loads((path / MLFLOW_RUN_FILE).read_text())["run_id"])
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}
    return client, run, history


def _expected() -> dict[str, list[tuple[int, float]]]:
    """Every number of RECORDS by key: [(round, value)]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in RECORDS:
        for key, value in scalars(record).items():
            out.setdefault(key, []).append((record["round"], value))
    return out


def test_a_record_flattens_to_slash_keys_with_per_client_entries():
    got = scalars(RECORDS[1])
    assert got["train_loss"] == pytest.approx(10.81765)
    assert got["clients/client-1/train_loss"] == 10.8185
    assert got["clients/client-0/bytes_up"] == 16384.0
    assert got["eval/rougeL"] == 0.25 and got["epsilon"] == 4.7285
    assert got["privacy/noise_multiplier"] == 1.0
    # the step, the kind of record, strings and booleans are not scalars
    assert not {"round", "event", "secure_aggregation", "privacy/level", "clients/client-0/device"} & set(got)
    assert "zero_shot" not in scalars(ZERO_SHOT) and "clients/client-0/client_id" not in got


def test_tensorboard_holds_every_number_of_every_record_at_its_round(run_path):
    _log(run_path, RECORDS, TrackingConfig(backends=["tensorboard"]))
    got = _tensorboard(run_path)
    expected = _expected()
    assert set(got) == set(expected)
    for tag, points in expected.items():  # float32 in the event file
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert got["eval/heldout_loss"][0] == (0, pytest.approx(10.857765))  # zero-shot at step 0
    assert not (run_path / MLRUNS_DIR).exists()


def test_mlflow_run_has_the_metrics_and_the_resolved_config_as_parameters(run_path):
    _log(run_path, RECORDS, TrackingConfig(backends=["mlflow"]))
    client, run, history = _mlflow(run_path)
    assert history == _expected()
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "trk"
    config = yaml.safe_load((run_path / "config.yaml").read_text())
    assert set(run.data.params) == set(flatten(config))
    assert run.data.params["federation.rounds"] == "2"
    assert run.data.params["model.name"] == "tiny-random-llama"
    assert run.data.params["run_id"] == "null"
    assert not (run_path / TENSORBOARD_DIR).exists()


def test_a_run_that_stops_before_its_summary_is_killed_in_mlflow(run_path):
    _log(run_path, RECORDS[:2], TrackingConfig(backends=["mlflow"]), summary=False)
    assert _mlflow(run_path)[1].info.status == "KILLED"


def test_mlflow_uri_puts_the_run_in_that_store(run_path, tmp_path):
    uri = (tmp_path / "shared-store").as_uri()
    _log(run_path, RECORDS, TrackingConfig(backends=["mlflow"], mlflow_uri=uri))
    assert not (run_path / MLRUNS_DIR).exists()
    assert _mlflow(run_path, uri)[2]["train_loss"] == _expected()["train_loss"]


def test_a_resumed_run_keeps_one_value_per_step(run_path, caplog):
    """Killed after logging round 2, before its checkpoint: --resume trains round 2 again, then 3."""
    _log(run_path, RECORDS, summary=False)
    again = copy.deepcopy(RECORDS[2])
    again["train_loss"], again["clients"][0]["train_loss"] = 5.0, 4.0
    third = {**copy.deepcopy(RECORDS[2]), "round": 3, "train_loss": 3.0}
    tree = yaml.safe_load((run_path / "config.yaml").read_text())
    tree["federation"]["rounds"] = 3  # resumed with --allow-config-change federation.rounds
    (run_path / "config.yaml").write_text(yaml.safe_dump(tree))
    resumed = RunDir(run_path, tracking=BOTH)
    resumed.truncate_metrics_after(1)
    with caplog.at_level("WARNING"):
        resumed.log_metrics(again)
        resumed.log_metrics(third)
    resumed.write_summary({})

    tensorboard = _tensorboard(run_path)  # purge_step: the resumed values replace round 2
    assert tensorboard["train_loss"] == [(1, pytest.approx(10.81765)), (2, 5.0), (3, 3.0)]
    assert tensorboard["clients/client-0/train_loss"][1] == (2, 4.0)
    assert [s for s, _ in tensorboard["eval/rougeL"]] == [0, 1, 2, 3]

    _, run, mlflow = _mlflow(run_path)  # the same MLflow run; it keeps round 2's first values
    assert json.loads((run_path / MLFLOW_RUN_FILE).read_text())["run_id"] == run.info.run_id
    assert mlflow["train_loss"] == [(1, pytest.approx(10.81765)), (2, pytest.approx(10.81675)), (3, 3.0)]
    assert [s for s, _ in mlflow["eval/rougeL"]] == [0, 1, 2, 3]
    assert run.info.status == "FINISHED"
    assert "MLflow already holds round 2" in caplog.text
    assert run.data.params["federation.rounds"] == "2"  # MLflow's parameters are fixed; the log says so
    assert "changed on resume: federation.rounds 2 -> 3" in caplog.text


def test_no_tracking_writes_no_store(run_path):
    _log(run_path, RECORDS, TrackingConfig())
    assert sorted(p.name for p in run_path.iterdir()) == ["config.yaml", "metrics.jsonl", "summary.json"]


def test_the_config_yaml_tracking_section_is_used_when_none_is_given(run_path):
    tree = yaml.safe_load((run_path / "config.yaml").read_text())
    (run_path / "config.yaml").write_text(yaml.safe_dump({**tree, "tracking": ["tensorboard"]}))
    run = RunDir.open(run_path)
    run.log_metrics(copy.deepcopy(RECORDS[1]))
    run.release()
    assert _tensorboard(run_path)["train_loss"] == [(1, pytest.approx(10.81765))]


def test_a_missing_library_is_a_clear_error_naming_the_pip_command(run_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    tree = yaml.safe_load((run_path / "config.yaml").read_text())
    (run_path / "config.yaml").write_text(yaml.safe_dump({**tree, "tracking": ["tensorboard", "mlflow"]}))
    with monkeypatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
        missing = r"'mlflow' needs the package 'mlflow-skinny'.*pip install 'fedpeft\[tracking\]'"
        with pytest.raises(ConfigError, match=missing):
            RunDir.open(run_path)  # before any training
    RunDir.open(run_path).release()  # the failed open let the folder go

    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # as if uninstalled after the check
    run = RunDir(run_path, tracking=TrackingConfig(backends=["mlflow"]))
    with pytest.raises(ConfigError, match=r"pip install 'fedpeft\[tracking\]' \(or: pip install mlflow-skinny\)"):
        run.log_metrics(copy.deepcopy(RECORDS[1]))


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_run_goes_on(run_path, monkeypatch, caplog):
    from fedpeft.tracking.mlflow import MlflowTracker

    calls = []

    def full_disk(self, record):  # noqa: ANN001
        calls.append(record["round"])
        if record["round"] == 1:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(MlflowTracker, "log", full_disk)
    _log(run_path, RECORDS)  # no exception reaches the run
    assert calls == [0, 1]  # dropped after its failure: not called for round 2
    assert [r["round"] for r in map(json.loads, (run_path / "metrics.jsonl").read_text().splitlines())] == [0, 1, 2]
    assert [s for s, _ in _tensorboard(run_path)["train_loss"]] == [1, 2]  # the other tracker kept going
    assert "mlflow failed to log (OSError" in caplog.text and "the run goes on without it" in caplog.text
