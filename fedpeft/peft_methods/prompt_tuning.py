"""Prompt tuning: Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(arXiv:2104.08691).

Wraps ``peft.PromptTuningConfig``: ``num_virtual_tokens`` trained embeddings prepended to every
input, with no encoder (P-Tuning v1 adds one; ``prefix`` feeds every layer). ``init: text``
starts them from the embeddings of ``init_text``'s tokens (the paper's recommendation), repeated
or cut to ``num_virtual_tokens``; ``random`` from random embeddings. Generation goes through
fedpeft's direct path (:mod:`fedpeft.generation`), like P-Tuning's.
"""

from __future__ import annotations

from typing import Literal

import peft
from transformers import PreTrainedModel

from fedpeft.errors import ConfigError
from fedpeft.peft_methods import PEFT_METHODS


@PEFT_METHODS.register("prompt_tuning")
class PromptTuning:
    """Prompt-tuning hyperparameters.

    Args:
        num_virtual_tokens: Trained embeddings prepended to every input; each costs sequence length.
        init: ``random``, or ``text``: start from the embeddings of ``init_text``.
        init_text: The text whose token embeddings start the prompt (``init: text``).
    """

    def __init__(self, num_virtual_tokens: int = 20, init: Literal["random", "text"] = "random",
                 init_text: str = "Answer the medical question accurately and concisely.") -> None:
        if num_virtual_tokens < 1:
            raise ConfigError(f"peft.num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        self.num_virtual_tokens, self.init, self.init_text = num_virtual_tokens, init, init_text

    def peft_config(self, model: PreTrainedModel) -> peft.PromptTuningConfig:
        """The ``peft.PromptTuningConfig`` for ``model`` (``text`` init reads the model's tokenizer)."""
        text = self.init == "text"
        name = getattr(model.config, "_name_or_path", None) if text else None
        if text and not name:
            raise ConfigError("peft.init: text needs the model's tokenizer, and this model has no name or path; "
                              "use init: random")
        return peft.PromptTuningConfig(
            task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=self.num_virtual_tokens,
            prompt_tuning_init=peft.PromptTuningInit.TEXT if text else peft.PromptTuningInit.RANDOM,
            prompt_tuning_init_text=self.init_text if text else None, tokenizer_name_or_path=name,
        )
