"""Evaluation throughput: tokens per second of batched greedy generation, batch 1 vs 4, 8, 16.

Generation dominates evaluation. ``fedpeft.generation`` batches left-padded prompts; this script
times ``run_generation`` (what ``generate_answers`` and the evaluator call) at each batch size
on the same questions and **asserts that every batch size gives exactly the answers of batch
1**. Tokens counted are the answers' own tokens (up to and including EOS), the same at every
batch size, so tokens/s ratios are time ratios. Each repetition runs every batch size once
(order rotated between repetitions); speedups are taken within a repetition.

    python bench/generation.py                                  # default model, 16 questions
    python bench/generation.py --model tiny --questions 4 --batch-sizes 1 4 --max-new-tokens 8 --reps 1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MEDQUAD_DIR, MODELS, PEFT_VARIANTS, Column, Recorder, base_parser, fmt_seconds, markdown_table, median,
    setup_torch, spread,
)

GOAL = 4.0  # speedup of the best batch size over batch 1 on CPU


def load_questions(n: int) -> tuple[list[str], str]:
    """The first ``n`` MedQuAD test questions (or the shipped sample's, without MedQuAD)."""
    test = MEDQUAD_DIR / "test.jsonl"
    if test.is_file():
        source = str(test)
        lines = test.read_text(encoding="utf-8").splitlines()
    else:
        from importlib import resources

        source = "builtin:sample"
        lines = resources.files("fedpeft").joinpath("data/sample.jsonl").read_text(encoding="utf-8").splitlines()
    questions = [json.loads(line)["question"] for line in lines if line.strip()]
    return questions[:n], source


class OutputsDiffer(AssertionError):
    """Batched generation gave answers that differ from batch 1."""


def build_model(model_name: str, peft: str):
    """The model to generate with: the base model, or it wrapped with a (seeded) adapter."""
    from fedpeft.config import ModelConfig
    from fedpeft.models import load_base_model

    model, tok = load_base_model(ModelConfig(name=model_name))
    if peft == "none":
        return model, tok
    import torch

    from fedpeft.peft_methods import build_peft_method, wrap_model

    spec = PEFT_VARIANTS[peft]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = wrap_model(model, build_peft_method(spec["method"], {k: v for k, v in spec.items() if k != "method"}))
        for p in model.parameters():  # LoRA's B starts at zero: give the adapter an effect
            if p.requires_grad:
                p.data.add_(0.02 * torch.randn_like(p))
    return model.eval(), tok


def run(model, tok, questions: list[str], batch_sizes: list[int], reps: int, max_new_tokens: int,
        penalty: float) -> list[dict]:
    """Time every batch size ``reps`` times; raise :class:`OutputsDiffer` on any mismatch."""
    import contextlib

    from fedpeft.generation import is_lora, merged_lora, run_generation

    merge = merged_lora(model) if is_lora(model) else contextlib.nullcontext()  # as the evaluator does
    times: dict[int, list[float]] = {b: [] for b in batch_sizes}
    speedups: dict[int, list[float]] = {b: [] for b in batch_sizes}
    reference, tokens = None, None
    with merge:
        # warm-up: lazy initialisation and allocator, outside the timings
        run_generation(model, tok, questions[:2], max_new_tokens=2, batch_size=max(batch_sizes), progress=False)
        for rep in range(reps):
            order = batch_sizes[rep % len(batch_sizes):] + batch_sizes[: rep % len(batch_sizes)]
            this_rep = {}
            for b in order:
                out = run_generation(model, tok, questions, max_new_tokens=max_new_tokens,
                                     repetition_penalty=penalty, batch_size=b, progress=False)
                if reference is None:
                    reference, tokens = out.answers, out.num_tokens
                _check_same(reference, out.answers, b)
                this_rep[b] = out.seconds
                times[b].append(out.seconds)
            for b in batch_sizes:
                speedups[b].append(this_rep[batch_sizes[0]] / this_rep[b])
    return [{"batch_size": b, "seconds": median(times[b]), "seconds_range": spread(times[b]),
             "tokens": tokens, "tokens_per_s": tokens / median(times[b]), "speedup": median(speedups[b]),
             "speedup_range": spread(speedups[b]), "identical": True} for b in batch_sizes]


def _check_same(reference: list[str], answers: list[str], batch_size: int) -> None:
    bad = [i for i, (a, b) in enumerate(zip(reference, answers)) if a != b]
    if bad:
        i = bad[0]
        raise OutputsDiffer(f"batch size {batch_size}: {len(bad)} of {len(answers)} answers differ from the "
                            f"first batch size's; first at question {i}:\n  ref: {reference[i]!r}\n  got: {answers[i]!r}")


COLUMNS = [
    Column("batch_size", "batch size"),
    Column("seconds", "seconds (median)", fmt_seconds),
    Column("tokens_per_s", "tokens/s", "{:.1f}"),
    Column("speedup", "speedup vs batch 1", "{:.2f}×"),
    Column("speedup_range", "speedup min–max", lambda r: f"{r[0]:.2f}–{r[1]:.2f}×"),
    Column("identical", "answers = batch 1", lambda v: "yes" if v else "NO"),
]


def main(argv: list[str] | None = None) -> dict:
    from fedpeft.config import EvalConfig

    p = base_parser(__doc__)
    p.add_argument("--model", choices=sorted(MODELS), default="default")
    p.add_argument("--peft", choices=["none", *PEFT_VARIANTS], default="none",
                   help="generate through an adapter (LoRA merged, as the evaluator does)")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repetition-penalty", type=float, default=EvalConfig().repetition_penalty)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    if args.batch_sizes[0] != 1:
        p.error("the first batch size is the reference and must be 1")
    rec = Recorder("generation", argv)
    setup_torch(args.threads)
    questions, source = load_questions(args.questions)
    model, tok = build_model(MODELS[args.model], args.peft)
    rows = run(model, tok, questions, args.batch_sizes, args.reps, args.max_new_tokens, args.repetition_penalty)
    best = max(rows, key=lambda r: r["speedup"])
    met = best["speedup"] >= GOAL
    md = markdown_table(COLUMNS, rows)
    md += (f"\n\nModel `{MODELS[args.model]}` ({'base' if args.peft == 'none' else args.peft}), "
           f"{len(questions)} questions from `{Path(source).name}`, greedy, max {args.max_new_tokens} new tokens, "
           f"repetition penalty {args.repetition_penalty}; {rows[0]['tokens']} answer tokens per pass; "
           f"medians of {args.reps} repetitions. Every batch size produced exactly the answers of batch 1 "
           f"(asserted). Goal ≥ {GOAL:g}× at the best batch size: **{'met' if met else 'missed'}** "
           f"({best['speedup']:.2f}× at batch {best['batch_size']}).")
    return rec.finish(
        args.results_dir, title="Evaluation throughput: batched greedy generation", rows=rows, markdown=md,
        params={"model": MODELS[args.model], "peft": args.peft, "questions": len(questions), "source": source,
                "batch_sizes": args.batch_sizes, "max_new_tokens": args.max_new_tokens,
                "repetition_penalty": args.repetition_penalty, "reps": args.reps},
        goal={"text": f"≥ {GOAL:g}× tokens/s at the best batch size vs batch 1", "met": met,
              "best_speedup": best["speedup"], "best_batch_size": best["batch_size"]},
    )


if __name__ == "__main__":
    main()
