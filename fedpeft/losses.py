"""Answer-token cross-entropy without the full-vocabulary logits.

A causal LM's forward ends with the output head: ``(batch, seq, hidden) -> (batch, seq, vocab)``.
For SmolLM2 (49k tokens) that tensor, kept for backward with its log-softmax and gradient, is
about 600 kB per token in fp32: 300 MB for a batch of 4 x 128 tokens, 2.4 GB for the held-out
loss of 16 x 256. The loss needs only the positions that predict an answer token, so
:func:`answer_nll` runs the model with its head replaced by the identity (the forward returns
the final hidden states), gathers the answer positions, and applies the head to them in chunks
of :data:`CHUNK_TOKENS`. With gradients on, each chunk is checkpointed: its logits are
recomputed in backward instead of kept, so at most one chunk's logits exist at a time.

Models whose forward does more than ``head(hidden)`` (logit soft-capping, a logit scale, or
custom model code) take the ordinary path: full logits, upcast to fp32 only at the answer
positions. Both paths give the same values (tested); the chunked one only saves memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fedpeft.data.prompts import IGNORE_INDEX

CHUNK_TOKENS = 512  # answer positions per head matmul: 512 x 49k vocab x 4 B = 100 MB of logits
_AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")  # config keys of extra steps


def answer_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of answer-token negative log-likelihoods, and per-row answer-token counts.

    Position ``t`` predicts token ``t + 1``; labels equal to ``IGNORE_INDEX`` take no loss.
    Prompt-learning methods that prepend virtual tokens are handled (the last ``seq`` positions
    are the batch's own).

    Args:
        model: A causal LM or a PeftModel around one.
        batch: ``input_ids``, ``attention_mask`` and ``labels``, each ``(batch, seq)``.

    Returns:
        ``(sums, counts)``, each ``(batch,)``: ``sums`` in fp32 (differentiable when gradients are
        enabled), ``counts`` as int64. The token-weighted mean loss is ``sums.sum() / counts.sum()``.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]  # (batch, seq - 1)
    keep = targets != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]  # the row of every kept position, in order
    head = _plain_head(model)
    if head is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kept = logits[:, -labels.shape[1]:][:, :-1][keep].float()  # upcast only the answer positions
        token_nll = F.cross_entropy(kept, targets[keep], reduction="none")
    else:
        with _head_replaced(model, head):
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token_nll = _chunked_nll(head, hidden[:, -labels.shape[1]:][:, :-1][keep], targets[keep])
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=token_nll.device).index_add(0, rows, token_nll)
    return sums, keep.sum(dim=1)


def _chunked_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(n,)`` cross-entropies of ``head(hidden)`` against ``targets``, :data:`CHUNK_TOKENS` at a time."""
    out = []
    for start in range(0, hidden.shape[0], CHUNK_TOKENS):
        h, t = hidden[start:start + CHUNK_TOKENS], targets[start:start + CHUNK_TOKENS]
        if torch.is_grad_enabled() and h.requires_grad:  # keep h only; recompute the logits in backward
            out.append(checkpoint(_head_nll, head, h, t, use_reentrant=False))
        else:
            out.append(_head_nll(head, h, t))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _head_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def _plain_head(model: nn.Module) -> nn.Module | None:
    """The output head if the model's logits are exactly ``head(hidden)``, else ``None``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not type(base).__module__.startswith("transformers.models."):  # custom model code: make no assumption
        return None
    config = getattr(base, "config", None)
    if any(getattr(config, key, None) not in (None, 1.0) for key in _AFTER_HEAD):
        return None
    get = getattr(base, "get_output_embeddings", None)
    head = get() if get is not None else None
    return head if isinstance(head, nn.Module) and _parent_of(base, head) is not None else None


def _parent_of(root: nn.Module, child: nn.Module) -> tuple[nn.Module, str] | None:
    for module in root.modules():
        for name, sub in module.named_children():
            if sub is child:
                return module, name
    return None


@contextmanager
def _head_replaced(model: nn.Module, head: nn.Module) -> Iterator[None]:
    """Inside: the model's head is the identity, so its forward returns the final hidden states."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parent, name = _parent_of(base, head)
    setattr(parent, name, nn.Identity())
    try:
        yield
    finally:
        setattr(parent, name, head)
