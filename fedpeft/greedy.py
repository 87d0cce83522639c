"""A greedy decoding loop that drops finished rows from the batch.

``model.generate`` keeps every row of a batch until the last one stops: a row that ended at its
EOS after 100 tokens is still computed, attended and padded for the other rows' remaining
steps. With answers up to EOS of very different lengths (SmolLM2 on MedQuAD: tens to 1024
tokens), most of a batch's late steps are such wasted rows. This loop removes a row as soon
as it ends, from the step's inputs, the attention mask, the positions, the repetition penalty's
prompts and every layer of the preallocated KV cache (:meth:`PreallocatedLayer.keep_rows`), so
the batch shrinks to the rows still answering.

It runs the base model one token per step on left-padded prompts exactly as ``generate``
does for greedy search (positions ``cumsum(mask) - 1``, the step's last logits only), after an
optional pre-filled cache (prefix tuning's virtual tokens: ``prefix`` positions). A row's tokens
are those of the same row generated alone; ``tests/test_generation.py`` checks them against a
cache-free reference loop.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, LogitsProcessorList, PreTrainedModel

from fedpeft.decoding import BlankLineStop, PreallocatedLayer, PromptRepetitionPenalty


def greedy_tokens(base: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, *,
                  max_new_tokens: int, eos_ids: list[int], pad_token_id: int, penalty: float = 1.0,
                  stop: BlankLineStop | None = None, prefix: int = 0, streamer=None) -> torch.Tensor:
    """Greedy new tokens ``(batch, new)`` for left-padded ``ids`` (pad after a row's end).

    Args:
        base: A transformers causal LM (LoRA layers inside it apply as they are).
        ids: ``(batch, width)`` left-padded prompts; ``mask`` their attention mask.
        cache: An empty cache of :class:`PreallocatedLayer` (``prefix`` positions already filled for
            prefix tuning), ``prefix + width + max_new_tokens`` long.
        max_new_tokens: Steps at most.
        eos_ids: Tokens that end a row.
        pad_token_id: Written after a row's end.
        penalty: The repetition penalty (:class:`PromptRepetitionPenalty`; 1.0: none).
        stop: Optionally, :class:`BlankLineStop` (for ``input_ids`` whose first ``width`` columns are the prompt).
        prefix: Positions of ``cache`` filled before the prompt (prefix tuning's virtual tokens).
        streamer: A transformers streamer (``put``, ``end``), as ``generate`` takes: it gets the prompt,
            then each new token (batch 1).
    """
    batch, width = ids.shape
    eos = torch.tensor(eos_ids, device=ids.device)
    full_mask = torch.cat([mask.new_ones(batch, prefix), mask, mask.new_ones(batch, max_new_tokens)], dim=1)
    seen = torch.cat([ids, ids.new_full((batch, max_new_tokens), pad_token_id)], dim=1)  # prompt, answer so far
    positions = (prefix + mask.cumsum(1) - 1).clamp(min=prefix)  # padding's positions are masked anyway
    out = ids.new_full((batch, max_new_tokens), pad_token_id)
    rows = torch.arange(batch, device=ids.device)  # the batch row of each row still answering
    processors = penalty_processors(penalty, ids, mask, skip=width)
    step_ids, length, steps = ids, width, 0
    kwarg = cache_kwarg(base)  # once, not per token
    if streamer is not None:
        streamer.put(ids.cpu())  # as generate does: the prompt first (a TextStreamer skips it)
    for steps in range(1, max_new_tokens + 1):
        logits = base(input_ids=step_ids, attention_mask=full_mask[:, :prefix + length], position_ids=positions,
                      use_cache=True, logits_to_keep=1, **{kwarg: cache}).logits[:, -1].float()
        token = processors(seen[:, :length], logits).argmax(-1)  # (rows,)
        seen[:, length] = token
        out[rows, steps - 1] = token
        if streamer is not None:
            streamer.put(token.cpu())
        length += 1
        done = torch.isin(token, eos)
        if stop is not None:
            done |= stop(seen[:, :length], logits)
        if bool(done.all()):
            break
        step_ids, positions = seen[:, length - 1:length], positions[:, -1:] + 1
        if bool(done.any()):  # drop the rows that ended, everywhere they are held
            keep = (~done).nonzero()[:, 0]
            rows, seen, full_mask, step_ids, positions = (t[keep] for t in (rows, seen, full_mask, step_ids, positions))
            ids, mask = ids[keep], mask[keep]
            processors = penalty_processors(penalty, ids, mask, skip=width)
            for layer in cache.layers:
                layer.keep_rows(keep)
    if streamer is not None:
        streamer.end()
    return out[:, :steps]


def can_run(base: PreTrainedModel, cache: DynamicCache) -> bool:
    """Whether :func:`greedy_tokens` can drive ``base``: a transformers model whose forward takes
    ``position_ids`` and ``logits_to_keep``, every cache layer a :class:`PreallocatedLayer` (full
    attention; sliding-window layers keep ``generate``)."""
    params = inspect.signature(base.forward).parameters
    return (type(base).__module__.startswith("transformers.models.") and "position_ids" in params
            and "logits_to_keep" in params and all(isinstance(layer, PreallocatedLayer) for layer in cache.layers))


def cache_kwarg(model: torch.nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (before), as ``model.forward`` names it."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def penalty_processors(penalty: float, ids: torch.Tensor, mask: torch.Tensor, skip: int) -> LogitsProcessorList:
    """The repetition penalty over each row's real prompt tokens and answer so far (none at 1.0)."""
    if penalty == 1.0:
        return LogitsProcessorList()
    return LogitsProcessorList([PromptRepetitionPenalty(penalty, ids, mask, skip)])
