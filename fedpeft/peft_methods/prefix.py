"""Prefix tuning with a reparameterisation MLP, i.e. P-Tuning v2.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"
(arXiv:2101.00190); Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to
Fine-tuning Universally Across Scales and Tasks" (arXiv:2110.07602). This is what the Ianvs
``fedllm-peft`` example trains as ``ptuning`` on ChatGLM (``pre_seq_len``, ``prefix_projection``):
trained key/value vectors for ``num_virtual_tokens`` positions in *every* layer, produced by a
small MLP (``prefix_projection``). fedpeft's ``ptuning`` is P-Tuning v1 (virtual tokens on the
input embeddings only).

Wraps ``peft.PrefixTuningConfig``. Every trainable parameter travels between server and clients
(the MLP included). Generation uses a batched greedy loop over the prefix's KV cache
(:mod:`fedpeft.generation`), not ``PeftModel.generate``.
"""

from __future__ import annotations

import warnings

import peft
from transformers import PreTrainedModel

from fedpeft.errors import ConfigError
from fedpeft.peft_methods import PEFT_METHODS

# PEFT 0.21's prefix-tuning forward still passes `past_key_values`, which transformers 5.2x renamed
# `cache` (both work until transformers 5.40, beyond this package's pin).
warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)


@PEFT_METHODS.register("prefix")
class Prefix:
    """Prefix-tuning (P-Tuning v2) hyperparameters.

    Args:
        num_virtual_tokens: Prefix length in every layer (ChatGLM's ``pre_seq_len``); each one
            costs attention over one more key per layer.
        prefix_projection: Produce the prefix with an MLP (P-Tuning v2's reparameterisation,
            steadier training); ``false`` trains the key/value vectors directly.
        encoder_hidden_size: Hidden size of that MLP (its output layer dominates the update:
            ``encoder_hidden_size x 2 x layers x kv_dim`` weights).
    """

    def __init__(self, num_virtual_tokens: int = 16, prefix_projection: bool = True,
                 encoder_hidden_size: int = 128) -> None:
        if num_virtual_tokens < 1:
            raise ConfigError(f"peft.num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        if encoder_hidden_size < 1:
            raise ConfigError(f"peft.encoder_hidden_size must be >= 1, got {encoder_hidden_size}")
        self.num_virtual_tokens = num_virtual_tokens
        self.prefix_projection = prefix_projection
        self.encoder_hidden_size = encoder_hidden_size

    def peft_config(self, model: PreTrainedModel) -> peft.PrefixTuningConfig:
        """The ``peft.PrefixTuningConfig`` for ``model``."""
        return peft.PrefixTuningConfig(
            task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=self.num_virtual_tokens,
            prefix_projection=self.prefix_projection, encoder_hidden_size=self.encoder_hidden_size,
        )
