"""``fedpeft eval --lm-eval TASKS``: EleutherAI's lm-evaluation-harness on every column's model.

lm-eval's ``HFLM`` wraps the model object ``fedpeft eval`` already loaded (the base model, or the
base with an adapter attached), so every base model fedpeft loads (the built-in names, GGUF files,
quantised bases) is scored as the rest of ``fedpeft eval`` scores it, and each adapter takes its
turn on the one base. lm-eval's defaults apply: prompts without a chat template, its task's own
few-shot setting and metrics, its standard errors.

lm-eval runs offline: the hub and ``datasets`` are put in offline mode for the run, so a task
whose data set is on the Hugging Face hub fails at once with a line saying how to make it local
(a task YAML with ``dataset_path: json`` and ``dataset_kwargs: {data_files: ...}`` in a
``--lm-eval-include`` folder). Relative ``data_files`` are read from the folder of the YAML that
names them (lm-eval alone reads them from the working directory). ``datasets`` caches the data in
the results folder while the tasks run and that cache is removed at the end; lm-eval's request
cache stays off. This module imports lm-eval, so it is imported only when ``--lm-eval`` is given.

Written into the results folder::

    lm_eval.json                        per task, metric and column: value and standard error
    <column>/lm_eval/<task>.jsonl       lm-eval's per-document records: prompt, target, response, scores
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import lm_eval
import torch
from lm_eval.api.group import Group
from lm_eval.api.task import Task
from lm_eval.evaluator import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import PreTrainedTokenizerBase

from fedpeft.errors import ConfigError, DataError, ModelError
from fedpeft.io_utils import write_json, write_jsonl
from fedpeft.serve.eval_report import slug
from fedpeft.serve.evaluate import Column
from fedpeft.tables import markdown_table

log = logging.getLogger(__name__)

LM_EVAL_FILE = "lm_eval.json"
LM_EVAL_DIR = "lm_eval"  # <column>/lm_eval/<task>.jsonl
CACHE_DIR = "lm_eval_cache"  # the datasets cache while the tasks run; removed afterwards
YAML_SUFFIXES = (".yaml", ".yml")
LIST_TASKS = "lm-eval ls tasks"
GENERATE = "generate_until"
Scores = dict[str, dict[str, dict]]  # task -> metric -> {"value": float, "stderr": float | None}


class Harness:
    """The lm-eval tasks named on the command line, run on each column's model in turn.

    Build it before the model loads (unknown names are refused then), enter :meth:`session`
    around the scoring, call :meth:`score` per column, then :meth:`report`.
    """

    def __init__(self, names: list[str], include: list[str], limit: int | None) -> None:
        """Find every task, group or tag in lm-eval's index and the ``include`` folders.

        Args:
            names: Task, group or tag names, or task YAML files.
            include: Folders of task YAML files (``--lm-eval-include``).
            limit: Score only the first ``limit`` documents of each task.

        Raises:
            ConfigError: for an include folder that does not exist or a name found nowhere.
        """
        self.names, self.limit = names, limit
        self.include = [_folder(d) for d in include]
        self.manager = _manager(names, self.include)
        self.specs = [spec for name in names for spec in _specs(name, self.manager, self.include)]
        self._loaded: list[Task | Group] = []
        self._out: Path | None = None
        self.results: dict[str, dict] = {}  # column label -> simple_evaluate's results

    @contextlib.contextmanager
    def session(self, out: Path, columns: list[Column]) -> Iterator[None]:
        """Offline, with the datasets cache in ``out``: load the tasks' data, then let the columns be scored.

        Raises:
            DataError: for a task whose data is on the hub or missing.
            ModelError: for a generating task and a prompt-learning adapter (see :meth:`_check_generation`).
        """
        cache, self._out = out / CACHE_DIR, out
        try:
            with _offline(cache):
                with _no_datasets_progress():
                    self._loaded = [obj for spec, folder in self.specs for obj in _load(self.manager, spec, folder)]
                self._check_generation(columns)
                yield
        finally:
            self._loaded = []
            shutil.rmtree(cache, ignore_errors=True)

    def _check_generation(self, columns: list[Column]) -> None:
        """Refuse generating tasks on prompt-learning adapters: lm-eval generates through
        ``PeftModel.generate``, which mis-places their virtual tokens (see :mod:`fedpeft.generation`)."""
        generating = [t.task_name for t in _leaf_tasks(self._loaded) if t.get_config("output_type") == GENERATE]
        learned = [c for c in columns if c.adapter is not None and c.adapter.prompt_learning]
        if generating and learned:
            raise ModelError(f"--lm-eval {generating[0]} generates answers, which lm-eval cannot do for the "
                             f"{learned[0].adapter.method} adapter {learned[0].source} (PeftModel.generate mis-places "
                             "virtual tokens); score it on loglikelihood tasks (multiple choice), or with --test")

    def score(self, column: Column, model: torch.nn.Module, tok: PreTrainedTokenizerBase) -> None:
        """Run the tasks on ``model`` (the column's base model or adapter) inside :meth:`session`; keep
        the results and write the column's per-document records."""
        assert self._out is not None, "Harness.score runs inside Harness.session"
        log.info("lm-eval: scoring %s on %s", column.label, ", ".join(self.names))
        with _quiet_lm_eval(), torch.no_grad():
            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=column.cfg.eval.batch_size)
            result = simple_evaluate(model=lm, tasks=self._loaded, task_manager=self.manager, limit=self.limit,
                                     log_samples=True)
        for task, samples in result.pop("samples", {}).items():  # the documents are not kept in memory
            write_jsonl(self._out / slug(column.label) / LM_EVAL_DIR / f"{slug(task)}.jsonl",
                        map(_sample_record, samples))
        self.results[column.label] = result

    def report(self, out: Path) -> str:
        """Write ``lm_eval.json``; return the table to print."""
        labels = list(self.results)
        scores = {label: task_scores(r) for label, r in self.results.items()}
        tasks = list(scores[labels[0]])
        first = self.results[labels[0]]
        write_json(out / LM_EVAL_FILE, {
            "lm_eval_version": lm_eval.__version__, "tasks": self.names, "include": [str(p) for p in self.include],
            "limit": self.limit, "columns": labels,
            "results": {t: {label: scores[label].get(t, {}) for label in labels} for t in tasks},
            "differences_against": labels[0], "differences": differences(scores, tasks),
            "documents": first.get("n-samples", {}), "n_shot": first.get("n-shot", {}),
            "versions": first.get("versions", {}), "higher_is_better": first.get("higher_is_better", {}),
        })
        return table(scores, tasks, first.get("n-samples", {}))


def _folder(given: str) -> Path:
    path = Path(given).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"--lm-eval-include {given}: no such folder; give a folder of lm-eval task YAML files")
    return path


def _manager(names: list[str], include: list[Path]) -> TaskManager:
    """lm-eval's task index: the include folders (and those of YAML files given) alone when they hold
    every name (indexing lm-eval's own thousands of tasks takes seconds), else lm-eval's tasks too
    (an include task wins a clash)."""
    folders = list(dict.fromkeys([*include, *(Path(n).expanduser().resolve().parent for n in names if _is_yaml(n))]))
    if folders:
        local = TaskManager(include_path=folders, include_defaults=False)
        if all(_is_yaml(n) or n in local.task_index for n in names):
            return local
    log.info("lm-eval: indexing its tasks")
    return TaskManager(include_path=folders or None)


def _is_yaml(name: str) -> bool:
    return name.endswith(YAML_SUFFIXES) and Path(name).expanduser().is_file()


def _specs(name: str, manager: TaskManager, include: list[Path]) -> list[tuple[str, Path]]:
    """``(spec, folder)`` pairs to load ``name`` with: a tag expands to its tasks, each loaded from the
    folder of its YAML (where its relative data files are).

    Raises:
        ConfigError: if ``name`` is neither a YAML file nor a task, group or tag lm-eval knows.
    """
    if _is_yaml(name):  # by the name it registers (its folder is indexed): lm-eval loads a group by path wrongly
        path = Path(name).expanduser().resolve()
        named = [n for n, e in manager.task_index.items() if e.yaml_path and Path(e.yaml_path).resolve() == path]
        return [(named[0] if named else str(path), path.parent)]
    entry = manager.task_index.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        where = f"lm-eval's tasks or --lm-eval-include {' '.join(map(str, include))}" if include else "lm-eval's tasks"
        flag = "".join(f" --include_path {p}" for p in include)
        raise ConfigError(f"--lm-eval {name}: no such task, group or tag in {where}"
                          + (f" (did you mean {', '.join(close)}?)" if close else "")
                          + f"; list them with: {LIST_TASKS}{flag}, or give a task YAML file")
    if entry.yaml_path is None:  # a tag: the tasks that carry it
        return [spec for member in sorted(entry.tags) for spec in _specs(member, manager, include)]
    return [(name, Path(entry.yaml_path).parent)]


def _load(manager: TaskManager, spec: str, folder: Path) -> list[Task | Group]:
    """The task or group ``spec`` names, its data read from ``folder`` (relative ``data_files``).

    Raises:
        DataError: for data on the hub (fedpeft eval downloads nothing) or a missing data file.
    """
    try:
        with _working_dir(folder):
            loaded = manager.load([spec])
    except ConnectionError as e:
        raise DataError(f"--lm-eval {spec}: its data set is not local ({e}); fedpeft eval runs lm-eval offline "
                        "and downloads nothing: copy the task's YAML into a --lm-eval-include folder with "
                        "dataset_path: json and dataset_kwargs: {data_files: <local JSONL>} (relative to the "
                        "YAML)") from None
    except FileNotFoundError as e:
        raise DataError(f"--lm-eval {spec}: {e} (relative data_files are read from {folder})") from None
    groups = list(loaded.get("groups", {}).values())
    return groups[:1] if groups else list(loaded["tasks"].values())  # a group holds its tasks and subgroups


def _leaf_tasks(loaded: list[Task | Group]) -> list[Task]:
    return [t for obj in loaded for t in (obj.get_all_tasks() if isinstance(obj, Group) else [obj])]


@contextlib.contextmanager
def _working_dir(folder: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _offline(cache: Path) -> Iterator[None]:
    """No network for the hub or ``datasets``, and the datasets cache in ``cache``; all restored on exit.

    The environment variables reach code that reads them late; ``huggingface_hub`` and ``datasets``
    read theirs when first imported (transformers imported them long before), so their constants
    are set too.
    """
    import datasets.config
    import huggingface_hub.constants

    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache)}
    constants: list[tuple[ModuleType, str, object]] = [
        (huggingface_hub.constants, "HF_HUB_OFFLINE", True), (datasets.config, "HF_HUB_OFFLINE", True),
        (datasets.config, "HF_DATASETS_OFFLINE", True), (datasets.config, "HF_DATASETS_CACHE", cache),
        (datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads"),
        (datasets.config, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")]
    saved_env = {k: os.environ.get(k) for k in env}
    saved = [(module, name, getattr(module, name)) for module, name, _ in constants]
    os.environ.update(env)
    for module, name, value in constants:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _no_datasets_progress() -> Iterator[None]:
    """Without the progress bar ``datasets`` shows while it converts each data file."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


class _Deliberate(logging.Filter):
    """Drops lm-eval's warnings about the model object fedpeft passes on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("`pretrained` model kwarg", "Passed an already-initialized model"))


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's warnings only (its info lines too with ``fedpeft -v``)."""
    root, models = logging.getLogger("lm_eval"), logging.getLogger("lm_eval.models.huggingface")
    level, deliberate = root.level, _Deliberate()
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        root.setLevel(logging.WARNING)
    models.addFilter(deliberate)
    try:
        yield
    finally:
        root.setLevel(level)
        models.removeFilter(deliberate)


def task_scores(results: dict) -> Scores:
    """``{task: {metric: {"value", "stderr"}}}`` from :func:`lm_eval.simple_evaluate`'s results, groups
    included. A metric under a filter other than lm-eval's ``none`` is named ``metric,filter``.
    """
    scores: Scores = {}
    for task, row in results["results"].items():
        metrics = {}
        for key, value in row.items():
            metric, sep, kept = key.partition(",")
            if not sep or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = row.get(f"{metric}_stderr,{kept}")
            metrics[metric if kept == "none" else key] = {
                "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
        scores[task] = metrics
    return scores


def differences(scores: dict[str, Scores], tasks: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """``{task: {column: {metric: value - first column's value}}}`` for every column after the first."""
    labels = list(scores)
    first = scores[labels[0]]
    return {t: {label: {m: s["value"] - first[t][m]["value"] for m, s in scores[label].get(t, {}).items()
                        if m in first.get(t, {})} for label in labels[1:]} for t in tasks}


def table(scores: dict[str, Scores], tasks: list[str], documents: dict) -> str:
    """The Markdown table of every task's metrics: a column per scored column (value ± standard error),
    then each difference against the first column."""
    labels = list(scores)
    diffs = differences(scores, tasks)
    headers = ["task", "metric", *labels, *(f"{label} - {labels[0]}" for label in labels[1:])]
    rows = []
    for task in tasks:
        for metric in scores[labels[0]].get(task, {}):
            cells = [_cell(scores[label].get(task, {}).get(metric)) for label in labels]
            gains = [diffs[task][label].get(metric) for label in labels[1:]]
            rows.append([task, metric, *cells, *("" if g is None else f"{g:+.4f}" for g in gains)])
    counts = ", ".join(f"{t} {n['effective']}" for t, n in documents.items() if isinstance(n, dict) and "effective" in n)
    title = f"lm-eval {lm_eval.__version__}" + (f" (documents: {counts})" if counts else "")
    return f"{title}\n\n" + markdown_table(headers, rows, ["left", "left"] + ["right"] * (len(headers) - 2))


def _cell(score: dict | None) -> str:
    if score is None:
        return ""
    stderr = score["stderr"]
    return f"{score['value']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _sample_record(sample: dict) -> dict:
    """One document as lm-eval scored it: its prompt, target, the model's response and the scores."""
    arguments = sample.get("arguments") or [[None]]
    return {"doc_id": sample.get("doc_id"), "prompt": arguments[0][0], "target": sample.get("target"),
            "response": sample.get("filtered_resps"), "filter": sample.get("filter"),
            **{m: sample[m] for m in sample.get("metrics", []) if m in sample}}
