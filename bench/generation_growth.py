"""Does batching pay at long answers? Tokens per CPU-second of batch 1 vs 4, before and after the fix.

Issue 14 measured batched greedy generation (``fedpeft.generation.run_generation``) on a random
25.7M GPT-NeoX: batch 4 gave 2.7x the tokens per CPU-second of batch 1 at 128 new tokens but
1.0x at 1024, its per-step cost growing with the context far faster than batch 1's. This script
times the same setting, one torch thread, every answer exactly ``--max-new-tokens`` long (EOS is
masked out of the logits, so no row stops early and both batch sizes generate the same tokens).

Arms, interleaved within one process (every arm asserts the same token ids as ``before``):

* ``before``: transformers' ``DynamicCache`` (grows by ``torch.cat``) and the ``nn.Linear`` head,
  i.e. the code before the fix (both switched back by patching ``fedpeft.generation``);
* ``cache``: only the preallocated KV cache (``--arms before cache after``);
* ``after``: ``run_generation`` as it is (preallocated cache and the vocab-major output head).

``ms/step`` columns are the CPU time of the model's forward in the first and last 64 decoding
steps: growth with the context shows as last > first. ``minor faults`` are the process's
page faults (``getrusage``). With ``MALLOC_MMAP_THRESHOLD_`` set (the README's lean-malloc setting)
the result goes to ``generation_growth_lean_malloc.json``: there the growing cache's page faults show.

    python bench/generation_growth.py                          # 128 and 1024 new tokens, ~2 min
    MALLOC_MMAP_THRESHOLD_=262144 python bench/generation_growth.py --max-new-tokens 1024 --arms before cache after
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Column, Recorder, base_parser, markdown_table, setup_torch  # noqa: E402
from bench.generation import load_questions  # noqa: E402

GOAL = 2.0  # tokens per CPU-second of batch 4 over batch 1 at the longest answers
WINDOW = 64  # decoding steps averaged at the start and at the end of an answer
BATCH_SIZES = (1, 4)


def build_model(seed: int = 0):
    """The issue's random GPT-NeoX: hidden 256, 1 layer, 4 heads, MLP 512, SmolLM2's 49k vocabulary (25.7M)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from fedpeft.config import ModelConfig
    from fedpeft.models import load_base_model

    _, tok = load_base_model(ModelConfig(name="tiny-random-llama"))  # SmolLM2's tokenizer
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config).eval()
    return model, tok


def _never_eos(model: torch.nn.Module, eos_ids: list[int]) -> None:
    """Mask EOS out of every forward's logits, so every answer runs to ``max_new_tokens``."""
    def hook(_module, _args, out):  # noqa: ANN001, ANN202
        out.logits[..., eos_ids] = float("-inf")

    model.register_forward_hook(hook)


@contextlib.contextmanager
def _arm(name: str):
    """Switch ``fedpeft.generation`` back to the code before the fix, in part (``cache``) or whole (``before``)."""
    import fedpeft.generation as gen
    from transformers import DynamicCache

    saved = gen.preallocated_cache, gen.vocab_major_head
    if name in ("before", "cache"):
        gen.vocab_major_head = lambda model: contextlib.nullcontext()
    if name == "before":
        gen.preallocated_cache = lambda model, capacity: DynamicCache(config=model.config)
    try:
        yield
    finally:
        gen.preallocated_cache, gen.vocab_major_head = saved


class _StepClock:
    """CPU seconds of each forward of ``model``, in call order."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.times: list[float] = []
        model.register_forward_pre_hook(lambda *_: self.times.append(-time.process_time()))
        model.register_forward_hook(lambda *_: self.times.__setitem__(-1, self.times[-1] + time.process_time()))

    def windows(self, steps: int) -> tuple[float, float]:
        """Mean ms of the first and the last ``WINDOW`` decoding steps (prefill excluded), over all batches."""
        calls = [self.times[i:i + steps] for i in range(0, len(self.times), steps)]  # one list per batch
        first = [t for c in calls for t in c[1:1 + WINDOW]]
        last = [t for c in calls for t in c[-WINDOW:]]
        return 1e3 * sum(first) / len(first), 1e3 * sum(last) / len(last)


def measure(model, tok, questions: list[str], arm: str, batch: int, new_tokens: int, penalty: float,
            clock: _StepClock) -> dict:
    from fedpeft.generation import run_generation

    clock.times.clear()
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    with _arm(arm):
        out = run_generation(model, tok, questions, max_new_tokens=new_tokens, batch_size=batch,
                             repetition_penalty=penalty, progress=False)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    if any(len(t) != new_tokens for t in out.token_ids):
        raise AssertionError(f"{arm}, batch {batch}: an answer stopped early: {[len(t) for t in out.token_ids]}")
    first, last = clock.windows(new_tokens)
    return {"arm": arm, "new_tokens": new_tokens, "batch_size": batch, "tokens": out.num_tokens,
            "wall_s": wall, "cpu_s": user + system, "sys_s": system, "tok_per_cpu_s": out.num_tokens / (user + system),
            "tok_per_s": out.num_tokens / wall, "step_ms_first": first, "step_ms_last": last,
            "minor_faults": after.ru_minflt - before.ru_minflt, "token_ids": out.token_ids}


def run(model, tok, questions: list[str], arms: list[str], lengths: list[int], penalty: float) -> list[dict]:
    """Every (length, batch size, arm), arms interleaved; raises if an arm's tokens differ from ``before``'s."""
    from fedpeft.generation import run_generation

    clock = _StepClock(model)
    run_generation(model, tok, questions[:2], max_new_tokens=4, batch_size=2, progress=False)  # warm-up
    rows = []
    for new_tokens in lengths:
        for batch in BATCH_SIZES:
            for arm in arms:
                rows.append(measure(model, tok, questions, arm, batch, new_tokens, penalty, clock))
                print(f"{new_tokens} tokens, batch {batch}, {arm:6s}: {rows[-1]['tok_per_cpu_s']:6.1f} tok/CPU-s, "
                      f"{rows[-1]['wall_s']:5.1f} s wall", flush=True)
    reference = {(r["new_tokens"], r["batch_size"]): r["token_ids"] for r in rows if r["arm"] == arms[0]}
    for r in rows:
        r["identical"] = r.pop("token_ids") == reference[r["new_tokens"], r["batch_size"]]
        if not r["identical"]:
            raise AssertionError(f"{r['arm']}, batch {r['batch_size']}, {r['new_tokens']} tokens: "
                                 f"token ids differ from {arms[0]}'s")
    for r in rows:
        one = next(o for o in rows if (o["arm"], o["new_tokens"], o["batch_size"]) == (r["arm"], r["new_tokens"], 1))
        r["batch_gain"] = r["tok_per_cpu_s"] / one["tok_per_cpu_s"]
    return rows


COLUMNS = [
    Column("new_tokens", "new tokens"),
    Column("batch_size", "batch"),
    Column("arm", "code"),
    Column("tok_per_cpu_s", "tok/CPU-s", "{:.1f}"),
    Column("batch_gain", "vs batch 1 (CPU)", "{:.2f}×"),
    Column("cpu_s", "CPU s", "{:.1f}"),
    Column("wall_s", "wall s", "{:.1f}"),
    Column("step_ms_first", f"ms/step, first {WINDOW}", "{:.1f}"),
    Column("step_ms_last", f"ms/step, last {WINDOW}", "{:.1f}"),
    Column("minor_faults", "minor faults", "{:,}"),
    Column("sys_s", "sys s", "{:.2f}"),
    Column("identical", "tokens = before", lambda v: "yes" if v else "NO"),
]


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--max-new-tokens", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--arms", nargs="+", choices=["before", "cache", "after"], default=["before", "after"])
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    args = p.parse_args(argv)
    lean = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    rec = Recorder("generation_growth" + ("_lean_malloc" if lean else ""), argv, script="generation_growth.py")
    setup_torch(args.threads)
    questions, source = load_questions(args.questions)
    model, tok = build_model()
    from fedpeft.generation import _eos_ids

    _never_eos(model, _eos_ids(model, tok))
    rows = run(model, tok, questions, args.arms, args.max_new_tokens, args.repetition_penalty)
    longest = max(args.max_new_tokens)
    gains = {r["arm"]: r["batch_gain"] for r in rows if r["new_tokens"] == longest and r["batch_size"] == 4}
    met = gains.get("after", 0.0) >= GOAL
    md = markdown_table(COLUMNS, rows) + (
        f"\n\nRandom GPT-NeoX (hidden 256, 1 layer, 4 heads, MLP 512, 49k vocabulary: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), {len(questions)} questions from "
        f"`{Path(source).name}`, greedy, every answer exactly the number of new tokens (EOS masked), repetition "
        f"penalty {args.repetition_penalty}, {torch.get_num_threads()} torch thread, one pass per row, arms "
        f"interleaved; `MALLOC_MMAP_THRESHOLD_` {os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}. Goal: batch 4 "
        f"≥ {GOAL:g}× the tokens per CPU-second of batch 1 at {longest} new tokens: "
        f"**{'met' if met else 'missed'}** (" + ", ".join(f"{a} {g:.2f}×" for a, g in gains.items()) + ").")
    return rec.finish(
        args.results_dir, title="Batched generation at long answers: tokens per CPU-second", rows=rows, markdown=md,
        params={"model": "random GPT-NeoX 25.7M", "questions": len(questions), "source": source, "arms": args.arms,
                "max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty,
                "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")},
        goal={"text": f"batch 4 ≥ {GOAL:g}× batch 1's tokens per CPU-second at {longest} new tokens", "met": met,
              "gains": gains},
    )


if __name__ == "__main__":
    main()
