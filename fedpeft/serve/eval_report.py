"""What ``fedpeft eval`` writes and prints: each column's scores side by side, and how sure each
difference is.

Every column answered the same generated questions (one ``eval:`` section for all), so each
difference against the first column gets a paired percentile bootstrap interval over those
questions (:func:`fedpeft.metrics.paired_bootstrap_ci`), for every metric with per-question
scores (a mean of per-answer scores such as ROUGE, or a corpus statistic such as BLEU). Held-out
loss and multiple-choice accuracy get theirs from the per-item scores (each question's loss, each
item's choice: :mod:`fedpeft.metrics.items`). Speed and memory get no difference.

The results folder (``--out``, else ``eval-<time>`` beside the first run) is always new::

    eval.json                           what was scored, the eval settings, every score and difference
    results.md                          the tables as printed
    <column>/<test>/metrics.json        one column's scores on one test file
    <column>/<test>/predictions.jsonl   its answers: question, reference, prediction
    <column>/<test>/item_scores.json    per-question held-out loss and multiple-choice choices
    lm_eval.json, <column>/lm_eval/     with --lm-eval: see :mod:`fedpeft.serve.lm_eval_bridge`
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from fedpeft.constants import CONFIG_FILE, ITEM_SCORES_FILE, KEY_HELDOUT_LOSS, KEY_MCQ_ACCURACY, PREDICTIONS_FILE
from fedpeft.errors import ConfigError
from fedpeft.io_utils import write_json, write_jsonl, write_text
from fedpeft.metrics import METRICS, paired_bootstrap_ci
from fedpeft.metrics.items import ITEM_METRICS, paired_item_ci
from fedpeft.serve.evaluate import Column, Scores, TestSet
from fedpeft.tables import markdown_table

EVAL_SUMMARY_FILE = "eval.json"
EVAL_TABLES_FILE = "results.md"
EVAL_METRICS_FILE = "metrics.json"
CONFIDENCE = 0.95

Results = dict[tuple[str, str], Scores]  # (column label, test label) -> (metrics, predictions, per-item scores)


def out_dir(out: str | None, columns: list[Column]) -> Path:
    """A new folder for the results: ``out`` (new or empty), else ``eval-<time>`` beside the first run
    (beside the first adapter folder that is not in a run; in the job's folder for a job YAML).

    Raises:
        ConfigError: if ``out`` is a file or holds files (results are never overwritten).
    """
    if out:
        path = Path(out).expanduser()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(f"--out {out} already holds files; fedpeft eval never overwrites results: give a new "
                              "or empty folder")
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = _home(columns) / f"eval-{dt.datetime.now():%Y%m%d-%H%M%S-%f}"
    path.mkdir(parents=True)  # a new name: exist_ok stays False
    return path


def _home(columns: list[Column]) -> Path:
    """The folder the default results folder goes in."""
    adapter = next((c.adapter for c in columns if c.adapter is not None), None)
    if adapter is None:  # the base model of a job YAML
        return Path(columns[0].cfg.workspace) / columns[0].cfg.job
    in_run = (adapter.path.parent / CONFIG_FILE).is_file()
    return (adapter.path.parent if in_run else adapter.path).parent


def slug(label: str) -> str:
    """``label`` as a folder or file name."""
    return re.sub(r"[^\w.-]+", "_", label).strip("._") or "column"


def write_scores(out: Path, column: Column, test: TestSet, scores: Scores) -> None:
    """``<column>/<test>/metrics.json``, ``predictions.jsonl`` and ``item_scores.json``."""
    metrics, predictions, items = scores
    folder = out / slug(column.label) / slug(test.label)
    write_json(folder / EVAL_METRICS_FILE, metrics)
    write_jsonl(folder / PREDICTIONS_FILE, predictions)
    if items:
        write_json(folder / ITEM_SCORES_FILE, items)


def per_question(name: str) -> bool:
    """Whether metric ``name`` has per-question scores to resample (see :mod:`fedpeft.metrics`)."""
    metric = METRICS.get(name)
    return hasattr(metric, "per_example") or (hasattr(metric, "statistics") and hasattr(metric, "from_statistics"))


def differences(first: Scores, other: Scores, quality: list[str], with_ci: list[str]) -> dict[str, dict]:
    """``other - first`` for each ``quality`` metric both have, with the paired bootstrap interval
    for those in ``with_ci``. (Costs such as seconds and memory are not compared: they measure the
    machine as much as the adapter.)

    Returns:
        ``{metric: {"difference": float, "ci95": [low, high] or None}}``.
    """
    (base, base_preds, base_items), (mine, preds, items) = first, other
    paired = [p["question"] for p in preds] == [p["question"] for p in base_preds]  # the same questions
    out = {}
    for name in quality:
        value = mine.get(name)
        if not isinstance(value, (int, float)) or not isinstance(base.get(name), (int, float)):
            continue
        ci = None
        if name in ITEM_METRICS:
            found = paired_item_ci(name, items, base_items, confidence=CONFIDENCE)
            ci = list(found) if found else None
        elif name in with_ci and paired and preds:
            ci = list(paired_bootstrap_ci(name, predictions=[p["prediction"] for p in preds],
                                          baseline=[p["prediction"] for p in base_preds],
                                          references=[p["reference"] for p in preds], confidence=CONFIDENCE))
        out[name] = {"difference": value - base[name], "ci95": ci}
    return out


def compare(columns: list[Column], tests: list[TestSet], results: Results) -> dict[str, dict[str, dict]]:
    """Every column's :func:`differences` against the first column, per test file."""
    quality = [*columns[0].cfg.eval.metrics, KEY_HELDOUT_LOSS, KEY_MCQ_ACCURACY]
    with_ci = [m for m in columns[0].cfg.eval.metrics if per_question(m)]
    first = columns[0].label
    return {t.label: {c.label: differences(results[first, t.label], results[c.label, t.label], quality, with_ci)
                      for c in columns[1:]} for t in tests}


def _number(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def _cell(diff: dict) -> str:
    ci = diff["ci95"]
    return f"{diff['difference']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")


def table(test: TestSet, columns: list[Column], results: Results, diffs: dict[str, dict]) -> str:
    """One test file's Markdown table: a row per metric, a column per scored column, then each
    difference against the first column with its 95 % interval."""
    metrics = {c.label: results[c.label, test.label][0] for c in columns}
    names = list(dict.fromkeys(k for m in metrics.values() for k in m))
    others = columns[1:]
    headers = ["metric", *(c.label for c in columns),
               *(f"{c.label} - {columns[0].label} (95% CI)" for c in others)]
    rows = [[name, *(_number(metrics[c.label][name]) if name in metrics[c.label] else "" for c in columns),
             *(_cell(diffs[c.label][name]) if name in diffs[c.label] else "" for c in others)] for name in names]
    generated = len(results[columns[0].label, test.label][1])
    of = f" of {test.in_file}" if test.in_file > len(test.rows) else ""
    title = f"{test.path}: {len(test.rows)}{of} rows, {generated} answers generated"
    return f"{title}\n\n" + markdown_table(headers, rows, ["left"] + ["right"] * (len(headers) - 1))


def report(out: Path, columns: list[Column], tests: list[TestSet], results: Results,
           more_tables: tuple[str, ...] = ()) -> str:
    """Write ``eval.json`` and ``results.md`` (``more_tables`` after the test files' tables, e.g.
    lm-eval's); return the tables to print."""
    diffs = compare(columns, tests, results)
    text = "\n\n".join([*(table(t, columns, results, diffs[t.label]) for t in tests), *more_tables])
    write_text(out / EVAL_TABLES_FILE, text + "\n")
    write_json(out / EVAL_SUMMARY_FILE, {
        "base_model": columns[0].cfg.model.name,
        "columns": [{"label": c.label, "adapter": str(c.adapter.path) if c.adapter else None, "given": str(c.source),
                     "system_prompt": c.cfg.data.system_prompt} for c in columns],
        "tests": [{"label": t.label, "file": str(t.path), "rows": len(t.rows), "rows_in_file": t.in_file}
                  for t in tests],
        "eval": columns[0].cfg.eval.model_dump(mode="json"),
        "results": {t.label: {c.label: results[c.label, t.label][0] for c in columns} for t in tests},
        "differences_against": columns[0].label, "differences": diffs,
    })
    return text
