"""Config validation: one error listing every problem with file, line, key and valid values."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from fedpeft.config import apply_overrides, dump_config, load_config, set_dotted
from fedpeft.errors import ConfigError

GOOD = """\
job: t
model:
  name: tiny-random-llama
federation:
  num_clients: 4
  aggregation:
    name: fedavgm
    beta: 0.5
"""


def test_good_config_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD)
    cfg = load_config(path, ["train.learning_rate=1e-4", "federation.clients_per_round=0.5", "eval.metrics=[rougeL]"])
    assert cfg.train.learning_rate == 1e-4 and cfg.sampled_per_round() == 2
    assert cfg.federation.aggregation.params == {"beta": 0.5} and cfg.eval.metrics == ["rougeL"]


def test_every_problem_is_listed_with_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "job: t\n"
        "modle:\n"            # line 2: misspelt section
        "  name: x\n"
        "federation:\n"
        "  num_clients: 0\n"  # line 5: out of range
        "  aggregation:\n"
        "    name: fedavgm\n"
        "    beta: high\n"    # line 8: wrong type
        "eval:\n"
        "  metrics: [rouge1, bleu5]\n"  # line 10: unknown metric
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith("4 problems in") and len(e.value.problems) == 4
    assert [p.line for p in e.value.problems] == [2, 5, 8, 10]  # listed top to bottom
    assert f"{path}:2: modle: unknown key 'modle'; did you mean 'model'?" in msg
    assert f"{path}:5: federation.num_clients" in msg and "greater than or equal to 1" in msg
    assert f"{path}:8: federation.aggregation.beta" in msg and "'high'" in msg
    assert f"{path}:10: eval.metrics.1" in msg and "bleu4" in msg


def test_semantic_checks(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD + "  min_clients: 5\n  clients_per_round: 9\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "federation.clients_per_round" in str(e.value) and "federation.min_clients" in str(e.value)


def test_example_level_dp_with_prefix_tuning_is_a_problem_at_the_privacy_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD + "peft:\n  method: prefix\nprivacy:\n  level: example\n  noise_multiplier: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"{path}:12: privacy.level" in str(e.value) and "not prefix" in str(e.value)
    load_config(path, ["privacy.level=client"])  # client-level DP takes any adapter


def test_a_float_above_one_clients_per_round_is_rejected_not_read_as_a_count(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD + "  clients_per_round: 2.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    (problem,) = e.value.problems
    assert (problem.key, problem.line) == ("federation.clients_per_round", 9)
    assert "2.5 is a float above 1" in problem.message and "fraction in (0, 1]" in problem.message
    for good, sampled in ((2, 2), (1, 1), (1.0, 4), (0.5, 2)):  # an int is a count, a float a fraction
        assert load_config(path, [f"federation.clients_per_round={good}"]).sampled_per_round() == sampled


def test_every_problem_is_counted_once(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD + "  clients_per_round: 2.5\n"  # a float above 1
                    "train:\n  batch_size: 0\n"          # out of range
                    "  warmup: 3\n"                      # unknown key
                    "eval:\n  metrics: [bleu]\n")        # unknown metric
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert [p.key for p in e.value.problems] == [
        "federation.clients_per_round", "train.batch_size", "train.warmup", "eval.metrics.0"]
    assert str(e.value).startswith("4 problems in")
    path.write_text(GOOD + "data:\n  max_train_samples: 3\n")  # fewer rows than the 4 clients
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert [(p.key, p.line) for p in e.value.problems] == [("data.max_train_samples", 10)]


def test_bad_override_form():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.learning_rate"])


def test_dotted_setter_creates_empty_sections_and_refuses_to_cross_a_value():
    tree = {"peft": None, "train": {"learning_rate": 1e-3}}
    apply_overrides(tree, ["peft.r=8", "eval.metrics=[rougeL]"])
    assert tree == {"peft": {"r": 8}, "train": {"learning_rate": 1e-3}, "eval": {"metrics": ["rougeL"]}}
    set_dotted(tree, "peft", {"method": "ptuning"})  # a mapping value replaces the whole section
    assert tree["peft"] == {"method": "ptuning"}
    with pytest.raises(ConfigError, match="'train.learning_rate' is a value"):
        set_dotted(tree, "train.learning_rate.x", 1)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def _job_with_data(data: dict) -> str:
    return yaml.safe_dump({"job": "t", "model": {"name": "tiny-random-llama"}, "data": data,
                           "federation": {"num_clients": 2}})


def test_relative_data_paths_resolve_beside_the_yaml_then_in_the_working_directory(tmp_path, monkeypatch, caplog):
    (tmp_path / "configs/data").mkdir(parents=True)
    (tmp_path / "configs/data/train.jsonl").write_text("{}\n")
    (tmp_path / "here").mkdir()
    (tmp_path / "here/test.jsonl").write_text("{}\n")
    (tmp_path / "here/a.jsonl").write_text("{}\n")
    path = tmp_path / "configs/job.yaml"
    path.write_text(_job_with_data({"train": "data/train.jsonl", "test": "test.jsonl",
                                    "client_files": ["a.jsonl", "data/train.jsonl"]}))
    monkeypatch.chdir(tmp_path / "here")
    with caplog.at_level(logging.INFO, logger="fedpeft"):
        cfg = load_config(path)
    assert cfg.data.train == str(tmp_path / "configs/data/train.jsonl")  # beside the YAML
    assert cfg.data.test == str(tmp_path / "here/test.jsonl")  # only in the working directory
    assert cfg.data.client_files == [str(tmp_path / "here/a.jsonl"), str(tmp_path / "configs/data/train.jsonl")]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "data.train: data/train.jsonl" in logged and "found beside the file" in logged
    assert "data.test: test.jsonl" in logged and "found in the working directory" in logged
    # the config a run folder keeps reloads to the same files from anywhere (resume)
    run_copy = tmp_path / "run/config.yaml"
    run_copy.parent.mkdir()
    run_copy.write_text(dump_config(cfg))
    monkeypatch.chdir(tmp_path)
    assert load_config(run_copy).data == cfg.data


def test_builtin_and_hub_data_pass_through(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(_job_with_data({"train": "builtin:sample", "test": "hf:org/data"}))
    cfg = load_config(path)
    assert (cfg.data.train, cfg.data.test) == ("builtin:sample", "hf:org/data")


def test_shipped_medquad_config_finds_its_data_from_any_directory(monkeypatch, medquad_dir):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(medquad_dir)
    cfg = load_config(repo / "configs/medquad-lora-fedavg.yaml")
    assert Path(cfg.data.train) == medquad_dir / "train.jsonl" and Path(cfg.data.test).is_file()


@pytest.mark.parametrize("text", ["", "# only a comment\n\n# and another\n"])
def test_an_empty_or_comment_only_config_is_refused_not_run_with_defaults(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"empty config: {path} has no keys; see configs/ for examples"):
        load_config(path)


def test_hyperparameter_ranges_of_aggregator_and_peft_method_are_checked_at_their_lines(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "peft:\n"
        "  method: lora\n"
        "  r: 0\n"                # line 3: checked in LoRA.__init__
        "federation:\n"
        "  aggregation:\n"
        "    name: fedavgm\n"
        "    beta: 5\n"           # line 7: checked in FedAvgM.__init__
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert [p.line for p in e.value.problems] == [3, 7]
    assert f"{path}:3: peft.r: peft.r must be >= 1, got 0" in msg
    assert f"{path}:7: federation.aggregation.beta: `beta` must be in [0, 1), got 5" in msg
    path.write_text("peft:\n  method: lora\n  r: 2\n  alpha: 0\n")  # the message names r too
    with pytest.raises(ConfigError, match=r":4: peft.alpha: peft.alpha must be > 0"):
        load_config(path)


def test_a_plugin_whose_import_or_init_raises_is_a_problem_naming_it_and_the_line(tmp_path):
    broken = tmp_path / "broken_agg.py"
    broken.write_text("import math\nX = 1 / 0\n")
    picky = tmp_path / "picky_agg.py"
    picky.write_text("class Picky:\n    def __init__(self, mix: float = 0.5) -> None:\n"
                     "        raise RuntimeError('no GPU here')\n")
    path = tmp_path / "job.yaml"
    path.write_text(f"federation:\n  aggregation:\n    name: {broken}:Agg\n"
                    f"peft:\n  method: {picky}:Picky\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "Traceback" not in msg and len(e.value.problems) == 2
    assert (f"federation.aggregation.name: plugin '{broken}:Agg' failed in import: "
            f"ZeroDivisionError: division by zero ({broken}:2: X = 1 / 0)") in msg
    assert (f"peft.method: plugin '{picky}:Picky' failed in __init__: RuntimeError: no GPU here "
            f"({picky}:3: raise RuntimeError('no GPU here'))") in msg
    with pytest.raises(ConfigError, match="ZeroDivisionError"):  # not silently half-imported the 2nd time
        load_config(path)
