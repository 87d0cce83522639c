"""``fedpeft validate`` beyond the file: data files, model name and LoRA target modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.cli import main
from fedpeft.config import load_config
from fedpeft.errors import ConfigError
from fedpeft.preflight import preflight


def _job(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(body)
    return path


def _rows(n: int, start: int = 0) -> str:
    return "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(start, start + n))


def test_every_data_file_problem_is_listed_with_file_and_line(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text(_rows(3) + '{"question": "q", "answer": ""}\n')  # line 4: empty answer
    (tmp_path / "b.jsonl").write_text(_rows(2) + "not json\n")  # line 3
    path = _job(tmp_path, "model:\n  name: tiny-random-llama\n"
                          "data:\n  client_files: [a.jsonl, b.jsonl, missing.jsonl]\n"
                          "federation:\n  num_clients: 3\n")
    load_config(path)  # a file check alone: data is read by validate, not by every load
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "3 problems in" in err
    assert f"{path}:4: data.client_files.0: {tmp_path / 'a.jsonl'}:4: answer field 'answer' is empty" in err
    assert f"data.client_files.1: {tmp_path / 'b.jsonl'}:3: invalid JSON" in err
    assert f"data.client_files.2: data file not found: {tmp_path / 'missing.jsonl'}" in err


def test_split_and_partition_problems_a_run_would_raise(tmp_path):
    (tmp_path / "t.jsonl").write_text(_rows(10))
    path = _job(tmp_path, "model:\n  name: tiny-random-llama\ndata:\n  train: t.jsonl\n  split_by: focus\n"
                          "federation:\n  num_clients: 2\n")
    with pytest.raises(ConfigError, match=r":5: data.split_by: row at index 0 has no field 'focus'"):
        preflight(path, load_config(path))


def test_hf_data_is_skipped_with_a_note(tmp_path):
    path = _job(tmp_path, "model:\n  name: tiny-random-llama\ndata:\n  train: hf:some/dataset\n")
    notes = preflight(path, load_config(path))
    assert notes == ["data.train: hf:some/dataset not checked (validate does not download data sets)"]


def test_a_model_that_is_nowhere_is_a_problem_not_a_traceback(tmp_path, capsys):
    missing = tmp_path / "models" / "my-llama"
    path = _job(tmp_path, f"model:\n  name: {missing}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: model.name: '{missing}' is neither a local folder, a file, a built-in name" in err
    assert "Traceback" not in err
    (tmp_path / "empty").mkdir()
    path = _job(tmp_path, f"model:\n  name: {tmp_path / 'empty'}\n")
    with pytest.raises(ConfigError, match="folder without config.json"):
        preflight(path, load_config(path))


def test_target_modules_are_checked_against_the_model_modules(tmp_path):
    path = _job(tmp_path, "model:\n  name: tiny-random-llama\n"
                          "peft:\n  method: lora\n  target_modules: [q_proj, qkv_proj, v_proj, o_prj]\n")
    with pytest.raises(ConfigError) as e:
        preflight(path, load_config(path))
    keys = [p.key for p in e.value.problems]
    assert keys == ["peft.target_modules.1", "peft.target_modules.3"]
    msg = str(e.value)
    assert "'o_prj' matches no module; did you mean 'o_proj'?" in msg and "q_proj" in msg and "down_proj" in msg
    good = _job(tmp_path, "model:\n  name: smollm2-135m-instruct\n"
                          "peft:\n  target_modules: [q_proj, mlp.down_proj]\n")
    assert preflight(good, load_config(good)) == []
    regex = _job(tmp_path, "model:\n  name: tiny-random-llama\npeft:\n  target_modules: '.*\\.qkv'\n")
    with pytest.raises(ConfigError, match="regex '.*\\\\.qkv' matches no module"):
        preflight(regex, load_config(regex))


def test_a_hub_id_not_in_the_cache_offline_is_a_problem_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr("fedpeft.preflight._hub_reachable", lambda timeout=3.0: False)
    path = _job(tmp_path, "model:\n  name: someone/no-such-model\n")
    with pytest.raises(ConfigError, match=r":2: model.name: 'someone/no-such-model' is neither .* "
                                          r"not in the Hugging Face cache and the hub is not reachable"):
        preflight(path, load_config(path))
