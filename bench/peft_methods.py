"""Every PEFT method side by side: a 2-round federated job each, ranked by the benchmark leaderboard.

One native benchmark grid (what ``fedpeft benchmark`` runs, :mod:`fedpeft.benchmark`) over the
``peft`` section: LoRA, LoRA with DoRA, LoRA with rsLoRA scaling, FFA-LoRA, (IA)^3, prompt
tuning, prefix tuning (P-Tuning v2) and P-Tuning, on the same data, clients, steps and learning
rate, plus the ``zero_shot`` baseline (the base model alone, evaluated once). Per method:

* trainable parameters (the adapter state that travels) and bytes per update: one client's
  upload in one round, fp32 on the wire, as ``metrics.jsonl`` reports ``bytes_up`` per client
  (the leaderboard's ``bytes_per_round`` is every client's, down and up together);
* held-out loss (nats per answer token, every test question) after the last round, and its
  change from zero-shot; train loss of the last round (mean over clients, weighted by rows);
* wall and CPU seconds of the whole run (model load, training, evaluation; CPU counts every
  thread of this process).

Default size: SmolLM2-135M-Instruct, 2 clients (IID), 2 rounds of 2 local steps (batch 4, lr
1e-3, at most 128 tokens), 32 MedQuAD training rows and 16 test questions on topics not in
train (``../shared/datasets/medquad``; the shipped sample when it is absent), 4 answers of 16
tokens generated after round 2. One run per method, so differences of a few hundredths in the
loss are within what another seed would change.

    python bench/peft_methods.py                           # about 10 min on one core
    python bench/peft_methods.py --smoke                   # tiny random Llama, 1 step (under a minute)
    python bench/peft_methods.py --only lora ia3 --workspace ws   # some methods; keep ws/peft-methods/rank/
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MEDQUAD_DIR, MODELS, Column, Recorder, base_parser, fmt_bytes, fmt_seconds, markdown_table, setup_torch,
)

JOB = "peft-methods"
FLAGS = ("use_dora", "use_rslora")  # the LoRA variants' switches, shown in the selected leaderboard
SMOKE = ["--model", "tiny", "--steps", "1", "--rows", "16", "--test-rows", "4", "--max-seq-len", "64",
         "--gen-samples", "2", "--max-new-tokens", "4"]
LORA = {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
METHODS: dict[str, dict[str, Any]] = {  # name -> the peft section of its test case
    "lora": dict(LORA),
    "lora+dora": {**LORA, "use_dora": True},
    "lora+rslora": {**LORA, "use_rslora": True},
    "ffa_lora": {**LORA, "method": "ffa_lora"},
    "ia3": {"method": "ia3"},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 20},
    "prefix": {"method": "prefix", "num_virtual_tokens": 16, "encoder_hidden_size": 128},
    "ptuning": {"method": "ptuning", "num_virtual_tokens": 20, "encoder_hidden_size": 128},
}


# ------------------------------------------------------------------------------------------
# The benchmark grid


def data_section(args: Any) -> dict:
    """MedQuAD (test topics not in train) when it is beside the repo, else the shipped sample."""
    sizes = {"max_train_samples": args.rows, "max_test_samples": args.test_rows, "max_seq_len": args.max_seq_len}
    if args.data == "medquad" or (args.data == "auto" and (MEDQUAD_DIR / "train.jsonl").is_file()):
        return {"train": str(MEDQUAD_DIR / "train.jsonl"), "test": str(MEDQUAD_DIR / "test.jsonl"), **sizes}
    return {"train": "builtin:sample", "test_ratio": 0.15, "split_by": "focus", **sizes}


def grid_tree(args: Any, workspace: Path, methods: dict[str, dict]) -> dict:
    """The native benchmark file: the shared job, a grid over ``peft``, the zero-shot baseline."""
    return {
        "job": JOB, "workspace": str(workspace), "seed": args.seed,
        "model": {"name": MODELS.get(args.model, args.model)}, "data": data_section(args),
        "federation": {"num_clients": args.clients, "rounds": args.rounds, "partition": {"method": "iid"}},
        "train": {"learning_rate": args.lr, "batch_size": args.batch_size, "max_steps": args.steps},
        "eval": {"every": 0, "max_samples": args.gen_samples, "max_new_tokens": args.max_new_tokens,
                 "metrics": ["rougeL"], "heldout_loss": True},
        "grid": {"peft": list(methods.values())},
        "baselines": ["zero_shot"],
        "rank": {"sort_by": [{"heldout_loss": "ascend"}], "selected_dataitem": selected_columns(methods)},
    }


def selected_columns(methods: dict[str, dict]) -> dict:
    """The selected leaderboard's columns: the method (and LoRA switches in use), loss and costs."""
    flags = [f"peft.{k}" for k in FLAGS if any(k in peft for peft in methods.values())]
    return {"hyperparameters": ["peft.method", *flags],
            "metrics": ["heldout_loss", "trainable_parameters", "bytes_per_round", "wall_seconds", "rougeL"]}


@contextlib.contextmanager
def timed_runs(log: list[dict]) -> Iterator[None]:
    """Wrap the runner's ``_execute``: CPU seconds, run folder or error of every run, in ``log``."""
    from fedpeft.benchmark import runner

    real = runner._execute

    def execute(job, plan, session):  # the runner's signature
        entry = {"kind": job.kind, "hyperparameters": job.meta["hyperparameters"]}
        log.append(entry)
        c0 = time.process_time()
        try:
            row = real(job, plan, session)
        except Exception as e:
            entry["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
            raise
        finally:
            entry["cpu_seconds"] = time.process_time() - c0
        entry["url"] = row["url"]
        return row

    runner._execute = execute
    try:
        yield
    finally:
        runner._execute = real


def run_grid(args: Any, workspace: Path, methods: dict[str, dict]) -> tuple[list[dict], list[dict], str]:
    """Run the grid; ``(leaderboard rows, run log, selected leaderboard as Markdown)``.

    A method that fails leaves its error in the log; the others are still measured.
    """
    from fedpeft.benchmark import load_plan, run_benchmark
    from fedpeft.benchmark.leaderboard import build_board, select, to_markdown
    from fedpeft.errors import FedPeftError

    path = workspace / f"{JOB}.yaml"
    path.write_text(yaml.safe_dump(grid_tree(args, workspace, methods), sort_keys=False))
    plan, log = load_plan(path), []
    with timed_runs(log):
        try:
            run_benchmark(plan, report=False)
        except FedPeftError as e:
            print(f"some methods failed:\n{e}", flush=True)
    board, meta = build_board(plan.job_dir)
    return board.rows, log, to_markdown(select(board, meta))


# ------------------------------------------------------------------------------------------
# Rows


def method_of(hyperparameters: dict, methods: dict[str, dict]) -> str | None:
    """The name of the method whose ``peft`` section gave these leaderboard hyperparameters."""
    from fedpeft.config import flatten

    return next((name for name, peft in methods.items() if flatten(peft, "peft.") == hyperparameters), None)


def run_facts(run_dir: Path) -> dict:
    """Bytes per update (mean over clients and rounds) and train loss per round, from ``metrics.jsonl``."""
    from fedpeft.io_utils import read_jsonl

    rounds = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "round"]
    ups = [c["bytes_up"] for r in rounds for c in r["clients"]]
    return {"bytes_per_update": round(sum(ups) / len(ups)) if ups else None,
            "train_losses": [r["train_loss"] for r in rounds]}


def method_row(name: str, peft: dict, board_row: dict | None, entry: dict | None, zero: float | None) -> dict:
    """One method's row: leaderboard columns, its run's bytes and train loss, CPU seconds or error."""
    row: dict[str, Any] = {"method": name, "peft": peft, "settings": settings_text(peft)}
    if entry is not None:
        row["cpu_seconds"] = entry["cpu_seconds"]
    if board_row is None:
        row["error"] = (entry or {}).get("error", "no leaderboard row")
        return row
    loss = board_row.get("heldout_loss")
    row.update(trainable=board_row.get("trainable_parameters"), heldout_loss=loss,
               rougeL=board_row.get("rougeL"), wall_seconds=board_row.get("wall_seconds"),
               bytes_per_round=board_row.get("bytes_per_round"), run_dir=board_row.get("url"),
               **run_facts(Path(board_row["url"])))
    row["train_loss"] = row["train_losses"][-1] if row["train_losses"] else None
    if loss is not None and zero is not None:
        row["vs_zero_shot"] = loss - zero
    if row["trainable"] and row["bytes_per_update"]:
        row["fp32"] = row["bytes_per_update"] == 4 * row["trainable"]
    return row


def table_rows(board: list[dict], log: list[dict], methods: dict[str, dict]) -> list[dict]:
    """The zero-shot row, then one row per method in ``methods`` order (this session's runs only)."""
    by_url = {r["url"]: r for r in board if r.get("url")}
    zero_entry = next((e for e in log if e["kind"] == "zero_shot"), {})
    zero_row = by_url.get(zero_entry.get("url"), {})
    zero = zero_row.get("heldout_loss")
    rows = [{"method": "zero-shot", "settings": "base model, no adapter", "heldout_loss": zero,
             "wall_seconds": zero_row.get("wall_seconds"), "cpu_seconds": zero_entry.get("cpu_seconds")}]
    by_method = {method_of(e["hyperparameters"], methods): e for e in log if e["kind"] == "federated"}
    for name, peft in methods.items():
        entry = by_method.get(name)
        rows.append(method_row(name, peft, by_url.get((entry or {}).get("url")), entry, zero))
    return rows


def settings_text(peft: dict) -> str:
    """``r 16, alpha 32, all-linear``: a method's settings without its name."""
    return ", ".join(str(v) if k == "target_modules" else k if v is True else f"{k} {v}"
                     for k, v in peft.items() if k != "method")


# ------------------------------------------------------------------------------------------
# Table


def _loss(v: float) -> str:
    return f"{v:.4f}"


COLUMNS = [Column("method", "method"), Column("settings", "settings"),
           Column("trainable", "trainable parameters", "{:,}"),
           Column("bytes_per_update", "bytes per update (fp32, one client)", fmt_bytes),
           Column("heldout_loss", "held-out loss", _loss), Column("vs_zero_shot", "vs zero-shot", "{:+.4f}"),
           Column("train_loss", "train loss (last round)", _loss),
           Column("wall_seconds", "wall", fmt_seconds), Column("cpu_seconds", "CPU", fmt_seconds)]
ERROR = Column("error", "error")


def table(rows: list[dict]) -> str:
    """The Markdown table; an error column only when a method failed."""
    return markdown_table(COLUMNS + [ERROR] * any(r.get("error") for r in rows), rows)


def footer(args: Any, data: dict) -> str:
    """What the table ran on."""
    source = "MedQuAD" if data["train"] != "builtin:sample" else "shipped sample (MedQuAD absent)"
    topics = "topics not in train" if source == "MedQuAD" else "held-out topics"
    return (f"Model `{MODELS.get(args.model, args.model)}`; {args.clients} clients (IID), {args.rounds} rounds of "
            f"{args.steps} local step{'s' * (args.steps != 1)} (batch {args.batch_size}, lr {args.lr:g}, at most {args.max_seq_len} tokens), "
            f"{args.rows} {source} training rows; held-out loss after round {args.rounds} on {args.test_rows} test "
            f"questions on {topics}, {args.gen_samples} answers of {args.max_new_tokens} tokens generated. "
            "Bytes per update: one client's fp32 upload in one round (`bytes_up` in `metrics.jsonl`). Wall and CPU "
            "cover the whole run (model load, training, evaluation). One run per method: one seed, one learning "
            "rate for all (prompt-based methods usually want a higher one).")


# ------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> Any:
    p = base_parser(__doc__)
    p.add_argument("--smoke", action="store_true", help=f"smoke size ({' '.join(SMOKE)})")
    p.add_argument("--model", default="default", help="tiny, default (smollm2-135m-instruct) or a model name")
    p.add_argument("--data", choices=["auto", "medquad", "sample"], default="auto",
                   help="auto: MedQuAD if beside the repo, else the shipped sample")
    p.add_argument("--rows", type=int, default=32, help="training rows over all clients")
    p.add_argument("--test-rows", type=int, default=16, help="test questions (held-out loss)")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="local optimizer steps per client per round")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--gen-samples", type=int, default=4, help="test questions answered (eval.max_samples)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", choices=list(METHODS), help="run only these methods")
    p.add_argument("--workspace", type=Path, default=None,
                   help="keep the benchmark job here (<workspace>/peft-methods; default: a temporary folder)")
    args = p.parse_args(argv)
    return p.parse_args(SMOKE + list(argv if argv is not None else sys.argv[1:])) if args.smoke else args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    rec = Recorder("peft_methods", argv)
    setup_torch(args.threads)
    methods = {k: v for k, v in METHODS.items() if not args.only or k in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(args.workspace or tmp).resolve()
        workspace.mkdir(parents=True, exist_ok=True)
        board, log, leaderboard = run_grid(args, workspace, methods)
        rows = table_rows(board, log, methods)
    data = data_section(args)
    md = table(rows) + "\n\n" + footer(args, data)
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return rec.finish(args.results_dir, title="PEFT methods side by side", rows=rows, markdown=md,
                      params={**params, "data": data, "methods": methods},
                      extra={"leaderboard": leaderboard})


if __name__ == "__main__":
    main()
