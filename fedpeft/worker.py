"""What holds the model: one PEFT-wrapped base model per device, and global-adapter evaluation on it.

The simulation's :class:`~fedpeft.scheduler.DeviceScheduler` keeps one :class:`Worker` per
device; the Flower server keeps one for evaluation (:class:`LocalHost`); a deployed site keeps
one for training. Each is built by :func:`build_worker` with the same seeded adapter init, so
every runtime starts from the same global adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from peft import PeftModel

from fedpeft.adapters import set_trainable_state
from fedpeft.config import JobConfig
from fedpeft.evaluation import evaluate
from fedpeft.memory import release_freed_memory
from fedpeft.models import load_base_model
from fedpeft.data.prompts import chat_template_from
from fedpeft.peft_methods import build_peft_method, wrap_model
from fedpeft.recompute import recompute_lora_dropout
from fedpeft.state import State

T = TypeVar("T")


@dataclass
class Worker:
    """What one device's worker holds for the whole run: ONE PEFT-wrapped base model."""

    model: PeftModel
    tokenizer: Any
    device: str


class Host(Protocol):
    """Something that runs a function on a worker: the scheduler, or :class:`LocalHost`."""

    def call(self, fn: Callable[[Worker], T]) -> T:
        """Run ``fn`` on a worker in the caller's thread and return its result."""
        ...


class LocalHost:
    """A single worker owned by the caller (the Flower server's evaluation model)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def call(self, fn: Callable[[Worker], T]) -> T:
        return fn(self.worker)


def build_worker(cfg: JobConfig, device: str) -> Worker:
    """Load the base model on ``device`` and wrap it (same seeded adapter init on every device)."""
    model, tok = load_base_model(cfg.model, device)
    if cfg.data.prompt_template is not None:  # every prompt (training, generation, MCQ) goes through it
        tok.chat_template = chat_template_from(cfg.data.prompt_template)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        peft_model = wrap_model(model, build_peft_method(cfg.peft.method, cfg.peft.params))
    if cfg.privacy.level != "example":  # Opacus needs each linear's own (dropped) input
        recompute_lora_dropout(peft_model)  # a third less activation memory, same numbers
    if cfg.model.quantization == "none":  # a quantised base stays where bitsandbytes put it (PEFT follows it)
        peft_model.to(device)
    if cfg.train.gradient_checkpointing:  # recompute activations in backward: training only (generation is eval)
        peft_model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.eval()
    return Worker(peft_model, tok, device)


@contextmanager
def base_view(model: PeftModel) -> Iterator[torch.nn.Module]:
    """The model with its adapter disabled (zero-shot evaluation)."""
    if model.peft_config[model.active_adapter].is_prompt_learning:
        yield model.get_base_model()
    else:
        with model.disable_adapter():
            yield model


def evaluate_global(worker: Worker, state: State | None, cfg: JobConfig, test: list[dict],
                    details: dict | None = None) -> tuple[dict, list[dict]]:
    """Score ``state`` (``None``: the base model alone, zero-shot) on ``test``; metrics and predictions
    (and per-item scores into ``details``, see :func:`fedpeft.evaluation.evaluate`)."""
    kwargs = dict(system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len, details=details)
    if state is None:
        with base_view(worker.model) as model:
            eval_cfg = cfg.eval.model_copy(update={"merge_lora": False})
            try:
                return evaluate(model, worker.tokenizer, test, eval_cfg, **kwargs)
            finally:
                release_freed_memory()
    set_trainable_state(worker.model, state)
    try:
        return evaluate(worker.model, worker.tokenizer, test, cfg.eval, **kwargs)
    finally:
        release_freed_memory()  # what the allocator kept from generation and the held-out loss
