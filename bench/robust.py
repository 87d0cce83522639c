"""Robust aggregation on MedQuAD: one site sends its update scaled by 100; held-out loss per rule.

The job is ``configs/medquad-lora-fedavg.yaml`` at a small size (by default 4 clients by NIH
source, 3 rounds of 2 local steps, 64 training rows of at most 128 tokens, held-out loss on 32
test questions on topics not in train), run in-process (``run_job``) once per arm:

1. **clean, fedavg**: no attacker. Every client's delta norm ``||state - global||`` is recorded;
   ``norm_bounded``'s ``max_norm`` is ``--norm-factor`` x their median.
2. **attacked, fedavg / median / trimmed_mean / norm_bounded**: client-1 returns
   ``global + 100 x (state - global)`` (a site that boosts its update, as in a model-replacement
   attack). The attack wraps ``fedpeft.simulation.fit``, which the simulation pool calls for every
   client; ``federation.max_update_norm`` stays None, so nothing is screened out: the rule alone
   has to cope.

Each arm reports the zero-shot held-out loss, the loss after every round and the seconds it took.
Generation is reduced to one token of one question (the loss is the measure).

    python bench/robust.py                  # about 10 min on 2 cores (5 arms)
    python bench/robust.py --quick          # tiny model, smoke size (about a minute)
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MEDQUAD_DIR, MODELS, REPO, Column, Recorder, base_parser, fmt_seconds, markdown_table, setup_torch,
)

CONFIG = REPO / "configs" / "medquad-lora-fedavg.yaml"
QUICK = ["--model", "tiny", "--rows", "16", "--test-rows", "4", "--rounds", "2", "--max-seq-len", "64"]
ATTACKER = "client-1"


# ------------------------------------------------------------------------------------------
# The attack


class Attack:
    """Wraps ``fedpeft.simulation.fit``: records each client's delta norm, scales the attacker's.

    Args:
        scale: Factor on the attacker's delta (None: no attacker, only record the norms).
        attacker: The client id that boosts its update.
    """

    def __init__(self, scale: float | None, attacker: str = ATTACKER) -> None:
        self.scale, self.attacker = scale, attacker
        self.norms: list[dict[str, Any]] = []  # one per client per round, in call order

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        from fedpeft import simulation

        real = simulation.fit

        def fit(model, examples, cfg, state, **kw):  # the trainer's signature
            update = real(model, examples, cfg, state, **kw)
            cid = kw["client_id"]
            entry = {"client": cid, "round": 1 + sum(n["client"] == cid for n in self.norms),
                     "delta_norm": _delta_norm(state, update.state)}
            if self.scale is not None and cid == self.attacker:
                update.state = scaled(state, update.state, self.scale)
                entry["sent_norm"] = _delta_norm(state, update.state)
            self.norms.append(entry)
            return update

        simulation.fit = fit
        try:
            yield
        finally:
            simulation.fit = real

    def honest_norms(self) -> list[float]:
        return [n["delta_norm"] for n in self.norms if self.scale is None or n["client"] != self.attacker]


def scaled(global_state: dict, state: dict, factor: float) -> dict:
    """``global + factor x (state - global)``, per tensor (float64, returned as float32)."""
    import torch

    return {k: (g.double() + factor * (state[k].double() - g.double())).to(torch.float32)
            for k, g in global_state.items()}


def _delta_norm(global_state: dict, state: dict) -> float:
    from fedpeft.update_checks import delta_norm

    return delta_norm(global_state, state)


# ------------------------------------------------------------------------------------------
# One arm


def job_tree(args: Any, aggregation: dict, workspace: Path, run_id: str) -> dict:
    """The MedQuAD job at this script's size with ``aggregation``; held-out loss after every round."""
    tree = yaml.safe_load(CONFIG.read_text())
    tree.update(workspace=str(workspace), run_id=run_id)
    tree["model"]["name"] = MODELS.get(args.model, args.model)
    tree["data"].update(train=str(MEDQUAD_DIR / "train.jsonl"), test=str(MEDQUAD_DIR / "test.jsonl"),
                        max_train_samples=args.rows, max_test_samples=args.test_rows, max_seq_len=args.max_seq_len)
    tree["federation"].update(num_clients=args.clients, rounds=args.rounds, aggregation=aggregation,
                              max_update_norm=None)  # the rule, not the screen, must cope
    tree["train"].update(max_steps=args.steps)
    tree["eval"].update(every=1, zero_shot=True, max_samples=1, max_new_tokens=1, metrics=[], heldout_loss=True)
    return tree


def run_arm(args: Any, name: str, aggregation: dict, attack: Attack, workspace: Path) -> dict:
    """Train one arm; its losses (zero-shot, each round, final), seconds and delta norms."""
    from fedpeft.config import validate_tree
    from fedpeft.io_utils import read_jsonl
    from fedpeft.simulation import run_job

    start = time.perf_counter()
    with attack.patched():
        run = run_job(validate_tree(job_tree(args, aggregation, workspace, f"{name}-{aggregation['name']}")))
    seconds = time.perf_counter() - start
    records = read_jsonl(run.path / "metrics.jsonl")
    rounds = [r for r in records if r.get("event") == "round"]
    zero = next(r["eval"]["heldout_loss"] for r in records if r.get("zero_shot"))
    losses = [r["eval"]["heldout_loss"] for r in rounds]
    honest = attack.honest_norms()
    row = {"arm": name, "aggregation": aggregation["name"], "params": {k: v for k, v in aggregation.items()
                                                                      if k != "name"},
           "attacked": attack.scale is not None, "zero_shot": zero, "losses": losses, "final": losses[-1],
           "seconds": round(seconds, 1), "norms": attack.norms,
           "honest_norm_median": statistics.median(honest), "client_sizes": [
               p["size"] for p in json.loads((run.path / "partitions.json").read_text())]}
    sent = [n["sent_norm"] for n in attack.norms if "sent_norm" in n]
    if sent:
        row["attacker_sent_norm_median"] = statistics.median(sent)
    print(f"[{name}] final held-out loss {row['final']:.4f} (zero-shot {zero:.4f}; rounds "
          + ", ".join(f"{x:.4f}" for x in losses) + f"), median honest delta norm {row['honest_norm_median']:.4g}, "
          f"{fmt_seconds(seconds)}", flush=True)
    return row


# ------------------------------------------------------------------------------------------
# Tables


def _loss(v: float) -> str:
    return f"{v:.4f}" if v < 1e3 else f"{v:.3g}"


def columns(rounds: int) -> list[Column]:
    return ([Column("arm", "arm"), Column("rule", "rule"), Column("zero_shot", "zero-shot", _loss)]
            + [Column(f"r{i}", f"after round {i}", _loss) for i in range(1, rounds + 1)]
            + [Column("vs_clean", "final vs clean", lambda v: f"{v:+.4f}"), Column("seconds", "seconds", fmt_seconds)])


def table_rows(rows: list[dict]) -> list[dict]:
    clean = rows[0]["final"]
    out = []
    for r in rows:
        params = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["params"].items())
        out.append({"arm": r["arm"], "rule": r["aggregation"] + (f" ({params})" if params else ""),
                    "zero_shot": r["zero_shot"], **{f"r{i}": x for i, x in enumerate(r["losses"], 1)},
                    "vs_clean": r["final"] - clean, "seconds": r["seconds"]})
    return out


def text(args: Any, rows: list[dict], max_norm: float) -> str:
    clean, attacked = rows[0], [r for r in rows if r["attacked"]]
    sent = statistics.median(r["attacker_sent_norm_median"] for r in attacked)
    return (
        f"`{CONFIG.relative_to(REPO)}` with {args.clients} clients (Dirichlet over NIH source; sizes "
        f"{clean['client_sizes']}), {args.rounds} rounds of {args.steps} local steps (batch 4), {args.rows} MedQuAD "
        f"training rows of at most {args.max_seq_len} tokens, held-out loss on {args.test_rows} test questions on "
        f"topics not in train, model `{MODELS.get(args.model, args.model)}`, LoRA r16 all-linear. Attacked arms: "
        f"`{ATTACKER}` sends `global + {args.scale:g} × (its state − global)` every round (median delta norm sent "
        f"{sent:.3g}, vs {clean['honest_norm_median']:.3g} for an honest client in the clean run); "
        f"`federation.max_update_norm` is unset, so no update is screened out. `norm_bounded`'s `max_norm` = "
        f"{args.norm_factor:g} × the clean run's median client delta norm = {max_norm:.3g}. With {args.clients} "
        f"clients, `trimmed_mean` at trim {args.trim:g} cuts {int(args.trim * args.clients)} value per side, "
        f"which leaves the middle two: the same as the median of an even count.")


# ------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> Any:
    p = base_parser(__doc__)
    p.add_argument("--quick", action="store_true", help=f"smoke size on the tiny model ({' '.join(QUICK)})")
    p.add_argument("--model", default="default", help="tiny, default (smollm2-135m-instruct) or a model name")
    p.add_argument("--rows", type=int, default=64, help="MedQuAD training rows over all clients")
    p.add_argument("--test-rows", type=int, default=32, help="test questions (held-out loss)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="local optimizer steps per client per round")
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--scale", type=float, default=100.0, help="the attacker's factor on its delta")
    p.add_argument("--trim", type=float, default=0.25, help="trimmed_mean: fraction cut from each end")
    p.add_argument("--norm-factor", type=float, default=2.0,
                   help="norm_bounded: max_norm = this x the clean run's median client delta norm")
    p.add_argument("--workspace", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    return p.parse_args(QUICK + list(argv if argv is not None else sys.argv[1:])) if args.quick else args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if not (MEDQUAD_DIR / "train.jsonl").is_file():
        sys.exit(f"MedQuAD not found at {MEDQUAD_DIR} (expected ../shared/datasets/medquad beside the repo; "
                 "see its README): nothing measured")
    rec = Recorder("robust", argv)
    setup_torch(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workspace = args.workspace or Path(tmp)
        rows = [run_arm(args, "clean", {"name": "fedavg"}, Attack(None), workspace)]
        max_norm = args.norm_factor * rows[0]["honest_norm_median"]
        for agg in ({"name": "fedavg"}, {"name": "median"}, {"name": "trimmed_mean", "trim": args.trim},
                    {"name": "norm_bounded", "max_norm": max_norm}):
            rows.append(run_arm(args, "attacked", agg, Attack(args.scale), workspace))
    md = markdown_table(columns(args.rounds), table_rows(rows)) + "\n\n" + text(args, rows, max_norm)
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return rec.finish(args.results_dir, title="Robust aggregation: one site sends a scaled update", rows=rows,
                      markdown=md, params=params, extra={"max_norm": max_norm,
                                                         "max_norm_rule": f"{args.norm_factor:g} x median "
                                                                          "client delta norm of the clean run"})


if __name__ == "__main__":
    main()
