"""``fedpeft chat``: a multi-turn conversation with a trained adapter in the terminal.

Each user line is answered greedily, in the job's prompt format, with the conversation so far in
the prompt; the answer is printed token by token as it is generated (a transformers
``TextStreamer``) and stops at EOS or ``max_new_tokens``. ``/reset`` forgets the conversation,
``/exit`` or end of input leaves. The ``you:`` prompt is shown only when input is a terminal, so
piped input gives one answer per line.

The history is laid out by the tokenizer's chat template. A job's ``data.prompt_template``
describes one question, so with it (or without any chat template) earlier turns are written
as they were in training: each prompt, its answer and EOS, one after the other.

Generation goes through :mod:`fedpeft.generation`'s per-method paths, so a turn without history
gets the same answer as ``fedpeft generate``, streamed by every path (generate's and
:mod:`fedpeft.greedy`'s loop alike).
"""

from __future__ import annotations

from typing import TextIO

import torch
from transformers import PreTrainedTokenizerBase, TextStreamer

from fedpeft.data.prompts import prompt_ids
from fedpeft.generation import (
    Model,
    _eos_ids,
    _generate_ids,
    _until_eos,
    eval_mode,
    model_device,
)

Turn = tuple[str, str]  # (question, answer)
HELP = "/reset forgets the conversation, /exit (or Ctrl-D) leaves\n"


class _Printer(TextStreamer):
    """A ``TextStreamer`` that writes the answer (no prompt, no special tokens) to ``out``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def conversation_ids(tok: PreTrainedTokenizerBase, turns: list[Turn], question: str, system: str | None, *,
                     single_turn_template: bool = False) -> list[int]:
    """Token ids of the prompt for ``question`` after ``turns``; without turns, exactly the training prompt.

    Args:
        tok: The tokenizer, with the job's chat template.
        turns: Earlier questions and answers, oldest first.
        question: The new user message.
        system: The system prompt, or None.
        single_turn_template: The chat template comes from ``data.prompt_template`` (one question only).
    """
    if not turns:
        return prompt_ids(tok, question, system)
    if tok.chat_template and not single_turn_template:
        messages = [{"role": "system", "content": system}] if system else []
        for asked, answered in turns:
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
        messages.append({"role": "user", "content": question})
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    ids: list[int] = []
    for asked, answered in turns:  # as tokenize_example lays out a training example
        ids += prompt_ids(tok, asked, system) + tok(answered, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids + prompt_ids(tok, question, system)


def stream_reply(model: Model, tok: PreTrainedTokenizerBase, prompt: list[int], out: TextIO, *,
                 max_new_tokens: int, repetition_penalty: float) -> str:
    """Generate the greedy answer to ``prompt``, writing it to ``out`` as it comes; return it stripped."""
    ids = torch.tensor([prompt], dtype=torch.long, device=model_device(model))  # (1, seq)
    eos = _eos_ids(model, tok)
    printer = _Printer(tok, out)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                      pad_token_id=tok.pad_token_id, streamer=printer)
    with eval_mode(model), torch.no_grad():
        new = _generate_ids(model, ids, torch.ones_like(ids), gen_kwargs, repetition_penalty)  # (1, new)
    (answer,) = _until_eos(new, eos)
    return tok.decode(answer, skip_special_tokens=True).strip()


def _fit_context(model: Model, turns: list[Turn], prompt_len: int, max_new_tokens: int) -> bool:
    """Drop the oldest turn if the prompt and the answer would not fit the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None or not turns or prompt_len + max_new_tokens <= limit:
        return False
    turns.pop(0)
    return True


def _read(inp: TextIO, out: TextIO, interactive: bool) -> str | None:
    """The next user line, None at end of input."""
    if interactive:
        out.write("you: ")
        out.flush()
    line = inp.readline()
    return line if line else None


def run_chat(model: Model, tok: PreTrainedTokenizerBase, inp: TextIO, out: TextIO, *, system: str | None,
             max_new_tokens: int, repetition_penalty: float, single_turn_template: bool = False) -> list[Turn]:
    """Answer user lines from ``inp`` until ``/exit`` or end of input.

    Args:
        model: The adapter on its base model (or any causal LM).
        tok: Its tokenizer, with the job's chat template.
        inp: User lines; ``you:`` prompts are written only when it is a terminal.
        out: Where answers stream.
        system: The system prompt, or None.
        max_new_tokens: Cap on each answer's length in tokens.
        repetition_penalty: ``1.0`` for none; ``> 1`` curbs greedy loops.
        single_turn_template: See :func:`conversation_ids`.

    Returns:
        The conversation the model still sees: since the last ``/reset``, less the oldest turns
        dropped when the prompt and an answer would not fit the model's positions.
    """
    interactive = inp.isatty()
    turns: list[Turn] = []
    if interactive:
        out.write(HELP)
    try:
        while (line := _read(inp, out, interactive)) is not None:
            text = line.strip()
            if text == "/exit":
                break
            if text == "/reset":
                turns.clear()
                out.write("(conversation cleared)\n" if interactive else "")
                continue
            if not text:
                continue
            prompt = conversation_ids(tok, turns, text, system, single_turn_template=single_turn_template)
            while _fit_context(model, turns, len(prompt), max_new_tokens):
                prompt = conversation_ids(tok, turns, text, system, single_turn_template=single_turn_template)
            out.write("model: " if interactive else "")
            answer = stream_reply(model, tok, prompt, out, max_new_tokens=max_new_tokens,
                                  repetition_penalty=repetition_penalty)
            turns.append((text, answer))
    except KeyboardInterrupt:  # Ctrl-C: leave quietly, as at end of input
        out.write("\n")
    return turns
