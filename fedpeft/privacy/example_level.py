"""Example-level DP-SGD in a client's local training (Abadi et al. 2016, arXiv:1607.00133), with Opacus.

Each step draws a Poisson batch (every example joins independently with probability
``q = batch_size * grad_accum / num_examples``, capped at 1: Opacus's
``UniformWithReplacementSampler``, the sampling the accountant in
:mod:`fedpeft.privacy.accounting` assumes), computes every example's gradient of the adapter
parameters (Opacus ``GradSampleHooks``), clips each to ``privacy.max_grad_norm``, sums them,
adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` and divides by the *expected*
batch size ``q * num_examples`` (Opacus ``DPOptimizer``; dividing by the actual size would leak
it) before an AdamW step. A round takes :func:`fedpeft.trainer.num_optimizer_steps` such steps.

Differences from :func:`fedpeft.trainer.local_steps`, all forced by the privacy analysis:

* The logical batch is one Poisson batch of expected size ``batch_size * grad_accum``; it is
  run in micro-batches of at most ``2 * batch_size`` rows (per-example gradients are summed
  across them). An empty Poisson batch still takes a (noise-only) step: skipping it would
  reveal that it was empty.
* Each example's loss is the mean over its own answer tokens (the ordinary trainer averages
  over the batch's tokens, which mixes examples and breaks per-example sensitivity).
* ``train.max_grad_norm`` (batch clipping) and FedProx (``train.fedprox_mu``) are not used.
* The reported ``train_loss`` and ``dp_examples`` (how many examples the Poisson batches
  drew) are computed on the private data and are *not* covered by the DP guarantee, which
  covers the adapter update only.
* The noise comes from a seeded ``torch.Generator`` (replayable rounds), not Opacus's
  ``secure_mode``, so it is not hardened against floating-point attacks (Mironov 2012).

The model is shared between clients, so everything Opacus attaches (hooks, ``grad_sample``
attributes, DPLSTM swaps for a P-Tuning LSTM encoder) is removed before returning.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleHooks
from opacus.layers import DPLSTM
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from peft import PeftType
from torch import nn
from tqdm.auto import tqdm

from fedpeft.adapters import trainable_parameters
from fedpeft.config import PrivacyConfig, TrainConfig
from fedpeft.constants import (
    KEY_DEVICE, KEY_DP_EXAMPLES, KEY_DP_NOISE, KEY_DP_SAMPLE_RATE, KEY_DP_STEPS, KEY_SECONDS, KEY_STEPS, KEY_TRAIN_LOSS,
)
from fedpeft.data.prompts import IGNORE_INDEX, TokenizedExample, collate
from fedpeft.errors import TrainingError
from fedpeft.privacy.accounting import Accountant, calibrate_noise, epsilon
from fedpeft.state import State
from fedpeft.trainer import _autocast, num_optimizer_steps

log = logging.getLogger(__name__)

MICRO_BATCH_FACTOR = 2  # a micro-batch holds at most this many times train.batch_size rows
OPACUS_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")
OPACUS_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad", "autograd_grad_sample_hooks")


def dp_schedule(num_examples: int, cfg: TrainConfig) -> tuple[int, float]:
    """(steps, Poisson sample rate) of one client's DP-SGD round.

    Steps are what the ordinary trainer takes (:func:`~fedpeft.trainer.num_optimizer_steps`,
    so ``local_epochs`` and ``max_steps`` mean the same); the rate makes the expected batch
    ``batch_size * grad_accum`` examples, so ``steps * q`` is about ``local_epochs`` passes.
    """
    if num_examples < 1:
        raise TrainingError("DP-SGD needs at least one example; this client has none")
    return num_optimizer_steps(num_examples, cfg), min(1.0, cfg.batch_size * cfg.grad_accum / num_examples)


def example_level_epsilon(noise_multiplier: float, num_examples: int, train_cfg: TrainConfig,
                          rounds_participated: int, delta: float, accountant: Accountant = "rdp") -> float:
    """Epsilon of one client's examples after it trained in ``rounds_participated`` rounds.

    Each round composes :func:`dp_schedule`'s steps at its sample rate; rounds the client sat
    out touch none of its data and cost nothing.

    Returns:
        Epsilon at ``delta`` (0.0 before any round, ``inf`` without noise).
    """
    steps, rate = dp_schedule(num_examples, train_cfg)
    return epsilon(noise_multiplier, rate, steps * rounds_participated, delta, accountant)


def example_level_noise(target_epsilon: float, num_examples: int, train_cfg: TrainConfig, rounds: int,
                        delta: float, accountant: Accountant = "rdp") -> float:
    """The smallest noise multiplier keeping a client within ``target_epsilon`` after ``rounds`` rounds."""
    steps, rate = dp_schedule(num_examples, train_cfg)
    return calibrate_noise(target_epsilon, rate, steps * rounds, delta, accountant)


def dp_local_steps(
    model: nn.Module,
    examples: list[TokenizedExample],
    train_cfg: TrainConfig,
    privacy_cfg: PrivacyConfig,
    noise_multiplier: float,
    *,
    seed: int,
    pad_token_id: int,
    anchor: State | None = None,
    client_id: str = "client",
    progress: bool = True,
) -> dict[str, float | int | str]:
    """DP-SGD steps of one client's round on the adapter the model holds now (see the module doc).

    Args:
        model: A PEFT-wrapped model whose only trainable parameters are the adapter's (LoRA or
            P-Tuning); it is left exactly as it was apart from the adapter's new values.
        examples: The client's tokenized examples.
        train_cfg: Learning rate, weight decay, batch size, epochs/max_steps, bf16.
        privacy_cfg: ``max_grad_norm``, the per-example clipping norm.
        noise_multiplier: Noise std over ``max_grad_norm`` (given or calibrated by the caller).
        seed: Seeds Poisson sampling, noise and dropout: same seed, same update.
        pad_token_id: Token id used to pad batches.
        anchor: Accepted for parity with :func:`fedpeft.trainer.local_steps`; FedProx is not
            applied under DP (a warning says so).
        client_id: Name used in errors and the progress bar.
        progress: Show a progress bar over steps.

    Returns:
        :func:`~fedpeft.trainer.local_steps`'s metrics plus ``dp_steps``, ``dp_sample_rate``,
        ``dp_noise_multiplier`` and ``dp_examples``.

    Raises:
        TrainingError: on a non-finite loss, no examples, or an unsupported prompt method.
    """
    _warn_unused(train_cfg, anchor, client_id)
    device = next(model.parameters()).device
    steps, rate = dp_schedule(len(examples), train_cfg)
    sample_gen = torch.Generator().manual_seed(seed)
    noise_seed = int(torch.randint(2**62, (1,), generator=sample_gen))  # a stream independent of sampling
    sampler = UniformWithReplacementSampler(num_samples=len(examples), sample_rate=rate, generator=sample_gen,
                                            steps=steps)
    micro = MICRO_BATCH_FACTOR * train_cfg.batch_size
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    model.train()
    with _private(model) as params, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout masks
        noise_gen = torch.Generator(device=device).manual_seed(noise_seed)
        optimizer = _dp_optimizer(params, train_cfg, privacy_cfg, noise_multiplier, rate * len(examples), noise_gen)
        for idx in tqdm(sampler, total=steps, desc=f"dp-train {client_id}", leave=False, disable=not progress):
            batch_losses, batch_tokens = _dp_step(model, optimizer, [examples[j] for j in idx], micro, pad_token_id,
                                                  device, train_cfg.bf16, client_id)
            losses += batch_losses
            tokens += batch_tokens
    model.eval()
    seconds = time.perf_counter() - start
    return {
        KEY_TRAIN_LOSS: sum(losses) / max(len(losses), 1),
        KEY_STEPS: steps,
        KEY_SECONDS: round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0,
        KEY_DEVICE: str(device),
        KEY_DP_STEPS: steps,
        KEY_DP_SAMPLE_RATE: rate,
        KEY_DP_NOISE: noise_multiplier,
        KEY_DP_EXAMPLES: len(losses),
    }


def _dp_optimizer(params: list[nn.Parameter], train_cfg: TrainConfig, privacy_cfg: PrivacyConfig,
                  noise_multiplier: float, expected_batch: float, generator: torch.Generator) -> DPOptimizer:
    """AdamW behind Opacus's clip-sum-noise step; the noisy sum is divided by ``expected_batch``."""
    adamw = torch.optim.AdamW(params, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)
    return DPOptimizer(adamw, noise_multiplier=noise_multiplier, max_grad_norm=privacy_cfg.max_grad_norm,
                       expected_batch_size=expected_batch, loss_reduction="mean", generator=generator)


def _warn_unused(cfg: TrainConfig, anchor: State | None, client_id: str) -> None:
    if cfg.fedprox_mu > 0 or anchor is not None:
        log.warning("client %s: train.fedprox_mu is ignored under example-level DP (the proximal term is not "
                    "part of the per-example clipped gradient)", client_id)


def _dp_step(model: nn.Module, optimizer: DPOptimizer, batch: list[TokenizedExample], micro: int,
             pad_token_id: int, device: torch.device, bf16: bool, client_id: str) -> tuple[list[float], int]:
    """One DP-SGD step on one Poisson batch, in micro-batches; returns per-example losses and tokens."""
    if not batch:  # still a release: clip nothing, add the noise, step
        for p in optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return [], 0
    chunks = [batch[i : i + micro] for i in range(0, len(batch), micro)]
    losses: list[float] = []
    tokens = 0
    for k, chunk in enumerate(chunks):
        tensors = {key: t.to(device) for key, t in collate(chunk, pad_token_id).items()}
        with _autocast(device, bf16):
            logits = _logits(model, tensors)
        per_example = per_example_loss(logits, tensors["labels"])  # (rows,)
        losses += per_example.tolist()
        if not all(math.isfinite(x) for x in losses[-len(chunk):]):
            raise TrainingError(f"client {client_id}: a DP-SGD training loss is not finite; lower "
                                "train.learning_rate or check this client's data")
        tokens += int(tensors["attention_mask"].sum())
        per_example.sum().backward()  # sum: Opacus's grad_sample is then each example's own gradient
        optimizer.signal_skip_step(do_skip=k + 1 < len(chunks))  # clip and accumulate until the last chunk
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, tokens


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean cross-entropy over its labelled tokens.

    Args:
        logits: ``(batch, prefix + seq, vocab)``; a prompt method's virtual tokens form the
            prefix (they carry no label).
        labels: ``(batch, seq)`` with ``IGNORE_INDEX`` where no loss is taken.

    Returns:
        ``(batch,)`` losses; 0 for a row without a labelled token.
    """
    labels = F.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=IGNORE_INDEX)  # (batch, prefix + seq)
    targets = labels[:, 1:]  # position t predicts token t + 1
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (batch * (prefix + seq - 1), vocab)
    token_loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    token_loss = token_loss.view(targets.shape)  # (batch, prefix + seq - 1)
    return token_loss.sum(1) / (targets != IGNORE_INDEX).sum(1).clamp(min=1)


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits, with one P-Tuning prompt computed per row (PEFT computes one per batch)."""
    cfg = getattr(model, "active_peft_config", None)
    if cfg is None or not cfg.is_prompt_learning:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if cfg.peft_type != PeftType.P_TUNING:
        raise TrainingError(f"example-level DP supports LoRA and P-Tuning, not {cfg.peft_type.value}")
    return _ptuning_logits(model, batch)


def _ptuning_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """PEFT's P-Tuning forward for a causal LM, with the prompt encoder run on every row.

    PEFT (since huggingface/peft#2043) runs the encoder once and repeats its output, so Opacus
    would see a batch of one and clip the batch's summed gradient instead of each example's.
    """
    rows = batch["input_ids"].shape[0]
    encoder = model.prompt_encoder[model.active_adapter]
    tokens = model.prompt_tokens[model.active_adapter].to(encoder.embedding.weight.device)
    prompts = encoder(tokens.unsqueeze(0).expand(rows, -1))  # (batch, virtual, hidden)
    embeds = model.word_embeddings(batch["input_ids"])  # (batch, seq, hidden)
    embeds = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)
    mask = batch["attention_mask"]
    mask = torch.cat([mask.new_ones(rows, prompts.shape[1]), mask], dim=1)
    return model.base_model(inputs_embeds=embeds, attention_mask=mask).logits


@contextmanager
def _private(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Attach Opacus's per-example gradient hooks for the block; yield the parameters to train.

    Trainable ``nn.LSTM`` modules (a P-Tuning LSTM encoder) are swapped for Opacus ``DPLSTM``
    copies, whose per-example gradients Opacus can compute, and swapped back with the trained
    weights afterwards.
    """
    with _dp_lstms(model):
        hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=True)
        try:
            with warnings.catch_warnings():  # LoRA's input (frozen activations) needs no grad: expected
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                yield list(trainable_parameters(model).values())
        finally:
            hooks.cleanup()
            strip_opacus(model)


def strip_opacus(model: nn.Module) -> None:
    """Remove any attribute Opacus may have left on the model's parameters and modules, and grads."""
    for p in model.parameters():
        for attr in OPACUS_PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
    for module in model.modules():
        for attr in OPACUS_MODULE_ATTRS:
            if attr in module.__dict__:
                delattr(module, attr)


@contextmanager
def _dp_lstms(model: nn.Module) -> Iterator[None]:
    """Swap every trainable ``nn.LSTM`` for an equivalent Opacus ``DPLSTM`` and back (weights copied both ways)."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.LSTM and any(p.requires_grad for p in child.parameters())]
    for parent, name, lstm in swaps:
        setattr(parent, name, _to_dp_lstm(lstm))
    try:
        yield
    finally:
        for parent, name, lstm in swaps:
            lstm.load_state_dict(getattr(parent, name).state_dict())
            setattr(parent, name, lstm)


def _to_dp_lstm(lstm: nn.LSTM) -> DPLSTM:
    if lstm.proj_size:
        raise TrainingError("example-level DP cannot train an LSTM with proj_size (Opacus DPLSTM lacks it)")
    dp = DPLSTM(lstm.input_size, lstm.hidden_size, num_layers=lstm.num_layers, bias=lstm.bias,
                batch_first=lstm.batch_first, dropout=lstm.dropout, bidirectional=lstm.bidirectional)
    dp.load_state_dict(lstm.state_dict())
    weight = next(lstm.parameters())
    return dp.to(device=weight.device, dtype=weight.dtype)


def private_steps(privacy_cfg: PrivacyConfig, num_examples: int, train_cfg: TrainConfig, rounds: int):
    """:func:`dp_local_steps` with the noise bound in: ``local_steps``'s signature (``trainer.fit`` calls it).

    Without ``noise_multiplier`` the client calibrates its own noise to reach ``target_epsilon``
    after training in every one of ``rounds`` rounds (a client sampled less often spends less).
    """
    noise = privacy_cfg.noise_multiplier
    if noise is None:
        steps, rate = dp_schedule(num_examples, train_cfg)
        noise = _calibrated(privacy_cfg.target_epsilon, rate, steps * rounds, privacy_cfg.delta, privacy_cfg.accountant)
    return partial(dp_local_steps, privacy_cfg=privacy_cfg, noise_multiplier=noise)


@lru_cache(maxsize=256)
def _calibrated(target_epsilon: float, rate: float, steps: int, delta: float, accountant: Accountant) -> float:
    """Calibrated once per client and run, rounded up (stays within the target)."""
    return math.ceil(calibrate_noise(target_epsilon, rate, steps, delta, accountant) * 1e6) / 1e6
