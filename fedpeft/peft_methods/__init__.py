"""PEFT methods, one file each, registered by name. Each wraps Hugging Face PEFT.

A method is a class whose typed ``__init__`` keyword arguments are its hyperparameters (the
``peft:`` section of a job config) and whose ``peft_config(model)`` returns a ``peft.PeftConfig``.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import peft
from peft.utils.error import PeftError
from transformers import PreTrainedModel

from fedpeft.errors import ConfigError
from fedpeft.params import instantiate
from fedpeft.registry import Registry

PEFT_METHODS: Registry = Registry("peft_methods")


class PeftMethod(Protocol):
    """``peft_config(model)``; optionally ``after_wrap(peft_model)`` to adjust the wrapped model."""

    def peft_config(self, model: PreTrainedModel) -> peft.PeftConfig: ...


from fedpeft.peft_methods import ffa_lora, ia3, lora, prefix, prompt_tuning, ptuning  # noqa: E402,F401  (registration)


def build_peft_method(name: str, params: dict[str, Any]) -> PeftMethod:
    """Instantiate the PEFT method registered as ``name`` with ``params``."""
    return instantiate(PEFT_METHODS, name, params, "PEFT method")


def wrap_model(model: PreTrainedModel, method: PeftMethod) -> peft.PeftModel:
    """Wrap a frozen base model with the method's adapter (only adapter parameters train)."""
    with warnings.catch_warnings():  # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            wrapped = peft.get_peft_model(model, method.peft_config(model))
        except PeftError as e:  # e.g. target_modules that match no module of this model
            raise ConfigError(f"peft: {e} (`fedpeft validate` lists the model's module names)") from e
    after_wrap = getattr(method, "after_wrap", None)  # e.g. FFA-LoRA freezes A
    if after_wrap is not None:
        after_wrap(wrapped)
    return wrapped
