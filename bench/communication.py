"""Communication: bytes of one client update and of one round, per PEFT method, vs the full model.

Only the adapter's trainable parameters travel (fp32). For each method this script wraps the
base model, takes the trainable state exactly as the trainer returns it, and counts its bytes
three ways: raw tensor bytes (``state_nbytes``, what ``metrics.jsonl`` reports), the safetensors
file the checkpoint writes, and the Flower ``ArrayRecord`` the deployment sends. A round sends
the global adapter down to every sampled client and one update back up from each.

    python bench/communication.py                      # default model, 4 clients
    python bench/communication.py --model tiny --ranks 4   # smoke size
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import MODELS, Column, Recorder, base_parser, fmt_bytes, markdown_table, setup_torch  # noqa: E402


def variants(ranks: list[int]) -> dict[str, dict]:
    """The PEFT settings compared: LoRA q/v and all-linear at each rank, and P-Tuning."""
    out: dict[str, dict] = {}
    for targets, label in ((["q_proj", "v_proj"], "q/v"), ("all-linear", "all-linear")):
        for r in ranks:
            out[f"LoRA {label} r{r}"] = {"method": "lora", "r": r, "alpha": 2 * r, "target_modules": targets}
    out["P-Tuning (20 tokens, MLP 128)"] = {"method": "ptuning", "num_virtual_tokens": 20, "encoder_hidden_size": 128}
    return out


def measure(model_name: str, peft: dict, clients: int) -> dict:
    """Bytes of one update and one round for ``peft`` on a fresh copy of the base model."""
    import torch
    from safetensors.torch import save as st_save

    from fedpeft.adapters import get_trainable_state, num_parameters, state_nbytes
    from fedpeft.config import ModelConfig
    from fedpeft.deploy.records import state_to_record
    from fedpeft.models import load_base_model
    from fedpeft.peft_methods import build_peft_method, wrap_model

    base, _ = load_base_model(ModelConfig(name=model_name))
    full_params = sum(p.numel() for p in base.parameters())  # tied embeddings counted once
    params = {k: v for k, v in peft.items() if k != "method"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = wrap_model(base, build_peft_method(peft["method"], params))
    state = get_trainable_state(model)
    update = state_nbytes(state)
    return {
        "trainable_params": num_parameters(state), "full_params": full_params,
        "pct_trainable": 100 * num_parameters(state) / full_params, "tensors": len(state),
        "update_bytes": update, "safetensors_bytes": len(st_save({k: v.contiguous() for k, v in state.items()})),
        "flower_bytes": state_to_record(state).count_bytes(),
        "round_bytes": 2 * clients * update,  # global adapter down + one update up, per client
        "full_model_bytes": full_params * 4, "full_round_bytes": 2 * clients * full_params * 4,
        "ratio": full_params * 4 / update,
    }


COLUMNS = [
    Column("method", "PEFT method"),
    Column("trainable_params", "trainable params", "{:,}"),
    Column("pct_trainable", "% of model", "{:.2f} %"),
    Column("update_bytes", "one update (fp32)", fmt_bytes),
    Column("flower_bytes", "as Flower record", fmt_bytes),
    Column("round_bytes", "round, down + up", fmt_bytes),
    Column("full_round_bytes", "round, full model", fmt_bytes),
    Column("ratio", "full model ÷ update", "{:,.0f}×"),
]


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--model", choices=sorted(MODELS), default="default")
    p.add_argument("--clients", type=int, default=4, help="clients per round")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16], help="LoRA ranks")
    args = p.parse_args(argv)
    rec = Recorder("communication", argv)
    setup_torch(args.threads)
    rows = [{"method": name, **measure(MODELS[args.model], peft, args.clients)}
            for name, peft in variants(args.ranks).items()]
    full = rows[0]["full_model_bytes"]
    md = markdown_table(COLUMNS, rows)
    md += (f"\n\nModel `{MODELS[args.model]}`: {rows[0]['full_params']:,} parameters, {fmt_bytes(full)} in fp32. "
           f"A round is {args.clients} clients × (global adapter down + update up). "
           "'as Flower record' adds the `.npy` headers the deployment sends.")
    return rec.finish(
        args.results_dir, title="Communication: bytes per update and per round", rows=rows, markdown=md,
        params={"model": MODELS[args.model], "clients": args.clients, "ranks": args.ranks,
                "variants": variants(args.ranks)},
    )


if __name__ == "__main__":
    main()
