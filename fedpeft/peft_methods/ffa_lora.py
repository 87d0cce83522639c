"""FFA-LoRA: LoRA with A frozen at its shared random initialisation; only B trains and travels.

Sun, Li, Li, Ding and Liu, "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024. https://arxiv.org/abs/2403.12313

Averaging LoRA's factors separately is not averaging the update: mean(B_i) mean(A_i) differs
from mean(B_i A_i). With A the same fixed matrix at every client, mean(B_i) A = mean(B_i A), so
FedAvg (or any rule on the mean) aggregates the product *exactly*; and only B is sent: half the
bytes of LoRA when a layer's input and output sizes are equal. A is PEFT's seeded random
initialisation (``seed`` of the job), identical at the server, at every simulated client and at
every deployed site, so it never travels. The paper trains with a larger learning rate than
LoRA (A no longer adapts); its DP results motivate it too (no noise on A).
"""

from __future__ import annotations

import peft
from transformers import PreTrainedModel

from fedpeft.peft_methods import PEFT_METHODS
from fedpeft.peft_methods.lora import LoRA


@PEFT_METHODS.register("ffa_lora")
class FFALoRA(LoRA):
    """LoRA hyperparameters (``r``, ``alpha``, ``dropout``, ``target_modules``, ``bias``); A frozen."""

    def peft_config(self, model: PreTrainedModel) -> peft.LoraConfig:
        """The ``peft.LoraConfig`` for ``model`` (as :class:`LoRA`)."""
        return super().peft_config(model)

    def after_wrap(self, model: peft.PeftModel) -> None:
        """Freeze every ``lora_A`` weight: it stays at its seeded initialisation."""
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
