"""Memory ceiling: peak resident memory of a whole federated run with 2, 8, 32 clients.

Each run is a fresh Python process running ``fedpeft.simulation.run_job`` end to end (model load,
rounds, aggregation, checkpoints, final evaluation, adapter save); its peak RSS comes from the
kernel (``os.wait4`` rusage ``ru_maxrss`` of that child; the child's own ``VmHWM`` is recorded
beside it). A child that only loads and wraps the model gives the floor. One base model per
device is kept and adapters are swapped, so the peak should not grow with the number of
clients; what may grow is the clients' updates, which the round keeps until it aggregates them.
The floor row is a child that loads and wraps the model and reads every weight once (the
safetensors weights are memory-mapped, so untouched pages would not count).

Data: every client holds the same number of rows (the shipped sample, cycled), so the data set
grows with the number of clients too.

    python bench/memory.py                                     # tiny: 2, 8, 32; default model: 2, 8
    python bench/memory.py --configs tiny:2 tiny:4 --reps 1    # smoke size
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MODELS, Column, Recorder, base_parser, fmt_bytes, markdown_table, median, setup_torch, spread,
)

GOAL = 0.05  # peak RSS growth from the fewest to the most clients
DEFAULT_CONFIGS = ["tiny:2", "tiny:8", "tiny:32", "default:2", "default:8"]
MARK = "BENCH_MEMORY_RESULT "


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def write_data(folder: Path, rows: int, test_rows: int) -> tuple[Path, Path]:
    """Training and test JSONL files of ``rows`` and ``test_rows`` sample rows (cycled)."""
    from bench.overhead import sample_rows

    train, test = folder / "train.jsonl", folder / "test.jsonl"
    train.write_text("".join(json.dumps({**r, "id": f"r{i}"}) + "\n" for i, r in enumerate(sample_rows(rows))))
    test.write_text("".join(json.dumps(r) + "\n" for r in sample_rows(test_rows)))
    return train, test


def child(args: argparse.Namespace) -> None:
    """Inside the fresh process: one whole run (or only the model load), then report."""
    from fedpeft.config import JobConfig

    cfg = JobConfig.model_validate({
        "job": "memory", "workspace": str(args.workspace), "run_id": f"{args.model}-{args.clients}",
        "model": {"name": MODELS[args.model], "devices": "cpu"},
        "data": {"train": str(args.train or "builtin:sample"), "test": str(args.test) if args.test else None,
                 "max_seq_len": args.max_seq_len},
        "federation": {"num_clients": max(1, args.clients), "rounds": args.rounds},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size},
        "eval": {"zero_shot": False, "every": 0, "max_samples": 2, "max_new_tokens": 8, "batch_size": 2},
    })
    if args.clients == 0:  # the floor: import, load and wrap the model, nothing else
        import torch

        from fedpeft.worker import build_worker

        worker = build_worker(cfg, "cpu")
        with torch.no_grad():  # safetensors weights are mmap'd: read every page so they count
            sum(float(p.sum()) for p in worker.model.parameters())
    else:
        from fedpeft.simulation import run_job

        run_job(cfg)
    print(MARK + json.dumps({"vm_hwm": _vm_hwm_bytes()}), flush=True)


def run_child(model: str, clients: int, opts: list[str], folder: Path) -> dict:
    """Run one configuration in a fresh process; its peak RSS from the kernel (``os.wait4``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model, "--clients", str(clients),
           "--workspace", str(folder / f"ws-{model}-{clients}-{os.urandom(3).hex()}"), *opts]
    log = folder / "child.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # keeps this child's own rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({' '.join(cmd)}):\n{text[-3000:]}")
    line = next(x for x in reversed(text.splitlines()) if x.startswith(MARK))
    return {"peak_rss": usage.ru_maxrss * 1024, **json.loads(line[len(MARK):])}


def measure(model: str, clients: int, opts: list[str], reps: int, folder: Path) -> dict:
    """Median peak RSS of ``reps`` fresh processes of one configuration."""
    runs = [run_child(model, clients, opts, folder) for _ in range(reps)]
    peaks = [r["peak_rss"] for r in runs]
    return {"model": MODELS[model], "clients": clients, "peak_rss": median(peaks), "peak_range": spread(peaks),
            "vm_hwm": median([r["vm_hwm"] or 0 for r in runs])}


COLUMNS = [
    Column("model", "model"),
    Column("label", "clients"),
    Column("peak_rss", "peak RSS (median)", fmt_bytes),
    Column("peak_range", "min–max", lambda r: f"{fmt_bytes(r[0])}–{fmt_bytes(r[1])}"),
    Column("above_floor", "above the loaded model", fmt_bytes),
    Column("growth", "vs fewest clients", lambda v: f"{100 * v:+.1f} %"),
]


def _parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="MODEL:N pairs (default: %(default)s)")
    p.add_argument("--reps", type=int, default=2, help="fresh processes per configuration")
    p.add_argument("--rows-per-client", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per client per round")
    p.add_argument("--default-rounds", type=int, default=1, help="rounds with the default model")
    p.add_argument("--default-steps", type=int, default=1, help="steps per client per round, default model")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=128)
    for name in ("--model", "--clients", "--workspace", "--train", "--test"):  # set by the parent for a child
        p.add_argument(name, type={"--clients": int, "--model": str}.get(name, Path), help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def measure_model(args: argparse.Namespace, model: str, counts: list[int], folder: Path) -> list[dict]:
    """The floor and each client count of one model, with growth relative to the fewest clients."""
    rounds, steps = (args.default_rounds, args.default_steps) if model == "default" else (args.rounds, args.steps)
    opts = ["--rounds", str(rounds), "--steps", str(steps), "--batch-size", str(args.batch_size),
            "--max-seq-len", str(args.max_seq_len), "--threads", str(args.threads)]
    floor = {**measure(model, 0, opts, args.reps, folder), "label": "model loaded, no run"}
    rows = []
    for n in sorted(counts):
        data = folder / f"data-{n}"
        data.mkdir(exist_ok=True)
        train, test = write_data(data, n * args.rows_per_client, 4)  # rows_per_client rows each (IID)
        row = measure(model, n, opts + ["--train", str(train), "--test", str(test)], args.reps, folder)
        rows.append({**row, "label": str(n), "above_floor": row["peak_rss"] - floor["peak_rss"]})
    for row in rows:
        row["growth"] = row["peak_rss"] / rows[0]["peak_rss"] - 1
    return [floor, *rows]


def main(argv: list[str] | None = None) -> dict | None:
    args = _parser().parse_args(argv)
    setup_torch(args.threads)
    if args.child:
        child(args)
        return None
    rec = Recorder("memory", argv)
    configs = [(m, int(n)) for m, n in (c.split(":") for c in args.configs)]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in dict.fromkeys(m for m, _ in configs):
            rows += measure_model(args, model, [n for m, n in configs if m == model], Path(tmp))
    growth = {r["model"]: r["growth"] for r in rows if "growth" in r}  # the last (most clients) wins
    met = {m: g <= GOAL for m, g in growth.items()}
    md = markdown_table(COLUMNS, rows)
    md += (f"\n\nEach row: a fresh process running `run_job` end to end (tiny model: {args.rounds} rounds × "
           f"{args.steps} steps, default model: {args.default_rounds} × {args.default_steps}, of batch "
           f"{args.batch_size} per client per round; {args.rows_per_client} rows per client, max_seq_len "
           f"{args.max_seq_len}, LoRA r16 all-linear, FedAvg, final evaluation on 2 questions, {args.threads} torch "
           f"thread(s)); peak RSS is the child's `ru_maxrss` (`os.wait4`), median of {args.reps} processes. "
           "Goal: ≤ 5 % growth from the fewest to the most clients: "
           + ", ".join(f"`{m}` {100 * g:+.1f} % **{'met' if met[m] else 'missed'}**" for m, g in growth.items()) + ".")
    return rec.finish(
        args.results_dir, title="Memory ceiling: peak RSS vs number of clients", rows=rows, markdown=md,
        params={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("child", "model", "clients", "workspace", "train", "test")},
        goal={"text": "peak RSS grows ≤ 5 % from the fewest to the most clients", "met": all(met.values()),
              "growth": growth},
    )


if __name__ == "__main__":
    main()
