"""Scaling on paper: what one round costs with 4, 16 and 64 sites for a 7B model on A100s.

A projection, not a measurement: every assumption is a command-line option and is printed with
the table. What is measured or computed exactly:

* **Update size**, exactly: the adapter is built on a Llama-2-7B-shaped model on the ``meta``
  device (no memory, no weights) and its trainable parameters counted, as the trainer sends them
  (fp32). The same code on SmolLM2's shape must give the bytes ``communication.py`` measured.
* **Aggregation and checkpoint throughput**, measured here in CPU time: FedAvg over K updates
  (``fedpeft.aggregators``), extrapolated linearly in K (it is one pass over K × update bytes).
* **Federation overhead** of the round loop: the measured share of a round spent outside
  ``fit`` (``bench/results/overhead.json``, default model), added to local training.
* **Per-client step time** of the default model on this CPU (``overhead.json``), shown beside the
  FLOP model's prediction for this CPU, as a check of the FLOP model's form only: the A100 step
  time comes from the FLOP model with the stated peak and utilisation.

Assumed: FLOPs per trained token = 4 × parameters (forward 2N, backward through frozen weights
2N; LoRA's own FLOPs negligible), bf16 on A100 (312 TFLOP/s dense peak) at the stated model FLOP
utilisation, one A100 per site, sites train in parallel, the server receives every update over
one link (uploads share it) and each site has its own link for the download.

    python bench/scaling.py
    python bench/scaling.py --sites 4 --site-steps 10   # smoke size
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Column, Recorder, base_parser, fmt_bytes, fmt_seconds, load_result, markdown_table, median, setup_torch,
)

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
ADAPTERS = {
    "LoRA all-linear r16": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    "LoRA q/v r8": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
}
A100_BF16_PEAK = 312e12  # dense bf16 tensor-core FLOP/s (NVIDIA A100 datasheet)


def count_params(shape: dict, lora: dict) -> tuple[int, int]:
    """(model parameters, adapter trainable parameters) of a Llama of ``shape``, built on ``meta``."""
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    total = sum(p.numel() for p in model.parameters())
    wrapped = peft.get_peft_model(model, peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, **lora))
    return total, sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def aggregation_seconds_per_byte(update_bytes: int, k: int = 4, reps: int = 3) -> tuple[float, float]:
    """Measured CPU seconds per byte of K updates for FedAvg, and for writing a checkpoint of one.

    CPU time of this process, not wall time: on a shared machine other jobs stretch wall time
    several-fold, and a server would not share its cores.
    """
    import tempfile
    import time

    import torch

    from fedpeft.aggregators import aggregate, build_aggregator
    from fedpeft.checkpoint import save_checkpoint
    from fedpeft.state import ClientUpdate

    n = update_bytes // 4
    shapes = [n // 64] * 64  # 64 tensors, like a LoRA state's many matrices
    state = {f"t{i}": torch.zeros(s) for i, s in enumerate(shapes)}
    updates = [ClientUpdate(f"c{j}", {key: torch.randn(v.shape) for key, v in state.items()}, 10) for j in range(k)]
    agg = build_aggregator("fedavg", {})
    def cpu(fn) -> float:  # noqa: ANN001
        start = time.process_time()
        fn()
        return time.process_time() - start

    agg_t = median([cpu(lambda: aggregate(agg, state, updates)) for _ in range(reps)])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_t = median([cpu(lambda: save_checkpoint(Path(tmp), 1, state, {})) for _ in range(reps)])
    return agg_t / (k * n * 4), ckpt_t / (n * 4)


def measured_inputs(results_dir: Path) -> dict:
    """Per-client step time and overhead share of the default model from ``overhead.json``."""
    res = load_result("overhead", results_dir)
    rows = [r for r in (res or {}).get("rows", []) if r["model"] == "smollm2-135m-instruct"]
    if not rows:
        return {}
    r = rows[0]
    p = res["params"]
    steps = r["clients"] * r["steps_per_client"] * r.get("rounds", 1)
    return {"step_s": r["pure_s"] / steps, "overhead": r["outside_steps"],
            "tokens_per_step": p["batch_size"] * p["max_seq_len"], "source": "bench/results/overhead.json",
            "threads": res["machine"]["torch_threads"], "loadavg": res["loadavg_start"]}


def project(args, update_bytes: int, params_7b: int, agg_s_per_b: float, ckpt_s_per_b: float,
            overhead: float) -> list[dict]:
    """One row per number of sites."""
    tokens = args.batch_size * args.seq_len
    step_s = 4 * params_7b * tokens / (A100_BF16_PEAK * args.mfu)
    train_s = args.site_steps * step_s * (1 + overhead)
    rows = []
    for k in args.sites:
        down_s = update_bytes * 8 / (args.site_mbps * 1e6)
        up_s = max(update_bytes * 8 / (args.site_mbps * 1e6), k * update_bytes * 8 / (args.server_mbps * 1e6))
        agg_s = k * update_bytes * agg_s_per_b + update_bytes * ckpt_s_per_b
        wall = down_s + train_s + up_s + agg_s
        rows.append({
            "sites": k, "update_bytes": update_bytes, "round_bytes": 2 * k * update_bytes, "step_s": step_s,
            "train_s": train_s, "comm_s": down_s + up_s, "server_s": agg_s, "round_s": wall,
            "gpu_hours": k * train_s / 3600, "comm_share": (down_s + up_s) / wall,
            "one_gpu_s": k * train_s + agg_s,  # fedpeft's in-process simulation of every site on one A100
        })
    return rows


COLUMNS = [
    Column("sites", "sites"),
    Column("round_bytes", "bytes / round", fmt_bytes),
    Column("train_s", "local training", fmt_seconds),
    Column("comm_s", "down + up", fmt_seconds),
    Column("server_s", "aggregate + checkpoint", fmt_seconds),
    Column("round_s", "round wall time", fmt_seconds),
    Column("comm_share", "comm. share", lambda v: f"{100 * v:.1f} %"),
    Column("gpu_hours", "A100-hours / round", "{:.2f}"),
    Column("one_gpu_s", "all sites simulated on 1 A100", fmt_seconds),
]


def _parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__)
    p.add_argument("--sites", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--site-steps", type=int, default=250,
                   help="optimizer steps per site per round (250 = one epoch of 1,000 examples at batch 4)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per example (padded)")
    p.add_argument("--mfu", type=float, default=0.35, help="model FLOP utilisation assumed on the A100")
    p.add_argument("--site-mbps", type=float, default=100.0, help="each site's link, Mbit/s, both directions")
    p.add_argument("--server-mbps", type=float, default=1000.0, help="the server's link, Mbit/s, shared by uploads")
    return p


def check_counting(results_dir: Path) -> dict:
    """Count SmolLM2's adapter on ``meta`` and compare with ``communication.py``'s measurement.

    Raises:
        AssertionError: if they differ (the 7B count would then be wrong too).
    """
    total, counted = count_params(SMOLLM2_135M, ADAPTERS["LoRA all-linear r16"])
    comm = load_result("communication", results_dir)
    out = {"smollm2_params": total, "smollm2_counted": counted}
    if comm and comm["params"]["model"] == "smollm2-135m-instruct":
        measured = next(r for r in comm["rows"] if r["method"] == "LoRA all-linear r16")["trainable_params"]
        if counted != measured:
            raise AssertionError(f"meta-device count {counted} != measured {measured}")
        out["smollm2_measured"] = measured
    return out


def caption(args: argparse.Namespace, sizes: dict, rows: list[dict], qv: list[dict], speeds: tuple[float, float],
            inputs: dict, small_params: int) -> str:
    """The assumptions and inputs under the table."""
    params_7b, lora = sizes["LoRA all-linear r16"]
    text = (f"Llama-2-7B shape ({params_7b / 1e9:.2f} B parameters), LoRA r16 all-linear: {lora:,} trainable "
            f"parameters, {fmt_bytes(lora * 4)} per update (fp32); with LoRA q/v r8 ({sizes['LoRA q/v r8'][1]:,} "
            f"parameters, {fmt_bytes(sizes['LoRA q/v r8'][1] * 4)}) the {qv[-1]['sites']}-site round sends "
            f"{fmt_bytes(qv[-1]['round_bytes'])} and takes {fmt_seconds(qv[-1]['round_s'])}. "
            f"Assumptions: {args.site_steps} steps of {args.batch_size} × {args.seq_len} tokens per site per round; "
            f"4 × params FLOPs per token; A100 bf16 {A100_BF16_PEAK / 1e12:.0f} TFLOP/s at {100 * args.mfu:.0f} % "
            f"utilisation → {rows[0]['step_s']:.2f} s per step; one A100 per site, sites in parallel; site links "
            f"{args.site_mbps:g} Mbit/s, server link {args.server_mbps:g} Mbit/s shared by the uploads; no "
            "stragglers, retries or secure aggregation. Aggregation and checkpoint speed measured on this machine "
            f"in CPU time ({1 / speeds[0] / 1e9:.2f} GB/s FedAvg, {1 / speeds[1] / 1e9:.2f} GB/s checkpoint), on "
            "one server core, not overlapped with uploads. Memory: one bf16 7B base (13.5 GB) + adapter, AdamW "
            "state and activations fits a 40 GB A100; the simulation keeps one base model per GPU whatever the "
            "number of sites.")
    if inputs:
        flops = 4 * small_params * inputs["tokens_per_step"]
        text += (f" Measured on this CPU ({inputs['source']}): SmolLM2-135M with LoRA, {inputs['tokens_per_step']} "
                 f"tokens per step, {inputs['step_s']:.1f} s per step, i.e. {flops / inputs['step_s'] / 1e9:.1f} "
                 f"GFLOP/s by the same FLOP model ({inputs['threads']} thread(s), load average "
                 f"{inputs['loadavg'][0]}); share of a round outside `fit`: {100 * inputs['overhead']:.2f} % "
                 "(added to local training above).")
    return text


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    rec = Recorder("scaling", argv)
    setup_torch(args.threads)
    check = check_counting(args.results_dir)
    sizes = {name: count_params(LLAMA2_7B, lora) for name, lora in ADAPTERS.items()}
    params_7b, main_bytes = sizes["LoRA all-linear r16"][0], sizes["LoRA all-linear r16"][1] * 4
    speeds = aggregation_seconds_per_byte(main_bytes // 8)  # measured on 1/8 of an update: linear in bytes
    inputs = measured_inputs(args.results_dir)
    overhead = inputs.get("overhead", 0.0)
    rows = project(args, main_bytes, params_7b, *speeds, overhead)
    qv = project(args, sizes["LoRA q/v r8"][1] * 4, params_7b, *speeds, overhead)
    md = markdown_table(COLUMNS, rows) + "\n\n" + caption(args, sizes, rows, qv, speeds, inputs,
                                                           check["smollm2_params"])
    return rec.finish(
        args.results_dir, title="Scaling on paper: a round of a 7B model on A100s", rows=rows, markdown=md,
        params={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        extra={"inputs": inputs, "check": check, "adapter_sizes": sizes, "qv_rows": qv,
               "agg_s_per_byte": speeds[0], "ckpt_s_per_byte": speeds[1]},
    )


if __name__ == "__main__":
    main()
