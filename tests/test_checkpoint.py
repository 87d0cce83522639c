"""Verified checkpoints, one writer per run folder, and resume refusing another config or data."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from fedpeft.checkpoint import load_latest_checkpoint, save_checkpoint
from fedpeft.config import JobConfig, validate_tree
from fedpeft.errors import CheckpointError, ConfigError
from fedpeft.io_utils import read_jsonl
from fedpeft.run_dir import RunDir
from fedpeft.simulation import run_job
from tiny_jobs import tiny_job


def _three_rounds(tmp_path, keep=None):
    for rnd in (1, 2, 3):
        save_checkpoint(tmp_path, rnd, {"w": torch.full((4,), float(rnd))}, {"m": torch.ones(2) * rnd},
                        {"config": {"seed": 0}}, keep=keep)
    return tmp_path / "checkpoints"


def test_a_checkpoint_round_trips_with_its_server_state(tmp_path):
    _three_rounds(tmp_path)
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.round == 3 and torch.equal(ckpt.global_state["w"], torch.full((4,), 3.0))
    assert torch.equal(ckpt.server_state["m"], torch.ones(2) * 3) and ckpt.meta["config"] == {"seed": 0}


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "delete"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog, damage):
    root = _three_rounds(tmp_path)
    target = root / "round-0003" / "global_state.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x40  # a value, not the header: the file still parses
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "empty":
        target.write_bytes(b"")
    else:
        target.unlink()
    with caplog.at_level(logging.WARNING):
        ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.round == 2 and torch.equal(ckpt.global_state["w"], torch.full((4,), 2.0))
    assert "skipping checkpoint" in caplog.text and "round-0003" in caplog.text


def test_latest_naming_a_missing_round_uses_the_newest_that_verifies(tmp_path, caplog):
    root = _three_rounds(tmp_path)
    (root / "latest").write_text("round-0009\n")
    with caplog.at_level(logging.WARNING):
        assert load_latest_checkpoint(tmp_path).round == 3
    assert "round-0009, which does not exist" in caplog.text


def test_no_verifying_checkpoint_is_a_clear_error_and_leftovers_are_removed(tmp_path):
    root = _three_rounds(tmp_path)
    leftover = root / ".round-0004.abc123"
    leftover.mkdir()
    for rnd in (1, 2, 3):
        (root / f"round-000{rnd}" / "server_optimizer.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no checkpoint of .* verifies"):
        load_latest_checkpoint(tmp_path)
    assert not leftover.exists()


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    root = _three_rounds(tmp_path, keep=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["round-0002", "round-0003"]


def test_one_writer_per_run_folder(tmp_path):
    cfg = JobConfig.model_validate({"workspace": str(tmp_path), "run_id": "r"})
    first = RunDir.create(cfg)
    with pytest.raises(ConfigError, match=r"in use by another fedpeft process \(pid \d+"):
        RunDir.create(cfg)
    with pytest.raises(ConfigError, match="in use by another fedpeft process"):
        RunDir.open(first.path)
    first.release()
    second = RunDir.open(first.path)  # free again
    second.release()
    with pytest.raises(ConfigError, match="not a fedpeft run folder"):
        RunDir.open(tmp_path)


JOB = tiny_job("ckpt", seed=2)


def test_resume_refuses_an_edited_config_unless_the_change_is_allowed(tmp_path):
    run = run_job(validate_tree({**JOB, "workspace": str(tmp_path), "run_id": "r"}))
    tree = yaml.safe_load(run.config_file.read_text())
    tree["train"]["learning_rate"] = 1e-2
    run.config_file.write_text(yaml.safe_dump(tree))
    with pytest.raises(CheckpointError, match=r"train.learning_rate: 0.005 -> 0.01"):
        run_job(None, resume=run.path)
    tree["train"]["learning_rate"] = 5e-3
    tree["federation"]["rounds"] = 3  # add a round, deliberately
    run.config_file.write_text(yaml.safe_dump(tree))
    with pytest.raises(CheckpointError, match="--allow-config-change federation.rounds"):
        run_job(None, resume=run.path)
    with pytest.raises(CheckpointError, match="federation.roundz: no such config key; did you mean 'federation.rounds'"):
        run_job(None, resume=run.path, allow_config_change=("federation.roundz",))
    run_job(None, resume=run.path, allow_config_change=("federation.rounds",))
    assert [r["round"] for r in read_jsonl(run.metrics_file)] == [1, 2, 3]


def test_resume_refuses_changed_data(tmp_path):
    import json
    from importlib import resources

    rows = [json.loads(line) for line in
            resources.files("fedpeft").joinpath("data/sample.jsonl").read_text().splitlines() if line.strip()]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = {**JOB, "data": {**JOB["data"], "train": str(train)}, "workspace": str(tmp_path), "run_id": "d"}
    run = run_job(validate_tree(job))
    rows[0]["answer"] = "edited after the run started"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(CheckpointError, match="data differ from what round 2's checkpoint was trained on"):
        run_job(None, resume=run.path)


def test_ctrl_c_prints_one_line_saying_where_to_resume(tmp_path, monkeypatch, capsys):
    import fedpeft.simulation as simulation
    from fedpeft.cli import main

    real = simulation.SchedulerPool.train

    def train(self, rnd, sampled, state, fold):  # Ctrl-C reaches the main thread during round 2
        if rnd == 2:
            raise KeyboardInterrupt
        return real(self, rnd, sampled, state, fold)

    monkeypatch.setattr(simulation.SchedulerPool, "train", train)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**JOB, "workspace": str(tmp_path), "run_id": "c"}))
    assert main(["run", str(path)]) == 130
    err = capsys.readouterr().err.strip().splitlines()  # progress bars, then the one line
    run = tmp_path / "ckpt" / "c"
    assert "Traceback" not in "\n".join(err)
    assert err[-1] == (f"interrupted: the last checkpoint is {run / 'checkpoints' / 'round-0001'}; "
                   f"go on with: fedpeft run --resume {run}")
    monkeypatch.setattr(simulation.SchedulerPool, "train", real)
    assert main(["run", "--resume", str(run)]) == 0  # and the lock was released


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch):
    import fedpeft.simulation as simulation

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(simulation, "fit", broken)
    with pytest.raises(Exception, match="boom|fewer than min_clients"):
        run_job(validate_tree({**JOB, "workspace": str(tmp_path), "run_id": "f"}))
    assert not (tmp_path / "ckpt" / "f").exists()


def test_resume_drops_a_metrics_line_cut_by_a_kill(tmp_path, caplog):
    run = RunDir(tmp_path)
    run.metrics_file.write_text('{"round": 1, "x": 1}\n{"round": 2, "x": 2}\n{"round": 3, "x"')
    with caplog.at_level("WARNING"):
        run.truncate_metrics_after(2)
    assert read_jsonl(run.metrics_file) == [{"round": 1, "x": 1}, {"round": 2, "x": 2}]
    assert "cut by an interrupted write" in caplog.text


@pytest.mark.parametrize("tree, key", [({"run_id": "../../escape"}, "run_id"), ({"job": "a/b"}, "job"),
                                       ({"seed": -1}, "seed")])
def test_names_that_leave_the_workspace_and_negative_seeds_are_refused(tree, key):
    with pytest.raises(ConfigError, match=rf"{key}: "):
        validate_tree(tree)


def test_a_workspace_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "ws").write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        RunDir.create(validate_tree({"workspace": str(tmp_path / "ws"), "run_id": "r"}))
