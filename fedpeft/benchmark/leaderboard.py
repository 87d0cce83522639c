"""The ranked leaderboard of a benchmark job: ``rank/all_rank.csv``, ``rank/selected_rank.csv``
(and ``.md``), and the terminal table.

The leaderboard is rebuilt from the test case folders (``<algorithm>/<uuid>/testcase.json``), so
re-running a job adds its rows and never duplicates old ones. The selected view, like Ianvs's
``selected_rank``, then keeps one row of those that read the same in every selected column.
Rows are ranked on the values the tables show (metrics to 4 decimals), so a tie in the first
sort key as shown is broken by the next key. Columns, in this order:
``rank, algorithm, <metrics>, paradigm, <modules>, <hyperparameters>, <extras>, time, url``,
where the extras are rounds, clients, trainable parameters, bytes per round, wall seconds,
peak memory (MB; GPU memory too when CUDA ran), held-out loss and ``pct_of_centralized`` (the
first metric of ``sort_by`` as a percentage of the centralised baseline trained the same way;
for a lower-is-better metric, centralised / row). ``local_only`` adds one row per client plus
``local_only (mean)`` and ``local_only (worst)`` (per column, the worst client).

When any test case trained with differential privacy, two more extras follow: ``epsilon`` (the
budget spent, from the run's ``summary.json``; lower is more private, so it sorts like a cost;
``inf`` for a run without DP, which has no guarantee, and 0 for zero-shot, which trains on
nothing) and ``dp`` (the level and the delta the epsilon is at). The selected view shows them
too, whatever ``selected_dataitem`` lists: a DP score read without its epsilon misleads.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedpeft.benchmark.constants import (
    ALL_RANK,
    ASCENDING_COLUMNS,
    CENTRALIZED,
    COL_BYTES_PER_UPDATE,
    COL_DP,
    COL_EPSILON,
    COL_HELDOUT_LOSS,
    COL_PCT_CENTRALIZED,
    COL_PEAK_GPU_MEMORY,
    COL_PEAK_MEMORY,
    COL_WALL_SECONDS,
    EXTRA_COLUMNS,
    KEY_PRIVACY,
    LOCAL_ONLY,
    PAIRED_COLUMNS,
    PLAN_FILE,
    RANK_DIR,
    SELECTED_RANK,
    SITE_COLUMNS,
    TESTCASE_FILE,
    ZERO_SHOT,
)
from fedpeft.benchmark.paired import add_paired_cis
from fedpeft.benchmark.plan import BenchmarkPlan
from fedpeft.benchmark.schema import RankSpec
from fedpeft.constants import KEY_EPSILON, SUMMARY_FILE
from fedpeft.errors import ConfigError
from fedpeft.io_utils import write_json, write_text
from fedpeft.tables import markdown_table

# row keys for grouping and the report, never shown (_privacy: summary.json's privacy entry)
HIDDEN = ("_kind", "_group", "_session", "_dir", "_zs", "_privacy")
PRIVACY_COLUMNS = (COL_EPSILON, COL_DP)
PRIVACY_NOTE = ("epsilon: privacy budget spent, at the delta in column dp (lower is more private); "
                "∞: trained without differential privacy, no guarantee; 0: zero-shot, trained on nothing")
ONE_DECIMAL = frozenset({COL_WALL_SECONDS, COL_PEAK_MEMORY, COL_PEAK_GPU_MEMORY, COL_PCT_CENTRALIZED})
DECIMALS = {"metric": 4, "cost": 1, "epsilon": 2}  # what the tables show of a float, by cell style


def cell_style(column: str, metrics: frozenset[str] | set[str]) -> str:
    """How a column's numbers are shown: ``metric`` (4 decimals), ``cost`` (1), ``epsilon`` (2) or ``plain``."""
    if column in metrics or column == COL_HELDOUT_LOSS:
        return "metric"
    return "cost" if column in ONE_DECIMAL else "epsilon" if column == COL_EPSILON else "plain"


def as_shown(value: Any, style: str) -> Any:
    """``value`` rounded as the tables show it (``0.30004`` -> ``0.3``): rows that look tied sort as tied."""
    if not isinstance(value, float) or not math.isfinite(value) or style not in DECIMALS:
        return value
    return float(f"{value:.{DECIMALS[style]}f}")


@dataclass
class Board:
    """A sorted leaderboard: column names, one flat dict per row, and which columns are metrics."""

    columns: list[str]
    rows: list[dict[str, Any]]
    metrics: frozenset[str] = frozenset()

    def cell(self, row: dict, column: str, precise: bool = False) -> str:
        """One cell as text (see :func:`format_cell`)."""
        return format_cell(row.get(column), precise, cell_style(column, self.metrics))

    def notes(self) -> list[str]:
        """Footnotes the table needs to be read right (the ``epsilon`` legend when it is shown)."""
        return [PRIVACY_NOTE] if COL_EPSILON in self.columns else []


# --------------------------------------------------------------------------------------------
# The job's plan file and its test case records


def write_plan_file(plan: BenchmarkPlan) -> None:
    """Save what the leaderboard needs to rebuild itself later (``fedpeft leaderboard``)."""
    old = read_plan_file(plan.job_dir) if (plan.job_dir / PLAN_FILE).is_file() else {}
    hyper = list(dict.fromkeys(plan.hyperparameter_columns() + old.get("hyperparameters", [])))
    metrics = [{"column": m.column, "key": m.key} for m in plan.metrics]
    metrics += [m for m in old.get("metrics", []) if m["column"] not in {n["column"] for n in metrics}]
    write_json(plan.job_dir / PLAN_FILE, {  # earlier runs' columns stay known: their rows keep them
        "name": plan.name, "source": plan.source, "metrics": metrics,
        "modules": plan.modules, "hyperparameters": hyper, "rank": plan.rank.model_dump(),
    })


def read_plan_file(job_dir: Path) -> dict:
    """The plan file of a job folder.

    Raises:
        ConfigError: if ``job_dir`` holds no benchmark job.
    """
    path = Path(job_dir) / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"{job_dir} is not a benchmark job folder (no {PLAN_FILE}); give the folder "
                          "'fedpeft benchmark' wrote: <workspace>/<job name>")
    return json.loads(path.read_text(encoding="utf-8"))


def load_records(job_dir: Path) -> list[dict]:
    """Every test case record of a job folder, oldest first (ties: by folder); ``_dir`` is its folder."""
    records = [{**json.loads(p.read_text(encoding="utf-8")), "_dir": str(p.parent)}
               for p in Path(job_dir).glob(f"*/*/{TESTCASE_FILE}")]
    return sorted(records, key=lambda r: (r.get("time", ""), r.get("url", "")))


# --------------------------------------------------------------------------------------------
# Rows


def _flat(record: dict) -> dict[str, Any]:
    row = {"algorithm": record["algorithm"], **record.get("metrics", {}), "paradigm": record["paradigm"],
           **record.get("modules", {}), **record.get("hyperparameters", {}), **record.get("extra", {}),
           "time": record.get("time", ""), "url": record.get("url", "")}
    row.update({"_kind": record.get("kind"), "_group": record.get("group"), "_session": record.get("session"),
                "_dir": record.get("_dir"), "_zs": record.get("zero_shot_group")})
    row.update(_privacy_cells(record))
    return row


def _privacy_cells(record: dict) -> dict[str, Any]:
    """``epsilon``, ``dp`` and ``_privacy`` of a test case, from its run's ``summary.json``
    (nothing when the run folder has none)."""
    path = Path(record["_dir"]) / SUMMARY_FILE if record.get("_dir") else None
    if path is None or not path.is_file():
        return {}
    summary = json.loads(path.read_text(encoding="utf-8"))  # json reads the Infinity it writes
    privacy = summary.get(KEY_PRIVACY)
    if not privacy:
        no_training = record.get("kind") == ZERO_SHOT  # released nothing trained on private data
        return {COL_EPSILON: 0.0 if no_training else math.inf, COL_DP: "no training" if no_training else "none",
                "_privacy": None}
    dp = f"{privacy['level']}, δ={privacy['delta']:g}"
    if privacy.get("stopped_before_round") is not None:
        dp += f", stopped before round {privacy['stopped_before_round']} (target ε {privacy['target_epsilon']:g})"
    return {COL_EPSILON: summary.get(KEY_EPSILON, privacy.get(KEY_EPSILON)), COL_DP: dp, "_privacy": privacy}


def uses_dp(rows: list[dict]) -> bool:
    """Whether any row trained with differential privacy."""
    return any(r.get("_privacy") for r in rows)


def _worse(column: str, a: Any, b: Any) -> Any:
    if a is None or b is None:
        return a if b is None else b
    return max(a, b) if column in ASCENDING_COLUMNS else min(a, b)


def _local_only_summaries(rows: list[dict], numeric: list[str]) -> list[dict]:
    """``local_only (mean)`` and ``(worst)`` rows, one pair per (session, training setup)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["_kind"] == LOCAL_ONLY:
            groups[(r["_session"], r["_group"])].append(r)
    out = []
    for members in groups.values():
        first = members[0]
        base = {k: v for k, v in first.items() if k not in numeric}
        base["url"] = str(Path(first["url"]).parent)
        base["_dir"] = None  # no run folder of its own
        base["time"] = max(m["time"] for m in members)
        mean, worst = dict(base), dict(base)
        for col in numeric:
            values = [m.get(col) for m in members if isinstance(m.get(col), (int, float))]
            same = len(set(values)) == 1  # rounds, clients, parameters: one value, kept as it is
            mean[col] = (values[0] if same else sum(values) / len(values)) if values else None
            worst[col] = None
            for v in values:
                worst[col] = _worse(col, worst[col], v)
        mean["algorithm"], worst["algorithm"] = f"{LOCAL_ONLY} (mean)", f"{LOCAL_ONLY} (worst)"
        mean["_kind"] = worst["_kind"] = f"{LOCAL_ONLY}-summary"
        out += [mean, worst]
    return out


def primary_metric(meta: dict) -> str | None:
    """The metric ``pct_of_centralized`` uses: the first metric (or held-out loss) of ``sort_by``,
    else the first metric."""
    metrics = [m["column"] for m in meta["metrics"]] + [COL_HELDOUT_LOSS]
    sort_cols = [next(iter(item)) for item in meta["rank"].get("sort_by", [])]
    return next((c for c in sort_cols if c in metrics), metrics[0] if metrics else None)


def _add_pct_of_centralized(rows: list[dict], metric: str | None) -> None:
    central = {r["_group"]: r for r in rows if r["_kind"] == CENTRALIZED}  # latest wins (rows oldest first)
    if not central or metric is None:
        return
    for r in rows:
        c = central.get(r["_group"])
        mine, ref = r.get(metric), (c or {}).get(metric)
        if not isinstance(mine, (int, float)) or not isinstance(ref, (int, float)) or not ref or not mine:
            r[COL_PCT_CENTRALIZED] = None
            continue
        ratio = ref / mine if metric in ASCENDING_COLUMNS else mine / ref
        r[COL_PCT_CENTRALIZED] = round(100.0 * ratio, 1)


def sort_rows(rows: list[dict], keys: list[tuple[str, str]], metrics: frozenset[str] = frozenset()) -> list[dict]:
    """Sort by ``[(column, ascend|descend), ...]`` (first has priority); missing values last; stable.

    Values are compared as the tables show them (:func:`as_shown`; ``metrics`` are the metric
    columns): two rows whose first key reads the same are ordered by the next key, never by a
    difference in a digit nobody sees.
    """
    def key(row: dict) -> tuple:
        parts: list[Any] = []
        for col, direction in keys:
            v = as_shown(row.get(col), cell_style(col, metrics))
            ok = isinstance(v, (int, float))
            parts += [0 if ok else 1, (v if direction == "ascend" else -v) if ok else 0]
        return tuple(parts)

    return sorted(rows, key=key)


def default_direction(column: str) -> str:
    """``ascend`` for lower-is-better columns (loss, bytes, seconds, memory), else ``descend``."""
    return "ascend" if column in ASCENDING_COLUMNS else "descend"


def build_board(job_dir: Path, sort_by: list[tuple[str, str]] | None = None) -> tuple[Board, dict]:
    """The full leaderboard of a job folder, sorted, and the job's plan file.

    Args:
        job_dir: ``<workspace>/<job name>``.
        sort_by: Overrides the job's ``rank.sort_by``.
    """
    meta = read_plan_file(job_dir)
    metrics = [m["column"] for m in meta["metrics"]]
    rows = [_flat(r) for r in load_records(job_dir)]
    rows += _local_only_summaries(rows, metrics + [c for c in EXTRA_COLUMNS if c != COL_DP])
    _add_pct_of_centralized(rows, primary_metric(meta))
    add_paired_cis(rows, meta)  # vs zero-shot and vs centralised, with paired bootstrap CIs
    keys = sort_by or [next(iter(i.items())) for i in meta["rank"].get("sort_by", [])]
    keys = keys or ([(metrics[0], "descend")] if metrics else [])
    rows = sort_rows(rows, keys, frozenset(metrics))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return Board(all_columns(meta, rows), rows, frozenset(metrics)), meta


def all_columns(meta: dict, rows: list[dict]) -> list[str]:
    """Every column in the documented order (hyperparameters: the plan's order, then any others sorted)."""
    fixed = {"rank", "algorithm", "paradigm", "time", "url", *HIDDEN, *meta["modules"], *EXTRA_COLUMNS}
    metrics = [m["column"] for m in meta["metrics"]]
    seen = {k for r in rows for k in r} - fixed - set(metrics)
    hyper = [h for h in meta["hyperparameters"] if h in seen] + sorted(seen - set(meta["hyperparameters"]))
    optional = (COL_PEAK_GPU_MEMORY, COL_PCT_CENTRALIZED, COL_BYTES_PER_UPDATE, *SITE_COLUMNS,
                *PAIRED_COLUMNS)  # shown when some row has a value
    hidden = {c for c in optional if all(r.get(c) is None for r in rows)}
    if not uses_dp(rows):
        hidden |= set(PRIVACY_COLUMNS)  # every epsilon is inf (or 0): nothing to compare
    extras = [c for c in EXTRA_COLUMNS if c not in hidden]
    return ["rank", "algorithm", *metrics, "paradigm", *meta["modules"], *hyper, *extras, "time", "url"]


def hyperparameter_columns(columns: list[str], meta: dict) -> list[str]:
    """The hyperparameter columns among ``columns`` (everything that is not a fixed column)."""
    fixed = {"rank", "algorithm", "paradigm", "time", "url", *HIDDEN, *meta["modules"], *EXTRA_COLUMNS,
             *(m["column"] for m in meta["metrics"])}
    return [c for c in columns if c not in fixed]


def select(board: Board, meta: dict) -> Board:
    """The ``selected_dataitem`` view: rows of the selected paradigms, the selected columns, without
    duplicate rows, re-ranked."""
    sel = RankSpec.model_validate(meta["rank"]).selected_dataitem
    metrics = [m["column"] for m in meta["metrics"]]

    def pick(chosen: list[str], available: list[str]) -> list[str]:
        return available if chosen == ["all"] else [c for c in chosen if c in available]

    extras = [c for c in board.columns if c in EXTRA_COLUMNS]
    hyper = hyperparameter_columns(board.columns, meta)
    chosen_metrics = pick(sel.metrics, metrics + extras)
    chosen_metrics += [c for c in PRIVACY_COLUMNS if c in extras and c not in chosen_metrics]
    columns = ["rank", "algorithm", *[c for c in chosen_metrics if c in metrics], "paradigm",
               *pick(sel.modules, meta["modules"]), *pick(sel.hyperparameters, hyper),
               *[c for c in chosen_metrics if c in extras], "time", "url"]
    rows = [dict(r) for r in board.rows if sel.paradigms == ["all"] or r["paradigm"] in sel.paradigms]
    rows = _drop_duplicates(rows, [c for c in columns if c not in ("rank", "time", "url")])
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return Board(columns, rows, board.metrics)


def _drop_duplicates(rows: list[dict], columns: list[str]) -> list[dict]:
    """The rows that differ from every better-ranked row in one of ``columns``, as Ianvs's
    ``selected_rank`` keeps them (``drop_duplicates`` over every selected column but time and url):
    a re-run that reproduced its numbers, or test cases that differ only in columns not selected."""
    seen: set[str] = set()
    kept = []
    for r in rows:
        key = json.dumps([r.get(c) for c in columns], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept


# --------------------------------------------------------------------------------------------
# Output


def format_cell(value: Any, precise: bool, style: str = "metric") -> str:
    """A cell as text: full precision for CSV (``precise``; infinity as ``inf``, which CSV readers
    parse); for people, ``metric`` with 4 decimals, ``cost`` with 1, ``epsilon`` with 2, ``plain``
    (hyperparameters) as written, and infinity as ``∞``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    if not isinstance(value, (int, float)):
        return str(value)
    if precise:
        return str(value) if isinstance(value, int) else f"{value:.6g}"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if style == "cost":
        return f"{value:,.1f}"
    if style == "epsilon":
        return f"{value:,.2f}"
    return f"{value:.4f}" if style == "metric" else f"{value:g}"


def to_csv(board: Board) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(board.columns)
    for r in board.rows:
        writer.writerow([board.cell(r, c, precise=True) for c in board.columns])
    return buf.getvalue()


def to_markdown(board: Board) -> str:
    """The leaderboard as a Markdown table, cells as :meth:`Board.cell` writes them for people."""
    rows = [[board.cell(r, c) for c in board.columns] for r in board.rows]
    return markdown_table(board.columns, rows) + "\n" + "".join(f"\n{note}\n" for note in board.notes())


def write_board(job_dir: Path) -> tuple[Board, Board, dict]:
    """Rebuild and write ``rank/*.csv`` and ``rank/*.md`` as the job's ``save_mode`` says.

    Returns:
        ``(all, selected, plan file)``.
    """
    board, meta = build_board(job_dir)
    selected = select(board, meta)
    mode = meta["rank"].get("save_mode", "selected_and_all")
    outputs = {SELECTED_RANK: selected} if mode == "selected_only" else {}
    if mode == "selected_and_all":
        outputs = {ALL_RANK: board, SELECTED_RANK: selected}
    for name, b in outputs.items():
        write_text(Path(job_dir) / RANK_DIR / f"{name}.csv", to_csv(b))
        write_text(Path(job_dir) / RANK_DIR / f"{name}.md", to_markdown(b))
    return board, selected, meta


def print_board(board: Board, title: str, console: Console | None = None) -> None:
    """Print a leaderboard as a table (every column but ``url``, which the CSV keeps)."""
    columns = [c for c in board.columns if c != "url"]
    cells = [[board.cell(r, c) for c in columns] for r in board.rows]
    table = Table(title=title, show_lines=False, caption="\n".join(board.notes()) or None)
    for c in columns:
        table.add_column(c, no_wrap=True, justify="right" if c == "rank" else "left")
    for row in cells:
        table.add_row(*row)
    if console is None:  # as wide as the table needs: a folded leaderboard is unreadable
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
        console = Console(width=max(80, sum(widths) + 3 * len(widths) + 1))
    console.print(table)
