"""The one problems collector: every problem with file, line and key, in one ConfigError."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from fedpeft.errors import ConfigError
from fedpeft.problems import Problems, did_you_mean, line_of


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: float = Field(1.0, gt=0)


class _Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: list[_Inner] = []


TEXT = "inner:\n  - rate: 2\n  - rate: -1\n    rait: 3\n"


def test_did_you_mean_names_the_closest_valid_name_or_nothing():
    assert did_you_mean("lerning_rate", ["learning_rate", "batch_size"]) == "; did you mean 'learning_rate'?"
    assert did_you_mean("zzz", ["learning_rate"]) == ""


def test_line_of_finds_keys_in_mappings_and_lists():
    root = yaml.compose(TEXT)
    locs = [("inner",), ("inner", 1, "rate"), ("inner", 1, "nope"), ()]
    assert [line_of(root, loc) for loc in locs] == [1, 3, 3, None]  # a missing key: its parent's line


def test_every_problem_is_listed_file_by_file_top_to_bottom():
    root = yaml.compose(TEXT)
    problems = Problems()
    try:
        _Outer.model_validate(yaml.safe_load(TEXT))
    except Exception as e:  # noqa: BLE001 - a pydantic ValidationError
        problems.add_validation_error(e, _Outer, "a.yaml", root)
    problems.add("b.yaml", ("x",), "bad")
    problems.add("a.yaml", (), "whole file")
    with pytest.raises(ConfigError) as err:
        problems.raise_if_any("two files")
    assert str(err.value).splitlines() == [
        "4 problems in two files:",
        "  - a.yaml: whole file",
        "  - a.yaml:3: inner.1.rate: Input should be greater than 0 (got -1)",
        "  - a.yaml:4: inner.1.rait: unknown key 'rait'; did you mean 'rate'? Valid keys here: rate",
        "  - b.yaml: x: bad",
    ]
    assert len(err.value.problems) == 4
    Problems().raise_if_any("nothing")  # no problem, no error
