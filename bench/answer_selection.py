"""MedQuAD answer selection, held-out loss and ROUGE-L for zero-shot, FedAvg-LoRA, centralised and
local-only, with paired CIs; per-site scores and the personalised arm (issues 12 and 14).

One job (``configs/medquad-lora-fedavg.yaml`` at the README's size: 200 training rows, 4 clients
Dirichlet over the NIH source, 2 rounds) with ``data.client_test_ratio`` (each site keeps a slice of
its own rows), ``eval.mcq`` (``fedpeft data mcq`` items made from the test questions: the true
answer and 3 answers of the same ``qtype`` on other topics) and ``eval.site_finetune_steps`` (the
personalised arm: k local steps on the global adapter, scored on the site's own slice). Arms:

* the FedAvg run itself, with its zero-shot evaluation (round 0): test set, MCQ items, site slices;
* ``centralized`` (``fedpeft run JOB --baseline centralized``): every site's rows, as many steps;
* ``local_only``: each site alone, scored on its own slice only (no test-set evaluation).

Every test-set score is read back from the runs' ``item_scores*.json`` and ``predictions*.jsonl``,
so each difference gets a paired percentile bootstrap interval over questions (1000 resamples).

    python bench/answer_selection.py                  # about 75 min on one idle core
    python bench/answer_selection.py --rows 24 --test-rows 8 --mcq-items 8 --gen 2 --model tiny   # smoke
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import MEDQUAD_DIR, REPO, Column, Recorder, base_parser, markdown_table, setup_torch  # noqa: E402

CONFIG = REPO / "configs" / "medquad-lora-fedavg.yaml"
N_RESAMPLES = 1000


def job_tree(args, workspace: Path, mcq_file: Path) -> dict:
    """The issue-2 MedQuAD job at the bench's size."""
    import yaml

    tree = yaml.safe_load(CONFIG.read_text())
    for key in ("train", "test"):
        tree["data"][key] = str(MEDQUAD_DIR / f"{key}.jsonl")
    if args.model != "default":
        tree["model"] = {"name": "tiny-random-llama" if args.model == "tiny" else args.model}
    tree.update(workspace=str(workspace), run_id="fedavg", seed=args.seed)
    tree["data"].update(max_train_samples=args.rows, max_test_samples=args.test_rows,
                        client_test_ratio=args.site_ratio, max_seq_len=args.seq_len)
    tree["federation"]["rounds"] = args.rounds
    tree["eval"].update(zero_shot=True, every=0, max_samples=args.gen, max_new_tokens=args.max_new_tokens,
                        mcq=str(mcq_file), mcq_option_tokens=args.option_tokens, site_max_samples=0, site_finetune_steps=args.personal_steps,
                        metrics=["rougeL"])
    return tree


def make_mcq(args, path: Path) -> int:
    from fedpeft.data.mcq_command import mcq_file

    return mcq_file(MEDQUAD_DIR / "test.jsonl", path, seed=args.seed, max_items=args.mcq_items)["items"]


def run_arms(cfg, tmp: Path) -> dict[str, Path]:
    """Run FedAvg (with zero-shot), centralised and local-only; return their run folders."""
    from fedpeft.benchmark.baselines import centralized, local_only
    from fedpeft.data.federated import FederatedData, prepare_data
    from fedpeft.simulation import run_job

    data = prepare_data(cfg)
    runs, seconds = {}, {}
    t0 = time.perf_counter()
    runs["fedavg"] = run_job(cfg, data=data).path
    seconds["fedavg"] = time.perf_counter() - t0
    print(f"fedavg done ({seconds['fedavg']:.0f} s)", flush=True)
    one, central, _ = centralized(cfg, data)
    one = one.model_copy(update={"run_id": "centralized",
                                 "eval": one.eval.model_copy(update={"site_finetune_steps": 0})})
    t0 = time.perf_counter()
    runs["centralized"] = run_job(one, data=central).path
    seconds["centralized"] = time.perf_counter() - t0
    print(f"centralized done ({seconds['centralized']:.0f} s)", flush=True)
    t0 = time.perf_counter()
    for cid, lone, d in local_only(cfg, data):
        lone = lone.model_copy(update={"run_id": f"local-{cid}",
                                       "eval": lone.eval.model_copy(update={"site_finetune_steps": 0})})
        no_test = FederatedData(d.client_ids, d.client_rows, [], d.summary, d.client_test_rows, d.site_ids)
        runs[f"local/{cid}"] = run_job(lone, data=no_test).path  # scored on its own slice only
    seconds["local_only"] = time.perf_counter() - t0
    print(f"local_only done ({seconds['local_only']:.0f} s)", flush=True)
    return runs, seconds


def _read(path: Path):
    return json.loads(path.read_text()) if path.suffix == ".json" else \
        [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _boot(stat, n: int) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(indices)`` resampling ``n`` paired items."""
    import numpy as np
    from scipy.stats import bootstrap

    ci = bootstrap((np.arange(n),), stat, vectorized=False, n_resamples=N_RESAMPLES, method="percentile",
                   random_state=0).confidence_interval
    return float(ci.low), float(ci.high)


def test_set_rows(runs: dict[str, Path]) -> tuple[list[dict], dict]:
    """One row per arm (zero-shot, FedAvg, centralised): MCQ accuracy, held-out loss, ROUGE-L, with CIs."""
    import numpy as np

    from fedpeft.metrics import compute_metrics, paired_bootstrap_ci

    fed, cen = runs["fedavg"], runs["centralized"]
    items = {"zero-shot": _read(fed / "item_scores_zero_shot.json"), "FedAvg-LoRA": _read(fed / "item_scores.json"),
             "centralised": _read(cen / "item_scores.json")}
    preds = {"zero-shot": _read(fed / "predictions_zero_shot.jsonl"), "FedAvg-LoRA": _read(fed / "predictions.jsonl"),
             "centralised": _read(cen / "predictions.jsonl")}
    for arm in items:  # every arm scored the same items and questions, in the same order
        assert [r["question"] for r in items[arm]["mcq"]] == [r["question"] for r in items["zero-shot"]["mcq"]]
        assert [r["question"] for r in items[arm]["heldout"]] == [r["question"] for r in items["zero-shot"]["heldout"]]
        assert [r["question"] for r in preds[arm]] == [r["question"] for r in preds["zero-shot"]]
    correct = {a: np.array([r["chosen"] == r["answer"] for r in v["mcq"]], float) for a, v in items.items()}
    nll = {a: np.array([r["nll"] for r in v["heldout"]]) for a, v in items.items()}
    tokens = np.array([r["tokens"] for r in items["zero-shot"]["heldout"]], float)
    refs = [r["reference"] for r in preds["zero-shot"]]
    answers = {a: [r["prediction"] for r in v] for a, v in preds.items()}
    n_mcq, n_q = len(correct["zero-shot"]), len(tokens)

    def loss(a, idx):
        return nll[a][idx].sum() / tokens[idx].sum()

    rows = []
    for arm in items:
        acc = float(correct[arm].mean())
        row = {"arm": arm, "mcq": acc, "mcq_ci": _boot(lambda i, a=arm: correct[a][i].mean(), n_mcq),
               "heldout_loss": float(loss(arm, np.arange(n_q))),
               "rougeL": compute_metrics(["rougeL"], predictions=answers[arm], references=refs)["rougeL"]}
        if arm != "zero-shot":
            row["mcq_gain"] = acc - float(correct["zero-shot"].mean())
            row["mcq_gain_ci"] = _boot(lambda i, a=arm: correct[a][i].mean() - correct["zero-shot"][i].mean(), n_mcq)
            row["rougeL_gain_ci"] = paired_bootstrap_ci("rougeL", predictions=answers[arm],
                                                        baseline=answers["zero-shot"], references=refs)
        if arm == "FedAvg-LoRA":
            row["mcq_ratio"] = acc / float(correct["centralised"].mean())
            row["mcq_ratio_ci"] = _boot(lambda i: correct[arm][i].mean() / max(correct["centralised"][i].mean(), 1e-9),
                                        n_mcq)
            row["gap_closed"] = float((loss("zero-shot", np.arange(n_q)) - loss(arm, np.arange(n_q)))
                                      / (loss("zero-shot", np.arange(n_q)) - loss("centralised", np.arange(n_q))))
            row["gap_ci"] = _boot(lambda i: (loss("zero-shot", i) - loss(arm, i))
                                  / (loss("zero-shot", i) - loss("centralised", i)), n_q)
        rows.append(row)
    fed_row = rows[1]
    fed_row["rougeL_ratio"] = fed_row["rougeL"] / rows[2]["rougeL"] if rows[2]["rougeL"] else None
    return rows, {"mcq_items": n_mcq, "heldout_questions": n_q, "generated": len(refs)}


def site_rows(runs: dict[str, Path]) -> list[dict]:
    """Per site: held-out loss on its own slice, zero-shot / FedAvg / personalised / centralised / local-only."""
    records = [r for r in _read(runs["fedavg"] / "metrics.jsonl") if "sites" in r]
    zero, final = records[0]["sites"], records[-1]["sites"]
    central = [r for r in _read(runs["centralized"] / "metrics.jsonl") if "sites" in r][-1]["sites"]
    rows = []
    for site in sorted(final):
        local = [r for r in _read(runs[f"local/{site}"] / "metrics.jsonl") if "sites" in r][-1]["sites"][site]
        rows.append({"site": site, "n": final[site]["n"], "zero-shot": zero[site]["heldout_loss"],
                     "FedAvg": final[site]["heldout_loss"], "personalised": final[site].get("personal/heldout_loss"),
                     "centralised": central[site]["heldout_loss"], "local-only": local["heldout_loss"]})
    arms = ["zero-shot", "FedAvg", "personalised", "centralised", "local-only"]
    have = list(rows)
    for label, fn in (("mean", lambda v: sum(v) / len(v)), ("worst", max)):
        rows.append({"site": label, "n": sum(r["n"] for r in have) if label == "mean" else None,
                     **{a: fn([r[a] for r in have if r[a] is not None]) for a in arms}})
    mean = rows[-2]
    for a in ("FedAvg", "personalised", "local-only"):
        mean[f"gap_{a}"] = (mean["zero-shot"] - mean[a]) / (mean["zero-shot"] - mean["centralised"])
    return rows


def _opt(fmt):
    """``fmt(v)``, or a dash for a missing value."""
    return lambda v: "–" if v is None else fmt(v)


_acc_ci = _opt(lambda v: f"[{100 * v[0]:.1f}, {100 * v[1]:.1f}]")
_signed_pp = _opt(lambda v: f"{100 * v:+.1f} pp")
_signed_ci = _opt(lambda v: f"[{100 * v[0]:+.1f}, {100 * v[1]:+.1f}]")
_ratio = _opt(lambda v: f"{v:.3f}×")
_ratio_ci = _opt(lambda v: f"[{v[0]:.3f}, {v[1]:.3f}]")
_rouge_ci = _opt(lambda v: f"[{v[0]:+.4f}, {v[1]:+.4f}]")


COLUMNS = [Column("arm", ""), Column("mcq", "answer selection", lambda v: f"{100 * v:.1f} %"),
           Column("mcq_ci", "95 % CI", _acc_ci), Column("mcq_gain", "vs zero-shot", _signed_pp),
           Column("mcq_gain_ci", "paired 95 % CI", _signed_ci), Column("mcq_ratio", "÷ centralised", _ratio),
           Column("mcq_ratio_ci", "95 % CI ", _ratio_ci), Column("heldout_loss", "held-out loss", "{:.4f}"),
           Column("gap_closed", "loss gap closed", lambda v: f"{100 * v:.1f} %"),
           Column("gap_ci", "95 % CI  ", _acc_ci), Column("rougeL", "ROUGE-L", "{:.4f}"),
           Column("rougeL_gain_ci", "ROUGE-L vs zero-shot, 95 % CI", _rouge_ci),
           Column("rougeL_ratio", "ROUGE-L ÷ centralised", _ratio)]
SITE_COLUMNS = [Column("site", "site"), Column("n", "slice rows", lambda v: "–" if v is None else str(v))] + [
    Column(a, a, "{:.4f}") for a in ("zero-shot", "FedAvg", "personalised", "centralised", "local-only")]


def goal(rows: list[dict]) -> dict:
    fed, cen = rows[1], rows[2]
    met = fed["mcq_gain_ci"][0] > 0 and cen["mcq_gain_ci"][0] > 0 and fed["mcq_ratio"] >= 0.95
    return {"text": "fine-tuned arms beat zero-shot on answer selection (paired CI > 0); FedAvg >= 0.95x centralised",
            "met": bool(met)}


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--rows", type=int, default=200, help="training rows in all, site slices included")
    p.add_argument("--site-ratio", type=float, default=0.2, help="data.client_test_ratio: each site's own slice")
    p.add_argument("--test-rows", type=int, default=400, help="test questions for the held-out loss")
    p.add_argument("--mcq-items", type=int, default=400, help="answer-selection items (from test questions)")
    p.add_argument("--option-tokens", type=int, default=64, help="eval.mcq_option_tokens: each option's first N tokens")
    p.add_argument("--gen", type=int, default=40, help="test questions generated (ROUGE-L)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--personal-steps", type=int, default=5, help="eval.site_finetune_steps (personalised arm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="default", help="tiny, default (SmolLM2) or a model name")
    p.add_argument("--keep", type=Path, default=None, help="keep the runs in this folder")
    args = p.parse_args(argv)
    if not (MEDQUAD_DIR / "train.jsonl").is_file():
        sys.exit(f"MedQuAD not found at {MEDQUAD_DIR} (expected ../shared/datasets/medquad beside the repo)")
    rec = Recorder("answer_selection", argv)
    setup_torch(args.threads)
    from fedpeft.config import validate_tree

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        make_mcq(args, root / "mcq.jsonl")
        cfg = validate_tree(job_tree(args, root / "ws", root / "mcq.jsonl"))
        runs, seconds = run_arms(cfg, root)
        rows, sizes = test_set_rows(runs)
        sites = site_rows(runs)
    mean = sites[-2]
    md = (markdown_table(COLUMNS, rows) + "\n\n" + markdown_table(SITE_COLUMNS, sites) + "\n\n"
          + _footer(args, sizes, cfg.model.name, mean))
    return rec.finish(args.results_dir, title="MedQuAD answer selection, per-site scores and the personalised arm",
                      rows=rows, markdown=md, goal=goal(rows),
                      params={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                      extra={"sites": sites, "seconds_per_arm": seconds, **sizes})


def _footer(args, sizes: dict, model: str, mean: dict) -> str:
    gaps = ", ".join(f"{a} {100 * mean[f'gap_{a}']:.0f} %" for a in ("FedAvg", "personalised", "local-only"))
    return (f"`{model}` (`configs/medquad-lora-fedavg.yaml`: LoRA r16 all-linear), {args.rows} MedQuAD "
            f"rows over 4 sites (Dirichlet alpha 1 over the NIH source), {args.site_ratio:.0%} of each site's rows "
            f"held out as its own slice, {args.rounds} rounds of one local epoch; centralised takes as many steps. "
            f"Answer selection: {sizes['mcq_items']} items of `fedpeft data mcq` on test questions whose topics are not "
            f"in train (1 true + 3 same-qtype answers on other topics; chance 25 %), length-normalised "
            f"log-likelihood of each option's first {args.option_tokens} tokens. Held-out loss on {sizes['heldout_questions']} test questions, ROUGE-L on the first "
            f"{sizes['generated']} (greedy, {args.max_new_tokens} new tokens). Intervals: paired percentile "
            f"bootstrap over items/questions, {N_RESAMPLES} resamples. Second table: held-out loss on each site's own "
            f"slice; personalised = the global adapter after {args.personal_steps} local steps on the site's rows "
            f"(`eval.site_finetune_steps`); local-only = the site trained alone with the same steps. Share of the "
            f"zero-shot → centralised gap closed on the site mean: {gaps}.")


if __name__ == "__main__":
    main()
