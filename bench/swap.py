"""Adapter swap vs reload: switching the worker to another client's adapter, two ways.

* **swap** (what the scheduler does): copy the client's adapter state into the one PEFT model
  the worker holds (``set_trainable_state``); the base model stays where it is. Shown also with
  the copy out (``get_trainable_state``) that returns a trained update, in either design.
* **reload** (what a per-client model would cost): re-create the model with the client's
  adapter from disk, ``fedpeft.adapters.load_adapter`` (base model from the local safetensors
  cache, then ``PeftModel.from_pretrained``). The files are in the page cache after a warm-up
  load, so this is the best case for reloading.

Both are checked to give the same logits on a fixed prompt. Each repetition times one reload
and a burst of swaps, and the ratio is taken per repetition (same load on the machine).

    python bench/swap.py                        # default model, 5 repetitions
    python bench/swap.py --model tiny --reps 2  # smoke size
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MODELS, PEFT_VARIANTS, Column, Recorder, base_parser, fmt_seconds, markdown_table, median, setup_torch, spread,
    timed,
)

GOAL = 50.0  # swap at least this many times faster than reload


def _client_states(state: dict, n: int) -> list[dict]:
    """``n`` distinct adapter states shaped like ``state`` (stand-ins for trained clients)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    return [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()} for _ in range(n)]


def _logits(model, ids) -> "torch.Tensor":  # noqa: F821
    import torch

    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float()


def measure(model_name: str, peft: dict, reps: int, swaps: int) -> dict:
    """Median swap and reload times for one PEFT method, and their per-repetition ratio."""
    import torch

    from fedpeft.adapters import load_adapter, save_adapter
    from fedpeft.adapters import get_trainable_state, set_trainable_state
    from fedpeft.config import JobConfig
    from fedpeft.worker import build_worker

    cfg = JobConfig.model_validate({"model": {"name": model_name, "devices": "cpu"}, "peft": peft})
    worker = build_worker(cfg, "cpu")
    model = worker.model
    states = _client_states(get_trainable_state(model), 4)
    ids = torch.tensor([worker.tokenizer("What are the symptoms of anemia?")["input_ids"]])
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        save_adapter(model, states[1], adapter, cfg)
        load_adapter(adapter)  # warm-up: page cache, lazy imports
        swap_in, swap_both, reload, ratios, ratios_both = [], [], [], [], []
        for _ in range(reps):
            t_reload, (reloaded, _) = timed(lambda: load_adapter(adapter))
            ins, both = [], []
            for i in range(swaps):
                ins.append(timed(lambda: set_trainable_state(model, states[i % len(states)]))[0])
                both.append(timed(lambda: (get_trainable_state(model), set_trainable_state(model, states[1])))[0])
            reload.append(t_reload)
            swap_in.append(median(ins))
            swap_both.append(median(both))
            ratios.append(t_reload / median(ins))
            ratios_both.append(t_reload / median(both))
        set_trainable_state(model, states[1])
        diff = float((_logits(model, ids) - _logits(reloaded.eval(), ids)).abs().max())
    return {
        "swap_in_s": median(swap_in), "swap_s": median(swap_both), "reload_s": median(reload),
        "reload_range_s": spread(reload), "swap_range_s": spread(swap_both),
        "ratio": median(ratios), "ratio_range": spread(ratios), "ratio_both": median(ratios_both),
        "ratio_both_range": spread(ratios_both), "max_logit_diff": diff,
        "goal_met": median(ratios) >= GOAL,
    }


COLUMNS = [
    Column("method", "PEFT method"),
    Column("swap_in_s", "swap in", fmt_seconds),
    Column("swap_s", "swap out + in", fmt_seconds),
    Column("reload_s", "reload from disk", fmt_seconds),
    Column("ratio", "reload ÷ swap in", "{:,.0f}×"),
    Column("ratio_range", "min–max", lambda r: f"{r[0]:,.0f}–{r[1]:,.0f}×"),
    Column("ratio_both", "reload ÷ swap out + in", "{:,.0f}×"),
    Column("ratio_both_range", "min–max", lambda r: f"{r[0]:,.0f}–{r[1]:,.0f}×"),
    Column("max_logit_diff", "max logit diff", "{:.1e}"),
]


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--model", choices=sorted(MODELS), default="default")
    p.add_argument("--reps", type=int, default=5, help="repetitions (one reload + a burst of swaps each)")
    p.add_argument("--swaps", type=int, default=20, help="swaps timed per repetition")
    args = p.parse_args(argv)
    rec = Recorder("swap", argv)
    setup_torch(args.threads)
    rows = [{"method": name, **measure(MODELS[args.model], peft, args.reps, args.swaps)}
            for name, peft in PEFT_VARIANTS.items()]
    met = all(r["goal_met"] for r in rows)
    met_both = all(r["ratio_both"] >= GOAL for r in rows)
    md = markdown_table(COLUMNS, rows)
    md += (f"\n\nModel `{MODELS[args.model]}`; medians of {args.reps} repetitions, each one reload and "
           f"{args.swaps} swaps; ratios are taken within each repetition. 'swap in' "
           "(`set_trainable_state`) is the switch itself, the counterpart of a reload; 'out + in' adds "
           "`get_trainable_state`, which the trainer calls after training to return the update in either "
           "design. 'max logit diff': swapped vs reloaded model on the same prompt (same adapter). Goal: "
           f"swap in ≥ 50× faster than reload: **{'met' if met else 'missed'}**"
           + ("" if met_both else "; with the copy out as well: **missed** for "
              + ", ".join(r["method"] for r in rows if r["ratio_both"] < GOAL)) + ".")
    return rec.finish(
        args.results_dir, title="Adapter swap vs reload", rows=rows, markdown=md,
        params={"model": MODELS[args.model], "reps": args.reps, "swaps": args.swaps, "variants": PEFT_VARIANTS},
        goal={"text": "swap in ≥ 50× faster than reload", "met": met, "met_out_and_in": met_both,
              "min_ratio": min(r["ratio"] for r in rows), "min_ratio_out_and_in": min(r["ratio_both"] for r in rows)},
    )


if __name__ == "__main__":
    main()
