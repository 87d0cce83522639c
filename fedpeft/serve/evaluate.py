"""``fedpeft eval``: score saved adapters, or their base model, on any question/answer test files.

A column is an adapter (a run folder, its ``adapter/`` folder, or a folder from ``fedpeft export
--out``) or the base model alone (``--base``). Each adapter is prompted as it was trained
(``data.system_prompt`` and ``data.prompt_template`` of its run's ``config.yaml``, or what
``fedpeft export`` saved with it); the base model as the first adapter, as a run's zero-shot
evaluation prompts it. Every column is scored with the first adapter's job's ``eval:`` section
and ``data.max_seq_len`` (the held-out loss's truncation), with the ``key=value`` overrides
applied, so all columns answer the same questions with the same generation settings and their
per-question scores pair up (:mod:`fedpeft.serve.eval_report` compares them).

The base model is loaded once. Each adapter is put on it (:func:`~fedpeft.serve.saved.attach_adapter`),
scored through :func:`fedpeft.worker.evaluate_global`, the code a run evaluates with, and taken
off again, so adapters of different PEFT methods can share the one base. With ``--lm-eval``, each
column's model also goes through EleutherAI's lm-evaluation-harness while it is loaded
(:mod:`fedpeft.serve.lm_eval_bridge`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedpeft.config import EvalConfig, JobConfig, apply_overrides, load_config, validate_tree
from fedpeft.constants import CONFIG_FILE
from fedpeft.data.federated import cap_rows
from fedpeft.data.io import load_examples
from fedpeft.errors import ConfigError, DataError, ModelError
from fedpeft.serve.saved import (
    KEY_GENERATION,
    KEY_SYSTEM_PROMPT,
    SavedAdapter,
    attach_adapter,
    detach_adapter,
    open_adapter,
)

log = logging.getLogger(__name__)

BASE_LABEL = "base"
# What a key=value override of `fedpeft eval` may set: how answers are generated and scored.
OVERRIDABLE = ("eval.", "data.system_prompt", "data.max_seq_len", "data.question_field", "data.answer_field",
               "data.max_test_samples")
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Column:
    """One column of the comparison: an adapter, or the base model alone (``adapter`` None)."""

    label: str
    cfg: JobConfig  # the model, the prompt settings (data) and the eval section it is scored with
    adapter: SavedAdapter | None
    source: Path  # the run folder, adapter folder or job YAML given


@dataclass(frozen=True)
class TestSet:
    """A test file's question/answer rows (at most ``data.max_test_samples`` of its ``in_file``)."""

    label: str
    path: Path
    rows: list[dict]
    in_file: int = 0


Scores = tuple[dict[str, float], list[dict], dict]  # (metrics, predictions, per-item scores: evaluate's details)
ModelVisitor = Callable[[Column, PreTrainedModel | PeftModel, PreTrainedTokenizerBase], None]  # (--lm-eval)


def split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """``(folders, overrides)``: a ``key=value`` item that is not an existing path is an override."""
    overrides = [i for i in items if "=" in i and not Path(i).exists()]
    return [i for i in items if i not in overrides], overrides


def check_overrides(overrides: list[str]) -> None:
    """Raise ConfigError for an override that does not set how answers are generated or scored."""
    bad = [o for o in overrides if not o.partition("=")[0].strip().startswith(OVERRIDABLE)]
    if bad:
        raise ConfigError(f"fedpeft eval: {bad[0]!r} is not an evaluation setting; overrides set eval.* (e.g. "
                          "eval.max_samples=50) or data.system_prompt, data.max_seq_len, data.max_test_samples, "
                          "data.question_field, data.answer_field")


def job_config(saved: SavedAdapter, overrides: list[str]) -> JobConfig:
    """The job settings ``saved`` is scored with: its run's ``config.yaml``, else what export saved.

    Raises:
        ConfigError: if the settings with ``overrides`` applied are invalid (listing every problem).
    """
    run_config = saved.path.parent / CONFIG_FILE
    if run_config.is_file():
        return load_config(run_config, overrides)
    info = saved.info()  # an exported folder: model, peft, prompt settings and generation settings
    generation = {k: v for k, v in (info.get(KEY_GENERATION) or {}).items() if v is not None}
    tree = {"model": info["model"], "peft": info["peft"], "eval": generation,
            "data": {KEY_SYSTEM_PROMPT: info.get(KEY_SYSTEM_PROMPT), "prompt_template": info.get("prompt_template")}}
    return validate_tree(apply_overrides(tree, overrides), source=str(saved.path))


def resolve_columns(targets: list[str], base: bool, overrides: list[str]) -> list[Column]:
    """The columns to score, the base model first (``base``), then the adapters in the order given.

    A job YAML (with ``base`` and nothing else) names a base model to score alone.

    Raises:
        ConfigError: for nothing to score, a job YAML given with adapters or without ``base``.
        ModelError: for a folder that is no adapter, or adapters of different base models.
    """
    check_overrides(overrides)
    yamls = [t for t in targets if t.endswith(YAML_SUFFIXES) and Path(t).is_file()]
    if yamls and (len(targets) > 1 or not base):
        raise ConfigError(f"fedpeft eval: {yamls[0]} is a job config, not an adapter; give it alone with --base to "
                          "score its base model, or give run or adapter folders")
    if yamls:
        return [Column(BASE_LABEL, load_config(yamls[0], overrides), None, Path(yamls[0]))]
    if not targets:
        raise ConfigError("fedpeft eval: give a run folder or adapter folder to score (with --base, the base model "
                          "too), or a job YAML with --base")
    saved = [open_adapter(t, flag="") for t in targets]
    configs = [job_config(s, overrides) for s in saved]
    check_one_base(saved, configs)
    common, max_seq_len = configs[0].eval, configs[0].data.max_seq_len
    columns = [Column(label, scored_with(cfg, common, max_seq_len), s, Path(t))
               for label, cfg, s, t in zip(column_labels(saved), configs, saved, targets)]
    for column, cfg in zip(columns[1:], configs[1:]):
        if (cfg.eval, cfg.data.max_seq_len) != (common, max_seq_len):
            log.warning("%s: scored with the eval settings of %s (its own job's differ), so that every column "
                        "answers the same questions the same way", column.source, columns[0].source)
    return ([Column(BASE_LABEL, columns[0].cfg, None, columns[0].source)] if base else []) + columns


def scored_with(cfg: JobConfig, common: EvalConfig, max_seq_len: int) -> JobConfig:
    """``cfg`` with the eval section and held-out truncation every column is scored with."""
    return cfg.model_copy(update={"eval": common, "data": cfg.data.model_copy(update={"max_seq_len": max_seq_len})})


def check_one_base(saved: list[SavedAdapter], configs: list[JobConfig]) -> None:
    """Raise ModelError unless every adapter was trained on the same base model (device aside)."""
    def base_of(cfg: JobConfig) -> dict:
        return cfg.model.model_dump(mode="json", exclude={"devices"})

    first = base_of(configs[0])
    for s, cfg in zip(saved[1:], configs[1:]):
        if base_of(cfg) != first:
            differ = ", ".join(f"{k} {v!r} (not {first[k]!r})" for k, v in base_of(cfg).items() if v != first[k])
            raise ModelError(f"{s.path}: this adapter's base model has {differ}, unlike {saved[0].path}'s; "
                             "fedpeft eval compares adapters of one base model (it loads it once): score the "
                             "others in a separate fedpeft eval")


def column_labels(saved: list[SavedAdapter]) -> list[str]:
    """Short distinct labels: the run id (or the folder's name), widened with parents on a clash."""
    def name(s: SavedAdapter, depth: int) -> str:
        folder = s.path.parent if (s.path.parent / CONFIG_FILE).is_file() else s.path  # a run's adapter/: the run
        return "/".join(folder.parts[-depth:])

    for depth in range(1, 4):
        labels = [name(s, depth) for s in saved]
        if len(set(labels)) == len(labels) and BASE_LABEL not in labels:
            return labels
    return [f"{i}:{label}" for i, label in enumerate(labels, 1)]


def load_tests(paths: list[str], cfg: JobConfig) -> list[TestSet]:
    """Each test file's rows, read as a run reads ``data.test``: the job's question/answer fields, and
    the same seeded subset of ``data.max_test_samples`` rows (``data.max_test_samples=null``: all).

    Raises:
        DataError: naming the file (and line) that is missing, empty or lacks a question or answer.
    """
    tests = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.is_file():
            raise DataError(f"--test {given}: no such file; give a JSONL file with one {{\"question\": ..., "
                            "\"answer\": ...}} object per line (fedpeft data split writes one)")
        rows = load_examples(path, cfg.data.question_field, cfg.data.answer_field)
        kept = cap_rows(rows, cfg.data.max_test_samples, cfg.seed + 1)  # as prepare_data caps data.test
        if len(kept) < len(rows):
            log.warning("%s: scoring %d of its %d rows (the job's data.max_test_samples, the run's seeded subset); "
                        "data.max_test_samples=null scores them all", path, len(kept), len(rows))
        tests.append(TestSet(path.stem, path, kept, len(rows)))
    stems = [t.label for t in tests]
    if len(set(stems)) < len(stems):  # two test.jsonl from different folders
        tests = [TestSet(f"{i}-{t.label}", t.path, t.rows, t.in_file) for i, t in enumerate(tests, 1)]
    return tests


def score(columns: list[Column], tests: list[TestSet], device: str,
          done: Callable[[Column, TestSet, Scores], None], each_model: ModelVisitor | None = None) -> None:
    """Score every column on every test set; ``done`` receives each result as it comes.

    The base model is loaded once; the base column is scored while the first adapter is on it
    (disabled), as a run's zero-shot evaluation scores its base through the job's adapter.
    ``each_model`` (``--lm-eval``) receives every column's model: the base model alone before any
    adapter is on it, each adapter's while it is on.
    """
    from fedpeft.models import load_base_model

    base, tok = load_base_model(columns[0].cfg.model, device)
    default_template = tok.chat_template
    adapters = [c for c in columns if c.adapter is not None]
    plain = [c for c in columns if c.adapter is None]
    for column in plain if each_model else []:
        each_model(column, base, tok)
    for i, host in enumerate(adapters or (plain if tests else [])):
        model = _attach(base, host)
        try:
            for column in (plain if i == 0 else []) + ([host] if host.adapter else []):
                _use_template(tok, column.cfg, default_template)
                for test in tests:
                    done(column, test, _evaluate(model, tok, device, column, test))
            if each_model and host.adapter is not None:
                each_model(host, model, tok)
        finally:
            base = detach_adapter(model)


def _attach(base: PreTrainedModel, column: Column) -> PeftModel:
    """``base`` with the column's adapter on it; for the base model alone, the job's fresh adapter."""
    if column.adapter is not None:
        return attach_adapter(base, column.adapter)
    from fedpeft.peft_methods import build_peft_method, wrap_model

    return wrap_model(base, build_peft_method(column.cfg.peft.method, column.cfg.peft.params))


def _use_template(tok: PreTrainedTokenizerBase, cfg: JobConfig, default: str | None) -> None:
    """The chat template the column's job prompted with (``data.prompt_template``, else the model's)."""
    from fedpeft.data.prompts import chat_template_from

    tok.chat_template = chat_template_from(cfg.data.prompt_template) if cfg.data.prompt_template else default


def _evaluate(model: PeftModel, tok: PreTrainedTokenizerBase, device: str, column: Column, test: TestSet) -> Scores:
    """The column's metrics and predictions on ``test``, through the run's own evaluation."""
    from fedpeft.adapters import get_trainable_state
    from fedpeft.worker import Worker, evaluate_global

    log.info("scoring %s on %s (%d rows)", column.label, test.path, len(test.rows))
    state = None if column.adapter is None else get_trainable_state(model)  # None: the adapter disabled
    items: dict = {}
    metrics, predictions = evaluate_global(Worker(model, tok, device), state, column.cfg, test.rows, items)
    return metrics, predictions, items

