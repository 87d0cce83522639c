"""Run the quick benchmark set and rewrite the tables in ``BENCHMARKS.md``.

Each script runs in its own process (fresh memory, its own thread settings) and writes
``bench/results/NAME.json``; then every result found, the long quality run's included, is
pasted into ``BENCHMARKS.md`` between its markers::

    <!-- bench:NAME:start -->  ...generated...  <!-- bench:NAME:end -->

Text outside the markers is kept as written. A result without markers in the file is appended
as a new section.

    python bench/run_all.py                       # quick set (all but quality), then BENCHMARKS.md
    python bench/run_all.py --only swap generation
    python bench/run_all.py --render-only         # only rewrite BENCHMARKS.md from bench/results/
    python bench/quality.py                       # the long one (about an hour), run on its own
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS_DIR, fmt_seconds, load_result, machine_line  # noqa: E402

# The quick set, in run order (scaling reads overhead's and communication's results).
QUICK: dict[str, list[str]] = {
    "communication": [],
    "swap": [],
    "generation": [],
    "memory": [],
    "overhead": [],
    "scaling": [],
}
# Order of the sections in BENCHMARKS.md, with their headings for a file without markers.
SECTIONS = {
    "overhead": "1. Federation overhead",
    "memory": "2. Memory ceiling",
    "swap": "3. Adapter swap vs reload",
    "generation": "4. Evaluation throughput",
    "communication": "5. Communication",
    "quality": "6. Learning quality",
    "scaling": "7. Scaling on paper",
}
BENCHMARKS_MD = REPO / "BENCHMARKS.md"


def run_script(name: str, args: list[str], results_dir: Path) -> float:
    """Run ``bench/NAME.py`` in a fresh process; return its wall time. Raises on failure."""
    extra = [] if results_dir == RESULTS_DIR else ["--results-dir", str(results_dir)]
    cmd = [sys.executable, str(REPO / "bench" / f"{name}.py"), *args, *extra]
    print(f"\n=== {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.perf_counter() - start


def render_section(result: dict) -> str:
    """The Markdown between one script's markers: provenance, then its table."""
    goal = result.get("goal") or {}
    verdict = "" if not goal else f" · **Goal:** {goal['text']} → **{'met' if goal.get('met') else 'missed'}**"
    return (
        f"Command: `{result['command']}` · {result['date']} · ran {fmt_seconds(result['seconds'])} · "
        f"load average (1/5/15 min) {result['loadavg_start']} before, {result['loadavg_end']} after{verdict}\n\n"
        f"Machine: {machine_line(result['machine'])}\n\n"
        f"{result['markdown'].strip()}"
    )


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def update_markdown(text: str, sections: dict[str, str]) -> str:
    """Replace each ``name``'s marked block in ``text``; append the ones without markers."""
    for name, body in sections.items():
        start, end = _markers(name)
        block = f"{start}\n{body}\n{end}"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text, count=1)
        else:
            text = text.rstrip("\n") + f"\n\n## {SECTIONS.get(name, name)}\n\n{block}\n"
    return text


def render(results_dir: Path, path: Path) -> list[str]:
    """Rewrite the marked tables of ``path`` from ``results_dir``; return the names written."""
    sections = {}
    for name in SECTIONS:
        result = load_result(name, results_dir)
        if result is not None:
            sections[name] = render_section(result)
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    path.write_text(update_markdown(text, sections), encoding="utf-8")
    return list(sections)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(QUICK), help="run only these scripts")
    p.add_argument("--skip", nargs="+", choices=list(QUICK), default=[], help="do not run these")
    p.add_argument("--render-only", action="store_true", help="run nothing; rewrite BENCHMARKS.md")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--markdown", type=Path, default=BENCHMARKS_MD, help="the file to rewrite")
    args = p.parse_args(argv)
    failed = []
    if not args.render_only:
        for name in args.only or QUICK:
            if name in args.skip:
                continue
            try:
                took = run_script(name, QUICK[name], args.results_dir)
                print(f"=== {name}: {fmt_seconds(took)}", flush=True)
            except subprocess.CalledProcessError as e:
                failed.append(f"{name} (exit {e.returncode})")
    written = render(args.results_dir, args.markdown)
    print(f"\n{args.markdown}: tables rewritten for {', '.join(written) or 'nothing'}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
