"""Turn question/answer pairs into token ids: chat template prompt, loss on answer tokens only.

The answer is followed by the tokenizer's EOS token (for chat models, the end-of-turn token such
as ``<|im_end|>``), which is learned: a model that never sees it never learns to stop. Labels are
masked by position (prompt tokens are ``-100``), never by pad id, because many tokenizers
(SmolLM2 among them) use EOS as their pad token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
PROMPT_FIELDS = {  # data.prompt_template placeholders -> the Jinja of a chat template
    "bos": "{{ bos_token }}", "eos": "{{ eos_token }}", "question": "{{ messages[-1]['content'] }}",
    "system": "{{ messages[0]['content'] if messages[0]['role'] == 'system' else '' }}",
}


def chat_template_from(prompt_template: str) -> str:
    """A tokenizer chat template that lays the prompt out as ``data.prompt_template`` says.

    ``"{bos}{question}\n"`` -> BOS, the question, a newline; the answer follows (as a model
    without a chat template, such as ChatGLM's ``"[gMASK]sop{question}"``, expects). Literal text
    is kept as is; the placeholders are :data:`PROMPT_FIELDS`.

    Raises:
        ValueError: naming an unknown placeholder and the valid ones.
    """
    import re

    parts, pos = [], 0
    for m in re.finditer(r"\{(\w*)\}", prompt_template):
        if m.group(1) not in PROMPT_FIELDS:
            raise ValueError(f"unknown placeholder {{{m.group(1)}}}; valid: "
                             + ", ".join(f"{{{k}}}" for k in PROMPT_FIELDS))
        parts += [_jinja_literal(prompt_template[pos:m.start()]), PROMPT_FIELDS[m.group(1)]]
        pos = m.end()
    parts.append(_jinja_literal(prompt_template[pos:]))
    return "".join(parts)


def _jinja_literal(text: str) -> str:
    return "{{ " + repr(text) + " }}" if text else ""


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt that precedes the answer (ends with the assistant turn header)."""
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": question})
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    text = (f"{system_prompt}\n\n" if system_prompt else "") + f"Question: {question}\nAnswer: "
    return tokenizer(text, add_special_tokens=True)["input_ids"]


@dataclass
class TokenizedExample:
    """One training/eval example: ``input_ids`` and ``labels`` of equal length."""

    input_ids: list[int]
    labels: list[int]


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    answer: str,
    max_seq_len: int,
    system_prompt: str | None = None,
) -> TokenizedExample:
    """Tokenize one pair; truncate to ``max_seq_len``, keeping the whole prompt where possible.

    A truncated answer loses its EOS (the model must not learn to stop mid-sentence). A prompt
    longer than half of ``max_seq_len`` is cut from the left, keeping the assistant header.
    """
    prompt = prompt_ids(tokenizer, question, system_prompt)
    if len(prompt) > max_seq_len // 2:
        prompt = prompt[-(max_seq_len // 2):]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer_ids = answer_ids[: max_seq_len - len(prompt)]
    return TokenizedExample(
        input_ids=prompt + answer_ids,
        labels=[IGNORE_INDEX] * len(prompt) + answer_ids,
    )


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict],
    max_seq_len: int,
    system_prompt: str | None = None,
) -> list[TokenizedExample]:
    """Tokenize ``examples`` (dicts with ``question`` and ``answer``) once, up front."""
    return [tokenize_example(tokenizer, e["question"], e["answer"], max_seq_len, system_prompt) for e in examples]


def collate(batch: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a training batch; padded positions get ``attention_mask`` 0 and label -100."""
    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)  # (batch, seq)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
