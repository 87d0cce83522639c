"""The native benchmark format: one YAML = a base job + ``grid:`` + ``baselines:`` + ``rank:``.

```yaml
# fedpeft benchmark configs/benchmark-sample.yaml
job: sample-bench            # the benchmark's name: workspace/<job>/...
workspace: workspace
model: {name: smollm2-135m-instruct}
...                          # every other JobConfig section: the base of every test case
grid:                        # dotted JobConfig keys -> values; the cartesian product is run
  train.learning_rate: [1.0e-3, 3.0e-4]
  peft:                      # a mapping value replaces the whole section
    - {method: lora, r: 16}
    - {method: ptuning, num_virtual_tokens: 20}
baselines: [zero_shot, local_only, centralized]
rank:                        # as in Ianvs: sort_by, visualization, selected_dataitem, save_mode
  sort_by: [{rougeL: descend}]
```

The first grid key varies slowest. Each test case runs in ``workspace/<job>/<algorithm>/<uuid>``
where ``<algorithm>`` is ``<aggregation>-<peft method>`` (``fedavgm-lora``). Leaderboard
columns are the grid keys (a mapping value gives one column per key: ``peft.method``, ``peft.r``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from fedpeft.benchmark.constants import BASELINES
from fedpeft.benchmark.plan import (BenchmarkPlan, Dimension, MetricColumn, Setting, TestCase, expand, rank_columns,
                                    settings_label)
from fedpeft.benchmark.schema import RankSpec, check_rank_names, parse_file_model
from fedpeft.config import JobConfig, apply_overrides, check_tree, resolve_data_paths, set_dotted
from fedpeft.problems import Problems, closest, did_you_mean, read_yaml

BENCHMARK_KEYS = ("grid", "baselines", "rank")


def make_config(base: dict, settings: list[Setting], overrides: list[str], source: str, problems: Problems,
                base_dir: Path) -> JobConfig | None:
    """Apply a test case's settings and the CLI overrides to a copy of ``base``; validate it.

    Args:
        base: The job tree every test case starts from.
        settings: The test case's grid values.
        overrides: ``key=value`` strings applied last.
        source: Names the file and the test case in each problem.
        problems: Where the test case's problems go.
        base_dir: The folder of the file naming the settings (relative data paths start there).

    Returns:
        The test case's config, or None if it has problems.

    Raises:
        ConfigError: for a malformed override (every test case would repeat it).
    """
    tree = copy.deepcopy(base)
    for s in settings:
        if s.target is not None:
            set_dotted(tree, s.target, copy.deepcopy(s.value))
    apply_overrides(tree, list(overrides))
    return check_tree(resolve_data_paths(tree, base_dir), problems, source)


def check_dotted(key: str) -> str | None:
    """Why ``key`` is not a dotted JobConfig key (with the closest valid one), or None if it is."""
    model: Any = JobConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or (model.model_config.get("extra") == "allow" and part not in fields):
            return None  # free-form section (peft, aggregation, partition): checked per test case
        if part not in fields:
            close = closest(part, fields)
            hint = f"; did you mean {'.'.join(parts[:i] + [close])!r}?" if close else ""
            return f"{key!r} is not a job setting{hint} Valid here: {', '.join(fields)}"
        model = fields[part].annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None if i == len(parts) - 1 else f"{'.'.join(parts[:i + 1])!r} is a value, not a section"
    return None


def _dimensions(grid: Any, source: str, root: yaml.Node | None, problems: Problems) -> list[Dimension]:
    if grid is None:
        return []
    if not isinstance(grid, dict):
        problems.add(source, ("grid",), "expected a mapping of dotted keys to value lists", root)
        return []
    dims = []
    for key, values in grid.items():
        why = check_dotted(str(key))
        if why:
            problems.add(source, ("grid", key), why, root)
        values = values if isinstance(values, list) else [values]
        if not values:
            problems.add(source, ("grid", key), "needs at least one value", root)
        dims.append(Dimension(str(key), tuple(values), str(key)))
    return dims


def check_baselines(value: Any, source: str, root: yaml.Node | None, problems: Problems,
                    loc: tuple = ("baselines",)) -> list[str]:
    """The requested baselines; unknown names are problems (with the closest valid name)."""
    names = value if isinstance(value, list) else ([] if value is None else [value])
    for i, name in enumerate(names):
        if name not in BASELINES:
            problems.add(source, loc + (i,), f"unknown baseline {name!r}{did_you_mean(str(name), BASELINES)} "
                         f"Valid: {', '.join(BASELINES)}", root)
    return [n for n in names if n in BASELINES]


def _algorithm(cfg: JobConfig) -> str:
    return f"{cfg.federation.aggregation.name}-{cfg.peft.method}".replace("/", "_").replace(":", "_")


def _cases(base: dict, grid: list[list[Setting]], overrides: list[str], path: Path,
           problems: Problems) -> list[TestCase]:
    """One validated test case per grid point; every failing one adds its problems."""
    cases = []
    for i, settings in enumerate(grid):
        source = f"{path} (test case {i + 1}: {settings_label(settings)})"
        cfg = make_config(base, settings, overrides, source, problems, path.parent)
        if cfg is not None:
            cases.append(TestCase(_algorithm(cfg), cfg, settings,
                                  {"basemodel": cfg.model.name, "aggregation": cfg.federation.aggregation.name}))
    return cases


def load_grid(path: str | Path, overrides: list[str] | None = None) -> BenchmarkPlan:
    """Read a native benchmark file into a plan (one validated JobConfig per grid point).

    Raises:
        ConfigError: every problem, each with file, line, key and the closest valid key; the
            problems of every test case when the file itself is sound.
    """
    path = Path(path)
    source = str(path)
    problems = Problems()
    tree, root = read_yaml(path, problems)
    if tree is not None and not isinstance(tree, dict):
        problems.add(source, (), f"expected a mapping (a job plus grid/baselines/rank), got {type(tree).__name__}")
    problems.raise_if_any(source)
    base = resolve_data_paths({k: v for k, v in (tree or {}).items() if k not in BENCHMARK_KEYS}, path.parent)
    base_cfg = check_tree(copy.deepcopy(base), problems, source, root)
    dims = _dimensions(tree.get("grid"), source, root, problems)
    baselines = check_baselines(tree.get("baselines"), source, root, problems)
    rank = parse_file_model(tree.get("rank") or {}, RankSpec, source, root, problems, ("rank",))
    problems.raise_if_any(source)  # the test cases would only repeat these
    assert base_cfg is not None and rank is not None
    grid = expand(dims)
    cases = _cases(base, grid, overrides or [], path, problems)
    metrics = [MetricColumn(m, m) for m in base_cfg.eval.metrics]
    plan = BenchmarkPlan(name=base_cfg.job, job_dir=Path(base_cfg.workspace) / base_cfg.job, cases=cases,
                         metrics=metrics, rank=rank, baselines=baselines, source=source)
    check_rank_names(rank, rank_columns(metrics, plan.modules, grid), source, root, ("rank",), problems)
    problems.raise_if_any(source)
    return plan
