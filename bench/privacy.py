"""Privacy on MedQuAD: utility at epsilon = inf, 8 and 1 (both DP levels), and canary exposure with and without DP.

One job, ``configs/medquad-lora-fedavg.yaml`` at a small size (by default 3 clients by NIH source,
2 rounds, 64 training rows of at most 128 tokens, 24 test questions on topics not in train), is
run in-process (``run_job``) several times, each with the same canaries planted into client 0:

1. **Finding r.** Without DP, for each ``--repetitions`` value in increasing order: train, then
   audit (``audit_run``: rank each canary's true secret among ``--candidates`` random ones by the
   global adapter's likelihood). The search stops at the first r whose planted canaries reach
   ``--memorised-bits`` of mean exposure; that run is also the epsilon = inf row of the utility
   table (the others only enter the canary table).
2. **DP at that r.** The same job with ``privacy: {level: example|client, target_epsilon: E}``
   for every ``--epsilons`` value. Example level (DP-SGD) protects a record, which is what a
   canary is, so those runs are audited too; client level (DP-FedAvg) protects a whole site and
   is audited only with ``--audit-client-level``.

Each run reports the epsilon it spent (at its delta) as written in ``summary.json``, the held-out
loss and ROUGE-L after the last round; the first run also scores the base model (zero-shot).

    python bench/privacy.py                       # about 35 min on one idle core
    python bench/privacy.py --repetitions 16      # no search: plant 16 copies of each canary
    python bench/privacy.py --quick               # tiny model, smoke size (about a minute)
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MEDQUAD_DIR, MODELS, REPO, Column, Recorder, base_parser, fmt_seconds, markdown_table, setup_torch,
)

CONFIG = REPO / "configs" / "medquad-lora-fedavg.yaml"
QUICK = ["--model", "tiny", "--rows", "24", "--test-rows", "4", "--rounds", "1", "--max-seq-len", "64",
         "--max-new-tokens", "4", "--repetitions", "2", "4", "--candidates", "20", "--epsilons", "8"]


@dataclass(frozen=True)
class Setting:
    """One run of the job: its privacy section and how many copies of each canary it plants."""

    level: str  # "none", "example" or "client"
    target_epsilon: float | None
    repetitions: int

    @property
    def label(self) -> str:
        if self.level == "none":
            return f"no DP, r={self.repetitions}"
        return f"{self.level} level, target ε={self.target_epsilon:g}, r={self.repetitions}"


# ------------------------------------------------------------------------------------------
# One run


def job_tree(args: Any, setting: Setting, workspace: Path, run_id: str, zero_shot: bool) -> dict:
    """The MedQuAD job at this script's size, with ``setting``'s privacy and canaries."""
    tree = yaml.safe_load(CONFIG.read_text())
    tree.update(workspace=str(workspace), run_id=run_id)
    tree["model"]["name"] = MODELS.get(args.model, args.model)
    tree["data"].update(train=str(MEDQUAD_DIR / "train.jsonl"), test=str(MEDQUAD_DIR / "test.jsonl"),
                        max_train_samples=args.rows, max_test_samples=args.test_rows, max_seq_len=args.max_seq_len)
    tree["federation"].update(num_clients=args.clients, rounds=args.rounds)
    tree["eval"].update(max_samples=args.test_rows, max_new_tokens=args.max_new_tokens, zero_shot=zero_shot,
                        metrics=["rougeL"])
    tree["audit"] = {"canaries": args.canaries, "repetitions": setting.repetitions, "candidates": args.candidates}
    if setting.level == "example":
        tree["privacy"] = {"level": "example", "target_epsilon": setting.target_epsilon,
                           "max_grad_norm": args.max_grad_norm, "delta": args.delta}
    elif setting.level == "client":
        tree["privacy"] = {"level": "client", "target_epsilon": setting.target_epsilon,
                           "clip_norm": args.clip_norm, "delta": args.delta}
    return tree


def run_setting(args: Any, setting: Setting, workspace: Path, index: int, audit: bool) -> dict:
    """Train ``setting``, audit its canaries if asked; one row of measurements."""
    from fedpeft.audit.report import audit_run
    from fedpeft.config import validate_tree
    from fedpeft.simulation import run_job

    start = time.perf_counter()
    run = run_job(validate_tree(job_tree(args, setting, workspace, f"run{index}", zero_shot=index == 0)))
    train_s = time.perf_counter() - start
    row = {"setting": setting.label, "level": setting.level, "target_epsilon": setting.target_epsilon,
           "repetitions": setting.repetitions, "run_s": round(train_s, 1), **read_run(run.path)}
    if audit:
        start = time.perf_counter()
        report = audit_run(run.path, progress=False)
        row.update(audit_s=round(time.perf_counter() - start, 1), **audit_numbers(report))
    return row


def read_run(run_dir: Path) -> dict:
    """Epsilon (with delta and noise), final scores, client sizes and zero-shot scores of a finished run."""
    from fedpeft.io_utils import read_jsonl

    summary = json.loads((run_dir / "summary.json").read_text())
    records = read_jsonl(run_dir / "metrics.jsonl")
    rounds = [r for r in records if r.get("event") == "round"]
    zero = next((r["eval"] for r in records if r.get("zero_shot")), None)
    privacy = summary.get("privacy") or {}
    row = {"epsilon": summary.get("epsilon"), "delta": privacy.get("delta"), "rounds_run": len(rounds),
           "trainable_parameters": summary.get("trainable_parameters"),
           "heldout_loss": summary["final"].get("heldout_loss"), "rougeL": summary["final"].get("rougeL"),
           "client_sizes": [p["size"] for p in json.loads((run_dir / "partitions.json").read_text())],
           "zero_shot": None if zero is None else {k: zero.get(k) for k in ("heldout_loss", "rougeL")}}
    clients = [c for r in rounds for c in r["clients"]]
    if privacy.get("level") == "example":
        noise = sorted({c["dp_noise_multiplier"] for c in clients})
        row.update(noise=[noise[0], noise[-1]], client_epsilon=privacy.get("client_epsilon"))
    elif privacy.get("level") == "client":
        row.update(noise=[rounds[0]["privacy"]["noise_multiplier"]] * 2,
                   clipped=f"{sum(c['dp_clipped'] for c in clients)}/{len(clients)}",
                   update_norm_median=sorted(c["dp_update_norm"] for c in clients)[len(clients) // 2])
    return row


def audit_numbers(report: dict) -> dict:
    """What the canary table shows of an audit report (no secrets or names)."""
    planted, unseen = report["summary"]["planted"], report["summary"]["unseen"]
    return {"planted_exposure": planted["mean_exposure"], "planted_max": planted["max_exposure"],
            "planted_extrapolated": planted["mean_exposure_extrapolated"],
            "unseen_exposure": unseen["mean_exposure"], "unseen_extrapolated": unseen["mean_exposure_extrapolated"],
            "extracted": f"{planted['extracted']}/{planted['count']}",
            "unseen_extracted": unseen["extracted"],
            "ranks": [c["rank"] for c in report["canaries"] if c["planted"]],
            "unseen_ranks": [c["rank"] for c in report["canaries"] if not c["planted"]],
            "max_bits": report["max_exposure"]["empirical"]}


# ------------------------------------------------------------------------------------------
# The plan: search r without DP, then DP at that r


def progress(i: int, row: dict) -> None:
    eps = "∞" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
    audit = "" if "planted_exposure" not in row else (
        f", exposure planted {row['planted_exposure']:.2f} / unseen {row['unseen_exposure']:.2f} bits "
        f"(extracted {row['extracted']}, audit {fmt_seconds(row['audit_s'])})")
    print(f"[run {i + 1}] {row['setting']}: ε={eps}, held-out loss {row['heldout_loss']:.4f}, "
          f"ROUGE-L {row['rougeL']:.4f}, {fmt_seconds(row['run_s'])}{audit}", flush=True)


def search_r(args: Any, workspace: Path) -> tuple[list[dict], int]:
    """Non-DP runs at increasing r until the planted canaries are memorised; (rows, chosen r)."""
    rows: list[dict] = []
    for r in sorted(set(args.repetitions)):
        rows.append(run_setting(args, Setting("none", None, r), workspace, len(rows), audit=True))
        progress(len(rows) - 1, rows[-1])
        if rows[-1]["planted_exposure"] >= args.memorised_bits:
            break
    return rows, rows[-1]["repetitions"]


def dp_runs(args: Any, workspace: Path, r: int, first: int) -> list[dict]:
    """The job under each DP level and target epsilon, at ``r`` repetitions."""
    rows = []
    for level in args.levels:
        for eps in args.epsilons:
            audit = level == "example" or args.audit_client_level
            rows.append(run_setting(args, Setting(level, eps, r), workspace, first + len(rows), audit=audit))
            progress(first + len(rows) - 1, rows[-1])
    return rows


# ------------------------------------------------------------------------------------------
# Tables


def _eps(row: dict) -> str:
    if row.get("level") == "none":
        return "∞ (no DP)"
    return f"{row['epsilon']:.3g} (δ = {row['delta']:g})"


def _noise(value: list[float] | None) -> str:
    return "–" if not value else (f"{value[0]:.3g}" if value[0] == value[1] else f"{value[0]:.3g}–{value[1]:.3g}")


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


def _f(digits: int) -> Any:
    return lambda v: f"{v:.{digits}f}"


UTILITY = [Column("setting", "setting"), Column("target_epsilon", "target ε", "{:g}"),
           Column("epsilon_text", "ε spent"), Column("noise", "noise multiplier", _noise),
           Column("heldout_loss", "held-out loss", _f(4)), Column("rougeL", "ROUGE-L", _f(4)),
           Column("run_s", "train + eval", fmt_seconds)]
CANARY = [Column("setting", "run"), Column("epsilon_text", "ε spent"),
          Column("planted_exposure", "planted: exposure (bits)", _f(2)),
          Column("planted_extrapolated", "planted: extrapolated", _f(2)),
          Column("unseen_exposure", "unseen: exposure", _f(2)),
          Column("unseen_extrapolated", "unseen: extrapolated", _f(2)),
          Column("rank_text", "ranks: planted; unseen"), Column("extracted", "extracted"),
          Column("audit_s", "audit", fmt_seconds)]


def utility_rows(rows: list[dict], r: int) -> list[dict]:
    """Zero-shot, the non-DP run at ``r``, then every DP run (one row each)."""
    zero = next(x["zero_shot"] for x in rows if x["zero_shot"])
    plain = next(x for x in rows if x["level"] == "none" and x["repetitions"] == r)
    out = [{"setting": "base model, zero-shot", **zero}, {**plain, "setting": "no DP"}]
    return out + [{**x, "setting": f"{x['level']} level"} for x in rows if x["level"] != "none"]


def render(args: Any, rows: list[dict], r: int, memorised: bool) -> str:
    """The two Markdown tables and what a reader needs to judge them."""
    for row in rows:
        row["epsilon_text"] = _eps(row)
    canary_rows = [{**x, "setting": x["setting"].replace("target ", ""),
                    "rank_text": f"{_ranks(x['ranks'])}; {_ranks(x['unseen_ranks'])} of {args.candidates + 1}"}
                   for x in rows if "planted_exposure" in x]
    return "\n\n".join([
        "**Privacy vs utility** (after the last round):", markdown_table(UTILITY, utility_rows(rows, r)),
        "**Canary exposure** (global adapter after the last round):", markdown_table(CANARY, canary_rows),
        settings_text(args, rows, r), *client_level_text(args, rows), exposure_text(args, rows[0]["max_bits"], r,
                                                                                     memorised)])


def settings_text(args: Any, rows: list[dict], r: int) -> str:
    sizes = next(x["client_sizes"] for x in rows if x["repetitions"] == r)
    return (
        f"`{CONFIG.relative_to(REPO)}` with {args.clients} clients (Dirichlet over NIH source; sizes {sizes} "
        f"with the canaries at r = {r}), {args.rounds} round{'s' * (args.rounds != 1)}, {args.rows} MedQuAD "
        f"training rows of at most {args.max_seq_len} tokens, {args.test_rows} test questions on topics not in "
        f"train (held-out loss; ROUGE-L of greedy answers of at most {args.max_new_tokens} tokens), model "
        f"`{MODELS.get(args.model, args.model)}`. Every run plants the same {args.canaries} canaries (a fake "
        f"patient name with a random 9-digit record number) r times each into client 0's rows. DP runs calibrate "
        f"their noise to `target_epsilon` before training; ε spent is what the run reports in `summary.json` "
        f"(example level: the largest client's, each client calibrating its own noise, whose range over clients "
        f"is shown, per-example gradient clip {args.max_grad_norm:g}; client level: every client in every round, "
        f"q = 1, update clip {args.clip_norm:g}).")


def client_level_text(args: Any, rows: list[dict]) -> list[str]:
    """How large the client-level noise is next to the clipped updates (one paragraph, if such runs exist)."""
    runs = [x for x in rows if x["level"] == "client"]
    if not runs:
        return []
    d = runs[0]["trainable_parameters"]

    def one(x: dict) -> str:
        std = x["noise"][0] * args.clip_norm / args.clients  # the noise of the sum, divided by the clients
        return (f"target ε {x['target_epsilon']:g}: σ = {x['noise'][0]:.3g}, noise std {std:.3g} per value of the "
                f"mean update, L2 norm ≈ {std * d ** 0.5:.3g}, updates clipped {x['clipped']} (median norm before "
                f"clipping {x['update_norm_median']:.3g})")

    per_run = "; ".join(one(x) for x in runs)
    return [(f"Client level next to its signal: the mean of {args.clients} updates, each clipped to L2 norm "
             f"{args.clip_norm:g}, carries Gaussian noise of std σ·clip/{args.clients} on each of the {d:,} adapter "
             f"values. {per_run}.")]


def exposure_text(args: Any, max_bits: float, r: int, memorised: bool) -> str:
    found = (f"At r = {r} the non-DP model memorised: mean planted exposure ≥ {args.memorised_bits:g} bits"
             if memorised else f"**Not memorised within the budget**: no r in {sorted(set(args.repetitions))} "
             f"reached {args.memorised_bits:g} bits of mean planted exposure; the DP runs use the largest, r = {r}")
    return (
        f"Exposure: log2 of (1 + {args.candidates} candidates) over (1 + candidates scoring at least the true "
        f"secret), at most {max_bits:.2f} bits; about 1.4 bits on average by chance (an unseen canary, but a "
        f"single secret can rank high by luck or because the model finds its digits likely: the ranks column "
        f"shows each canary). "
        f"Extrapolated: the skew-normal fit of Carlini et al. 2019 §4.3, up to 29.9 bits. Extracted: greedy "
        f"decoding from the record's prefix reproduces the secret. {found}.")


# ------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> Any:
    p = base_parser(__doc__)
    p.add_argument("--quick", action="store_true", help=f"smoke size on the tiny model ({' '.join(QUICK)})")
    p.add_argument("--model", default="default", help="tiny, default (smollm2-135m-instruct) or a model name")
    p.add_argument("--rows", type=int, default=64, help="MedQuAD training rows over all clients (before canaries)")
    p.add_argument("--test-rows", type=int, default=24, help="test questions (held-out loss and ROUGE-L)")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 1.0], help="target epsilons of the DP runs")
    p.add_argument("--levels", nargs="+", choices=["example", "client"], default=["example", "client"])
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="example level: per-example gradient clip")
    p.add_argument("--clip-norm", type=float, default=0.5, help="client level: per-update delta clip")
    p.add_argument("--repetitions", type=int, nargs="+", default=[4, 16],
                   help="copies of each canary tried without DP, in increasing order until memorised")
    p.add_argument("--memorised-bits", type=float, default=6.0,
                   help="mean planted exposure at which the search stops (chance is about 1.4)")
    p.add_argument("--canaries", type=int, default=2, help="planted canaries (as many unseen ones are scored)")
    p.add_argument("--candidates", type=int, default=300, help="random secrets each canary is ranked against")
    p.add_argument("--audit-client-level", action="store_true", help="also audit the client-level DP runs")
    p.add_argument("--workspace", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    return p.parse_args(QUICK + list(argv if argv is not None else sys.argv[1:])) if args.quick else args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if not (MEDQUAD_DIR / "train.jsonl").is_file():
        sys.exit(f"MedQuAD not found at {MEDQUAD_DIR} (expected ../shared/datasets/medquad beside the repo; "
                 "see its README): nothing measured")
    rec = Recorder("privacy", argv)
    setup_torch(args.threads)
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's RDP orders that do not converge
    with tempfile.TemporaryDirectory() as tmp:
        workspace = args.workspace or Path(tmp)
        rows, r = search_r(args, workspace)
        memorised = rows[-1]["planted_exposure"] >= args.memorised_bits
        rows += dp_runs(args, workspace, r, len(rows))
    md = render(args, rows, r, memorised)
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return rec.finish(args.results_dir, title="Privacy: DP vs utility and canary exposure on MedQuAD", rows=rows,
                      markdown=md, params=params, extra={"repetitions_found": r, "memorised": memorised})


if __name__ == "__main__":
    main()
