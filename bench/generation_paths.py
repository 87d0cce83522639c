"""Tokens/s of each generation path on SmolLM2-135M-Instruct (a measurement, not a test).

    python bench/generation_paths.py [--questions 8] [--new-tokens 128] [--reps 3] [--threads N]

Paths: the base model; P-Tuning through ``PeftModel.generate`` ("slow") and through
:mod:`fedpeft.generation`'s direct path ("fast"); LoRA unmerged and merged. Every path
generates exactly ``--new-tokens`` tokens per question (``min_new_tokens``), so tokens/s
compares the cost per token, not how early answers stop. Paths run interleaved ``--reps``
times and the table shows the median and best: on a shared CPU single runs are noisy.

``tok/CPU-s`` divides by the CPU time of this process (all its threads) instead of wall time:
it is what the path costs, and it moves less than wall time when other processes share the
cores (with ``--threads 1`` it is the cleanest per-token cost). ``positions/step`` is the
number of positions the base model's decoder encoded per decoding step (a forward hook): 1
means the KV cache is reused; more would mean every step re-encodes the sequence.
"""

from __future__ import annotations

import contextlib
import sys
import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Column, Recorder, base_parser, markdown_table, setup_torch  # noqa: E402
from fedpeft.config import ModelConfig
from fedpeft.data.prompts import prompt_ids
from fedpeft.generation import _generate_ids, _left_pad, merged_lora
from fedpeft.models import load_base_model
from fedpeft.peft_methods import build_peft_method, wrap_model

QUESTION_FILE = Path(__file__).resolve().parents[1] / "fedpeft" / "data" / "sample.jsonl"


def _questions(n: int) -> list[str]:
    with open(QUESTION_FILE, encoding="utf-8") as f:
        return [json.loads(line)["question"] for line in f if line.strip()][:n]


def _perturb(params: list[torch.nn.Parameter], seed: int, std: float) -> None:
    """Give freshly initialised adapter weights non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


def _count_positions(decoder: torch.nn.Module, lengths: list[int]) -> torch.utils.hooks.RemovableHandle:
    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        lengths.append(int(x.shape[1]))

    return decoder.register_forward_pre_hook(hook, with_kwargs=True)


Path_ = tuple[torch.nn.Module, Callable[[dict], None], bool]  # (model, run(generate kwargs), merge LoRA)


def _runner(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, slow: bool) -> Callable[[dict], None]:
    if slow:  # what a caller of PeftModel.generate gets
        return lambda kw: model.generate(input_ids=ids, attention_mask=mask, **kw)
    return lambda kw: _generate_ids(model, ids, mask, kw, penalty=1.0)


def _paths(base: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Path_]:
    """Every path, on fedpeft's default adapters (P-Tuning: 20 virtual tokens; LoRA: r=16, all
    linear layers) with perturbed weights. get_peft_model modifies what it wraps: wrap copies."""
    ptuning = wrap_model(copy.deepcopy(base), build_peft_method("ptuning", {})).eval()
    _perturb(list(ptuning.prompt_encoder.parameters()), seed=1, std=0.02)
    lora = wrap_model(copy.deepcopy(base), build_peft_method("lora", {})).eval()
    _perturb([p for name, p in lora.named_parameters() if "lora_B" in name], seed=2, std=0.01)
    return {
        "base": (base, _runner(base, ids, mask, slow=False), False),
        "p-tuning slow (PeftModel.generate)": (ptuning, _runner(ptuning, ids, mask, slow=True), False),
        "p-tuning fast (fedpeft)": (ptuning, _runner(ptuning, ids, mask, slow=False), False),
        "lora unmerged": (lora, _runner(lora, ids, mask, slow=False), False),
        "lora merged": (lora, _runner(lora, ids, mask, slow=False), True),
    }


def _measure(path: Path_, kw: dict) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, most positions encoded by one decoding step) of one run."""
    model, run, merge = path
    decoder = (model.get_base_model() if hasattr(model, "get_base_model") else model).model
    lengths: list[int] = []
    handle = _count_positions(decoder, lengths)
    with merged_lora(model) if merge else contextlib.nullcontext(), torch.no_grad():
        start, cpu_start = time.perf_counter(), time.process_time()
        run(kw)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    handle.remove()
    return seconds, cpu_seconds, max(lengths[1:])  # lengths[0] is the prompt (prefill)


COLUMNS = [
    Column("path", "path"),
    Column("median_tok_s", "median tok/s", lambda v: f"{v:.1f}"),
    Column("best_tok_s", "best tok/s", lambda v: f"{v:.1f}"),
    Column("tok_per_cpu_s", "tok/CPU-s", lambda v: f"{v:.1f}"),
    Column("positions_per_step", "positions per decoding step"),
]


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    rec = Recorder("generation_paths", argv)
    setup_torch(args.threads)
    warnings.filterwarnings("ignore")
    base, tok = load_base_model(ModelConfig(name="smollm2-135m-instruct"))
    ids, mask = _left_pad([prompt_ids(tok, q) for q in _questions(args.questions)], tok.pad_token_id,
                          torch.device("cpu"))
    paths = _paths(base, ids, mask)
    wall: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    positions: dict[str, int] = {}
    for rep in range(args.reps + 1):  # rep 0 is a short warm-up run of every path
        tokens = args.new_tokens if rep else 8
        kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for name, path in paths.items():
            seconds, cpu_seconds, positions[name] = _measure(path, kw)
            if rep:
                wall[name].append(ids.shape[0] * tokens / seconds)
                cpu[name].append(ids.shape[0] * tokens / cpu_seconds)
                print(f"rep {rep}: {name:36s} {wall[name][-1]:7.1f} tok/s {cpu[name][-1]:7.1f} tok/CPU-s", flush=True)
    rows = [{"path": name, "median_tok_s": statistics.median(wall[name]), "best_tok_s": max(wall[name]),
             "tok_per_cpu_s": statistics.median(cpu[name]), "positions_per_step": positions[name]}
            for name in paths]
    md = markdown_table(COLUMNS, rows) + (
        f"\n\nSmolLM2-135M-Instruct, {ids.shape[0]} questions × exactly {args.new_tokens} new tokens, batch "
        f"{ids.shape[0]}, {torch.get_num_threads()} thread(s), {args.reps} interleaved repetitions.")
    return rec.finish(args.results_dir, title="Generation paths: P-Tuning and merged LoRA", rows=rows, markdown=md,
                      params={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})


if __name__ == "__main__":
    main()
