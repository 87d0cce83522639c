"""KubeEdge Ianvs benchmark files -> a :class:`~fedpeft.benchmark.plan.BenchmarkPlan`.

Three files, as Ianvs's ``federated-llm/fedllm-peft`` example writes them:

* ``benchmarkingjob.yaml``: ``name``, ``workspace``, ``testenv`` (path), ``test_object``
  (``type: algorithms``, ``algorithms: [{name, url}]``), ``rank``; plus an optional
  ``fedpeft:`` section (Ianvs has no equivalent): ``baselines``, ``config`` (native JobConfig
  keys applied to every test case: ``data.max_seq_len``, ``eval.max_samples``, ...) and
  ``peft`` (each PEFT method's hyperparameters: ``{lora: {r: 16}, ptuning: {...}}``).
* ``testenv.yaml``: ``dataset.train_data`` / ``test_data`` (JSONL) -> ``data.train`` / ``data.test``;
  ``metrics`` -> ``eval.metrics`` (a metric's ``url`` always wins, as in Ianvs; the file is
  checked here: it exists, imports and can be called, :mod:`fedpeft.metrics.plugin`);
  ``round`` -> ``federation.rounds``; ``client_number`` -> ``federation.num_clients``;
  ``gpu_num`` -> ``model.devices`` (0 or no GPU: CPU).
* ``algorithm.yaml``: ``paradigm_type: federatedlearning``; a ``basemodel`` module whose
  ``hyperparameters`` (``batch_size``, ``learning_rate``, ``local_epochs``, ``model_name`` /
  ``initial_model_url`` -> ``model.name``, ``peft_method``, or any dotted JobConfig key such as
  ``data.max_seq_len``) and an ``aggregation`` module (``FedAvg-PEFT`` -> fedavg,
  ``FedAvgM-PEFT`` -> fedavgm with ``beta`` / ``server_lr``) span the grid.

Relative input paths are looked up beside the file that names them, then in the working
directory (Ianvs's convention); ``workspace`` is relative to the working directory.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import torch
import yaml

from fedpeft.benchmark.constants import BASELINES
from fedpeft.benchmark.native import check_baselines, check_dotted, make_config
from fedpeft.config import flatten
from fedpeft.benchmark.plan import (BenchmarkPlan, Dimension, MetricColumn, Setting, TestCase, expand,
                                    rank_columns, settings_label)
from fedpeft.benchmark.ianvs_schema import (AlgorithmFile, AlgorithmRef, BenchmarkingJob, BenchmarkingJobFile, Module,
                                            NamedUrl, TestEnv, TestEnvFile)
from fedpeft.benchmark.schema import check_rank_names, parse_file_model
from fedpeft.config import check_tree, resolve_data_paths
from fedpeft.data.io import resolve_input
from fedpeft.errors import RegistryError
from fedpeft.problems import Problems, did_you_mean, read_yaml

log = logging.getLogger(__name__)

BUILTIN_METRICS = {"rouge1_metric": "rouge1", "rouge2_metric": "rouge2", "rougel_metric": "rougeL",
                   "bleu4_metric": "bleu4"}
BASEMODEL_HYPERPARAMETERS: dict[str, str | None] = {
    "batch_size": "train.batch_size", "learning_rate": "train.learning_rate",
    "local_epochs": "train.local_epochs", "model_name": "model.name", "initial_model_url": "model.name",
    "peft_method": "peft.method", "save_dir": None, "aggregation": None,
}
# JobConfig keys the Ianvs files set; fedpeft.config must not set them too.
MAPPED_KEYS = ("data.train", "data.test", "federation.rounds", "federation.num_clients", "model.devices",
               "eval.metrics", "model.name", "train.batch_size", "train.learning_rate", "train.local_epochs",
               "peft", "federation.aggregation")


# --------------------------------------------------------------------------------------------
# Mapping onto JobConfig


def _plugin_spec(url: str, name: str, base_dir: Path) -> str:
    """``file.py:name``: ``name`` is the ``ClassFactory`` alias the file registers (Ianvs's lookup) or
    a name it defines."""
    return f"{resolve_input(url, base_dir)}:{name}"


def _devices(gpu_num: int | None) -> str | list[str] | None:
    if gpu_num is None:
        return None
    available = torch.cuda.device_count()
    if gpu_num == 0 or available == 0:
        if gpu_num:
            log.info("testenv gpu_num=%d but no CUDA device is visible: running on the CPU", gpu_num)
        return "cpu"
    return [f"cuda:{i}" for i in range(min(gpu_num, available))]


def _metric_plugin(url: str, name: str, base_dir: Path, src: str, loc: tuple, root: yaml.Node | None,
                   problems: Problems) -> str | None:
    """``file.py:name`` of a metric file that loads and can be called; None (a problem recorded) if not."""
    from fedpeft.metrics import METRICS
    from fedpeft.registry import describe_failure

    path = resolve_input(url, base_dir)
    if not os.path.isfile(path):
        problems.add(src, loc, f"metric file not found: {url!r} is neither beside {Path(src).name} (in "
                     f"{os.path.abspath(base_dir)}) nor in the working directory ({os.getcwd()})", root)
        return None
    spec = f"{path}:{name}"  # Ianvs finds the function by its ClassFactory alias: the metric's name
    try:
        METRICS.get(spec)
    except RegistryError as e:
        problems.add(src, loc, str(e), root)
        return None
    except Exception as e:  # noqa: BLE001 - the plugin's own import error, with its file and line
        missing = f"; {e.name!r} is not installed where fedpeft runs" if isinstance(e, ModuleNotFoundError) else ""
        problems.add(src, loc, describe_failure(spec, "import", e) + missing, root)
        return None
    return spec


def _metric_columns(metrics: list[NamedUrl], base_dir: Path, src: str, root: yaml.Node | None,
                    problems: Problems) -> list[MetricColumn]:
    """One column per testenv metric: its file when it has a ``url`` (always, as in Ianvs, even
    for a name fedpeft has built in), else the built-in metric of that name."""
    from fedpeft.metrics import METRICS
    from fedpeft.metrics.plugin import EXPECTED

    columns = []
    for i, m in enumerate(metrics):
        if m is None:  # malformed: reported by the file's validation
            continue
        if m.url:
            spec = _metric_plugin(m.url, m.name, base_dir, src, ("testenv", "metrics", i, "url"), root, problems)
            if spec is not None:
                columns.append(MetricColumn(m.name, spec))
        elif m.name in BUILTIN_METRICS or m.name in METRICS:
            columns.append(MetricColumn(m.name, BUILTIN_METRICS.get(m.name, m.name)))
        else:
            problems.add(src, ("testenv", "metrics", i, "name"),
                         f"unknown metric {m.name!r}{did_you_mean(m.name, BUILTIN_METRICS)} Built in: "
                         f"{', '.join(BUILTIN_METRICS)}; or give a `url` to a Python file defining "
                         f"the function, {EXPECTED}", root)
    return columns


def _aggregator_name(module: Module | None, base_dir: Path) -> str:
    """The aggregator a module names: its file when it has a ``url``, else a built-in by name."""
    from fedpeft.aggregators import AGGREGATORS

    if module is None:
        return "fedavg"
    if module.url:  # the file always wins, as in Ianvs (its own FedAvg-PEFT.py runs, adapted)
        return _plugin_spec(module.url, module.name, base_dir)
    short = module.name.lower().removesuffix("-peft")
    return short if short in AGGREGATORS else module.name  # unknown: reported with the valid names


def _values(raw: Any) -> tuple[Any, ...]:
    """``{values: [a, b]}`` -> ``(a, b)``; a bare value (Ianvs shorthand) -> ``(value,)``."""
    if isinstance(raw, dict) and set(raw) == {"values"}:
        values = raw["values"]
        return tuple(values) if isinstance(values, list) else (values,)
    return (raw,)


def _dimensions(module: Module, index: int, agg: str, src: str, root: yaml.Node | None,
                problems: Problems) -> list[Dimension]:
    """The grid dimensions of one module, checking each hyperparameter name."""
    from fedpeft.aggregators import AGGREGATORS
    from fedpeft.params import valid_params

    if module.type == "basemodel":
        valid = list(BASEMODEL_HYPERPARAMETERS)
    else:
        try:
            valid = valid_params(AGGREGATORS.get(agg))
        except Exception as e:  # noqa: BLE001 - unknown name or broken plugin
            problems.add(src, ("algorithm", "modules", index, "name"), str(e), root)
            return []
    dims = []
    for j, item in enumerate(module.hyperparameters):
        key, raw = next(iter(item.items()))
        loc = ("algorithm", "modules", index, "hyperparameters", j, key)
        values = _values(raw)
        if module.type == "basemodel" and "." in key:
            why = check_dotted(key)
            if why:
                problems.add(src, loc, why, root)
            target: str | None = key
        elif key not in valid:
            problems.add(src, loc, f"unknown {module.type} hyperparameter {key!r}{did_you_mean(key, valid)} "
                         f"Valid: {', '.join(valid) or 'none'}" + (", or a dotted job key (data.max_seq_len)"
                                                                    if module.type == "basemodel" else ""), root)
            continue
        else:
            target = BASEMODEL_HYPERPARAMETERS[key] if module.type == "basemodel" else f"federation.aggregation.{key}"
        if not values:
            problems.add(src, loc, "needs at least one value", root)
        if key == "save_dir":
            problems.ignored.append(f"{src}: basemodel save_dir (each test case saves its adapter in its folder)")
        if key == "aggregation" and any(str(v).lower().removesuffix("-peft") != agg for v in values):
            problems.add(src, loc, f"names {list(values)} but the aggregation module runs {agg!r}; "
                         "give each aggregation its own algorithm file", root)
        dims.append(Dimension(f"{module.type}-{key}", values, target))
    model_dims = [d for d in dims if d.column == "basemodel-initial_model_url"]
    return [d for d in dims if d not in model_dims] + model_dims  # initial_model_url wins over model_name


def _case_base(base: dict, settings: list[Setting], peft_params: dict[str, dict], agg: str) -> tuple[dict, list[Setting]]:
    """The test case's base tree (peft and aggregation sections) and the settings left to apply."""
    tree = copy.deepcopy(base)
    method = next((s.value for s in settings if s.target == "peft.method"), tree.get("peft", {}).get("method", "lora"))
    tree["peft"] = {"method": method, **peft_params.get(str(method), {})}
    tree.setdefault("federation", {})["aggregation"] = {"name": agg}
    rest = [s if s.target != "peft.method" and not (s.column == "basemodel-initial_model_url" and not s.value)
            else Setting(s.column, s.value, None) for s in settings]
    return tree, rest


@dataclass
class _Algorithm:
    """What one algorithm file says: its grid, aggregator and module columns."""

    ref: AlgorithmRef
    path: Path
    dims: list[Dimension]
    agg: str
    modules: dict[str, str]
    initial_model: str | None


def _read_algorithm(ref: AlgorithmRef, job_dir: Path, problems: Problems) -> _Algorithm | None:
    """Read and check one algorithm file; None (its problems recorded) if it is unusable."""
    path = Path(resolve_input(ref.url, job_dir))
    src = str(path)
    tree, root = read_yaml(path, problems)
    algo = parse_file_model(tree, AlgorithmFile, src, root, problems) if tree is not None else None
    if algo is None:
        return None
    modules = algo.algorithm.modules
    basemodels = [m for m in modules if m.type == "basemodel"]
    aggs = [m for m in modules if m.type == "aggregation"]
    if len(basemodels) != 1 or len(aggs) > 1:
        problems.add(src, ("algorithm", "modules"), f"expected one basemodel and at most one aggregation "
                     f"module, found {len(basemodels)} and {len(aggs)}", root)
        return None
    if basemodels[0].url:
        problems.ignored.append(f"{src}: basemodel url (fedpeft trains with its own trainer)")
    agg_module = aggs[0] if aggs else None
    agg = _aggregator_name(agg_module, path.parent)
    dims = [d for i, m in enumerate(modules) for d in _dimensions(m, i, agg, src, root, problems)]
    names = {"basemodel": basemodels[0].name, "aggregation": agg_module.name if agg_module else "FedAvg-PEFT"}
    return _Algorithm(ref, path, dims, agg, names, algo.algorithm.initial_model_url)


def _model_name(url: str, base_dir: Path) -> str:
    """``initial_model_url``: a local folder or file (beside the algorithm file first), else a hub id."""
    path = resolve_input(url, base_dir)
    return path if os.path.exists(path) else url


def _algorithm_cases(algo: _Algorithm, base: dict, job: BenchmarkingJob, overrides: list[str],
                     problems: Problems) -> list[TestCase]:
    """The validated test cases of one algorithm; every failing one adds its problems."""
    base = copy.deepcopy(base)
    if algo.initial_model:
        base.setdefault("model", {})["name"] = _model_name(algo.initial_model, algo.path.parent)
    cases = []
    for k, settings in enumerate(expand(algo.dims)):
        case_tree, rest = _case_base(base, settings, job.fedpeft.peft, algo.agg)
        case_src = f"{algo.path} (algorithm {algo.ref.name!r}, test case {k + 1}: {settings_label(settings)})"
        cfg = make_config(case_tree, rest, overrides, case_src, problems, algo.path.parent)
        if cfg is not None:
            cases.append(TestCase(algo.ref.name, cfg, settings, dict(algo.modules)))
    return cases


def _testenv_tree(env: TestEnv, env_dir: Path, metrics: list[MetricColumn]) -> dict:
    """The JobConfig keys testenv.yaml sets."""
    tree: dict[str, Any] = {
        "data": {"train": resolve_input(env.dataset.train_data, env_dir, "testenv.dataset.train_data")},
        "federation": {"rounds": env.round, "num_clients": env.client_number},
        "eval": {"metrics": [m.key for m in metrics]},
    }
    if env.dataset.test_data:
        tree["data"]["test"] = resolve_input(env.dataset.test_data, env_dir, "testenv.dataset.test_data")
    devices = _devices(env.gpu_num)
    if devices is not None:
        tree["model"] = {"devices": devices}
    return tree


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_fedpeft(job: BenchmarkingJob, src: str, root: yaml.Node | None, problems: Problems) -> None:
    loc = ("benchmarkingjob", "fedpeft")
    check_baselines(job.fedpeft.baselines, src, root, problems, loc + ("baselines",))
    for key in flatten(job.fedpeft.config):
        clash = next((m for m in MAPPED_KEYS if key == m or key.startswith(m + ".")), None)
        if clash:
            problems.add(src, loc + ("config",) + tuple(key.split(".")),
                         f"{clash!r} is set by the Ianvs files (testenv.yaml / algorithm.yaml); set it there", root)
    from fedpeft.peft_methods import PEFT_METHODS

    for method in job.fedpeft.peft:
        if method not in PEFT_METHODS:
            problems.add(src, loc + ("peft", method), PEFT_METHODS.unknown_message(method), root)
    check_tree(copy.deepcopy(job.fedpeft.config), problems, src, root, loc + ("config",), partial=True)


def _check_algorithm_names(job: BenchmarkingJob, src: str, root: yaml.Node | None, problems: Problems) -> None:
    names = [a.name for a in job.test_object.algorithms]
    for i, name in enumerate(names):
        if name in BASELINES or names.count(name) > 1:
            problems.add(src, ("benchmarkingjob", "test_object", "algorithms", i, "name"),
                         f"algorithm name {name!r} is {'a baseline name' if name in BASELINES else 'used twice'}", root)


def _raw_metrics(tree: Any) -> list[NamedUrl | None]:
    """``testenv.metrics`` of a testenv.yaml that failed validation; None for a malformed entry."""
    raw = tree.get("testenv") if isinstance(tree, dict) else None
    raw = raw.get("metrics") if isinstance(raw, dict) else None
    out: list[NamedUrl | None] = []
    for item in raw if isinstance(raw, list) else []:
        try:
            out.append(NamedUrl.model_validate(item))
        except pydantic.ValidationError:
            out.append(None)
    return out


def _read_testenv(job: BenchmarkingJob, job_path: Path, problems: Problems) -> tuple[list[MetricColumn], dict]:
    """The metric columns and the base job tree (``fedpeft.config`` + what testenv.yaml sets)."""
    env_path = Path(resolve_input(job.testenv, job_path.parent))
    env_tree, env_root = read_yaml(env_path, problems)
    env_file = parse_file_model(env_tree, TestEnvFile, str(env_path), env_root, problems) if env_tree else None
    if env_file is None:  # its metric files are still checked: one error lists every problem
        _metric_columns(_raw_metrics(env_tree), env_path.parent, str(env_path), env_root, problems)
        return [], {}
    metrics = _metric_columns(env_file.testenv.metrics, env_path.parent, str(env_path), env_root, problems)
    own = resolve_data_paths({"job": job.name, "workspace": job.workspace, **copy.deepcopy(job.fedpeft.config)},
                             job_path.parent)
    return metrics, _merge(own, _testenv_tree(env_file.testenv, env_path.parent, metrics))


def load_ianvs(path: str | Path, overrides: list[str] | None = None) -> BenchmarkPlan:
    """Read ``benchmarkingjob.yaml`` and the files it names into a plan.

    Raises:
        ConfigError: every problem of the three files, each with file, line, key and closest valid
            key; the problems of every test case when the files themselves are sound.
    """
    path = Path(path)
    src = str(path)
    problems = Problems()
    tree, root = read_yaml(path, problems)
    problems.raise_if_any(src)
    parsed = parse_file_model(tree, BenchmarkingJobFile, src, root, problems)
    if parsed is None:  # without it the other files cannot be found
        problems.raise_if_any(src)
    job = parsed.benchmarkingjob
    _check_fedpeft(job, src, root, problems)
    _check_algorithm_names(job, src, root, problems)
    metrics, base = _read_testenv(job, path, problems)
    algos = [_read_algorithm(ref, path.parent, problems) for ref in job.test_object.algorithms]
    problems.raise_if_any(src)  # the test cases would only repeat these
    cases = [c for a in algos if a is not None for c in _algorithm_cases(a, base, job, overrides or [], problems)]
    plan = BenchmarkPlan(name=job.name, job_dir=Path(job.workspace) / job.name, cases=cases, metrics=metrics,
                         rank=job.rank, baselines=list(job.fedpeft.baselines), source=src,
                         ignored=list(dict.fromkeys(problems.ignored)))
    grid = [settings for a in algos if a is not None for settings in expand(a.dims)]
    check_rank_names(job.rank, rank_columns(metrics, plan.modules, grid), src, root, ("benchmarkingjob", "rank"),
                     problems)
    problems.raise_if_any(src)
    for line in plan.ignored:  # once per file and key
        log.info("ignored: %s", line)
    return plan
