"""The README's MedQuAD run: FedAvg-LoRA on SmolLM2, zero-shot vs after the last round, with CIs.

Runs ``configs/medquad-lora-fedavg.yaml`` through ``fedpeft run``'s loop (``run_job``) at the
README's size (200 training rows, 4 clients by NIH source, 2 rounds, 40 test questions on topics
not in train), then scores the zero-shot and final predictions: ROUGE-1/2/L, BLEU-4, held-out
loss, a 95 % bootstrap interval of ROUGE-L over questions for each, and the paired interval of
the ROUGE-L gain (``scipy.stats.bootstrap`` resampling questions, both runs' answers together).

    python bench/medquad.py                        # about 35 min on one idle core
    python bench/medquad.py --rows 16 --test-rows 4 --rounds 1 --max-new-tokens 8   # smoke size
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import MEDQUAD_DIR, REPO, Column, Recorder, base_parser, markdown_table, setup_torch  # noqa: E402

CONFIG = REPO / "configs" / "medquad-lora-fedavg.yaml"
METRICS = ["rouge1", "rouge2", "rougeL", "bleu4", "heldout_loss"]


def _ci(value: tuple[float, float]) -> str:
    return f"[{value[0]:.3f}, {value[1]:.3f}]"


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


COLUMNS = [Column("arm", "")] + [Column(m, m, _fmt) for m in METRICS] + [Column("rougeL_ci", "ROUGE-L 95 % CI", _ci)]


def score(run_dir: Path) -> dict:
    """Zero-shot and final rows, and the paired ROUGE-L gain, from a finished run folder."""
    from fedpeft.io_utils import read_jsonl
    from fedpeft.metrics import METRICS as REGISTRY
    from fedpeft.metrics import bootstrap_ci, paired_bootstrap_ci

    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval" in r]
    zero, final = evals[0]["eval"], evals[-1]["eval"]
    base = read_jsonl(run_dir / "predictions_zero_shot.jsonl")
    tuned = read_jsonl(run_dir / "predictions.jsonl")
    refs = [r["reference"] for r in tuned]
    assert [r["question"] for r in base] == [r["question"] for r in tuned], "different questions"
    p_base, p_tuned = [r["prediction"] for r in base], [r["prediction"] for r in tuned]
    rows = []
    for arm, ev, preds in (("zero-shot", zero, p_base), ("FedAvg-LoRA, last round", final, p_tuned)):
        rows.append({"arm": arm, **{m: ev.get(m) for m in METRICS},
                     "rougeL_ci": bootstrap_ci("rougeL", predictions=preds, references=refs)})
    gain = paired_bootstrap_ci("rougeL", predictions=p_tuned, baseline=p_base, references=refs)
    rouge = REGISTRY.get("rougeL")
    better = sum(rouge(predictions=[t], references=[r]) > rouge(predictions=[b], references=[r])
                 for t, b, r in zip(p_tuned, p_base, refs))
    return {"rows": rows, "gain": final["rougeL"] - zero["rougeL"], "gain_ci": gain, "better": better,
            "questions": len(refs)}


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--rows", type=int, default=200, help="training rows (data.max_train_samples)")
    p.add_argument("--test-rows", type=int, default=40, help="test questions")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--workspace", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    args = p.parse_args(argv)
    if not (MEDQUAD_DIR / "train.jsonl").is_file():
        sys.exit(f"MedQuAD not found at {MEDQUAD_DIR} (expected ../shared/datasets/medquad beside the repo)")
    rec = Recorder("medquad", argv)
    setup_torch(args.threads)
    from fedpeft.config import load_config
    from fedpeft.simulation import run_job

    with tempfile.TemporaryDirectory() as tmp:
        workspace = args.workspace or Path(tmp)
        cfg = load_config(CONFIG, [
            f"workspace={workspace}", "run_id=bench", f"model.name={args.model}",
            f"data.train={MEDQUAD_DIR / 'train.jsonl'}", f"data.test={MEDQUAD_DIR / 'test.jsonl'}",
            f"data.max_train_samples={args.rows}", f"data.max_test_samples={args.test_rows}",
            f"eval.max_samples={args.test_rows}", f"federation.rounds={args.rounds}",
            f"eval.max_new_tokens={args.max_new_tokens}"])
        run = run_job(cfg)
        result = score(run.path)
        sizes = [p["size"] for p in json.loads((run.path / "partitions.json").read_text())]
    lo, hi = result["gain_ci"]
    md = markdown_table(COLUMNS, result["rows"])
    md += (f"\n\nPaired ROUGE-L gain over zero-shot: {result['gain']:+.4f}, 95 % CI [{lo:+.4f}, {hi:+.4f}] "
           f"(percentile bootstrap over questions, 1000 resamples); the tuned answer scores higher on "
           f"{result['better']} of {result['questions']} questions. `{CONFIG.relative_to(REPO)}` with "
           f"{args.rows} training rows, {args.rounds} rounds, {args.test_rows} test questions on topics not in "
           f"train, max {args.max_new_tokens} new tokens.")
    return rec.finish(args.results_dir, title="MedQuAD: FedAvg-LoRA on SmolLM2", rows=result["rows"], markdown=md,
                      params={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                      extra={"gain": result["gain"], "gain_ci": result["gain_ci"], "better": result["better"],
                             "questions": result["questions"], "client_sizes": sizes})


if __name__ == "__main__":
    main()
