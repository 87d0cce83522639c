"""``report.html`` of a benchmark job: one self-contained page, readable offline.

Sections: the selected leaderboard (and every column under a fold), final metrics as bars,
metric-vs-round curves of every test case (centralised dashed, zero-shot dotted), per-client
train loss curves of every federated test case, and the data partition sizes per client
(stacked by the partition field when there is one). When any test case trained with differential
privacy, a privacy section adds epsilon vs round (one line per DP run, from ``metrics.jsonl``)
and the main metric vs final epsilon (runs without DP in a side panel at ε = ∞); without DP
the page is as before. Figures are matplotlib PNGs (Agg backend)
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
import math
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedpeft.benchmark.constants import (  # noqa: E402
    CENTRALIZED, COL_EPSILON, COL_HELDOUT_LOSS, KIND_FEDERATED, LOCAL_ONLY, REPORT_FILE, ZERO_SHOT,
)
from fedpeft.benchmark.leaderboard import (  # noqa: E402
    build_board, hyperparameter_columns, primary_metric, select, uses_dp,
)
from fedpeft.constants import (  # noqa: E402
    EVENT_ROUND, KEY_EPSILON, KEY_EVAL, KEY_EVENT, KEY_HELDOUT_LOSS, METRICS_FILE, PARTITIONS_FILE,
)
from fedpeft.io_utils import read_jsonl, write_text  # noqa: E402
from fedpeft.site_scores import KEY_SITES, PERSONAL  # noqa: E402

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


def _final_sites(run_dir: str | None) -> dict[str, dict]:
    """The per-site scores of a run's last evaluation that has them (``{}``: none)."""
    path = Path(run_dir) / METRICS_FILE if run_dir else None
    records = read_jsonl(path) if path and path.is_file() else []
    return next((r[KEY_SITES] for r in reversed(records) if r.get(KEY_SITES)), {})


def sites_figure(rows: list[dict], labels: dict[int, str]) -> str | None:
    """Held-out loss on each site's own slice (``data.client_test_ratio``) after the last evaluation,
    one bar per test case and site (hatched: personalised); ``None`` when no run scored sites."""
    scored = {i: _final_sites(r["_dir"]) for i, r in enumerate(rows)}
    scored = {i: s for i, s in scored.items() if s}
    if not scored:
        return None
    sites = sorted({name for s in scored.values() for name in s})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(sites) * max(1, len(scored)) / 3), 4.2), layout="constrained")
    width = 0.8 / len(scored)
    for k, (i, per_site) in enumerate(scored.items()):
        here = [(j + k * width, per_site[name]) for j, name in enumerate(sites) if name in per_site]
        ax.bar([x for x, _ in here], [s[KEY_HELDOUT_LOSS] for _, s in here], width, label=labels[i])
        personal = [(x, s[PERSONAL + KEY_HELDOUT_LOSS]) for x, s in here if PERSONAL + KEY_HELDOUT_LOSS in s]
        if personal:
            ax.bar(*zip(*personal), width, fill=False, hatch="//", edgecolor="black")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sites))], sites)
    ax.set_ylabel("held-out loss on the site's own slice")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def _epsilon_curve(run_dir: str | None) -> list[tuple[int, float]]:
    """(round, epsilon so far) of a run's round records, from (0, 0) (finite values only: ∞ cannot be drawn)."""
    if not run_dir or not (Path(run_dir) / METRICS_FILE).is_file():
        return []
    curve = [(r["round"], r[KEY_EPSILON]) for r in read_jsonl(Path(run_dir) / METRICS_FILE)
             if r.get(KEY_EVENT) == EVENT_ROUND and isinstance(r.get(KEY_EPSILON), (int, float))
             and math.isfinite(r[KEY_EPSILON])]
    return [(0, 0.0)] + curve if curve else []  # nothing is spent before the first round


def epsilon_figure(rows: list[dict], labels: dict[int, str]) -> str | None:
    """Epsilon spent vs round, one line per DP run, its ``target_epsilon`` dashed in the same
    colour (``None``: no run recorded an epsilon)."""
    curves = {i: _epsilon_curve(r["_dir"]) for i, r in enumerate(rows) if r.get("_privacy")}
    curves = {i: c for i, c in curves.items() if c}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    for i, curve in curves.items():
        p = rows[i]["_privacy"]
        (line,) = ax.plot(*zip(*curve), marker="o", label=f"{labels[i]} ({p['level']}, δ={p['delta']:g})")
        if p.get("target_epsilon") is not None:
            ax.axhline(p["target_epsilon"], color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_ylabel("epsilon spent so far")
    ax.set_ylim(bottom=0)
    ax.set_title("Epsilon vs round (dashed: target_epsilon)")
    ax.legend(fontsize=8)
    _round_axis(ax)
    return _png(fig)


def score_epsilon_figure(rows: list[dict], labels: dict[int, str], metric: str | None) -> str | None:
    """``metric`` against final epsilon, one point per federated or centralised run; runs without
    DP in a narrow panel at ε = ∞, zero-shot as a dotted line (``None``: no DP run or no metric)."""
    if metric is None or not uses_dp(rows):
        return None
    points = [(i, r[COL_EPSILON], r[metric]) for i, r in enumerate(rows) if r["_kind"] in (KIND_FEDERATED, CENTRALIZED)
              and isinstance(r.get(COL_EPSILON), (int, float)) and isinstance(r.get(metric), (int, float))]
    finite = [p for p in points if math.isfinite(p[1])]
    infinite = [p for p in points if not math.isfinite(p[1])]
    fig, axes = plt.subplots(1, 2 if infinite else 1, sharey=True, squeeze=False, figsize=(8.5, 4.2),
                             width_ratios=[5, 1] if infinite else [1], layout="constrained")
    ax, *side = list(axes.flat)
    for n, (i, eps, score) in enumerate(finite + infinite):  # one colour per run across both panels
        panel, x, label = (ax, eps, labels[i]) if math.isfinite(eps) else (side[0], 0, f"{labels[i]} (no DP)")
        panel.scatter(x, score, s=40, color=f"C{n % 10}", label=label,
                      marker="D" if rows[i]["_kind"] == CENTRALIZED else "o")
    _epsilon_axis(ax, [eps for _, eps, _ in finite])
    if side:
        side[0].set_xticks([0], ["∞"])
        side[0].set_xlabel("no DP")
        side[0].grid(alpha=0.3)
    for r in rows:
        if r["_kind"] == ZERO_SHOT and isinstance(r.get(metric), (int, float)):
            for a in axes.flat:
                a.axhline(r[metric], color="gray", linestyle=":", label="zero-shot (ε = 0)" if a is ax else None)
    ax.set_ylabel(metric)
    fig.suptitle(f"{metric} vs final epsilon (diamonds: centralised)")
    legend = [a.get_legend_handles_labels() for a in axes.flat]
    fig.legend([h for hs, _ in legend for h in hs], [n for _, ns in legend for n in ns], loc="upper center",
               ncol=2, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    return _png(fig)


def _epsilon_axis(ax: plt.Axes, epsilons: list[float]) -> None:
    """Log scale when the epsilons span more than a factor 10 (0.5, 8 and 64 all readable), else from 0."""
    if epsilons and min(epsilons) > 0 and max(epsilons) / min(epsilons) > 10:
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0)
    ax.set_xlabel("final epsilon (lower is more private)")
    ax.grid(alpha=0.3)


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
        "sites": sites_figure(rows, labels),
        "epsilon": epsilon_figure(rows, labels),
        "score_epsilon": score_epsilon_figure(rows, labels, primary_metric(meta)),
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
