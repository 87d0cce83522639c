"""Config validation: one error listing every problem with file, line, key and valid values."""

from __future__ import annotations

import pytest

from fedpeft.config import apply_overrides, load_config
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
    assert msg.startswith("4 problems in")
    assert f"{path}:2: modle: unknown key; did you mean 'model'?" in msg
    assert f"{path}:5: federation.num_clients" in msg and "greater than or equal to 1" in msg
    assert f"{path}:8: federation.aggregation.beta" in msg and "'high'" in msg
    assert f"{path}:10: eval.metrics.1" in msg and "bleu4" in msg


def test_semantic_checks(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD + "  min_clients: 5\n  clients_per_round: 9\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "federation.clients_per_round" in str(e.value) and "federation.min_clients" in str(e.value)


def test_bad_override_form():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.learning_rate"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
