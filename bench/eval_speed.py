"""Evaluation speed against the seed's predict loop: questions/s and tokens per CPU-second (issue 14).

The seed (KubeEdge Ianvs ``examples/federated-llm/fedllm-peft/algorithm/model.py``, ``predict``)
generates one question at a time with ``model.generate(**enc, max_new_tokens=1024,
do_sample=False, num_beams=1, use_cache=True)`` on the tokenized prompt text, then decodes the
whole output. This script runs that loop (``seed loop``, batch 1, as the issue measured it) and
``fedpeft.generation.run_generation`` (batch ``--batch``: prompts sorted by length, every row
stopped at EOS, preallocated KV cache, vocab-major head), on the same model, the same chat-template
prompts, the same questions, greedy, 1 torch thread, interleaved in one process:

* ``smollm2``: SmolLM2-135M-Instruct, where answers stop at EOS at different lengths. The answers
  are compared up to EOS (the seed decodes with ``skip_special_tokens``: what follows its EOS, if
  the model's ``generation_config`` lets it run on, is counted as time but not as answer).
* ``random``: the issue's random 25.7M GPT-NeoX (``bench/generation_growth.py``), where no
  sequence stops early: every answer is ``max_new_tokens`` long in both loops.

Goals (issue 14): ≥ 10× less time than the seed loop on SmolLM2 at equal answers, ≥ 2× on the
random model.

    python bench/eval_speed.py                      # 8 SmolLM2 questions, 4 random-model ones; ~12 min
    python bench/eval_speed.py --questions 2 --random-questions 2 --max-new-tokens 32   # smoke
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Column, Recorder, base_parser, markdown_table, setup_torch  # noqa: E402
from bench.generation import load_questions  # noqa: E402
from bench.generation_growth import build_model  # noqa: E402

GOALS = {"smollm2": 10.0, "random": 2.0}


def seed_loop(model, tok, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The seed's ``predict`` at batch 1: new token ids per prompt (the whole output, EOS and after)."""
    out = []
    for prompt in prompts:
        enc = tok([prompt], padding=True, return_tensors="pt")
        enc["attention_mask"] = enc["attention_mask"].bool()
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                 pad_token_id=tok.pad_token_id)
        out.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    return out


def up_to_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - w0, time.process_time() - c0


def measure(name: str, model, tok, questions: list[str], max_new_tokens: int, batch: int) -> list[dict]:
    from fedpeft.data.prompts import prompt_ids
    from fedpeft.generation import _eos_ids, run_generation

    texts = [tok.decode(prompt_ids(tok, q)) for q in questions]  # the seed tokenizes prompt text
    assert [tok(t)["input_ids"] for t in texts] == [prompt_ids(tok, q) for q in questions], "prompts differ"
    eos = set(_eos_ids(model, tok))
    seed_ids, seed_wall, seed_cpu = timed(lambda: seed_loop(model, tok, texts, max_new_tokens))
    result, ours_wall, ours_cpu = timed(lambda: run_generation(model, tok, questions, max_new_tokens=max_new_tokens,
                                                               batch_size=batch, progress=False))
    ours = [up_to_eos(list(ids), eos) for ids in result.token_ids]
    seeds = [up_to_eos(ids, eos) for ids in seed_ids]
    same = sum(a == b for a, b in zip(ours, seeds))
    n = len(questions)
    rows = []
    for label, bsz, wall, cpu, generated, answer in (
            ("seed loop", 1, seed_wall, seed_cpu, sum(map(len, seed_ids)), sum(map(len, seeds))),
            ("fedpeft", batch, ours_wall, ours_cpu, sum(map(len, result.token_ids)), sum(map(len, ours)))):
        rows.append({"model": name, "loop": label, "batch": bsz, "questions": n, "wall": wall, "cpu": cpu,
                     "q_per_s": n / wall, "generated": generated, "answer_tokens": answer,
                     "tok_per_cpu_s": answer / cpu, "same": f"{same}/{n}"})
    rows[1]["speedup_wall"], rows[1]["speedup_cpu"] = seed_wall / ours_wall, seed_cpu / ours_cpu
    rows[1]["goal"] = GOALS[name]
    return rows


COLUMNS = [Column("model", "model"), Column("loop", "loop"), Column("batch", "batch"),
           Column("questions", "questions"), Column("q_per_s", "questions/s", "{:.3f}"),
           Column("wall", "wall s", "{:.1f}"), Column("cpu", "CPU s", "{:.1f}"),
           Column("generated", "tokens generated"), Column("answer_tokens", "answer tokens (to EOS)"),
           Column("tok_per_cpu_s", "answer tok/CPU-s", "{:.1f}"),
           Column("speedup_wall", "less time (wall)", lambda v: "–" if v is None else f"{v:.2f}×"),
           Column("speedup_cpu", "less time (CPU)", lambda v: "–" if v is None else f"{v:.2f}×"),
           Column("same", "answers = seed's")]


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--questions", type=int, default=8, help="SmolLM2 questions")
    p.add_argument("--random-questions", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="fedpeft's batch size (eval.batch_size's default)")
    p.add_argument("--random-batch", type=int, default=4)
    args = p.parse_args(argv)
    rec = Recorder("eval_speed", argv)
    setup_torch(args.threads)
    from fedpeft.config import ModelConfig
    from fedpeft.models import load_base_model

    rows = []
    model, tok = build_model()
    questions, source = load_questions(max(args.questions, args.random_questions))
    rows += measure("random", model, tok, questions[:args.random_questions], args.max_new_tokens, args.random_batch)
    print(markdown_table(COLUMNS, rows), flush=True)
    model, tok = load_base_model(ModelConfig(name="smollm2-135m-instruct"))
    model.eval()
    rows += measure("smollm2", model, tok, questions[:args.questions], args.max_new_tokens, args.batch)
    gains = {r["model"]: r for r in rows if r.get("goal")}
    met = all(r["speedup_cpu"] >= r["goal"] for r in gains.values())
    equal = ", ".join(f"{m}: {r['same']}" for m, r in gains.items())
    md = markdown_table(COLUMNS, rows) + "\n\n" + (
        f"Questions from `{source}`, chat-template prompts, greedy, `max_new_tokens` {args.max_new_tokens}, repetition "
        f"penalty 1.0, 1 torch thread, both loops in one process on the same model object. Answers compared up to the "
        f"first EOS ({equal} equal). Goals: ≥ 10× less time "
        f"on SmolLM2, ≥ 2× on the random model: "
        + ", ".join(f"{m} {r['speedup_cpu']:.2f}× CPU ({r['speedup_wall']:.2f}× wall)" for m, r in gains.items())
        + f" → **{'met' if met else 'missed'}**.")
    return rec.finish(args.results_dir, title="Evaluation speed vs the seed's predict loop", rows=rows, markdown=md,
                      params=vars(args) | {"results_dir": str(args.results_dir)},
                      goal={"text": ">= 10x less time than the seed loop on SmolLM2, >= 2x on the random model "
                                    "(CPU time)", "met": met})


if __name__ == "__main__":
    main()
