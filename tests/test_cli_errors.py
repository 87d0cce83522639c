"""What the fault suite found: each now a clear one-line error, never a traceback or a silent value."""

from __future__ import annotations

import pytest
import yaml

from fedpeft.cli import main
from tiny_jobs import tiny_job


def _write(tmp_path, job, name="job.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**job, "workspace": str(tmp_path / "ws")}))
    return path


def test_a_key_given_twice_is_an_error_not_the_last_value(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 0\nmodel: {name: tiny-random-llama}\nseed: 7\n")
    assert main(["validate", str(path)]) == 2
    assert "the key 'seed' is given twice, on lines 1 and 3" in capsys.readouterr().err
    assert main(["run", str(path)]) == 2


def test_target_modules_matching_nothing_is_a_clear_error_in_run(tmp_path, capsys):
    job = tiny_job("tm")
    job["peft"] = {"method": "lora", "r": 2, "target_modules": ["nothing_here"]}
    assert main(["run", str(_write(tmp_path, job))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: peft:" in err and "nothing_here" in err


def test_a_plugin_raising_at_run_time_is_one_line_naming_its_file(tmp_path, capsys):
    plugin = tmp_path / "bad_metric.py"
    plugin.write_text("def bad(*, predictions, references):\n    raise ValueError('bad metric')\n")
    job = tiny_job("pm")
    job["eval"] = {**job["eval"], "metrics": [f"{plugin}:bad"]}
    assert main(["run", str(_write(tmp_path, job))]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ValueError: bad metric (raised at ") and f"{plugin}:2" in err
    assert "run with -v for the traceback" in err


def test_the_command_leaves_at_once_after_ctrl_c(monkeypatch):
    """A worker thread may still be in a torch kernel: a normal exit would abort with -6."""
    from fedpeft import cli

    exits = []
    monkeypatch.setattr(cli, "main", lambda: 130)
    monkeypatch.setattr(cli.os, "_exit", lambda code: exits.append(code))
    with pytest.raises(SystemExit):
        cli.entry()
    assert exits == [130]
