"""Fault suite: what does ``fedpeft`` do with bad data, bad configs, broken checkpoints and faulty clients?

Every case runs the ``fedpeft`` CLI in a subprocess (tiny model, 2-3 clients, 1-3 rounds, one
optimizer step per client) inside its own temporary folder, then CHECKS THE RESULT, not only the
exit code, and files the outcome in one category:

- ``clear error``: non-zero exit, a message naming the file / key / client, no traceback;
- ``worked``: exit 0 and the outputs are right (summary, finite adapter, one metrics line per round,
  a resumed adapter bit-equal to an uninterrupted run);
- ``unclear error``: non-zero exit, but the message does not say what or where;
- ``traceback``: a Python traceback was printed;
- ``silent wrong result``: exit 0 with a wrong output (NaN adapter, duplicated rounds, a bad
  config accepted...);
- ``data lost``: the outputs of an earlier run were destroyed.

    python bench/faults.py                  # every case (about 10 min on 2 cores)
    python bench/faults.py --quick          # 6 fast cases
    python bench/faults.py --only resume concurrency
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench import fault_deploy, fault_inputs, fault_runs  # noqa: E402,F401  (register the cases)
from bench.common import Column, Recorder, base_parser, markdown_table  # noqa: E402
from bench.fault_kit import (  # noqa: E402
    _REF_ROOT, _REFS, CASES, CATEGORIES, GOAL_TEXT, LOST, SILENT, TRACEBACK, UNCLEAR, Case,
)
from bench.fault_kit import Proc, RUN, check_run, expect_error  # noqa: E402,F401  (the tests use them from here)


# ------------------------------------------------------------------------------------------
# Runner


def run_case(c: Case, root: Path) -> dict[str, Any]:
    d = Path(tempfile.mkdtemp(prefix=re.sub(r"\W+", "_", c.name)[:40] + "-", dir=root))
    t0 = time.perf_counter()
    try:
        category, detail = c.fn(d)
    except Exception as e:  # noqa: BLE001 - a bug of the suite itself, reported as such
        category, detail = UNCLEAR, f"the suite's check failed: {type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    print(f"[{c.group}] {c.name}: {category} ({seconds:.1f} s) {detail[:160]}", flush=True)
    return {"group": c.group, "case": c.name, "category": category, "detail": detail, "seconds": round(seconds, 1)}


def _merged(path: Path, new: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The rows of ``path`` with the cases in ``new`` replaced (new cases appended), and where the others come from."""
    fresh = {(r["group"], r["case"]): r for r in new}
    before = json.loads(path.read_text())
    old = before["rows"]
    source = before.get("params", {}).get("merged_from") or (f"`{before['command']}` of {before['date']} at commit "
                                           f"{before['machine'].get('git_commit')}, {before['seconds'] / 60:.1f} min")
    seen = {(r["group"], r["case"]) for r in old}
    rows = [fresh.get((r["group"], r["case"]), r) for r in old]
    rows += [r for r in new if (r["group"], r["case"]) not in seen]
    return rows, source


def _merge_note(source: str, cases: list[Case]) -> str:
    if not source:
        return ""
    return (f" The other rows are from {source}; re-run with `--merge` (this run): "
            f"{'; '.join(c.name for c in cases)}.")


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    groups = sorted({c.group for c in CASES})
    p.add_argument("--only", nargs="+", choices=groups, help="run only these groups")
    p.add_argument("--quick", action="store_true", help="about 6 fast cases")
    p.add_argument("--case", help="run only the cases whose name matches this regex")
    p.add_argument("--merge", action="store_true",
                   help="replace only the rows of the cases run now in the existing results file")
    p.add_argument("--jobs", type=int, default=1, help="cases run at once")
    args = p.parse_args(argv)
    rec = Recorder("faults", argv)
    cases = [c for c in CASES if (not args.quick or c.quick) and (not args.only or c.group in args.only)
             and (not args.case or re.search(args.case, c.name, re.I))]
    with tempfile.TemporaryDirectory(prefix="fedpeft-faults-") as tmp:
        _REF_ROOT[:] = [Path(tmp)]
        _REFS.clear()
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            rows = list(pool.map(lambda c: run_case(c, Path(tmp)), cases))
    source = ""
    if args.merge:
        rows, source = _merged(args.results_dir / "faults.json", rows)
    counts = Counter(r["category"] for r in rows)
    cols = [Column("group", "group"), Column("case", "case"), Column("category", "category"),
            Column("detail", "detail", lambda s: s.replace("|", "\\|")[:200]), Column("seconds", "s", "{:.1f}")]
    table = markdown_table(cols, rows)
    count_line = ", ".join(f"{k}: {counts.get(k, 0)}" for k in CATEGORIES)
    met = counts[SILENT] == 0 and counts[LOST] == 0 and counts[TRACEBACK] == 0 and counts[UNCLEAR] <= 2
    rec.finish(args.results_dir, title="Fault suite", params={"cases": len(rows), "quick": args.quick,
                                                              "only": args.only, "jobs": args.jobs,
                                                              "merged": [c.name for c in cases] if args.merge else [],
                                                              "merged_from": source},
               rows=rows, markdown=f"{len(rows)} cases: {count_line}.{_merge_note(source, cases)}\n\n{table}",
               goal={"text": GOAL_TEXT, "met": met, "counts": dict(counts)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

