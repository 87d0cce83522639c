"""GPU-only paths, one line per check: bf16 training, 4-bit and 8-bit QLoRA, workers per device,
peak GPU memory, tokens/s next to the CPU. Run by ``bench/gpu_check.sh`` (<= 8 minutes on one GPU).

    python bench/gpu_check.py --check bf16|4bit|8bit|workers|speed [--steps 20]

Each check prints ``CHECK <name>: ok|FAIL <numbers>`` and exits non-zero on failure; the shell
script runs them one by one (a crash in one does not hide the others).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = [{"question": f"What are the symptoms of condition {i}?",
         "answer": f"Condition {i} causes fever, cough and tiredness; see a doctor if it lasts."} for i in range(32)]


def _worker(model: dict, device: str, train: dict | None = None):
    from fedpeft.config import validate_tree
    from fedpeft.worker import build_worker

    job = {"model": {"name": "smollm2-135m-instruct", **model}, "peft": {"method": "lora", "r": 16},
           "train": train or {}}
    return build_worker(validate_tree(job), device)


def _train(worker, steps: int, bf16: bool = False) -> tuple[float, float, float]:
    """(first loss, last loss, training tokens per second) over ``steps`` steps of batch 4."""
    import torch

    from fedpeft.adapters import get_trainable_state
    from fedpeft.config import TrainConfig
    from fedpeft.data.prompts import tokenize_examples
    from fedpeft.evaluation import heldout_loss
    from fedpeft.trainer import fit

    examples = tokenize_examples(worker.tokenizer, ROWS, 128)
    before = heldout_loss(worker.model, examples, pad_token_id=worker.tokenizer.pad_token_id)
    if worker.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fit(worker.model, examples, TrainConfig(max_steps=steps, batch_size=4, learning_rate=1e-3, bf16=bf16,
                                            local_epochs=steps), get_trainable_state(worker.model), seed=0,
        pad_token_id=worker.tokenizer.pad_token_id, progress=False)
    if worker.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    after = heldout_loss(worker.model, examples, pad_token_id=worker.tokenizer.pad_token_id)
    tokens = steps * 4 * sum(len(e.input_ids) for e in examples) / len(examples)
    return before, after, tokens / seconds


def _peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def check(name: str, steps: int) -> bool:
    import torch

    if not torch.cuda.is_available():
        print(f"CHECK {name}: FAIL no CUDA device visible (torch {torch.__version__})")
        return False
    if name in ("bf16", "4bit", "8bit"):
        model = {"dtype": "bfloat16"} if name == "bf16" else {"quantization": name, "dtype": "bfloat16"}
        torch.cuda.reset_peak_memory_stats()
        before, after, tps = _train(_worker(model, "cuda:0"), steps, bf16=name == "bf16")
        ok = after < before
        print(f"CHECK {name}: {'ok' if ok else 'FAIL'} loss {before:.3f} -> {after:.3f} over {steps} steps, "
              f"{tps:.0f} train tok/s, peak {_peak_gb():.2f} GiB")
        return ok
    if name == "workers":
        from fedpeft.models import resolve_devices

        devices = resolve_devices("auto")
        peaks = []
        for d in devices:
            torch.cuda.reset_peak_memory_stats(d)
            _train(_worker({}, d), 2)
            peaks.append(torch.cuda.max_memory_allocated(d) / 2**30)
        print(f"CHECK workers: ok {len(devices)} worker(s) on {devices}, peak GiB {[round(p, 2) for p in peaks]}")
        return bool(devices)
    if name == "speed":
        from fedpeft.generation import run_generation

        out = []
        for device in ("cuda:0", "cpu"):
            worker = _worker({}, device)
            _, _, tps = _train(worker, 4)
            gen = run_generation(worker.model, worker.tokenizer, [r["question"] for r in ROWS[:8]],
                                 max_new_tokens=64, progress=False)
            out.append((device, tps, gen.num_tokens / gen.seconds))
        (g, gt, gg), (c, ct, cg) = out
        print(f"CHECK speed: ok train {gt:.0f} vs {ct:.0f} tok/s ({gt / ct:.1f}x), generate {gg:.0f} vs {cg:.0f} "
              f"tok/s ({gg / cg:.1f}x) on {g} vs {c}")
        return True
    raise SystemExit(f"unknown check {name!r}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", required=True, choices=["bf16", "4bit", "8bit", "workers", "speed"])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    sys.exit(0 if check(args.check, args.steps) else 1)
