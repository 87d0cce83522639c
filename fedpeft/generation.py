"""Batched greedy answer generation for base models, LoRA and prompt-learning adapters.

Generation dominates evaluation time, so this module takes seven shortcuts, each checked
against a slow reference in ``tests/test_generation.py``:

* **Batching with left padding**, questions sorted by prompt length so a batch wastes little
  on padding. Positions come from the attention mask (``cumsum - 1``), so a padded row sees
  the same positions, and generates the same tokens, as the question alone.
* **P-Tuning / prompt tuning without** ``PeftModel.generate``: the virtual-token embeddings
  are computed once (``model.get_prompt``), prepended to the prompt's embeddings with an
  extended attention mask, and the *base* model generates from ``inputs_embeds``. Through
  ``PeftModel.generate`` (peft 0.21.2) the KV cache is reused too, but peft drops the
  ``position_ids`` that transformers derives from the attention mask
  (``PeftModel._adjust_prompt_learning_kwargs``), so left-padded rows get shifted positions and
  batched answers differ from one-at-a-time answers; with transformers 5.24 it also prepends
  the virtual tokens again before every new token (the cache reaches peft's
  ``prepare_inputs_for_generation`` as ``cache``, not ``past_key_values``). The direct path
  keeps them equal.
* **Rows that reach EOS leave the batch** (:mod:`fedpeft.greedy`, our greedy loop): ``generate``
  computes every row until the last one stops. Used for transformers models whose cache is all
  full-attention layers, and for prefix tuning; ``generate`` stays for custom model code and
  sliding-window caches.
* **Prefix tuning (P-Tuning v2) by a greedy loop of our own** (the same loop) over the prefix's KV cache
  (``model.get_prompt``, ``num_virtual_tokens`` long in every layer): the prompt goes through
  the base model after the prefix, positions counted from the prefix length as in PEFT's
  training forward (``P + cumsum(mask) - 1``), then one token per step on the growing cache.
  ``generate`` cannot take a pre-filled cache whose tokens are not among its ``input_ids``, and
  ``PeftModel.generate`` has the position problem above.
* **LoRA merged into the weights** while generating (:func:`merged_lora`): one matmul per
  layer instead of three. On exit the original base weights are copied back from a CPU copy,
  because unmerging (subtracting ``B @ A`` again) is not bit-exact in floating point.
* **A KV cache allocated once per batch** (:class:`PreallocatedLayer`), prompt plus
  ``max_new_tokens`` long: each step writes its keys and values in place and attention reads a
  view of the filled part. transformers' ``DynamicLayer`` grows by ``torch.cat`` instead: each
  step copies the whole cache into a new buffer, larger than any freed before, which glibc maps
  with fresh pages whenever it is above the mmap threshold (every buffer over 256 kB under
  ``MALLOC_MMAP_THRESHOLD_=262144``), so the step cost of a batch grew with the answer length.
* **The output head as** ``weight @ hidden.T`` **on CPU** (:func:`vocab_major_head`): MKL
  computes ``nn.Linear``'s ``hidden @ weight.T`` for a 49k-token head 1.4-2.4x slower at 4-8
  rows than the same product the other way round, so a step of batch 4 cost twice a step of
  batch 1 on a small model; at one row both give the same bits.

``bench/generation_growth.py`` measures both (issue 14: batching must pay at 1024 new tokens).

Optionally an answer also ends at its first blank line (``"\\n\\n"``) after half of
``max_new_tokens`` (:class:`BlankLineStop`, ``stop_at_blank_line=True``).

The repetition penalty is applied by :class:`PromptRepetitionPenalty` rather than by
transformers: it penalises the tokens of the prompt and of the answer so far, like
``repetition_penalty=``, but never the padding (which with SmolLM2 is the end-of-turn token,
and would otherwise make padded rows less likely to stop), and it sees the prompt also when
generating from ``inputs_embeds``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft import PeftModel, PeftType
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers import StoppingCriteriaList

from fedpeft.data.prompts import prompt_ids
from fedpeft.decoding import (  # noqa: F401  (re-exported: tests and callers import them from here)
    BlankLineStop, PreallocatedLayer, PromptRepetitionPenalty, preallocated_cache, vocab_major_head,
)
from fedpeft.errors import ModelError
from fedpeft.greedy import cache_kwarg as _cache_kwarg
from fedpeft.greedy import can_run, greedy_tokens
from fedpeft.greedy import penalty_processors as _processors

log = logging.getLogger(__name__)

# Prompt-learning methods whose get_prompt() returns virtual-token *embeddings* (prefix tuning
# returns a KV cache instead: _generate_after_prefix).
_EMBEDDING_PROMPT_TYPES = (PeftType.P_TUNING, PeftType.PROMPT_TUNING)

Model = PreTrainedModel | PeftModel

@dataclass
class GenerationResult:
    """Answers in question order, with what it cost."""

    answers: list[str]
    token_ids: list[list[int]]  # generated ids of each answer, up to and including its EOS (or blank line)
    seconds: float

    @property
    def num_tokens(self) -> int:
        """Tokens generated in all, EOS included, padding after it not."""
        return sum(len(ids) for ids in self.token_ids)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (no dropout) and restore its train/eval mode on exit."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _enabled_peft_type(model: torch.nn.Module) -> PeftType | None:
    """The active adapter's type; None for a plain model or inside ``disable_adapter()``."""
    if not isinstance(model, PeftModel) or getattr(model, "_adapters_disabled", False):
        return None
    return model.active_peft_config.peft_type


def uses_virtual_token_embeddings(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a :class:`PeftModel` with an enabled P-Tuning or prompt-tuning adapter."""
    return _enabled_peft_type(model) in _EMBEDDING_PROMPT_TYPES


def uses_prefix_cache(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a :class:`PeftModel` with an enabled prefix-tuning adapter."""
    return _enabled_peft_type(model) == PeftType.PREFIX_TUNING


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a :class:`PeftModel` with an enabled LoRA adapter."""
    return _enabled_peft_type(model) == PeftType.LORA


def _lora_layers(model: PeftModel) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def merged_lora(model: PeftModel) -> Iterator[PeftModel]:
    """Merge the active LoRA adapter into the base weights for the duration of the block.

    Generation is faster with merged weights. On exit the adapter is unmerged and the base
    weights that merging touched are overwritten with a CPU copy taken on entry, so they are
    bit-identical to before (unmerging alone leaves rounding differences).

    Args:
        model: A LoRA :class:`PeftModel`, not merged, adapter enabled.

    Yields:
        ``model``, merged.

    Raises:
        ModelError: if ``model`` is not a LoRA PeftModel, is merged already, or is inside
            ``disable_adapter()`` (merging would apply the adapter that was switched off).
    """
    if not is_lora(model):
        raise ModelError(
            f"merged_lora needs a LoRA PeftModel with its adapter enabled, got {type(model).__name__}"
            + (" inside disable_adapter()" if getattr(model, "_adapters_disabled", False) else "")
        )
    layers = _lora_layers(model)
    if any(layer.merged for layer in layers):
        raise ModelError("merged_lora: the LoRA adapter is merged already; unmerge it first")
    saved = {
        id(p): (p, p.detach().to("cpu", copy=True))
        for layer in layers
        for p in layer.get_base_layer().parameters(recurse=False)
    }
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for param, original in saved.values():
                param.copy_(original)


def _left_pad(rows: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``, each ``(batch, longest)``, with padding on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _eos_ids(model: Model, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS (what training appends to answers) and the model's own EOS ids."""
    config_eos = model.generation_config.eos_token_id
    config_eos = [] if config_eos is None else [config_eos] if isinstance(config_eos, int) else list(config_eos)
    return list(dict.fromkeys([tokenizer.eos_token_id, *config_eos]))


def _generate_ids(model: Model, ids: torch.Tensor, mask: torch.Tensor, gen_kwargs: dict, penalty: float,
                  stop: BlankLineStop | None = None) -> torch.Tensor:
    """Greedy new tokens ``(batch, new)`` for left-padded ``ids``; see the module docstring."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    capacity = ids.shape[1] + gen_kwargs["max_new_tokens"]
    if uses_virtual_token_embeddings(model):
        embeds = base.get_input_embeddings()(ids)  # (batch, seq, hidden)
        virtual = model.get_prompt(batch_size=ids.shape[0]).to(embeds.dtype)  # (batch, virtual, hidden)
        full_mask = torch.cat([mask.new_ones(virtual.shape[:2]), mask], dim=1)  # (batch, virtual + seq)
        return base.generate(
            inputs_embeds=torch.cat([virtual, embeds], dim=1), attention_mask=full_mask,
            logits_processor=_processors(penalty, ids, mask, skip=0), stopping_criteria=_criteria(stop, skip=0),
            **{_cache_kwarg(base): preallocated_cache(base, capacity + virtual.shape[1])}, **gen_kwargs,
        )
    stop_after = stop and stop.after(ids.shape[1])
    if uses_prefix_cache(model):
        return _generate_after_prefix(model, ids, mask, gen_kwargs, penalty, stop_after)
    cache = preallocated_cache(base, capacity)
    if can_run(base, cache):  # our loop: finished rows leave the batch (fedpeft.greedy)
        return greedy_tokens(base, ids, mask, cache, max_new_tokens=gen_kwargs["max_new_tokens"],
                             eos_ids=gen_kwargs["eos_token_id"], pad_token_id=gen_kwargs["pad_token_id"],
                             penalty=penalty, stop=stop_after, streamer=gen_kwargs.get("streamer"))
    out = model.generate(input_ids=ids, attention_mask=mask, logits_processor=_processors(penalty, ids, mask,
                                                                                          skip=ids.shape[1]),
                         stopping_criteria=_criteria(stop, skip=ids.shape[1]), **{_cache_kwarg(base): cache},
                         **gen_kwargs)
    return out[:, ids.shape[1]:]


def _generate_after_prefix(model: PeftModel, ids: torch.Tensor, mask: torch.Tensor, gen_kwargs: dict,
                           penalty: float, stop: BlankLineStop | None) -> torch.Tensor:
    """Greedy new tokens ``(batch, new)`` after a prefix-tuning adapter's KV cache; see the module docstring."""
    base, (batch, width), max_new = model.get_base_model(), ids.shape, gen_kwargs["max_new_tokens"]
    prompt_cache = model.get_prompt(batch_size=batch)  # DynamicCache, num_virtual_tokens long
    prefix = prompt_cache.get_seq_length()
    cache = preallocated_cache(base, prefix + width + max_new)
    for i, layer in enumerate(prompt_cache.layers):
        cache.update(layer.keys, layer.values, i)
    return greedy_tokens(base, ids, mask, cache, max_new_tokens=max_new, eos_ids=gen_kwargs["eos_token_id"],
                         pad_token_id=gen_kwargs["pad_token_id"], penalty=penalty, stop=stop, prefix=prefix,
                         streamer=gen_kwargs.get("streamer"))


def _criteria(stop: BlankLineStop | None, skip: int) -> StoppingCriteriaList:
    return StoppingCriteriaList([] if stop is None else [stop.after(skip)])


def _until_eos(new: torch.Tensor, eos_ids: list[int], stop: BlankLineStop | None = None) -> list[list[int]]:
    """Each row of ``new`` (batch, new) up to and including its first EOS or blank-line stop."""
    ends = torch.isin(new, torch.tensor(eos_ids, device=new.device))  # (batch, new)
    if stop is not None:
        ends |= stop.stops(new)
    rows = []
    for row, end in zip(new.tolist(), ends.tolist()):
        rows.append(row[: next((i + 1 for i, e in enumerate(end) if e), len(row))])
    return rows


def run_generation(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    *,
    system_prompt: str | None = None,
    max_new_tokens: int = 256,
    repetition_penalty: float = 1.0,
    batch_size: int = 8,
    progress: bool = True,
    stop_at_blank_line: bool = False,
) -> GenerationResult:
    """Like :func:`generate_answers`, also returning the token ids and the seconds it took.

    Returns:
        Answers and generated token ids in question order, and the wall-clock seconds.
    """
    prompts = [prompt_ids(tokenizer, q, system_prompt) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    eos_ids, device = _eos_ids(model, tokenizer), model_device(model)
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
    )
    stop = BlankLineStop(tokenizer, (max_new_tokens + 1) // 2, device) if stop_at_blank_line else None
    token_ids: list[list[int]] = [[] for _ in questions]
    start = time.perf_counter()
    with eval_mode(model), torch.no_grad(), vocab_major_head(model), \
            tqdm(total=len(questions), desc="generating", unit="q", disable=not progress) as bar:
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            ids, mask = _left_pad([prompts[i] for i in batch], tokenizer.pad_token_id, device)
            new = _generate_ids(model, ids, mask, gen_kwargs, repetition_penalty, stop)  # (batch, new)
            for i, row in zip(batch, _until_eos(new, eos_ids, stop)):
                token_ids[i] = row
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    answers = [t.strip() for t in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]
    return GenerationResult(answers, token_ids, seconds)


def generate_answers(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    *,
    system_prompt: str | None = None,
    max_new_tokens: int = 256,
    repetition_penalty: float = 1.0,
    batch_size: int = 8,
    progress: bool = True,
    stop_at_blank_line: bool = False,
) -> list[str]:
    """Greedy answers to ``questions``, generated in left-padded batches.

    Args:
        model: A base model, or a LoRA, P-Tuning, prefix-tuning or other :class:`PeftModel`.
        tokenizer: Its tokenizer (the chat template builds the prompts).
        questions: The questions; answers come back in this order.
        system_prompt: Optional system message of the chat template.
        max_new_tokens: Cap on each answer's length in tokens.
        repetition_penalty: ``1.0`` for none; ``> 1`` curbs greedy loops.
        batch_size: Questions generated together (sorted by prompt length first, for less padding).
        progress: Show a tqdm bar over questions.
        stop_at_blank_line: Also end an answer at its first blank line (``"\\n\\n"``) once it has
            ``max_new_tokens / 2`` tokens (rounded up): the model has moved on from the answer.

    Returns:
        One answer per question, special tokens removed, whitespace stripped.
    """
    return run_generation(
        model, tokenizer, questions, system_prompt=system_prompt, max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty, batch_size=batch_size, progress=progress,
        stop_at_blank_line=stop_at_blank_line,
    ).answers
