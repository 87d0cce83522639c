"""``report.html`` of a benchmark job: one self-contained page, readable offline.

Sections: the selected leaderboard (and every column under a fold), final metrics as bars,
metric-vs-round curves of every test case (centralised dashed, zero-shot dotted), per-client
train loss curves of every federated test case, and the data partition sizes per client
(stacked by the partition field when there is one). Figures are matplotlib PNGs (Agg backend)
embedded as base64; the page loads nothing from anywhere.

The page is the Jinja2 template ``templates/report.html.j2`` (package data), rendered with
autoescape on: algorithm names, hyperparameter values and paths from the job are text, never
markup. The figure functions here return base64 PNG text (``None``: nothing to draw).
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import logging
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedpeft.benchmark.constants import (  # noqa: E402
    CENTRALIZED, COL_HELDOUT_LOSS, KIND_FEDERATED, LOCAL_ONLY, REPORT_FILE, ZERO_SHOT,
)
from fedpeft.benchmark.leaderboard import build_board, hyperparameter_columns, select  # noqa: E402
from fedpeft.constants import EVENT_ROUND, KEY_EVAL, KEY_EVENT, METRICS_FILE, PARTITIONS_FILE  # noqa: E402
from fedpeft.io_utils import read_jsonl, write_text  # noqa: E402

log = logging.getLogger(__name__)

TEMPLATE = "report.html.j2"
_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("fedpeft.benchmark", "templates"),
                                autoescape=True, undefined=jinja2.StrictUndefined)


def _png(fig: plt.Figure) -> str:
    """``fig`` as base64 PNG text (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _labels(rows: list[dict], hyper: list[str]) -> dict[int, str]:
    """Row index -> ``algorithm [varying hyperparameters]`` (constant ones are left out)."""
    varying = [h for h in hyper if len({json.dumps(r.get(h), default=str) for r in rows if r.get(h) is not None}) > 1]
    out = {}
    for i, r in enumerate(rows):
        extra = ", ".join(f"{h.split('-', 1)[-1]}={r[h]}" for h in varying if r.get(h) not in (None, ""))
        out[i] = f"{r['algorithm']} [{extra}]" if extra else r["algorithm"]
    return out


def _eval_curve(run_dir: str | None, key: str) -> list[tuple[int, float]]:
    if not run_dir or not (Path(run_dir) / METRICS_FILE).is_file():
        return []
    return [(r["round"], r[KEY_EVAL][key]) for r in read_jsonl(Path(run_dir) / METRICS_FILE)
            if isinstance((r.get(KEY_EVAL) or {}).get(key), (int, float))]


def _grid(n: int, width: float = 5.2, height: float = 3.4) -> tuple[plt.Figure, list]:
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def bars_figure(rows: list[dict], labels: dict[int, str], metrics: list[str]) -> str:
    """Final value of each metric, one horizontal bar per row (per-client local rows left out)."""
    keep = [i for i, r in enumerate(rows) if not (r["_kind"] == LOCAL_ONLY)]
    fig, axes = _grid(len(metrics), width=5.2, height=0.32 * len(keep) + 1.2)
    colors = {KIND_FEDERATED: "tab:blue", CENTRALIZED: "tab:green", ZERO_SHOT: "tab:gray"}
    cols = min(len(metrics), 3)
    for n, (ax, m) in enumerate(zip(axes, metrics)):
        vals = [rows[i].get(m) if isinstance(rows[i].get(m), (int, float)) else 0.0 for i in keep]
        ax.barh(range(len(keep)), vals, color=[colors.get(rows[i]["_kind"], "tab:orange") for i in keep])
        ax.set_yticks(range(len(keep)), [labels[i] for i in keep] if n % cols == 0 else [""] * len(keep), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(m)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Final metrics (blue: federated, green: centralised, grey: zero-shot, orange: local-only)")
    return _png(fig)


def _round_zero(rows: list[dict], key: str) -> dict[str | None, float]:
    """Zero-shot value of ``key`` per zero-shot setup (``None``: the only one, if there is one)."""
    points = {r.get("_zs"): _eval_curve(r["_dir"], key) for r in rows if r["_kind"] == ZERO_SHOT}
    out = {zs: curve[0][1] for zs, curve in points.items() if curve}
    if len(set(out.values())) == 1:
        out[None] = next(iter(out.values()))
    return out


def curves_figure(rows: list[dict], labels: dict[int, str], metric_keys: dict[str, str]) -> str:
    """Metric vs round for every test case (centralised dashed); round 0 is the zero-shot
    baseline evaluated on the same questions (dotted line) when a run did not evaluate it."""
    fig, axes = _grid(len(metric_keys))
    for ax, (column, key) in zip(axes, metric_keys.items()):
        zero = _round_zero(rows, key)
        for i, r in enumerate(rows):
            curve = _eval_curve(r["_dir"], key)
            if r["_kind"] == ZERO_SHOT and curve:
                ax.axhline(curve[0][1], color="gray", linestyle=":", label=labels[i])
            elif r["_kind"] in (KIND_FEDERATED, CENTRALIZED) and curve:
                start = zero.get(r.get("_zs"), zero.get(None))
                if curve[0][0] != 0 and start is not None:
                    curve = [(0, start)] + curve
                style = "--" if r["_kind"] == CENTRALIZED else "-"
                ax.plot(*zip(*curve), style, marker="o", label=labels[i])
        ax.set_title(column)
        _round_axis(ax)
    if axes:
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="upper center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    return _png(fig)


def _round_axis(ax: plt.Axes) -> None:
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def train_loss_figure(rows: list[dict], labels: dict[int, str]) -> str | None:
    """Per-client train loss over rounds, one panel per federated test case (``None``: no such case)."""
    fed = [i for i, r in enumerate(rows) if r["_kind"] == KIND_FEDERATED and r["_dir"]]
    if not fed:
        return None
    fig, axes = _grid(len(fed))
    for ax, i in zip(axes, fed):
        per_client: dict[str, list[tuple[int, float]]] = {}
        for rec in read_jsonl(Path(rows[i]["_dir"]) / METRICS_FILE):
            if rec.get(KEY_EVENT) == EVENT_ROUND:
                for c in rec["clients"]:
                    per_client.setdefault(c["client_id"], []).append((rec["round"], c["train_loss"]))
        for cid, pts in sorted(per_client.items()):
            ax.plot(*zip(*pts), marker="o", label=cid)
        ax.set_title(labels[i], fontsize=9)
        ax.set_ylabel("train loss")
        ax.legend(fontsize=7)
        _round_axis(ax)
    return _png(fig)


def partitions_figure(rows: list[dict]) -> str | None:
    """Rows per client of each distinct partition (stacked by field value where counted);
    ``None`` when no run recorded one."""
    seen: dict[str, list[dict]] = {}
    for r in rows:
        path = Path(r["_dir"]) / PARTITIONS_FILE if r["_dir"] and r["_kind"] == KIND_FEDERATED else None
        if path and path.is_file():
            parts = json.loads(path.read_text())
            seen.setdefault(json.dumps(parts, sort_keys=True), parts)
    if not seen:
        return None
    fig, axes = _grid(len(seen), width=6.0, height=3.6)
    for ax, parts in zip(axes, seen.values()):
        names = [f"client-{p['client']}" for p in parts]
        values = sorted({v for p in parts for v in p.get("counts", {})})
        if values:
            bottom = [0] * len(parts)
            for v in values:
                heights = [p.get("counts", {}).get(v, 0) for p in parts]
                ax.bar(names, heights, bottom=bottom, label=v)
                bottom = [b + h for b, h in zip(bottom, heights)]
            ax.legend(fontsize=7, ncol=2)
        else:
            ax.bar(names, [p["size"] for p in parts])
        for x, p in enumerate(parts):
            ax.annotate(str(p["size"]), (x, p["size"]), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("training rows")
        ax.set_title(f"{len(parts)} clients, {sum(p['size'] for p in parts)} rows")
    return _png(fig)


def render_report(job_dir: Path) -> str:
    """The report page of ``job_dir`` as HTML text."""
    board, meta = build_board(job_dir)
    rows = board.rows
    labels = _labels(rows, hyperparameter_columns(board.columns, meta))
    metric_keys = {m["column"]: m["key"] for m in meta["metrics"]}
    metric_keys[COL_HELDOUT_LOSS] = COL_HELDOUT_LOSS
    figures = {
        "bars": bars_figure(rows, labels, list(metric_keys)),
        "curves": curves_figure(rows, labels, metric_keys),
        "train_loss": train_loss_figure(rows, labels),
        "partitions": partitions_figure(rows),
    }
    return _TEMPLATES.get_template(TEMPLATE).render(
        name=meta["name"], source=meta.get("source", ""), job_dir=str(job_dir), n_rows=len(rows),
        generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        board=board, selected=select(board, meta), figures=figures,
    )


def write_report(job_dir: Path) -> Path:
    """Write ``<job_dir>/report.html``; return its path."""
    path = Path(job_dir) / REPORT_FILE
    write_text(path, render_report(Path(job_dir)))
    log.info("report: %s", path)
    return path
