"""Server memory of one round: peak RSS with 2, 8 and 32 clients, streaming fold vs holding every update.

Only the server side of a round is simulated, on the real adapter of the README's model: LoRA
all-linear r16 on SmolLM2-135M (420 tensors, 4.9M parameters, 19.5 MB in fp32). A helper process
loads the model once to read the adapter's tensor names and shapes; each measurement is then a
fresh Python process that never loads the model. It builds the global adapter (zeros of those
shapes) and records its RSS (the baseline), then lets N clients "reply" one after another: each
reply is a random fp32 state of those shapes (seeded by the client), made only when it arrives,
and handed to the server, which

- ``streaming``: adds it to the round's ``fedpeft.fold.Fold`` (float64 running sums) and drops it;
- ``hold-all (before)``: appends it to a list, as the server did before ``Fold`` existed, then
  screens the list (``update_problem``, as ``Fold.add`` does to each update) and averages it
  (``aggregate(FedAvg(), global, updates)``, i.e. ``weighted_mean``);
- ``median``: adds it to a ``Fold(hold=True)`` (a rule that reads each update must hold them all),
  then ``aggregate(Median(), global, updates)``.

The process's peak RSS is its ``VmHWM`` (``/proc/self/status``), median of ``--reps`` processes.
Not ``ru_maxrss``: Linux carries a process's ``ru_maxrss`` across ``fork`` and ``exec``, so a child
reports at least its parent's peak (a parent that had loaded the model gave every child the same
496 MB); ``VmHWM`` belongs to the new address space. ``ru_maxrss`` (``getrusage`` in the child) is
recorded beside it. The server's time is the CPU and wall time of its calls only (``Fold.add``,
``result``, list appends, screening, ``aggregate``), not of making the replies.

    python bench/server_memory.py                                  # about 2 min
    python bench/server_memory.py --clients 2 4 --reps 1 --median-clients 2   # smoke size
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MODELS, Column, Recorder, base_parser, fmt_bytes, fmt_seconds, markdown_table, median, setup_torch, spread,
)

GOAL = 0.02  # peak RSS growth of the streaming server from the fewest to the most clients
ARMS = {"streaming": "streaming (Fold)", "hold-all": "hold-all (before)", "median": "median (holds all)"}
PEFT = {"r": 16, "alpha": 32}  # LoRA; its default target_modules is all-linear
MARK = "BENCH_SERVER_MEMORY_RESULT "


def adapter_shapes(model: str) -> dict[str, list[int]]:
    """Names and shapes of the LoRA all-linear r16 adapter of ``model`` (the model is loaded once, here)."""
    from fedpeft.adapters import get_trainable_state
    from fedpeft.config import ModelConfig
    from fedpeft.models import load_base_model
    from fedpeft.peft_methods import build_peft_method, wrap_model

    base, _ = load_base_model(ModelConfig(name=model))
    state = get_trainable_state(wrap_model(base, build_peft_method("lora", PEFT)))
    return {k: list(v.shape) for k, v in state.items()}


# ------------------------------------------------------------------------------------------
# Inside the fresh process


def _status_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _reply(shapes: dict[str, list[int]], index: int):
    """Client ``index``'s update as it arrives: random fp32 tensors of the adapter's shapes."""
    import torch

    from fedpeft.state import ClientUpdate

    gen = torch.Generator().manual_seed(1000 + index)
    state = {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}
    return ClientUpdate(f"client-{index}", state, num_examples=10 + index % 7)


def server_round(arm: str, shapes: dict[str, list[int]], clients: int) -> dict:
    """The server side of one round of ``clients`` replies; its seconds, baseline and peak RSS."""
    import torch

    from fedpeft.aggregators import FedAvg, aggregate, build_aggregator
    from fedpeft.fold import Fold
    from fedpeft.update_checks import update_problem

    global_state = {k: torch.zeros(shape) for k, shape in shapes.items()}
    baseline = _status_bytes("VmRSS")
    sampled = [f"client-{i}" for i in range(clients)]
    fold = Fold(global_state, sampled, hold=arm == "median") if arm != "hold-all" else None
    held: list = []
    cpu = wall = 0.0
    for i in range(clients):
        update = _reply(shapes, i)
        c0, w0 = time.process_time(), time.perf_counter()
        if fold is not None:
            fold.add(update)
        else:
            held.append(update)
        del update  # the server keeps nothing of it but what add() or the list holds
        cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - w0
    c0, w0 = time.process_time(), time.perf_counter()
    if fold is None:  # the old loop: screen the round's list, then weighted_mean over it
        assert not any(update_problem(global_state, u, None) for u in held)
        new_state = aggregate(FedAvg(), global_state, held)
    else:
        updates, mean = fold.result()
        rule = build_aggregator("median", {}) if arm == "median" else FedAvg()
        new_state = aggregate(rule, global_state, updates, mean=mean)
    cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - w0
    assert set(new_state) == set(global_state)
    return {"peak_rss": _status_bytes("VmHWM"), "baseline_rss": baseline,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "cpu_s": cpu, "wall_s": wall, "peak_held": None if fold is None else fold.peak_held}


def child(args: argparse.Namespace) -> None:
    if args.arm is None:  # the parent's helper: load the model, write the adapter's shapes
        args.shapes.write_text(json.dumps(adapter_shapes(MODELS.get(args.model, args.model))))
        return
    shapes = json.loads(Path(args.shapes).read_text())
    print(MARK + json.dumps(server_round(args.arm, shapes, args.n)), flush=True)


# ------------------------------------------------------------------------------------------
# The parent


def run_child(arm: str, clients: int, shapes: Path, threads: int) -> dict:
    """One fresh process; what it reported."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--arm", arm, "--n", str(clients),
           "--shapes", str(shapes), "--threads", str(threads)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"server_memory child failed ({' '.join(cmd)}):\n{(out.stdout + out.stderr)[-3000:]}")
    line = next(x for x in reversed(out.stdout.splitlines()) if x.startswith(MARK))
    return json.loads(line[len(MARK):])


def write_shapes(model: str, path: Path, threads: int) -> dict[str, list[int]]:
    """The adapter's names and shapes, read by a child process (the model never enters this one)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model, "--shapes", str(path),
           "--threads", str(threads)]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads(path.read_text())


def measure(arm: str, clients: int, shapes: Path, args: argparse.Namespace) -> dict:
    """Medians over ``--reps`` fresh processes of one arm and client count."""
    runs = [run_child(arm, clients, shapes, args.threads) for _ in range(args.reps)]
    peaks = [r["peak_rss"] for r in runs]
    row = {"arm": ARMS[arm], "key": arm, "clients": clients, "peak_rss": median(peaks), "peak_range": spread(peaks),
           **{k: median([r[k] for r in runs]) for k in ("baseline_rss", "ru_maxrss", "cpu_s", "wall_s")},
           "peak_held": runs[0]["peak_held"]}
    row["above_baseline"] = row["peak_rss"] - row["baseline_rss"]
    print(f"{row['arm']:>20} N={clients:>2}: peak {fmt_bytes(row['peak_rss'])} ({fmt_bytes(row['above_baseline'])} "
          f"above baseline), server {fmt_seconds(row['cpu_s'])} CPU / {fmt_seconds(row['wall_s'])} wall", flush=True)
    return row


def add_growth(rows: list[dict]) -> dict[str, dict]:
    """Per arm: growth of the peak from its fewest to its most clients (%, and bytes per extra client)."""
    out = {}
    for arm in dict.fromkeys(r["key"] for r in rows):
        mine = [r for r in rows if r["key"] == arm]
        first, last = mine[0], mine[-1]
        for r in mine:
            r["growth"] = r["peak_rss"] / first["peak_rss"] - 1
        per_client = (last["peak_rss"] - first["peak_rss"]) / max(1, last["clients"] - first["clients"])
        last["per_client"] = per_client
        out[arm] = {"from": first["clients"], "to": last["clients"], "growth": last["growth"],
                    "per_client_bytes": per_client}
    return out


COLUMNS = [
    Column("arm", "server"),
    Column("clients", "clients"),
    Column("peak_rss", "peak RSS (median)", fmt_bytes),
    Column("peak_range", "min–max", lambda r: f"{fmt_bytes(r[0])}–{fmt_bytes(r[1])}"),
    Column("baseline_rss", "global adapter built", fmt_bytes),
    Column("above_baseline", "round, above that", fmt_bytes),
    Column("growth", "vs fewest clients", lambda v: f"{100 * v:+.1f} %"),
    Column("per_client", "per extra client", fmt_bytes),
    Column("cpu_s", "server CPU", fmt_seconds),
    Column("wall_s", "server wall", fmt_seconds),
]


def _parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__)
    p.add_argument("--clients", type=int, nargs="+", default=[2, 8, 32], help="clients per round")
    p.add_argument("--median-clients", type=int, nargs="+", default=[2, 32], help="client counts of the median arm")
    p.add_argument("--reps", type=int, default=3, help="fresh processes per arm and client count")
    p.add_argument("--model", default="default", help="tiny, default (smollm2-135m-instruct) or a model name")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--shapes", type=Path, help=argparse.SUPPRESS)
    return p


def _text(args: argparse.Namespace, shapes: dict, growth: dict[str, dict], met: bool) -> str:
    n = sum(math.prod(s) for s in shapes.values())
    g = {a: f"{100 * x['growth']:+.1f} % ({fmt_bytes(x['per_client_bytes'])} per extra client)"
         for a, x in growth.items()}
    return (f"The server side of one round, LoRA all-linear r16 on `{MODELS.get(args.model, args.model)}` "
            f"({len(shapes)} tensors, {n:,} parameters, {fmt_bytes(4 * n)} per fp32 update): each process builds "
            f"the global adapter (baseline RSS), then receives the clients' random updates one at a time. "
            f"Peak RSS is the process's `VmHWM`, median of {args.reps} fresh processes; 'server' "
            f"times are the server's own calls (fold/list, `aggregate`), {args.threads} torch thread(s). "
            f"Growth from {min(args.clients)} to {max(args.clients)} clients: streaming {g['streaming']}, "
            f"hold-all {g['hold-all']}" + (f", median {g['median']}" if "median" in g else "")
            + f". Goal: streaming grows ≤ {100 * GOAL:g} % → **{'met' if met else 'missed'}**.")


def main(argv: list[str] | None = None) -> dict | None:
    args = _parser().parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads or torch.get_num_threads())
        child(args)
        return None
    rec = Recorder("server_memory", argv)
    setup_torch(args.threads)
    plan = [(a, n) for a in ("streaming", "hold-all") for n in sorted(args.clients)]
    plan += [("median", n) for n in sorted(args.median_clients)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shapes.json"
        shapes = write_shapes(args.model, path, args.threads)
        rows = [measure(arm, n, path, args) for arm, n in plan]
    growth = add_growth(rows)
    met = growth["streaming"]["growth"] <= GOAL
    md = markdown_table(COLUMNS, rows) + "\n\n" + _text(args, shapes, growth, met)
    return rec.finish(
        args.results_dir, title="LoRA-aware aggregation: server memory of a round", rows=rows, markdown=md,
        params={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("child", "arm", "n", "shapes")},
        goal={"text": f"streaming server's peak RSS grows ≤ {100 * GOAL:g} % from {min(args.clients)} to "
                      f"{max(args.clients)} clients", "met": met, "growth": growth},
        extra={"adapter": {"tensors": len(shapes), "shapes": shapes}},
    )


if __name__ == "__main__":
    main()
