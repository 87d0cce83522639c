"""``fedpeft chat`` driven through stdin: history in the prompt, streamed answers, /reset, /exit."""

from __future__ import annotations

import copy
import io

import pytest
from peft import PeftModel
from serve_helpers import NEW_TOKENS, PENALTY, SYSTEM

from fedpeft.cli import main
from fedpeft.data.prompts import chat_template_from, prompt_ids
from fedpeft.generation import generate_answers
from fedpeft.serve import chat
from fedpeft.serve.saved import load_model, open_adapter


class Terminal(io.StringIO):
    """stdin or stdout: records every write (one per streamed piece) and says whether it is a TTY."""

    def __init__(self, text: str = "", tty: bool = False) -> None:
        super().__init__(text)
        self.tty, self.writes = tty, []

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


@pytest.fixture
def prompts(monkeypatch) -> list[list[int]]:
    """The prompt of every answer chat generates, in order."""
    seen: list[list[int]] = []
    real = chat.stream_reply

    def spy(model, tok, prompt, out, **kwargs):
        seen.append(list(prompt))
        return real(model, tok, prompt, out, **kwargs)

    monkeypatch.setattr(chat, "stream_reply", spy)
    return seen


def _chat(monkeypatch, lines: str, argv: list[str], tty: bool = False) -> Terminal:
    out = Terminal()
    monkeypatch.setattr("sys.stdin", Terminal(lines, tty=tty))
    monkeypatch.setattr("sys.stdout", out)
    assert main(["chat", *argv]) == 0
    return out


def test_chat_keeps_the_conversation_streams_answers_and_resets(served_run, tiny_base, monkeypatch, prompts):
    lines = "What is gout?\nHow is it treated?\n\n/reset\nWhat is gout?\n/exit\nWhat is asthma?\n"
    out = _chat(monkeypatch, lines, ["--adapter", str(served_run)])
    answers = out.getvalue().splitlines()
    assert len(prompts) == len(answers) == 3  # the empty line is skipped, nothing is read after /exit
    tok = tiny_base[1]
    first, second, after_reset = (tok.decode(p) for p in prompts)
    assert SYSTEM in first and second.startswith(first)  # the job's system prompt, then the history
    assert f"What is gout?<|im_end|>\n<|im_start|>assistant\n{answers[0]}<|im_end|>" in second
    assert second.endswith("How is it treated?<|im_end|>\n<|im_start|>assistant\n")
    assert after_reset == first and answers[2] == answers[0]
    # the first turn is what `fedpeft generate` answers with the job's settings, and the adapter shows
    kwargs = dict(system_prompt=SYSTEM, max_new_tokens=NEW_TOKENS, repetition_penalty=PENALTY, progress=False)
    base = copy.deepcopy(tiny_base[0])
    assert answers[0] == generate_answers(PeftModel.from_pretrained(base, served_run / "adapter"), tok,
                                          ["What is gout?"], **kwargs)[0]
    assert answers[0] != generate_answers(tiny_base[0], tok, ["What is gout?"], **kwargs)[0]
    # streamed: the first answer came in several writes, not as one line at the end
    end = next(i for i, w in enumerate(out.writes) if "\n" in w)
    assert len([w for w in out.writes[:end + 1] if w.strip()]) >= 3


def test_a_terminal_gets_prompts_and_system_overrides_the_job(served_run, tiny_base, monkeypatch, prompts):
    out = _chat(monkeypatch, "Hi\n", ["--adapter", str(served_run), "--system", "Be terse.",
                                      "--max-new-tokens", "3"], tty=True)
    text = tiny_base[1].decode(prompts[0])
    assert "Be terse." in text and SYSTEM not in text
    assert "/reset" in out.getvalue() and "you: model: " in out.getvalue()
    assert out.getvalue().endswith("you: ")  # asked again, then end of input


@pytest.mark.parametrize("method", ["ptuning", "prefix", "prompt_tuning", "ia3"])
def test_every_method_streams_the_answer_generate_gives(make_adapter, method):
    adapter = make_adapter(method, **({} if method == "ia3" else {"num_virtual_tokens": 4}))
    model, tok = load_model(open_adapter(adapter))
    out = Terminal()
    turns = chat.run_chat(model, tok, Terminal("What is gout?\n"), out, system=None, max_new_tokens=6,
                          repetition_penalty=1.1)
    expected = generate_answers(model, tok, ["What is gout?"], max_new_tokens=6, repetition_penalty=1.1,
                                progress=False)[0]
    assert turns == [("What is gout?", expected)] and out.getvalue().strip() == expected


def test_history_follows_a_single_question_prompt_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = chat_template_from("{bos}Q: {question}\nA:")
    ids = chat.conversation_ids(tok, [("Why?", "Because.")], "How?", None, single_turn_template=True)
    # each earlier turn as tokenize_example lays out a training example: prompt, answer, EOS
    assert tok.decode(ids) == "<|im_start|>Q: Why?\nA:Because.<|im_end|><|im_start|>Q: How?\nA:"
    assert "Why?" not in tok.apply_chat_template(  # premise: the template alone would drop the history
        [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."},
         {"role": "user", "content": "How?"}], tokenize=False)
    assert chat.conversation_ids(tok, [], "How?", None, single_turn_template=True) == prompt_ids(tok, "How?")


def test_the_oldest_turns_leave_when_the_context_is_full(make_adapter, prompts):
    model, tok = load_model(open_adapter(make_adapter("lora", r=2)))
    alone = chat.conversation_ids(tok, [], "And asthma?", None)
    model.config.max_position_embeddings = len(alone) + 6 + 4  # room for one question and its answer only
    turns = chat.run_chat(model, tok, Terminal("What is gout?\nAnd asthma?\n"), Terminal(), system=None,
                          max_new_tokens=6, repetition_penalty=1.1)
    assert len(prompts) == 2 and prompts[1] == alone  # the first turn was dropped to fit
    assert [q for q, _ in turns] == ["And asthma?"]
