"""Shared helpers of the bench scripts: machine facts, timing, tables, JSON results.

Every script measures one question of ``BENCHMARKS.md``, prints a Markdown table and writes
``bench/results/NAME.json`` holding the table, the raw measurements, the command that produced
them and the machine they ran on (CPU, cores, load average before and after, library versions).
``bench/run_all.py`` pastes the tables into ``BENCHMARKS.md``.

The machines we run on are shared and noisy, so timings are medians of repetitions, and every
comparison is a ratio of two things measured in the same process, interleaved.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from fedpeft import tables

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
MEDQUAD_DIR = REPO.parent / "shared" / "datasets" / "medquad"
MODELS = {"tiny": "tiny-random-llama", "default": "smollm2-135m-instruct"}

# PEFT settings compared across scripts (``peft:`` sections of a job config).
PEFT_VARIANTS: dict[str, dict[str, Any]] = {
    "LoRA q/v r8": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "LoRA all-linear r16": {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
    "P-Tuning (20 tokens)": {"method": "ptuning", "num_virtual_tokens": 20, "encoder_hidden_size": 128},
}


# ------------------------------------------------------------------------------------------
# Machine facts


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (other people's jobs share these cores)."""
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:  # read-only
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def machine_info() -> dict[str, Any]:
    """CPU, cores, threads, memory, accelerator and library versions of this process."""
    import torch

    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": _torch_threads(),
        "mem_total_gib": _mem_total_gib(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("fedpeft", "torch", "transformers", "peft", "flwr")},
        "git_commit": _git_commit(),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """One line describing ``machine`` for a table caption."""
    v = machine["versions"]
    dev = machine.get("cuda") or "no GPU"
    threads = machine["torch_threads"]
    return (f"{machine['cpu']}, {machine['cpu_count']} cores ({threads} torch thread{'s' * (threads != 1)}), "
            f"{machine['mem_total_gib']} GiB, {dev}; Python {machine['python']}, torch {v['torch']}, "
            f"transformers {v['transformers']}, peft {v['peft']}, fedpeft {v['fedpeft']} "
            f"(commit {machine.get('git_commit') or '?'})")


# ------------------------------------------------------------------------------------------
# Timing


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(min, max) of ``values``: what a reader needs to judge a median of a few repetitions."""
    return float(min(values)), float(max(values))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call of ``fn`` (wall clock)."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# ------------------------------------------------------------------------------------------
# Tables


@dataclass
class Column:
    """One table column: the row key, its header and how to format its values."""

    key: str
    header: str
    fmt: str | Callable[[Any], str] = "{}"

    def render(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        if value is None:
            return "–"
        return self.fmt(value) if callable(self.fmt) else self.fmt.format(value)


def markdown_table(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub Markdown table of ``rows`` (first column left-aligned, the others right-aligned)."""
    align = ["left"] + ["right"] * (len(columns) - 1)
    return tables.markdown_table([c.header for c in columns], [[c.render(r) for c in columns] for r in rows], align)


def fmt_bytes(n: float) -> str:
    """Bytes in the largest unit that keeps three significant digits (decimal units, like ``ls -h --si``)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.2f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def fmt_pct(x: float) -> str:
    return f"{100 * x:+.1f} %"


# ------------------------------------------------------------------------------------------
# Results


def base_parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every script shares."""
    p = argparse.ArgumentParser(description=(description or "").split("\n\n")[0])
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where NAME.json is written")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 (default) is the stable choice on a shared machine, 0 keeps torch's")
    return p


def setup_torch(threads: int | None) -> None:
    """Quiet logging from libraries and fix the number of torch threads if asked."""
    import logging

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars on every model load
    logging.getLogger("fedpeft").setLevel(logging.WARNING)
    if threads:
        torch.set_num_threads(threads)


class Recorder:
    """Collects one script's measurements and writes them with the context to reproduce them.

    Args:
        name: Script name (``overhead``); the result goes to ``<results_dir>/<name>.json``.
        argv: The script's arguments (``None``: ``sys.argv[1:]``), recorded as the command.
        script: The script's file name when it is not ``<name>.py`` (one script, several results).
    """

    def __init__(self, name: str, argv: Sequence[str] | None, script: str | None = None) -> None:
        self.name = name
        args = list(sys.argv[1:] if argv is None else argv)
        self.command = shlex.join(["python", f"bench/{script or name + '.py'}", *args])
        self.started = dt.datetime.now(dt.timezone.utc)
        self.load_start = loadavg()
        self.machine = machine_info()  # the commit that runs, not the one checked out when it ends
        self.t0 = time.perf_counter()

    def finish(self, results_dir: Path, *, title: str, params: dict[str, Any], rows: list[dict[str, Any]],
               markdown: str, goal: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
               echo: bool = True) -> dict[str, Any]:
        """Write ``<results_dir>/<name>.json``, print the table, and return the result dict."""
        result = {
            "name": self.name, "title": title, "command": self.command,
            "date": self.started.strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": round(time.perf_counter() - self.t0, 1),
            "loadavg_start": self.load_start, "loadavg_end": loadavg(),
            "machine": {**self.machine, "torch_threads": _torch_threads()}, "params": params, "rows": rows, "goal": goal,
            "markdown": markdown, **(extra or {}),
        }
        results_dir = Path(results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        tmp.replace(path)
        if echo:
            print(f"\n## {title}\n\n{markdown}\n")
            if goal:
                print(f"goal: {goal.get('text')} -> {'met' if goal.get('met') else 'MISSED'}")
            print(f"load average {result['loadavg_start']} -> {result['loadavg_end']}; "
                  f"{result['seconds']} s; written to {path}")
        return result


def load_result(name: str, results_dir: Path = RESULTS_DIR) -> dict[str, Any] | None:
    """A script's last result, or None if it has not run."""
    path = Path(results_dir) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
