"""Learning quality on MedQuAD: zero-shot, centralised LoRA, FedAvg/FedAvgM-LoRA, FedAvg-P-Tuning.

Runs on the benchmark runner (``fedpeft.benchmark``): four native grid plans per seed, written
into the workspace and executed with ``run_benchmark`` (one after the other, or ``--parallel``):

* ``fedavg-lora-iid``: FedAvg-LoRA, IID partition, with the ``zero_shot`` and ``centralized``
  baselines;
* ``fedavgm-lora``: FedAvgM-LoRA, IID and ``by_field: source`` (each NIH site a hospital);
* ``fedavg-ptuning``: FedAvg-P-Tuning, IID and non-IID;
* ``fedavg-lora-noniid``: FedAvg-LoRA, non-IID.

Every client takes exactly ``--steps`` optimizer steps per round in both partitions
(``max_steps``, with enough local epochs for the smallest client), so the federated runs take
the same total number of steps, and the centralised baseline (one client holding every row)
takes that many too (the runner matches them; asserted here). Its rows are the same in both
partitions, so one centralised run is the reference for IID and non-IID alike.

Metrics: ROUGE-1/2/L and BLEU-4 of greedy answers to the test questions, held-out loss on the
same questions, 95% bootstrap intervals over questions (and, in the JSON rows, the paired interval
of the ROUGE-L gain over zero-shot), and federated ÷ centralised ROUGE-L.

    python bench/quality.py                      # the size in BENCHMARKS.md (1 torch thread)
    python bench/quality.py --parallel 3         # plans in 3 processes at once (needs ~3 × 3.5 GB)
    python bench/quality.py --seeds 0 1 2        # three seeds (three times as long)
    python bench/quality.py --collect-only       # re-read finished runs and rewrite the table
    python bench/quality.py --model tiny --train builtin:sample --test none --train-rows 16 \
        --test-rows 2 --max-seq-len 48 --rounds 1 --steps 1 --max-new-tokens 4   # smoke size
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MEDQUAD_DIR, MODELS, REPO, Column, Recorder, base_parser, fmt_seconds, markdown_table, setup_torch,
)

METRICS = ["rouge1", "rouge2", "rougeL", "bleu4"]
GOAL_IID, GOAL_NONIID = 0.97, 0.90  # FedAvg-LoRA ROUGE-L ÷ centralised
LORA = {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
PTUNING = {"method": "ptuning", "num_virtual_tokens": 20, "encoder_hidden_size": 128}
IID = {"method": "iid"}
NONIID = {"method": "by_field", "field": "source"}
FEDAVG, FEDAVGM = {"name": "fedavg"}, {"name": "fedavgm", "beta": 0.9, "server_lr": 1.0}
DEPTH_PLAN = "central-depth-matched"


def base_job(args: Any, seed: int) -> dict[str, Any]:
    """The job every test case starts from (sizes from the command line)."""
    # Each epoch gives every client at least one step, so --steps epochs let even the smallest
    # non-IID client reach --steps steps per round (max_steps cuts the rest).
    epochs = args.steps
    return {
        "job": f"quality-seed{seed}", "workspace": str(args.workspace), "seed": seed,
        "model": {"name": MODELS[args.model], "devices": "cpu"},
        "peft": LORA,
        "data": {"train": args.train, "test": _test_source(args.test), "max_train_samples": args.train_rows,
                 "max_test_samples": args.test_rows, "max_seq_len": args.max_seq_len},
        "federation": {"num_clients": args.clients, "rounds": args.rounds, "partition": IID, "aggregation": FEDAVG},
        "train": {"learning_rate": args.lr, "batch_size": args.batch_size, "max_steps": args.steps,
                  "local_epochs": epochs},
        "eval": {"every": 0, "zero_shot": False, "max_samples": args.test_rows, "batch_size": args.eval_batch_size,
                 "max_new_tokens": args.max_new_tokens, "metrics": METRICS, "heldout_loss": True},
        "rank": {"sort_by": [{"rougeL": "descend"}], "visualization": {"mode": "off"}},
    }


def _test_source(test: str) -> str | None:
    """``--test none``: hold out part of the training file instead (``data.test_ratio``)."""
    return None if test.lower() in ("", "none") else test


def plans(args: Any, seed: int) -> dict[str, dict[str, Any]]:
    """The grid files of one seed, ``{name: tree}``, sized so that ``--parallel 3`` balances."""
    base = base_job(args, seed)
    both = [IID, NONIID]
    out = {
        "fedavg-lora-iid": {**base, "baselines": ["zero_shot", "centralized"]},
        "fedavgm-lora": {**base, "federation": {**base["federation"], "aggregation": FEDAVGM},
                         "grid": {"federation.partition": both}},
        "fedavg-ptuning": {**base, "peft": PTUNING, "grid": {"federation.partition": both}},
        "fedavg-lora-noniid": {**base, "federation": {**base["federation"], "partition": NONIID}},
    }
    if args.depth_matched:  # one client with every row, as many sequential steps as one federated client
        out[DEPTH_PLAN] = {**base, "federation": {**base["federation"], "num_clients": 1}}
    for name, tree in out.items():
        tree["job"] = f"{base['job']}-{name}"
    return {name: tree for name, tree in out.items() if not args.plans or name in args.plans}


def run_parallel(args: Any, argv: list[str]) -> None:
    """Run every (seed, plan) as its own process, at most ``--parallel`` at a time.

    Each process is single-threaded; on a 2-core machine shared with other jobs, three of them
    get a larger share of the cores than one, and finish the set in about a third of the time.
    """
    import subprocess
    import time

    todo = [(seed, name) for seed in args.seeds for name in plans(args, seed)]
    running: dict[subprocess.Popen, Path] = {}
    failed: list[str] = []
    base = _without_option(argv, "--parallel", "--seeds", "--plans")
    while todo or running:
        while todo and len(running) < args.parallel:
            seed, name = todo.pop(0)
            log = Path(args.workspace) / f"seed{seed}-{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, *base, "--seeds", str(seed), "--plans", name, "--no-collect"]
            with log.open("w") as out:
                running[subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)] = log
        time.sleep(1)
        for proc in [p for p in running if p.poll() is not None]:
            log = running.pop(proc)
            if proc.returncode != 0:
                failed.append(f"exit code {proc.returncode}, log {log}")
    if failed:
        raise RuntimeError("quality runs failed (the finished ones are kept): " + "; ".join(failed))


def _without_option(argv: list[str], *names: str) -> list[str]:
    """``argv`` without the options ``names`` and their values."""
    out, skip = [], False
    for a in argv:
        if a in names:
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


def run_plans(args: Any, seed: int) -> None:
    """Write and run the plans of ``seed`` (each plan's runs land in its own job folder)."""
    import yaml

    from fedpeft.benchmark import load_plan, run_benchmark
    from fedpeft.benchmark.baselines import centralized, federated_steps
    from fedpeft.data.federated import prepare_data

    folder = Path(args.workspace) / "plans"
    folder.mkdir(parents=True, exist_ok=True)
    steps = set()
    for name, tree in plans(args, seed).items():
        path = folder / f"seed{seed}-{name}.yaml"
        text = yaml.safe_dump(json.loads(json.dumps(tree)), sort_keys=False)
        path.write_text(f"# written by: python bench/quality.py (seed {seed})\n{text}")
        plan = load_plan(path)
        for case in plan.cases if name != DEPTH_PLAN else []:  # equal total steps, centralised included
            data = prepare_data(case.cfg)
            steps.add(federated_steps(case.cfg, data))
            if name == "fedavg-lora-iid":
                steps.add(centralized(case.cfg, data)[2] * case.cfg.federation.rounds)
        if len(steps) != 1:
            raise AssertionError(f"total optimizer steps differ between runs: {sorted(steps)}; "
                                 "raise --train-rows or lower --steps so every client reaches --steps")
        if args.dry_run:
            continue
        run_benchmark(plan, report=False)


def _label(row: dict) -> tuple[str, str]:
    """(method, partition) of a leaderboard row."""
    kind = row["kind"]
    if kind == "zero_shot":
        return "zero-shot", "–"
    cfg = row["_cfg"]
    if kind == "centralized":
        return f"centralised {cfg['peft']['method'].replace('lora', 'LoRA')}", "all rows"
    if cfg["federation"]["num_clients"] == 1:
        steps = cfg["federation"]["rounds"] * cfg["train"]["max_steps"]
        return f"centralised LoRA, {steps} steps", "all rows"
    agg = {"fedavg": "FedAvg", "fedavgm": "FedAvgM"}[cfg["federation"]["aggregation"]["name"]]
    peft = {"lora": "LoRA", "ptuning": "P-Tuning"}[cfg["peft"]["method"]]
    part = "IID" if cfg["federation"]["partition"]["method"] == "iid" else "non-IID (source)"
    return f"{agg}-{peft}", part


def _predictions(run_dir: Path) -> list[dict]:
    from fedpeft.io_utils import read_jsonl

    for name in ("predictions.jsonl", "predictions_zero_shot.jsonl"):
        if (run_dir / name).is_file():
            return read_jsonl(run_dir / name)
    raise FileNotFoundError(f"no predictions in {run_dir}")


def collect(workspace: Path, seeds: list[int]) -> list[dict]:
    """One row per finished run: metrics, bootstrap intervals, wall time."""
    import yaml

    from fedpeft.metrics import bootstrap_ci

    rows, answers = [], {}
    for seed in seeds:
        for tc in sorted(workspace.glob(f"quality-seed{seed}-*/*/*/testcase.json")):
            row = json.loads(tc.read_text())
            run_dir = tc.parent
            row["_cfg"] = yaml.safe_load((run_dir / "config.yaml").read_text())
            method, part = _label(row)
            preds = _predictions(run_dir)
            p, r = [x["prediction"] for x in preds], [x["reference"] for x in preds]
            summary = json.loads((run_dir / "summary.json").read_text())
            out = {"seed": seed, "method": method, "partition": part, "run_dir": str(run_dir),
                   "questions": len(preds), "wall_s": row["extra"].get("wall_seconds"),
                   "heldout_loss": summary["final"].get("heldout_loss"), "kind": row["kind"]}
            for m in METRICS:
                out[m] = summary["final"][m]
                out[f"{m}_ci"] = bootstrap_ci(m, predictions=p, references=r, n_resamples=1000, seed=0)
            rows.append(out)
            answers[out["run_dir"]] = (p, r)
    add_gain_cis(rows, answers)
    return rows


def add_gain_cis(rows: list[dict], answers: dict[str, tuple[list[str], list[str]]]) -> None:
    """``rougeL_gain_ci``: paired 95% bootstrap interval of each run's ROUGE-L gain over the
    zero-shot run of its seed (``None`` where there is none, or it answered other questions).

    Args:
        rows: Rows of :func:`collect` (``seed``, ``kind``, ``run_dir``).
        answers: ``{run_dir: (predictions, references)}``.
    """
    from fedpeft.metrics import paired_bootstrap_ci

    zero = {r["seed"]: answers[r["run_dir"]] for r in rows if r["kind"] == "zero_shot"}
    for r in rows:
        predictions, references = answers[r["run_dir"]]
        baseline, base_refs = zero.get(r["seed"], (None, None))
        paired = baseline is not None and base_refs == references and r["kind"] != "zero_shot"
        r["rougeL_gain_ci"] = paired_bootstrap_ci(
            "rougeL", predictions=predictions, baseline=baseline, references=references, n_resamples=1000,
            seed=0) if paired else None


ORDER = ["zero-shot", "centralised LoRA", "FedAvg-LoRA", "FedAvgM-LoRA", "FedAvg-P-Tuning"]  # then the rest


def summarise(rows: list[dict]) -> tuple[list[dict], dict]:
    """Rows in a fixed order with ratios to centralised (same seed), and the goals."""
    central = {r["seed"]: r["rougeL"] for r in rows if r["method"] == "centralised LoRA"}
    zero = {r["seed"]: r["rougeL"] for r in rows if r["method"] == "zero-shot"}
    for r in rows:
        r["vs_central"] = r["rougeL"] / central[r["seed"]] if central.get(r["seed"]) else None
        r["vs_zero"] = r["rougeL"] - zero[r["seed"]] if r["seed"] in zero else None
    rows.sort(key=lambda r: (r["seed"], ORDER.index(r["method"]) if r["method"] in ORDER else 99, r["partition"]))
    tuned = [r for r in rows if r["method"] in ORDER[1:]]  # the arms (not the diagnostic one)

    def ratio(method: str, iid: bool) -> list[float]:
        return [r["vs_central"] for r in rows if r["method"] == method and (r["partition"] == "IID") == iid
                and r["vs_central"] is not None]

    iid, noniid = ratio("FedAvg-LoRA", True), ratio("FedAvg-LoRA", False)
    goals = {
        "every_finetune_above_zero_shot": bool(tuned) and all((r["vs_zero"] or 0) > 0 for r in tuned),
        "below_zero_shot": [f"{r['method']} {r['partition']} (seed {r['seed']})" for r in tuned if (r["vs_zero"] or 0) <= 0],
        "fedavg_lora_iid_ratio": iid, "fedavg_lora_iid_met": bool(iid) and min(iid) >= GOAL_IID,
        "fedavg_lora_noniid_ratio": noniid, "fedavg_lora_noniid_met": bool(noniid) and min(noniid) >= GOAL_NONIID,
    }
    return rows, goals


COLUMNS = [
    Column("seed", "seed"),
    Column("method", "method"),
    Column("partition", "partition"),
    Column("rouge1", "ROUGE-1", "{:.3f}"),
    Column("rouge2", "ROUGE-2", "{:.3f}"),
    Column("rougeL", "ROUGE-L", "{:.3f}"),
    Column("rougeL_ci", "ROUGE-L 95% CI", lambda c: f"{c[0]:.3f}–{c[1]:.3f}"),
    Column("bleu4", "BLEU-4", "{:.3f}"),
    Column("heldout_loss", "held-out loss", "{:.3f}"),
    Column("vs_central", "ROUGE-L ÷ centralised", "{:.3f}"),
    Column("wall_s", "wall time", fmt_seconds),
]


SPREAD_COLUMNS = [
    Column("method", "method"),
    Column("partition", "partition"),
    Column("seeds", "seeds"),
    Column("rougeL_mean", "ROUGE-L mean", "{:.3f}"),
    Column("rougeL_range", "ROUGE-L min–max", lambda c: f"{c[0]:.3f}–{c[1]:.3f}"),
    Column("loss_mean", "held-out loss mean", "{:.3f}"),
    Column("ratio_range", "ROUGE-L ÷ centralised, min–max", lambda c: f"{c[0]:.3f}–{c[1]:.3f}" if c else "–"),
]


def spread(rows: list[dict]) -> list[dict]:
    """One row per (method, partition) over the seeds it ran with: mean and range."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["partition"]), []).append(r)
    out = []
    for (method, part), rs in groups.items():
        rl = [r["rougeL"] for r in rs]
        ratios = [r["vs_central"] for r in rs if r["vs_central"] is not None]
        out.append({"method": method, "partition": part, "seeds": ", ".join(str(r["seed"]) for r in rs),
                    "rougeL_mean": sum(rl) / len(rl), "rougeL_range": (min(rl), max(rl)),
                    "loss_mean": sum(r["heldout_loss"] for r in rs) / len(rs),
                    "ratio_range": (min(ratios), max(ratios)) if ratios else None})
    return out


def describe(args: Any, depth_matched: bool) -> str:
    """The size of the experiment in words (for the table caption)."""
    return (f"`{MODELS[args.model]}`, LoRA r16 all-linear (α 32) and P-Tuning (20 virtual tokens, MLP 128), "
            f"lr {args.lr:g}; {args.train_rows} training rows ({Path(args.train).name}, seeded subset), "
            f"{args.clients} clients, {args.rounds} rounds × {args.steps} optimizer steps of batch {args.batch_size} "
            f"per client (= {args.clients * args.rounds * args.steps} steps in total for every run, centralised "
            f"included), max_seq_len {args.max_seq_len}; {args.test_rows} test questions ({Path(args.test).name}; "
            f"topics unseen in training), greedy, max {args.max_new_tokens} new tokens, repetition penalty 1.1; "
            f"seeds {', '.join(map(str, args.seeds))}; {args.threads} torch thread(s)."
            + (f" 'centralised LoRA, {args.rounds * args.steps} steps': one client with every row taking as many "
               "sequential steps as each federated client (a diagnostic, not a goal)." if depth_matched else ""))


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--model", choices=sorted(MODELS), default="default")
    p.add_argument("--train", default=str(MEDQUAD_DIR / "train.jsonl"))
    p.add_argument("--test", default=str(MEDQUAD_DIR / "test.jsonl"))
    p.add_argument("--train-rows", type=int, default=80)
    p.add_argument("--test-rows", type=int, default=100)
    p.add_argument("--max-seq-len", type=int, default=160)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per client per round")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--workspace", type=Path, default=REPO / "workspace" / "bench-quality")
    p.add_argument("--collect-only", action="store_true", help="only re-read finished runs")
    p.add_argument("--dry-run", action="store_true", help="write and check the plans, run nothing")
    p.add_argument("--parallel", type=int, default=1, help="plans run at once, each in its own process")
    p.add_argument("--plans", nargs="+", help="run only these plans (default: all)")
    p.add_argument("--depth-matched", action="store_true",
                   help="add a centralised run with as many sequential steps as one federated client "
                        "(rounds × steps): what FedAvg's averaging of parallel steps is worth")
    p.add_argument("--no-collect", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rec = Recorder("quality", argv)
    setup_torch(args.threads)
    log = Path(args.workspace) / "commands.log"
    if not (args.collect_only or args.dry_run or args.no_collect):
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(rec.command + "\n")
    if args.parallel > 1 and not (args.collect_only or args.dry_run):
        run_parallel(args, list(sys.argv[1:] if argv is None else argv))
    elif not args.collect_only:
        for seed in args.seeds:
            run_plans(args, seed)
    if args.dry_run or args.no_collect:
        return {}
    rows, goals = summarise(collect(Path(args.workspace), args.seeds))
    for r in rows:
        r.pop("_cfg", None)
    commands = list(dict.fromkeys(log.read_text().splitlines())) if log.is_file() else []
    md = markdown_table(COLUMNS, rows) + "\n\n" + describe(args, any(r["method"] not in ORDER for r in rows))
    md += "".join(f" Runs made by `{c}`." for c in commands)
    if len({r["seed"] for r in rows}) > 1:
        md += "\n\nAcross seeds:\n\n" + markdown_table(SPREAD_COLUMNS, spread(rows))
    return rec.finish(
        args.results_dir, title="Learning quality on MedQuAD", rows=rows, markdown=md,
        params={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "results_dir"},
        extra={"run_commands": commands},
        goal={"text": "every fine-tune above zero-shot; FedAvg-LoRA ≥ 0.97× centralised (IID), ≥ 0.90× (non-IID)",
              "met": goals["every_finetune_above_zero_shot"] and goals["fedavg_lora_iid_met"]
              and goals["fedavg_lora_noniid_met"], **goals},
    )


if __name__ == "__main__":
    main()
