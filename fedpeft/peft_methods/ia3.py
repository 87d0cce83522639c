"""(IA)^3: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (arXiv:2205.05638).

Wraps ``peft.IA3Config``: learned vectors that rescale the keys, values and the feed-forward
activations; the smallest update of the methods here (one vector per adapted layer). With
``target_modules: default`` PEFT picks the architecture's key/value/down projections and marks
the feed-forward one (its vector scales the layer's input instead of its output).
"""

from __future__ import annotations

import peft
from transformers import PreTrainedModel

from fedpeft.peft_methods import PEFT_METHODS


@PEFT_METHODS.register("ia3")
class IA3:
    """(IA)^3 hyperparameters.

    Args:
        target_modules: ``default`` (PEFT's choice for the architecture) or a list of module names.
        feedforward_modules: With a list of targets, which of them are feed-forward layers
            (must be a subset of ``target_modules``); ``default`` with ``default`` targets.
    """

    def __init__(self, target_modules: str | list[str] = "default",
                 feedforward_modules: str | list[str] = "default") -> None:
        self.target_modules = target_modules
        self.feedforward_modules = feedforward_modules

    def peft_config(self, model: PreTrainedModel) -> peft.IA3Config:
        """The ``peft.IA3Config`` for ``model``."""
        targets = None if self.target_modules == "default" else self.target_modules
        feedforward = None if self.feedforward_modules == "default" else self.feedforward_modules
        return peft.IA3Config(task_type=peft.TaskType.CAUSAL_LM, target_modules=targets,
                              feedforward_modules=feedforward)
