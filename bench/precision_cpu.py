"""Base precisions on this CPU: SmolLM2 + LoRA r16 trained in fp32, bf16, 8-bit and 4-bit (QLoRA).

Each arm is a fresh process that builds the worker (``model.dtype`` / ``model.quantization``),
measures the loss on 32 short medical rows, trains ``--steps`` optimizer steps of batch 4 on
them (``fedpeft.trainer.fit``, lr 1e-3) and measures the loss again: the loss must fall. Reported
with the training speed (CPU seconds per step), the process's peak RSS (VmHWM) and the base
weights' bytes as stored. bitsandbytes >= 0.50 runs 4-bit and 8-bit on CPU; this measures it.
The same steps on a GPU are ``bench/gpu_check.sh``'s.

    python bench/precision_cpu.py                 # about 10 min on one core
    python bench/precision_cpu.py --steps 2 --arms fp32 4bit   # smoke size
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Column, Recorder, base_parser, fmt_bytes, markdown_table, setup_torch  # noqa: E402

MARK = "BENCH_PRECISION "
ARMS = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "8bit": {"quantization": "8bit"},
        "4bit": {"quantization": "4bit", "quant_type": "nf4", "double_quant": True}}


def child(arm: str, steps: int) -> dict:
    """One arm in this process: the loss before and after ``steps`` steps, CPU per step, weights."""
    from bench.gpu_check import ROWS, _worker
    from fedpeft.adapters import get_trainable_state
    from fedpeft.config import TrainConfig
    from fedpeft.data.prompts import tokenize_examples
    from fedpeft.evaluation import heldout_loss
    from fedpeft.memory import weight_bytes
    from fedpeft.trainer import fit

    worker = _worker(ARMS[arm], "cpu")
    examples = tokenize_examples(worker.tokenizer, ROWS, 128)
    pad = worker.tokenizer.pad_token_id
    before = heldout_loss(worker.model, examples, pad_token_id=pad)
    cpu, wall = time.process_time(), time.perf_counter()
    fit(worker.model, examples, TrainConfig(max_steps=steps, batch_size=4, learning_rate=1e-3, local_epochs=steps),
        get_trainable_state(worker.model), seed=0, pad_token_id=pad, progress=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    after = heldout_loss(worker.model, examples, pad_token_id=pad)
    return {"before": before, "after": after, "cpu_per_step": cpu / steps, "wall_per_step": wall / steps,
            "weights": weight_bytes(worker.model)[0]}


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_arm(arm: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--steps", str(args.steps),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        return {"arm": arm, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:200]}
    row = {"arm": arm, **json.loads(line[len(MARK):])}
    return {**row, "falls": row["after"] < row["before"]}


COLUMNS = [
    Column("arm", "base"), Column("weights", "base weights", fmt_bytes),
    Column("before", "loss before", lambda v: f"{v:.4f}"), Column("after", "after", lambda v: f"{v:.4f}"),
    Column("falls", "falls", lambda v: "yes" if v else "**no**"),
    Column("cpu_per_step", "CPU s / step", lambda v: f"{v:.2f}"), Column("wall_per_step", "wall s / step",
                                                                          lambda v: f"{v:.2f}"),
    Column("peak", "peak RSS", fmt_bytes), Column("error", "error"),
]


def main(argv: list[str] | None = None) -> dict | None:
    p = base_parser(__doc__)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--child", choices=list(ARMS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    setup_torch(args.threads)
    if args.child:
        print(MARK + json.dumps({**child(args.child, args.steps), "peak": _vm_hwm()}), flush=True)
        return None
    rec = Recorder("precision_cpu", argv)
    rows = [run_arm(arm, args) for arm in args.arms]
    ok = all(r.get("falls") for r in rows)
    md = markdown_table(COLUMNS, rows) + (
        f"\n\nSmolLM2-135M-Instruct + LoRA r16 all-linear on CPU ({args.threads} torch thread(s)): the loss on the 32 "
        f"training rows of `bench/gpu_check.py` before and after {args.steps} optimizer steps of batch 4 (lr 1e-3), "
        "one fresh process per base precision; 8-bit and 4-bit through bitsandbytes (nf4, double quantisation; "
        "compute in fp32 here), adapters fp32 in every arm. Peak RSS is the process's VmHWM.")
    return rec.finish(args.results_dir, title="Base precisions on CPU: fp32, bf16, 8-bit, 4-bit", rows=rows,
                      markdown=md, params={k: v for k, v in vars(args).items() if k != "child"},
                      goal={"text": "the loss falls in every precision on CPU", "met": ok})


if __name__ == "__main__":
    main()
