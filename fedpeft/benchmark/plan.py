"""The one internal form of a benchmark job: a list of test cases (each a validated JobConfig).

Both file formats end here: the KubeEdge Ianvs files (:mod:`fedpeft.benchmark.ianvs`) and the
native single-file grid (:mod:`fedpeft.benchmark.native`). :func:`load_plan` tells them apart
and :func:`fedpeft.benchmark.runner.run_benchmark` executes the result.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedpeft.benchmark.constants import EXTRA_COLUMNS, PARADIGM_BASELINE, PARADIGM_FEDERATED
from fedpeft.benchmark.schema import RankSpec
from fedpeft.config import JobConfig, flatten
from fedpeft.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    """One hyperparameter value of one test case.

    Attributes:
        column: Its leaderboard column (``basemodel-learning_rate``, ``train.learning_rate``).
        value: The value as written in the file.
        target: The dotted JobConfig key it sets (``train.learning_rate``); None when it is
            shown only (Ianvs ``save_dir``).
    """

    column: str
    value: Any
    target: str | None


@dataclass(frozen=True)
class Dimension:
    """One hyperparameter of a grid with every value it takes."""

    column: str
    values: tuple[Any, ...]
    target: str | None


@dataclass
class TestCase:
    """One federated run of a benchmark.

    Attributes:
        algorithm: Folder and ``algorithm`` column (Ianvs algorithm name, or ``fedavgm-lora``).
        cfg: The validated job config (workspace, job and run id are set by the runner).
        settings: Its hyperparameter values, in grid order.
        modules: ``{"basemodel": ..., "aggregation": ...}`` (the module columns).
        paradigm: The ``paradigm`` column.
    """

    __test__ = False  # not a pytest test class

    algorithm: str
    cfg: JobConfig
    settings: list[Setting]
    modules: dict[str, str]
    paradigm: str = PARADIGM_FEDERATED

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Column -> value; a mapping value (a whole ``peft`` section) gives one column per key."""
        return setting_columns(self.settings)

    def label(self) -> str:
        """``peft_method=lora, learning_rate=1e-4`` (module prefixes dropped) for logs."""
        return settings_label(self.settings)


def setting_columns(settings: list[Setting]) -> dict[str, Any]:
    """Column -> value of a test case; a mapping value gives one column per key (``peft.r``)."""
    out: dict[str, Any] = {}
    for s in settings:
        out.update(flatten(s.value, s.column + ".") if isinstance(s.value, dict) else {s.column: s.value})
    return out


def grid_columns(grid: list[list[Setting]]) -> list[str]:
    """The hyperparameter columns of a grid's test cases, in first-seen order."""
    return list(dict.fromkeys(col for settings in grid for col in setting_columns(settings)))


def settings_label(settings: list[Setting]) -> str:
    """A short text for a list of settings (module prefixes such as ``basemodel-`` dropped)."""
    return ", ".join(f"{k.split('-', 1)[-1]}={v}" for k, v in setting_columns(settings).items()) or "defaults"


@dataclass(frozen=True)
class MetricColumn:
    """A leaderboard metric column and the key of fedpeft's evaluation results it shows."""

    column: str  # rouge1_metric (Ianvs name) or rouge1 (native)
    key: str  # rouge1, or the plugin spec 'path/file.py:fn'


@dataclass
class BenchmarkPlan:
    """Everything a benchmark run needs, whichever format it came from."""

    name: str
    job_dir: Path  # <workspace>/<name>: test case folders, rank/, report.html
    cases: list[TestCase]
    metrics: list[MetricColumn]
    rank: RankSpec
    baselines: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=lambda: ["basemodel", "aggregation"])
    source: str = ""
    ignored: list[str] = field(default_factory=list)

    def hyperparameter_columns(self) -> list[str]:
        """Hyperparameter columns in first-seen order over the test cases."""
        return grid_columns([c.settings for c in self.cases])


def rank_columns(metrics: list[MetricColumn], modules: list[str], grid: list[list[Setting]]) -> dict[str, list[str]]:
    """The names a ``rank`` section may use, by kind (see :func:`~fedpeft.benchmark.schema.check_rank_names`).

    Args:
        metrics: The benchmark's metric columns (the extra columns fedpeft adds are sortable too).
        modules: The module columns.
        grid: The settings of every test case (its hyperparameter columns).
    """
    return {"metrics": [m.column for m in metrics] + list(EXTRA_COLUMNS), "modules": modules,
            "hyperparameters": grid_columns(grid), "paradigms": [PARADIGM_FEDERATED, PARADIGM_BASELINE]}


def expand(dimensions: list[Dimension]) -> list[list[Setting]]:
    """The cartesian product of the dimensions' values (the first dimension varies slowest)."""
    value_lists = [[Setting(d.column, v, d.target) for v in d.values] for d in dimensions]
    return [list(combo) for combo in itertools.product(*value_lists)]


def detect_format(path: str | Path) -> str:
    """``"ianvs"`` (a ``benchmarkingjob:`` file), ``"grid"`` (native with ``grid:``/``baselines:``)
    or ``"job"`` (a plain native job)."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return "job"
    if isinstance(tree, dict) and "benchmarkingjob" in tree:
        return "ianvs"
    if isinstance(tree, dict) and ({"grid", "baselines", "rank"} & set(tree)):
        return "grid"
    return "job"


def load_plan(path: str | Path, overrides: list[str] | None = None) -> BenchmarkPlan:
    """Read a benchmark file in either format into a :class:`BenchmarkPlan`.

    Args:
        path: ``benchmarkingjob.yaml`` (Ianvs) or a native ``benchmark-*.yaml`` with ``grid:``.
        overrides: ``key=value`` JobConfig overrides applied to every test case
            (``eval.max_samples=8``).

    Raises:
        ConfigError: listing every problem of every file, with file, line, key and closest valid key.
    """
    fmt = detect_format(path)
    if fmt == "ianvs":
        from fedpeft.benchmark.ianvs import load_ianvs

        return load_ianvs(path, overrides)
    if fmt == "grid":
        from fedpeft.benchmark.native import load_grid

        return load_grid(path, overrides)
    raise ConfigError(f"{path}: not a benchmark file: expected a top-level 'benchmarkingjob:' (Ianvs format) "
                      "or a native job with 'grid:' / 'baselines:' / 'rank:' (see configs/benchmark-*.yaml)")
