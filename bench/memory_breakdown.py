"""Where a SmolLM2 LoRA round's memory goes, what the savers cut, and a memory plan for 1B-13B bases.

Three parts, each in fresh processes (a parent that had loaded a model would lend its peak to
every child's ``ru_maxrss``; each child reports its own ``VmHWM``):

1. **A LoRA round**, at ``bench/memory.py``'s settings (SmolLM2-135M, LoRA r16 all-linear,
   dropout 0.05, 2 clients x 8 sample rows, 1 round of 1 step of batch 4, max_seq_len 128, final
   evaluation on 2 questions): ``before`` runs the code paths as they were before the savers
   (transformers' own loss over full-vocabulary logits, PEFT's dropout, no ``malloc_trim``);
   ``now`` the current code; ``now + checkpointing`` adds ``train.gradient_checkpointing``;
   ``... + lean malloc`` sets ``MALLOC_MMAP_THRESHOLD_=262144`` (glibc then maps every tensor
   above 256 kB on its own and unmaps it when freed, so resident memory follows the live tensors;
   it costs page faults, hence CPU). The first client's breakdown (``memory_*`` metrics) and the
   CPU time of the whole process come with each row.
2. **The held-out loss** of 32 MedQuAD test questions (``--heldout-rows``) at batch 16 and
   max_seq_len 256, the evaluation settings of ``configs/medquad-lora-fedavg.yaml`` (shipped
   sample rows if MedQuAD is absent): ``before`` (full logits) vs ``now`` (answer positions, in
   chunks); the two losses must agree.
3. **A memory plan on paper**: the bytes autograd keeps per token per decoder layer, counted
   exactly (saved-tensor hooks) on 2- and 1-layer random slices of each target shape with LoRA r16
   all-linear, in fp32 and bf16; then, per worker, weights + adapter and AdamW + activations at
   batch 4 x 512 tokens, with and without gradient checkpointing, for 1B/7B/13B bases in fp32,
   bf16, 8-bit and 4-bit, and the smallest common GPU it fits.

    python bench/memory_breakdown.py                      # about 6 min on one core
    python bench/memory_breakdown.py --reps 1 --heldout-rows 4 --plan-tokens 64 --arms now   # smoke size
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Column, Recorder, base_parser, fmt_bytes, markdown_table, median, setup_torch  # noqa: E402
from bench.plan_shapes import GPUS, SHAPES, plan_rows, saved_bytes_per_token_layer  # noqa: E402

MARK = "BENCH_MEMORY_BREAKDOWN "
GOAL = 0.30  # peak RSS of a LoRA round at least 30 % below before
LEAN_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "262144"}
ARMS = {  # name: (code path, gradient checkpointing, extra environment)
    "before": ("before", False, {}),
    "now": ("now", False, {}),
    "now + checkpointing": ("now", True, {}),
    "before + lean malloc": ("before", False, LEAN_MALLOC),
    "now + lean malloc": ("now", False, LEAN_MALLOC),
    "now + checkpointing + lean malloc": ("now", True, LEAN_MALLOC),
}
MEDQUAD_TEST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medquad" / "test.jsonl"


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def use_code_before() -> None:
    """Patch in the code paths as they were before the memory savers (for the ``before`` arms)."""
    import fedpeft.losses as losses
    import fedpeft.trainer as trainer
    import fedpeft.worker as worker
    from fedpeft.data.prompts import IGNORE_INDEX

    def hf_loss(model, batch):  # noqa: ANN001, ANN202  transformers' loss over every position's logits
        n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return (model(**batch).loss * n).reshape(1), n.reshape(1)

    trainer.answer_nll = hf_loss
    losses._plain_head = lambda model: None  # held-out loss: full logits, upcast at answer positions
    worker.recompute_lora_dropout = lambda model: 0
    trainer.release_freed_memory = worker.release_freed_memory = lambda: False


def child_round(args: argparse.Namespace) -> dict:
    """One whole LoRA round (``run_job``) with 2 clients; its first client's memory breakdown."""
    from bench.memory import write_data
    from fedpeft.config import JobConfig
    from fedpeft.memory import rss_bytes
    from fedpeft.simulation import run_job

    imports = rss_bytes()
    folder = Path(tempfile.mkdtemp(prefix="membd-"))
    train, test = write_data(folder, 16, 4)
    cfg = JobConfig.model_validate({
        "job": "breakdown", "workspace": str(folder / "ws"), "run_id": "r",
        "model": {"name": "smollm2-135m-instruct", "devices": "cpu"},
        "data": {"train": str(train), "test": str(test), "max_seq_len": 128},
        "federation": {"num_clients": 2, "rounds": 1},
        "train": {"max_steps": 1, "batch_size": 4, "gradient_checkpointing": args.checkpointing},
        "eval": {"zero_shot": False, "every": 0, "max_samples": 2, "max_new_tokens": 8, "batch_size": 2},
    })
    run_dir = run_job(cfg)
    records = [json.loads(x) for x in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    first = next(c for r in records if r.get("event") == "round" for c in r["clients"])
    return {"imports": imports, **{k: v for k, v in first.items() if k.startswith("memory_")}}


def child_heldout(args: argparse.Namespace) -> dict:
    """The held-out loss of ``--heldout-rows`` test questions at batch 16, max_seq_len 256."""
    from fedpeft.config import JobConfig
    from fedpeft.data.prompts import tokenize_examples
    from fedpeft.evaluation import heldout_loss
    from fedpeft.worker import build_worker

    source = MEDQUAD_TEST if MEDQUAD_TEST.is_file() else Path(__file__).resolve().parents[1] / "fedpeft/data/sample.jsonl"
    rows = [json.loads(x) for x in source.read_text().splitlines() if x.strip()][: args.heldout_rows]
    worker = build_worker(JobConfig.model_validate({"job": "m", "model": {"name": "smollm2-135m-instruct"}}), "cpu")
    tokenized = tokenize_examples(worker.tokenizer, rows, 256, None)
    loss = heldout_loss(worker.model, tokenized, 16, pad_token_id=worker.tokenizer.pad_token_id)
    return {"loss": loss, "source": source.name, "rows": len(rows)}


def run_child(kind: str, arm: str, args: argparse.Namespace) -> dict:
    """``kind`` (round | heldout) of ``arm`` in a fresh process: its VmHWM, CPU seconds and numbers."""
    code, checkpointing, env = ARMS[arm]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--code", code, "--threads", str(args.threads),
           "--heldout-rows", str(args.heldout_rows)]
    cmd += ["--checkpointing"] if checkpointing else []
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        text = out.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child failed ({' '.join(cmd)}):\n{text[-3000:]}")
    line = next(x for x in reversed(text.splitlines()) if x.startswith(MARK))
    return {**json.loads(line[len(MARK):]), "cpu_s": usage.ru_utime + usage.ru_stime}


def measure(kind: str, arm: str, args: argparse.Namespace) -> dict:
    runs = [run_child(kind, arm, args) for _ in range(args.reps)]
    row = {k: v for k, v in runs[0].items() if k not in ("peak", "cpu_s")}
    return {**row, "arm": arm, "peak": median([r["peak"] for r in runs]), "cpu_s": median([r["cpu_s"] for r in runs])}


ROUND_COLUMNS = [
    Column("arm", "code"), Column("peak", "peak RSS (median)", fmt_bytes),
    Column("vs_before", "vs before", lambda v: f"{100 * v:+.1f} %"),
    Column("memory_base_weights_bytes", "base weights", fmt_bytes),
    Column("memory_adapter_optimizer_bytes", "adapter + AdamW", fmt_bytes),
    Column("memory_peak_activation_bytes", "peak during the 1st training", fmt_bytes),
    Column("imports", "after imports", fmt_bytes), Column("cpu_s", "process CPU", lambda v: f"{v:.1f} s"),
]
HELDOUT_COLUMNS = [
    Column("arm", "code"), Column("peak", "peak RSS (median)", fmt_bytes),
    Column("vs_before", "vs before", lambda v: f"{100 * v:+.1f} %"),
    Column("loss", "held-out loss", lambda v: f"{v:.6f}"), Column("cpu_s", "process CPU", lambda v: f"{v:.1f} s"),
]
PLAN_COLUMNS = [
    Column("model", "base"), Column("precision", "precision"), Column("weights", "weights", fmt_bytes),
    Column("adapter", "LoRA r16 + AdamW", fmt_bytes), Column("act", "activations", fmt_bytes),
    Column("act_gc", "activations (checkpointing)", fmt_bytes), Column("total", "total", fmt_bytes),
    Column("total_gc", "total (checkpointing)", fmt_bytes), Column("fits", "fits (no ckpt / ckpt)"),
]


def _with_change(rows: list[dict]) -> list[dict]:
    base = next((r["peak"] for r in rows if r["arm"] == "before"), None)
    return [{**r, "vs_before": (r["peak"] / base - 1) if base else None} for r in rows]


def _parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__)
    p.add_argument("--reps", type=int, default=2, help="fresh processes per arm")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--heldout-rows", type=int, default=32)
    p.add_argument("--plan-tokens", type=int, default=256, help="tokens per slice forward (batch 1)")
    p.add_argument("--child", choices=["round", "heldout"], help=argparse.SUPPRESS)
    p.add_argument("--code", choices=["before", "now"], help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict | None:
    args = _parser().parse_args(argv)
    setup_torch(args.threads)
    if args.child:
        if args.code == "before":
            use_code_before()
        numbers = (child_round if args.child == "round" else child_heldout)(args)
        print(MARK + json.dumps({**numbers, "peak": _vm_hwm()}), flush=True)
        return None
    rec = Recorder("memory_breakdown", argv)
    rounds = _with_change([measure("round", arm, args) for arm in args.arms])
    heldout = _with_change([measure("heldout", arm, args) for arm in ("before", "now") if arm in args.arms])
    per_layer = {name: saved_bytes_per_token_layer(shape, args.plan_tokens) for name, shape in SHAPES.items()}
    plan = plan_rows(per_layer)
    by_arm = {r["arm"]: r for r in rounds}
    cut = 1 - by_arm["now"]["peak"] / by_arm["before"]["peak"] if {"now", "before"} <= by_arm.keys() else None
    md = _markdown(rounds, heldout, per_layer, plan, cut, args)
    return rec.finish(args.results_dir, title="Memory breakdown of a SmolLM2 LoRA round, and a plan for 1B-13B",
                      rows=rounds, markdown=md, params=vars(args) | {"child": None},
                      goal={"text": "peak RSS of a LoRA round ≥ 30 % below before", "met": cut is not None and cut >= GOAL,
                            "cut": cut},
                      extra={"heldout": heldout, "per_layer": per_layer, "plan": plan})


def _markdown(rounds: list[dict], heldout: list[dict], per_layer: dict, plan: list[dict], cut: float | None,
              args: argparse.Namespace) -> str:
    layer_text = "; ".join(f"{name}: {v['fp32'] / 1e3:,.1f} kB (fp32), {v['bf16'] / 1e3:,.1f} kB (bf16)"
                           for name, v in per_layer.items())
    gpus = ", ".join(f"{n} {g} GB" for n, g in GPUS)
    return (
        "**A LoRA round** (SmolLM2-135M, 2 clients, batch 4 × ≤128 tokens; fresh process per row, median of "
        f"{args.reps}; peak RSS = the process's VmHWM):\n\n" + markdown_table(ROUND_COLUMNS, rounds)
        + "\n\n**Held-out loss** of " + (f"{heldout[0]['rows']} questions of {heldout[0]['source']}" if heldout else "–")
        + " at batch 16 × ≤256 tokens:\n\n" + markdown_table(HELDOUT_COLUMNS, heldout)
        + f"\n\n**Memory plan per worker** (LoRA r16 all-linear, batch 4 × 512 tokens, AdamW). Activation bytes per "
        f"token per decoder layer, counted on random slices of each shape ({args.plan_tokens} tokens): {layer_text}. "
        "Checkpointing keeps one layer input (hidden × 2 or 4 B) per layer plus one layer's activations. 8-bit: "
        "1 B per linear weight + an fp32 scale per row; 4-bit: nf4 with double quantisation, 0.516 B per linear "
        "weight; the embeddings, head and norms are kept in fp32 by PEFT's `prepare_model_for_kbit_training` "
        "(counted). Totals add 1 GB for the CUDA "
        f"context and allocator; 'fits' is the smallest of {gpus} with 10 % to spare.\n\n"
        + markdown_table(PLAN_COLUMNS, plan)
        + (f"\n\nPeak RSS of the round, now vs before: {100 * cut:.1f} % lower (goal ≥ 30 %)." if cut is not None else "")
    )


if __name__ == "__main__":
    main()
