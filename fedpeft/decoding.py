"""One decoding step's pieces for :mod:`fedpeft.generation`: the repetition penalty, the blank-line
stop, a KV cache allocated once per batch, and the output head computed vocab-major on CPU.

Each is described in :mod:`fedpeft.generation`'s docstring and checked in ``tests/test_generation.py``.
"""

from __future__ import annotations

import contextlib
import copy
import types
import weakref
from collections.abc import Iterator

import torch
from peft import PeftModel
from transformers import DynamicCache, LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria
from transformers.cache_utils import DynamicLayer

from fedpeft.errors import ModelError

Model = PreTrainedModel | PeftModel

# Rows up to which the output head runs as weight @ hidden.T (vocab_major_head); at 16 rows both
# orders cost the same, and a prefill without logits_to_keep has many more.
_HEAD_MAX_ROWS = 16


class PromptRepetitionPenalty(LogitsProcessor):
    """CTRL's repetition penalty over the real prompt tokens and the tokens generated so far.

    Keskar et al., "CTRL: A Conditional Transformer Language Model for Controllable
    Generation", 2019. https://arxiv.org/abs/1909.05858 (same arithmetic as transformers'
    ``RepetitionPenaltyLogitsProcessor``: positive logits divided, negative ones multiplied).

    Args:
        penalty: ``> 1`` makes seen tokens less likely.
        prompt_ids: ``(batch, prompt_len)`` left-padded prompts.
        prompt_mask: ``(batch, prompt_len)``, 1 on real tokens, 0 on padding.
        skip: Leading columns of the ``input_ids`` that ``generate`` passes which are the prompt
            (``prompt_len`` when generating from ids, 0 when generating from embeddings).
    """

    def __init__(self, penalty: float, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, skip: int) -> None:
        self.penalty = penalty
        # Padding replaced by a real token of the same row, which is penalised anyway.
        real = prompt_ids.gather(1, prompt_mask.long().argmax(1, keepdim=True))  # (batch, 1)
        self.prompt_ids = torch.where(prompt_mask.bool(), prompt_ids, real)  # (batch, prompt_len)
        self.skip = skip

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # Gather and scatter the seen ids only (repeats write the same value): no (batch, vocab) masks.
        seen = torch.cat([self.prompt_ids.to(scores.device), input_ids[:, self.skip:]], dim=1)  # (batch, seen)
        logits = scores.gather(1, seen)
        logits = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
        return scores.scatter(1, seen, logits)


class BlankLineStop(StoppingCriteria):
    """Ends a row at its first blank line (``"\\n\\n"``) completed by its ``min_new``-th new token or later.

    A token completes a blank line if its text contains ``"\\n\\n"``, or starts with a newline
    after a token that ends with one. The stopping token stays in the answer; with byte-level BPE
    (SmolLM2, Llama) such tokens are whitespace only, which the answer's ``strip()`` removes.

    Args:
        tokenizer: Decodes each vocabulary id once (cached per tokenizer).
        min_new: New tokens a row must have before a blank line stops it.
        device: Where the token flags live (the model's device).
        skip: Leading columns of ``input_ids`` that are the prompt (as in
            :class:`PromptRepetitionPenalty`).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, min_new: int, device: torch.device, skip: int = 0) -> None:
        self.blank, self.ends_nl, self.starts_nl = (f.to(device) for f in _newline_flags(tokenizer))
        self.min_new, self.skip = max(1, min_new), skip

    def after(self, skip: int) -> BlankLineStop:
        """A copy for ``input_ids`` whose first ``skip`` columns are the prompt."""
        stop = copy.copy(self)
        stop.skip = skip
        return stop

    def stops(self, new: torch.Tensor) -> torch.Tensor:
        """``(batch, n)`` bool: where a token of ``new`` (``(batch, n)`` generated ids) stops its row."""
        hit = self._completes_blank_line(new)
        hit[:, : self.min_new - 1] = False
        return hit

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.skip:]  # (batch, generated so far)
        if new.shape[1] < self.min_new:
            return torch.zeros(new.shape[0], dtype=torch.bool, device=new.device)
        return self._completes_blank_line(new[:, -2:])[:, -1]

    def _completes_blank_line(self, new: torch.Tensor) -> torch.Tensor:
        new = new.clamp(max=len(self.blank) - 1)  # ids beyond the tokenizer map to its last flag: False
        hit = self.blank[new]  # (batch, n)
        hit[:, 1:] |= self.ends_nl[new[:, :-1]] & self.starts_nl[new[:, 1:]]
        return hit


_NEWLINE_FLAGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _newline_flags(tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(contains "\\n\\n", ends with "\\n", starts with "\\n"), each ``(vocab + 1,)`` bool, last entry False."""
    if tokenizer not in _NEWLINE_FLAGS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))]) + [""]
        _NEWLINE_FLAGS[tokenizer] = tuple(torch.tensor([test(t) for t in texts]) for test in (
            lambda t: "\n\n" in t, lambda t: t.endswith("\n"), lambda t: t.startswith("\n")))
    return _NEWLINE_FLAGS[tokenizer]


class PreallocatedLayer(DynamicLayer):
    """A cache layer whose keys and values live in buffers ``capacity`` positions long, allocated once.

    ``update`` writes the new positions in place and returns views of the filled part, so a
    decoding step neither copies the cache nor allocates (see the module docstring). For greedy
    decoding only: beam search's reordering and cropping are not supported.

    Args:
        capacity: Positions the layer can hold (prompt, virtual tokens and new tokens).
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads, _, dim = key_states.shape
        self.key_buffer = key_states.new_empty(batch, heads, self.capacity, dim)  # (batch, heads, capacity, dim)
        self.value_buffer = value_states.new_empty(batch, value_states.shape[1], self.capacity, value_states.shape[3])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ModelError(f"PreallocatedLayer holds {self.capacity} positions; {end} were written")
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (indices), in that order: rows that finished answering."""
        if not self.is_initialized:
            return
        self.key_buffer, self.value_buffer = self.key_buffer[rows], self.value_buffer[rows]
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        super().reset()


def preallocated_cache(model: PreTrainedModel, capacity: int) -> DynamicCache:
    """``model``'s ``DynamicCache``, its full-attention layers replaced by :class:`PreallocatedLayer`."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _head_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])  # (rows, hidden)
    if rows.shape[0] > _HEAD_MAX_ROWS:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    out = torch.mm(self.weight, rows.t()).t()  # (rows, vocab), a transposed view
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def vocab_major_head(model: Model) -> Iterator[None]:
    """Compute ``model``'s output head as ``weight @ hidden.T`` inside the block (CPU, plain ``nn.Linear`` only).

    Same product, bit-identical at one row; at 2-16 rows a different summation order (like any
    change of batch size). Any other head (GPU, LoRA-wrapped, patched already) is left alone.
    """
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.device.type != "cpu" or "forward" in vars(head):
        yield
        return
    head.forward = types.MethodType(_head_forward, head)
    try:
        yield
    finally:
        del head.forward
