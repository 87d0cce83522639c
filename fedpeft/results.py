"""Print a run's results: zero-shot vs each evaluated round, as a rich table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedpeft.constants import KEY_EVAL, KEY_EVAL_SECONDS, KEY_GEN_TOKENS, KEY_PEAK_MEMORY, METRICS_FILE, SUMMARY_FILE
from fedpeft.io_utils import read_jsonl


def print_results(run_dir: str | Path, console: Console | None = None) -> None:
    """Print every evaluation of ``run_dir`` (round 0 is zero-shot) and the run's footprint."""
    run_dir = Path(run_dir)
    records = [r for r in read_jsonl(run_dir / METRICS_FILE) if KEY_EVAL in r]
    hidden = (KEY_GEN_TOKENS, KEY_EVAL_SECONDS, KEY_PEAK_MEMORY)  # in metrics.jsonl; not scores
    names = list(dict.fromkeys(k for r in records for k in r[KEY_EVAL] if k not in hidden))
    table = Table(title=f"fedpeft results: {run_dir}")
    table.add_column("round")
    for n in names:
        table.add_column(n, justify="right")
    for r in records:
        label = "zero-shot" if r.get("zero_shot") else str(r["round"])
        table.add_row(label, *(f"{r[KEY_EVAL].get(n, float('nan')):.4f}" for n in names))
    console = console or Console()
    console.print(table)
    for r in records:
        if r.get("sites_missing"):  # fedpeft.rounds.KEY_SITES_MISSING
            console.print(f"round {r['round']}: site_mean/site_worst leave out {', '.join(r['sites_missing'])} "
                          "(their per-site score did not come back)")
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        import json

        s = json.loads(summary.read_text())
        console.print(f"trainable parameters: {s['trainable_parameters']:,}; one update: "
                      f"{s['update_bytes'] / 1e6:.2f} MB; adapter: {run_dir / 'adapter'}")
