"""LoRA-aware aggregation and compression on MedQuAD: held-out loss of each arm, with paired CIs.

Every arm trains SmolLM2 (LoRA r16 on every linear layer) on the same MedQuAD rows, 4 clients
split by NIH source (non-IID, Dirichlet alpha 1), with the same total optimizer steps; the
centralised arm is one client holding every row, with as many steps in all
(:func:`fedpeft.benchmark.baselines.centralized`). Each arm's final adapter is scored on the same
test questions (topics not in train): held-out loss (nats per answer token), and the share of
the zero-shot -> centralised loss gap it closes, with a 95 % percentile bootstrap interval over
questions (``scipy.stats.bootstrap``, the arms' per-question losses resampled together).

Suites:

* ``rules``: ``fedavg``, ``ffa_lora`` (FedAvg), ``svd``, heterogeneous ranks {4, 8, 16, 16} with
  ``svd`` and with zero-padding (``fedavg``), and centralised.
* ``schedule``: the same 16 steps per client as 2 x 8, 4 x 4 and 8 x 2 rounds x steps, and a
  server learning rate (FedAvgM 2, FedAdam), next to centralised with as many steps.
* ``compression``: FedAvg with updates sent as fp32, fp16, int8, nf4 (down fp16) and top-k 10 %:
  bytes per round and held-out loss; goal: nf4 at >= 7x fewer bytes than fp32 within 1 % loss.

    python bench/lora_aggregation.py --suite rules            # ~30 min on one idle core
    python bench/lora_aggregation.py --suite compression      # ~20 min
    python bench/lora_aggregation.py --suite schedule         # ~60 min
    python bench/lora_aggregation.py --suite rules --rows 16 --test-rows 8 --steps 1 --model tiny  # smoke
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MEDQUAD_DIR, MODELS, Column, Recorder, base_parser, fmt_bytes, markdown_table, setup_torch,
)

LORA = {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
HETERO = [4, 8, 16, 16]
SUITES: dict[str, dict[str, dict[str, Any]]] = {
    "rules": {
        "fedavg": {},
        "ffa_lora": {"peft": {**LORA, "method": "ffa_lora"}},
        "svd": {"aggregation": {"name": "svd"}},
        "ranks {4,8,16,16} + svd": {"aggregation": {"name": "svd"}, "client_ranks": HETERO},
        "ranks {4,8,16,16} + padding": {"client_ranks": HETERO},
        "centralised": {"centralised": True},
    },
    "schedule": {  # 16 optimizer steps per client in all, split differently; server learning rates
        "2 rounds x 8 steps": {"rounds": 2, "steps": 8},
        "4 rounds x 4 steps": {"rounds": 4, "steps": 4},
        "8 rounds x 2 steps": {"rounds": 8, "steps": 2},
        "4 x 4, fedavgm server_lr 2": {"rounds": 4, "steps": 4,
                                       "aggregation": {"name": "fedavgm", "beta": 0.5, "server_lr": 2.0}},
        "4 x 4, fedadam server_lr 0.01": {"rounds": 4, "steps": 4,
                                          "aggregation": {"name": "fedadam", "server_lr": 0.01}},
        "centralised (4 x 4)": {"rounds": 4, "steps": 4, "centralised": True},
    },
    "compression": {
        "fp32": {},
        "fp16": {"compression": {"up": {"name": "fp16"}, "down": {"name": "fp16"}}},
        "int8": {"compression": {"up": {"name": "int8"}, "down": {"name": "fp16"}}},
        "nf4": {"compression": {"up": {"name": "nf4"}, "down": {"name": "fp16"}}},
        "top-k 10 %": {"compression": {"up": {"name": "topk", "fraction": 0.1}}},
    },
}


def base_job(args, workspace: Path) -> dict:
    """The job every arm shares (an arm overrides ``peft`` or ``federation`` keys)."""
    return {
        "job": "lora-aggregation", "seed": 0, "workspace": str(workspace),
        "model": {"name": MODELS.get(args.model, args.model)}, "peft": dict(LORA),
        "data": {"train": str(MEDQUAD_DIR / "train.jsonl"), "test": str(MEDQUAD_DIR / "test.jsonl"),
                 "max_train_samples": args.rows, "max_test_samples": args.test_rows, "max_seq_len": args.seq_len},
        "federation": {"num_clients": 4, "rounds": args.rounds,
                       "partition": {"method": "dirichlet", "field": "source", "alpha": 1.0}},
        "train": {"learning_rate": args.lr, "batch_size": 4, "max_steps": args.steps},
        "eval": {"every": 0, "zero_shot": False, "max_samples": 1, "max_new_tokens": 1, "metrics": ["rougeL"],
                 "heldout_loss": True, "batch_size": 16},
    }


def run_arm(name: str, arm: dict, job: dict) -> tuple[Path, dict]:
    """Train one arm; its run folder and summary."""
    from fedpeft.benchmark.baselines import centralized
    from fedpeft.config import validate_tree
    from fedpeft.data.federated import prepare_data
    from fedpeft.simulation import run_job

    run_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("%", "pct")).strip("_.-")  # a plain folder name
    tree = {**job, "run_id": run_id}
    if "peft" in arm:
        tree["peft"] = arm["peft"]
    fed = dict(tree["federation"], rounds=arm.get("rounds", tree["federation"]["rounds"]))
    tree["train"] = dict(tree["train"], max_steps=arm.get("steps", tree["train"]["max_steps"]))
    for key in ("aggregation", "client_ranks", "compression"):
        if key in arm:
            fed[key] = arm[key]
    tree["federation"] = fed
    cfg = validate_tree(tree)
    if arm.get("centralised"):
        one, data, _ = centralized(cfg, prepare_data(cfg))
        run = run_job(one, data=data)
    else:
        run = run_job(cfg)
    return run.path, run.read_summary()


def per_question_losses(adapter_dir: Path | None, job: dict) -> list[tuple[float, int]]:
    """``(loss sum, answer tokens)`` of each test question under the adapter (None: the base model)."""
    from fedpeft.adapters import load_adapter
    from fedpeft.config import validate_tree
    from fedpeft.data.federated import prepare_data
    from fedpeft.data.prompts import tokenize_examples
    from fedpeft.evaluation import answer_losses
    from fedpeft.models import load_base_model

    cfg = validate_tree({**job, "run_id": "score"})
    test = prepare_data(cfg).test_rows
    if adapter_dir is None:
        model, tok = load_base_model(cfg.model)
    else:
        model, tok = load_adapter(adapter_dir)
    model.eval()
    examples = tokenize_examples(tok, test, cfg.data.max_seq_len, cfg.data.system_prompt)
    sums, counts = answer_losses(model, examples, 1, pad_token_id=tok.pad_token_id)
    return list(zip(sums, counts))


def gap_closed(zero: list, central: list, arm: list) -> tuple[float, tuple[float, float]]:
    """Share of the zero-shot -> centralised held-out-loss gap that ``arm`` closes, with a paired CI."""
    import numpy as np
    from scipy.stats import bootstrap

    z, c, a = (np.array([x[0] for x in v]) for v in (zero, central, arm))
    tokens = np.array([x[1] for x in zero], dtype=float)

    def stat(idx: np.ndarray) -> float:
        t = tokens[idx].sum()
        lz, lc, la = z[idx].sum() / t, c[idx].sum() / t, a[idx].sum() / t
        return (lz - la) / (lz - lc)

    value = stat(np.arange(len(z)))
    ci = bootstrap((np.arange(len(z)),), stat, vectorized=False, n_resamples=1000, method="percentile",
                   random_state=0).confidence_interval
    return float(value), (float(ci.low), float(ci.high))


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def _ci(v: tuple[float, float] | None) -> str:
    return "–" if v is None else f"[{100 * v[0]:.1f}, {100 * v[1]:.1f}] %"


COLUMNS = [Column("arm", ""), Column("heldout_loss", "held-out loss", "{:.4f}"),
           Column("gap_closed", "gap closed (zero-shot → centralised)", _pct), Column("gap_ci", "95 % CI", _ci),
           Column("bytes_per_round", "bytes per round (down + up)", fmt_bytes),
           Column("fp32_ratio", "fp32 ÷ bytes", "{:.2f}×"), Column("bytes_up", "up", fmt_bytes),
           Column("fp32_up_ratio", "fp32 ÷ up", "{:.2f}×"),
           Column("extra", "notes"), Column("seconds", "seconds", "{:.0f}")]


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--suite", choices=sorted(SUITES), default="rules")
    p.add_argument("--rows", type=int, default=96, help="training rows in all (data.max_train_samples)")
    p.add_argument("--test-rows", type=int, default=200, help="test questions (held-out loss)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per client per round")
    p.add_argument("--seq-len", type=int, default=192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="default", help="tiny, default (SmolLM2) or a model name")
    p.add_argument("--only", nargs="*", default=None, help="arms to run (default: the whole suite)")
    p.add_argument("--rerender", type=Path, default=None, help="rewrite a results file (see rerender())")
    args = p.parse_args(argv)
    if args.rerender:
        return rerender(args.rerender)
    if not (MEDQUAD_DIR / "train.jsonl").is_file():
        sys.exit(f"MedQuAD not found at {MEDQUAD_DIR} (expected ../shared/datasets/medquad beside the repo)")
    rec = Recorder(f"lora_aggregation_{args.suite}", argv, script="lora_aggregation.py")
    setup_torch(args.threads)
    arms = {k: v for k, v in SUITES[args.suite].items() if args.only is None or k in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        job = base_job(args, Path(tmp))
        rows, losses = [], {"zero-shot": per_question_losses(None, job)}
        for name, arm in arms.items():
            t0 = time.perf_counter()
            path, summary = run_arm(name, arm, job)
            losses[name] = per_question_losses(path / "adapter", job)
            rows.append({"arm": name, "heldout_loss": summary["final"]["heldout_loss"],
                         "bytes_per_round": _bytes_per_round(path), "bytes_up": _bytes_per_round(path, "up"),
                         "seconds": time.perf_counter() - t0,
                         "extra": _notes(path)})
            print(f"{name}: held-out loss {rows[-1]['heldout_loss']:.4f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    zero = losses["zero-shot"]
    zero_loss = sum(x[0] for x in zero) / sum(x[1] for x in zero)
    central = next((v for k, v in losses.items() if k.startswith("centralised")), None)
    fp32 = next((r["bytes_per_round"] for r in rows if r["arm"] in ("fedavg", "fp32")), None)
    fp32_up = next((r["bytes_up"] for r in rows if r["arm"] in ("fedavg", "fp32")), None)
    for r in rows:
        if central is not None and not r["arm"].startswith("centralised"):
            r["gap_closed"], r["gap_ci"] = gap_closed(zero, central, losses[r["arm"]])
        if fp32 and r["bytes_per_round"]:
            r["fp32_ratio"] = fp32 / r["bytes_per_round"]
        if fp32_up and r.get("bytes_up"):
            r["fp32_up_ratio"] = fp32_up / r["bytes_up"]
    rows.insert(0, {"arm": "zero-shot", "heldout_loss": zero_loss})
    md = markdown_table(COLUMNS, rows) + "\n\n" + _footer(args)
    return rec.finish(args.results_dir, title=f"LoRA-aware aggregation on MedQuAD: {args.suite}", rows=rows,
                      markdown=md, params={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                      goal=goal(args.suite, rows))


def rerender(path: Path) -> dict:
    """Rewrite a results file written before ``bytes_up`` was recorded (first runs of this script).

    A round's bytes down are fixed by the down codec: every client gets the global adapter, 4 bytes
    per value in fp32, 2 in fp16/bf16 (the payload formulas of :mod:`fedpeft.compression`), and
    the fp32 arm sends as many bytes up as down; so ``up = total - down`` exactly.
    """
    import json

    result = json.loads(path.read_text())
    suite = result["title"].rsplit(": ", 1)[-1]
    rows = result["rows"]
    fp32_total = next(r["bytes_per_round"] for r in rows if r["arm"] in ("fedavg", "fp32"))
    for r in rows:
        arm = SUITES[suite].get(r["arm"])
        if arm is None or r.get("bytes_up") is not None or not r.get("bytes_per_round"):
            continue
        down_codec = arm.get("compression", {}).get("down", {}).get("name", "none")
        if "compression" in arm:
            r["bytes_up"] = r["bytes_per_round"] - fp32_total // 2 * (2 if down_codec in ("fp16", "bf16") else 4) // 4
        else:
            r["bytes_up"] = r["bytes_per_round"] // 2  # fp32 both ways (a rank's share each way)
    fp32_up = next(r["bytes_up"] for r in rows if r["arm"] in ("fedavg", "fp32"))
    for r in rows:
        if r.get("bytes_up"):
            r["fp32_up_ratio"] = fp32_up / r["bytes_up"]
    args = argparse.Namespace(**result["params"])
    result["goal"] = goal(suite, rows)
    result["markdown"] = markdown_table(COLUMNS, rows) + "\n\n" + _footer(args) + (
        " Bytes up derived from the total and the down codec's fixed size (`--rerender`).")
    result["command"] = result["command"].replace("bench/lora_aggregation_rules.py", "bench/lora_aggregation.py") \
        .replace("bench/lora_aggregation_compression.py", "bench/lora_aggregation.py")  # first runs named it wrong
    path.write_text(json.dumps(result, indent=2))
    return result


def goal(suite: str, rows: list[dict]) -> dict | None:
    """The issue's goal for ``suite`` and whether these rows meet it."""
    if suite == "rules":
        fed = [r for r in rows if r.get("gap_closed") is not None]
        if not fed:
            return None
        best = max(fed, key=lambda r: r["gap_closed"])
        return {"text": "best federated arm closes >= 90 % of the zero-shot -> centralised held-out-loss gap "
                        "(non-IID)", "met": best["gap_closed"] >= 0.90, "best": best["arm"],
                "gap_closed": best["gap_closed"]}
    if suite == "compression":
        by = {r["arm"]: r for r in rows}
        if "nf4" not in by or "fp32" not in by:
            return None
        ratio = by["fp32"]["bytes_up"] / by["nf4"]["bytes_up"]
        loss = by["nf4"]["heldout_loss"] / by["fp32"]["heldout_loss"] - 1
        return {"text": "nf4 updates: >= 7x fewer bytes up per round than fp32, held-out loss within 1 %",
                "met": ratio >= 7 and abs(loss) <= 0.01, "ratio": ratio, "loss_change": loss}
    return None


def _bytes_per_round(run_dir: Path, way: str = "both") -> int:
    """Mean bytes per round: up (client -> server), down, or both."""
    from fedpeft.io_utils import read_jsonl

    keys = ["bytes_up", "bytes_down"] if way == "both" else [f"bytes_{way}"]
    rounds = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "round"]
    return round(sum(r[k] for r in rounds for k in keys) / max(len(rounds), 1))


def _notes(run_dir: Path) -> str:
    """svd: the energy its truncation kept (last round)."""
    from fedpeft.io_utils import read_jsonl

    rounds = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "round"]
    agg = rounds[-1].get("aggregation") if rounds else None
    return f"energy kept {agg['svd_energy_kept']:.3f} (min {agg['svd_energy_kept_min']:.3f})" if agg else ""


def _footer(args) -> str:
    schedule = ("rounds x steps per client as each arm names them (a client stops at one local epoch)"
                if args.suite == "schedule" else f"{args.rounds} rounds x {args.steps} steps per client")
    return (f"SmolLM2-135M-Instruct, LoRA r16 all-linear (alpha 32), {args.rows} MedQuAD training rows over 4 clients "
            f"(Dirichlet alpha 1 over the NIH source), {schedule} "
            f"(batch 4, lr {args.lr:g}, max {args.seq_len} tokens); the centralised arm takes as many steps in all. "
            f"Held-out loss on {args.test_rows} test questions whose topics are not in train; the gap CI resamples "
            "questions (1000 percentile-bootstrap resamples, all arms' losses together).")


if __name__ == "__main__":
    main()
