"""Local training of one client: ``fit`` on plain tensors, no threads, no network.

Both runtimes call this: the in-process simulation (through the device scheduler) and the
Flower ClientApp. The same global state, data, config and seed give the same update.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from fedpeft.adapters import (
    get_trainable_state,
    set_trainable_state,
    trainable_parameters,
)
from fedpeft.config import PrivacyConfig, TrainConfig
from fedpeft.constants import KEY_DEVICE, KEY_SECONDS, KEY_STEPS, KEY_TRAIN_LOSS
from fedpeft.data.prompts import TokenizedExample, collate
from fedpeft.errors import TrainingError
from fedpeft.losses import answer_nll
from fedpeft.memory import breakdown_once, release_freed_memory
from fedpeft.state import ClientUpdate, State

log = logging.getLogger(__name__)


def _batches(n: int, batch_size: int, epochs: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled index batches for every local epoch (a fresh permutation each epoch)."""
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator).tolist()
        out += [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    return out


def _group_sizes(num_micro: int, grad_accum: int) -> list[int]:
    """For each micro-batch, how many micro-batches its accumulation group holds.

    Every group holds ``grad_accum`` micro-batches except perhaps the last (``num_micro`` need
    not divide evenly); dividing each loss by its own group's size makes every optimizer step's
    gradient the mean over the micro-batches it actually saw.
    """
    return [min(grad_accum, num_micro - i // grad_accum * grad_accum) for i in range(num_micro)]


def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("bf16 requested but %s does not support it; training in fp32", device)
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _proximal_term(params: dict[str, nn.Parameter], anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """FedProx (Li et al. 2020): sum over adapter parameters of ||w - w_global||^2."""
    return sum(((p - anchor[n]) ** 2).sum() for n, p in params.items())


def num_optimizer_steps(num_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps one client takes in one round with ``num_examples`` examples."""
    micro = math.ceil(num_examples / cfg.batch_size) * cfg.local_epochs
    steps = math.ceil(micro / cfg.grad_accum)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def fit(
    model: nn.Module,
    examples: list[TokenizedExample],
    cfg: TrainConfig,
    global_state: State,
    *,
    seed: int,
    pad_token_id: int,
    client_id: str = "client",
    progress: bool = True,
    privacy: PrivacyConfig | None = None,
    rounds: int = 1,
    shares: int = 1,
) -> ClientUpdate:
    """Train the model's adapter on ``examples`` starting from ``global_state``.

    Args:
        model: A PEFT-wrapped model whose only trainable parameters are the adapter's.
        examples: The client's tokenized examples (tokenized once, reused every round).
        cfg: Local training hyperparameters.
        global_state: The global adapter sent by the server; copied into the model first.
        seed: Seeds shuffling and dropout, so a round can be replayed exactly (resume).
        pad_token_id: Token id used to pad batches (labels mask padding by position).
        client_id: Name used in the update and the progress bar.
        progress: Show a progress bar over optimizer steps.
        privacy: Differential privacy (``level: example``: DP-SGD steps; ``client``: the update
            clipped and noised before it leaves, with weight 1); ``None``: none.
        rounds: The job's rounds (example level calibrates its noise over them).
        shares: Clients sampled this round (client level: each adds its share of the noise).

    Returns:
        The client's update: its new adapter state, weight (example count) and training metrics.
    """
    set_trainable_state(model, global_state)  # swap the global adapter in
    anchor = global_state if cfg.fedprox_mu > 0 else None
    level = privacy.level if privacy is not None else "none"
    steps = local_steps
    if level == "example":
        from fedpeft.privacy.example_level import private_steps

        steps = private_steps(privacy, len(examples), cfg, rounds)
    longest = max((len(ex.input_ids) for ex in examples), default=0)
    with breakdown_once(model, client_id, cfg.batch_size, longest) as memory:  # logged once per worker
        metrics = steps(model, examples, cfg, seed=seed, pad_token_id=pad_token_id, anchor=anchor,
                        client_id=client_id, progress=progress)
    metrics = {**metrics, **memory}
    release_freed_memory()  # what the allocator kept from the step's activations
    state, weight = get_trainable_state(model), len(examples)  # and out
    if level == "client":
        from fedpeft.privacy.client_level import release

        state, dp_metrics = release(state, global_state, privacy, shares, seed)
        metrics, weight = {**metrics, **dp_metrics, "examples": len(examples)}, 1
    return ClientUpdate(client_id, state, weight, metrics)


def local_steps(
    model: nn.Module,
    examples: list[TokenizedExample],
    cfg: TrainConfig,
    *,
    seed: int,
    pad_token_id: int,
    anchor: State | None = None,
    client_id: str = "client",
    progress: bool = True,
) -> dict[str, float | int | str]:
    """The optimizer steps of one client's round on the adapter the model holds now.

    Args:
        anchor: The global state FedProx pulls towards (``cfg.fedprox_mu > 0``).
        Others: as in :func:`fit`.

    Returns:
        Training metrics: mean loss, steps, seconds, tokens/s, device.
    """
    device = next(model.parameters()).device
    params = trainable_parameters(model)
    anchor = {n: t.to(device) for n, t in anchor.items()} if anchor is not None else {}
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(len(examples), cfg.batch_size, cfg.local_epochs, generator)
    total_steps = num_optimizer_steps(len(examples), cfg)
    batches = batches[: total_steps * cfg.grad_accum]
    group_sizes = _group_sizes(len(batches), cfg.grad_accum)
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    model.train()
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)  # dropout masks
        bar = tqdm(total=total_steps, desc=f"train {client_id}", leave=False, disable=not progress)
        for i, idx in enumerate(batches):
            batch = {k: v.to(device) for k, v in collate([examples[j] for j in idx], pad_token_id).items()}
            with _autocast(device, cfg.bf16):
                sums, counts = answer_nll(model, batch)  # no full-vocabulary logits (fedpeft.losses)
                loss = sums.sum() / counts.sum().clamp(min=1)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise TrainingError(f"client {client_id}: the training loss is {losses[-1]} at micro-batch {i + 1} "
                                    f"of {len(batches)}; lower train.learning_rate, set train.max_grad_norm, or "
                                    "check this client's data")
            tokens += int(batch["attention_mask"].sum())
            if cfg.fedprox_mu > 0:
                loss = loss + cfg.fedprox_mu / 2 * _proximal_term(params, anchor)
            (loss / group_sizes[i]).backward()
            if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(batches):
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
        bar.close()
    model.eval()
    seconds = time.perf_counter() - start
    return {
        KEY_TRAIN_LOSS: sum(losses) / max(len(losses), 1),
        KEY_STEPS: total_steps,
        KEY_SECONDS: round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0,
        KEY_DEVICE: str(device),
    }
