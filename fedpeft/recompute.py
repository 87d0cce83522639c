"""LoRA's input dropout, recomputed in backward instead of kept.

PEFT computes a LoRA layer as ``base(x) + B(A(dropout(x))) * scaling``. With dropout on, every
adapted linear keeps its own dropped copy of ``x`` (for A's gradient) and a mask: q, k and v see
the same ``x`` but keep three copies. On SmolLM2 with LoRA all-linear that is about 0.8 MB per
token, a third of a training step's activations. :func:`recompute_lora_dropout` moves the
dropout inside A and checkpoints the pair: backward keeps only ``x`` (shared by its siblings)
and redraws the same mask from the saved random state. Forward values, gradients and the random
stream afterwards are bit-identical to PEFT's; the parameter names do not change.

Not applied under example-level DP (Opacus computes per-example gradients from each linear's
input, which must then be the dropped one) or to DoRA layers (PEFT's DoRA treats dropout itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.checkpoint import checkpoint


class DropoutLinear(nn.Linear):
    """``linear(dropout(x))`` whose dropped input is recomputed in backward, not kept."""

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0 and torch.is_grad_enabled():
            return checkpoint(self._dropped, x, use_reentrant=False)  # saves x and the RNG state
        return self._dropped(x)

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.dropout(x, self.p, self.training), self.weight, self.bias)


def recompute_lora_dropout(model: nn.Module) -> int:
    """Fold each LoRA layer's dropout into its A as a :class:`DropoutLinear`; returns how many.

    Layers with dropout 0, a LoRA variant (DoRA) or an A that is not a plain ``nn.Linear`` are
    left as they are.
    """
    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, drop in list(module.lora_dropout.items()):
            old = module.lora_A[name] if name in module.lora_A else None
            if (not isinstance(drop, nn.Dropout) or drop.p == 0 or type(old) is not nn.Linear
                    or name in getattr(module, "lora_variant", {})):
                continue
            new = DropoutLinear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
            new.weight, new.bias, new.p = old.weight, old.bias, drop.p
            new.train(old.training)
            module.lora_A[name], module.lora_dropout[name] = new, nn.Identity()
            changed += 1
    return changed
