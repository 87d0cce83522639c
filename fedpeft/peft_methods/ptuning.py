"""P-Tuning: Liu et al. 2021, "GPT Understands, Too" (arXiv:2103.10385).

Wraps ``peft.PromptEncoderConfig``: trainable virtual tokens produced by a small prompt encoder
(MLP or LSTM). Every trainable parameter travels between server and clients, the prompt encoder
included (``get_peft_model_state_dict`` alone would omit it).
"""

from __future__ import annotations

from typing import Literal

import peft
from transformers import PreTrainedModel

from fedpeft.errors import ConfigError
from fedpeft.peft_methods import PEFT_METHODS


@PEFT_METHODS.register("ptuning")
class PTuning:
    """P-Tuning hyperparameters.

    Args:
        num_virtual_tokens: Virtual tokens prepended to every input; each costs sequence length.
        encoder_hidden_size: Hidden size of the prompt encoder (its size dominates the update).
        encoder_type: ``MLP`` or ``LSTM`` reparameterisation of the virtual tokens.
    """

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        encoder_hidden_size: int = 128,
        encoder_type: Literal["MLP", "LSTM"] = "MLP",
    ) -> None:
        if num_virtual_tokens < 1:
            raise ConfigError(f"peft.num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        if encoder_hidden_size < 1:
            raise ConfigError(f"peft.encoder_hidden_size must be >= 1, got {encoder_hidden_size}")
        self.num_virtual_tokens = num_virtual_tokens
        self.encoder_hidden_size = encoder_hidden_size
        self.encoder_type = encoder_type

    def peft_config(self, model: PreTrainedModel) -> peft.PromptEncoderConfig:
        """The ``peft.PromptEncoderConfig`` for ``model``."""
        return peft.PromptEncoderConfig(
            task_type=peft.TaskType.CAUSAL_LM,
            num_virtual_tokens=self.num_virtual_tokens,
            encoder_hidden_size=self.encoder_hidden_size,
            encoder_reparameterization_type=self.encoder_type,
        )
