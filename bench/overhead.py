"""Federation overhead: rounds of ``run_job``'s loop vs the same training steps without federation.

* **federated**: :func:`fedpeft.rounds.run_rounds` with the simulation's client pool, as
  ``fedpeft run`` calls it, evaluation off: sample clients, schedule each on the device worker,
  swap its adapter in and out, train, aggregate (FedAvg), write the metrics record, checkpoint,
  and at the end save the adapter folder and ``summary.json``. The model is loaded once, before
  timing (a run loads it once too; its load time is reported apart).
* **pure training**: :func:`fedpeft.trainer.local_steps` (the optimizer steps inside ``fit``) for
  the same clients, data, seeds and steps, back to back on a model that already holds an adapter:
  no swap in or out, no scheduler, no aggregation, no record, no checkpoint.

overhead = federated wall time ÷ pure training time − 1, taken within each repetition (the two
alternate) and reported as the median over repetitions; the same in CPU seconds of this process,
which other jobs on the machine barely move. The least noisy view times the run's own
``local_steps`` calls and counts everything else in that same run as overhead.

    python bench/overhead.py                                   # tiny model N=2,8,32; default model N=4
    python bench/overhead.py --configs tiny:2 --reps 2 --steps 1   # smoke size
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MODELS, Column, Recorder, base_parser, fmt_pct, fmt_seconds, markdown_table, median, setup_torch, spread,
)

GOAL = 0.02  # round wall time at most 2 % above pure training
DEFAULT_CONFIGS = ["tiny:2", "tiny:8", "tiny:32", "default:4"]


def sample_rows(n: int) -> list[dict]:
    """``n`` question/answer rows: the shipped sample, cycled (synthetic clients need only shapes)."""
    import json
    from importlib import resources

    text = resources.files("fedpeft").joinpath("data/sample.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [rows[i % len(rows)] for i in range(n)]


@contextmanager
def _timing_local_steps(walls: list[float]) -> Iterator[None]:
    """Time every ``local_steps`` call ``fit`` makes (the trainer's module global, patched)."""
    import fedpeft.trainer as trainer

    original = trainer.local_steps

    def timed(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            walls.append(time.perf_counter() - start)

    trainer.local_steps = timed
    try:
        yield
    finally:
        trainer.local_steps = original


class Bench:
    """One configuration: the simulation's client pool (one worker), N clients of equal size."""

    def __init__(self, model: str, clients: int, steps: int, batch_size: int, max_seq_len: int, rounds: int,
                 folder: Path) -> None:
        from fedpeft.config import JobConfig
        from fedpeft.data.federated import FederatedData
        from fedpeft.simulation import build_pool

        self.folder = folder
        self.cfg = JobConfig.model_validate({
            "job": "overhead", "workspace": str(folder),
            "model": {"name": MODELS[model], "devices": "cpu"},
            "data": {"max_seq_len": max_seq_len},
            "federation": {"num_clients": clients, "rounds": rounds},
            "train": {"max_steps": steps, "batch_size": batch_size, "local_epochs": 1},
            "eval": {"zero_shot": False},
        })
        rows = sample_rows(clients * steps * batch_size)
        per = steps * batch_size
        parts = [rows[i * per:(i + 1) * per] for i in range(clients)]
        t0 = time.perf_counter()
        self.pool = build_pool(self.cfg, FederatedData([f"client-{i}" for i in range(clients)], parts, [], []))
        self.load_s = time.perf_counter() - t0
        self.runs = 0

    def federated(self) -> dict[str, float]:
        """``run_rounds`` in a fresh run folder: wall and CPU time, and its ``local_steps`` time."""
        from fedpeft.rounds import run_rounds
        from fedpeft.run_dir import RunDir

        self.runs += 1
        run = RunDir.create(self.cfg.model_copy(update={"run_id": f"run-{self.runs}"}))
        walls: list[float] = []
        t0, c0 = time.perf_counter(), time.process_time()
        with _timing_local_steps(walls):
            run_rounds(self.cfg, run, self.pool, self.pool.sched, [])
        return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "steps_wall": sum(walls)}

    def pure(self) -> dict[str, float]:
        """The same clients' optimizer steps back to back on the worker's model, nothing around them."""
        from fedpeft.rounds import client_seed
        from fedpeft.trainer import local_steps

        worker, cfg = self.pool.sched.resources["cpu"], self.cfg
        t0, c0 = time.perf_counter(), time.process_time()
        for rnd in range(1, cfg.federation.rounds + 1):
            for i, cid in enumerate(self.pool.client_ids):
                local_steps(worker.model, self.pool.tokenized[i], cfg.train, seed=client_seed(cfg, rnd, i),
                            pad_token_id=worker.tokenizer.pad_token_id, client_id=cid)
        return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}


def measure(model: str, clients: int, steps: int, batch_size: int, max_seq_len: int, rounds: int,
            reps: int) -> dict:
    """Interleaved federated runs and pure passes; medians and per-repetition ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(model, clients, steps, batch_size, max_seq_len, rounds, Path(tmp))
        b.federated()  # warm-up: lazy initialisation, allocator, page cache
        feds, pures = [], []
        for rep in range(reps):
            pair = (b.federated, b.pure) if rep % 2 == 0 else (b.pure, b.federated)
            first, second = pair[0](), pair[1]()
            fed, pure = (first, second) if rep % 2 == 0 else (second, first)
            feds.append(fed)
            pures.append(pure)
    over = [f["wall"] / p["wall"] - 1 for f, p in zip(feds, pures)]
    over_cpu = [f["cpu"] / p["cpu"] - 1 for f, p in zip(feds, pures)]
    outside = [f["wall"] - f["steps_wall"] for f in feds]  # seconds outside the optimizer steps
    over_inner = [o / f["steps_wall"] for o, f in zip(outside, feds)]
    return {
        "model": MODELS[model], "clients": clients, "steps_per_client": steps, "rounds": rounds,
        "load_s": b.load_s, "pure_s": median([p["wall"] for p in pures]),
        "federated_s": median([f["wall"] for f in feds]), "pure_cpu_s": median([p["cpu"] for p in pures]),
        "overhead": median(over), "overhead_range": spread(over),
        "overhead_cpu": median(over_cpu), "overhead_cpu_range": spread(over_cpu),
        "outside_steps_s": median(outside), "outside_steps": median(over_inner),
        "outside_steps_range": spread(over_inner),
        "goal_met_wall": median(over) <= GOAL, "goal_met_cpu": median(over_cpu) <= GOAL,
        "goal_met_in_run": median(over_inner) <= GOAL,
        "raw": {"federated": feds, "pures": pures},
    }


def _range(r: tuple[float, float]) -> str:
    return f"{100 * r[0]:+.1f}…{100 * r[1]:+.1f} %"


COLUMNS = [
    Column("model", "model"),
    Column("clients", "N"),
    Column("steps_per_client", "steps/client"),
    Column("rounds", "rounds"),
    Column("pure_s", "pure training (wall)", fmt_seconds),
    Column("federated_s", "run_rounds (wall)", fmt_seconds),
    Column("overhead", "overhead, wall", fmt_pct),
    Column("overhead_range", "wall min…max", _range),
    Column("overhead_cpu", "overhead, CPU time", fmt_pct),
    Column("overhead_cpu_range", "CPU min…max", _range),
    Column("outside_steps_s", "time outside the steps", fmt_seconds),
    Column("outside_steps", "÷ steps time", lambda v: f"{100 * v:.2f} %"),
]


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="MODEL:N pairs, MODEL in tiny|default (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per client (tiny model)")
    p.add_argument("--default-steps", type=int, default=1, help="optimizer steps per client (default model)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1, help="rounds per federated run")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--default-reps", type=int, default=5, help="repetitions for the default model")
    args = p.parse_args(argv)
    rec = Recorder("overhead", argv)
    setup_torch(args.threads)
    rows = []
    for spec in args.configs:
        model, n = spec.split(":")
        steps, reps = (args.default_steps, args.default_reps) if model == "default" else (args.steps, args.reps)
        rows.append(measure(model, int(n), steps, args.batch_size, args.max_seq_len, args.rounds, reps))
    met_wall = all(r["goal_met_wall"] for r in rows)
    met_cpu = all(r["goal_met_cpu"] for r in rows)
    met_in = all(r["goal_met_in_run"] for r in rows)
    md = markdown_table(COLUMNS, rows)
    md += (f"\n\nLoRA r16 all-linear, batch {args.batch_size}, max_seq_len {args.max_seq_len}, shipped sample rows; "
           f"medians of {args.reps} repetitions (tiny) / {args.default_reps} (default model), federated run and "
           "pure pass alternating; each overhead is taken within a repetition (federated ÷ pure − 1). "
           "'run_rounds': everything `fedpeft run` does after loading the model, evaluation off: sampling, "
           "scheduling, each client's adapter swapped in and out, aggregation, metrics record, checkpoint, "
           "adapter folder and summary. 'pure training': the same optimizer steps (`local_steps`) on a model "
           "that already holds an adapter. 'CPU time' is this process's CPU seconds (all threads), which other "
           "jobs on the machine barely move. 'time outside the steps': the run's wall time minus its own "
           "`local_steps` calls, measured in the same run, the least noisy view. Goal ≤ 2 %: "
           f"wall **{'met' if met_wall else 'missed'}**, CPU time **{'met' if met_cpu else 'missed'}**, "
           f"outside the steps **{'met' if met_in else 'missed'}**.")
    return rec.finish(
        args.results_dir, title="Federation overhead: run_rounds vs pure local training", rows=rows, markdown=md,
        params={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        goal={"text": "federated wall time ≤ 1.02 × pure training time", "met": met_wall, "met_cpu_time": met_cpu,
              "met_outside_steps": met_in, "worst_wall": max(r["overhead"] for r in rows),
              "worst_cpu": max(r["overhead_cpu"] for r in rows)},
    )


if __name__ == "__main__":
    main()
