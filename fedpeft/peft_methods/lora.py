"""LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).

Wraps ``peft.LoraConfig``. ``target_modules`` accepts ``all-linear`` (every linear layer but the
output head; our default: q/v alone at rank 8 did not beat zero-shot on SmolLM2 in our pilot),
``default`` (PEFT's per-architecture choice, usually the attention q/v projections), or a list
of module names.
"""

from __future__ import annotations

from typing import Literal

import peft
from transformers import PreTrainedModel

from fedpeft.errors import ConfigError
from fedpeft.peft_methods import PEFT_METHODS


@PEFT_METHODS.register("lora")
class LoRA:
    """LoRA hyperparameters.

    Args:
        r: Rank of the update; higher increases capacity, memory and bytes per round linearly.
        alpha: Scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the LoRA input during training.
        target_modules: ``all-linear``, ``default`` or a list of module names.
        bias: Which biases train (``none`` keeps updates small).
        use_rslora: Scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA, Kalajdzievski 2023,
            arXiv:2312.03732) instead of ``alpha / r``.
        use_dora: DoRA (Liu et al. 2024, arXiv:2402.09353): a trained magnitude vector per
            adapted layer on top of LoRA's direction; it travels with the update. Slower steps.
    """

    def __init__(
        self,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.05,
        target_modules: str | list[str] = "all-linear",
        bias: Literal["none", "all", "lora_only"] = "none",
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        if r < 1:
            raise ConfigError(f"peft.r must be >= 1, got {r}")
        if not alpha > 0:
            raise ConfigError(f"peft.alpha must be > 0 (the update is scaled by alpha / r), got {alpha}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {dropout}")
        self.r, self.alpha, self.dropout, self.bias = r, alpha, dropout, bias
        self.target_modules = target_modules
        self.use_rslora, self.use_dora = use_rslora, use_dora

    def peft_config(self, model: PreTrainedModel) -> peft.LoraConfig:
        """The ``peft.LoraConfig`` for ``model``."""
        targets = None if self.target_modules == "default" else self.target_modules
        return peft.LoraConfig(
            task_type=peft.TaskType.CAUSAL_LM, r=self.r, lora_alpha=self.alpha,
            lora_dropout=self.dropout, target_modules=targets, bias=self.bias,
            use_rslora=self.use_rslora, use_dora=self.use_dora,
        )
