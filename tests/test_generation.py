"""Generation: batching, the direct P-Tuning path and merged LoRA give the reference tokens.

The tiny random Llama of the fixtures produces one token forever (its weights are too small
to separate the logits), which would make every equality below hold trivially. The tests use
copies with larger random weights: ``lively`` (std 0.3) never repeats itself and answers each
question differently; ``repetitive`` (std 0.1) loops, so the repetition penalty changes it;
``neox`` is a small GPT-NeoX treated like ``lively`` (another attention and cache layout).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, get_peft_model
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.cache_utils import DynamicLayer

import fedpeft.generation as generation
from fedpeft.data.prompts import prompt_ids
from fedpeft.errors import ModelError
from fedpeft.generation import (
    BlankLineStop, PreallocatedLayer, PromptRepetitionPenalty, generate_answers, merged_lora, run_generation,
)

QUESTIONS = [
    "What are the symptoms of a heart attack in women over sixty?",
    "What is diabetes?",
    "How is the flu treated in young children who also have asthma?",
    "Who gets gout?",
    "Is high blood pressure inherited?",
]
NEW_TOKENS = 10


def _perturb(params: list[torch.nn.Parameter], seed: int, std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


def _randomized(model: torch.nn.Module, std: float) -> torch.nn.Module:
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _seeded_peft_model(model: torch.nn.Module, config, seed: int) -> PeftModel:  # noqa: ANN001
    """``get_peft_model`` on a copy, its random initialisation seeded: torch's global seed differs per process
    here (``torch.initial_seed()``), so unseeded adapters would differ from run to run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(copy.deepcopy(model), config)


def _ptuning(model: torch.nn.Module) -> PeftModel:
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=32)
    peft_model = _seeded_peft_model(model, config, seed=1)
    _perturb(list(peft_model.prompt_encoder.parameters()), seed=1, std=0.5)
    return peft_model


def _prefix(model: torch.nn.Module) -> PeftModel:
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prefix_projection=True,
                                encoder_hidden_size=32)
    peft_model = _seeded_peft_model(model, config, seed=3)
    _perturb(list(peft_model.prompt_encoder.parameters()), seed=3, std=0.5)
    return peft_model


@pytest.fixture(scope="module")
def lively(tiny_base) -> torch.nn.Module:
    """Greedy answers that differ between questions and never repeat a token (read-only)."""
    return _randomized(tiny_base[0], std=0.3)


@pytest.fixture(scope="module")
def repetitive(tiny_base) -> torch.nn.Module:
    """Greedy answers that loop on one token, so a repetition penalty changes them (read-only)."""
    return _randomized(tiny_base[0], std=0.1)


@pytest.fixture(scope="module")
def neox(tokenizer) -> torch.nn.Module:
    """A GPT-NeoX (hidden 64, 2 layers) with lively random weights (read-only)."""
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(config)
    return _randomized(model, std=0.3).eval()


@pytest.fixture
def ptuning_model(lively) -> PeftModel:
    return _ptuning(lively)


@pytest.fixture
def prefix_model(lively) -> PeftModel:
    return _prefix(lively)


@pytest.fixture
def lora_model(lively) -> PeftModel:
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = _seeded_peft_model(lively, config, seed=2)
    _perturb([p for n, p in model.named_parameters() if "lora_B" in n], seed=2, std=0.5)
    return model


def _token_ids(model, tokenizer, questions, batch_size, penalty=1.0) -> list[list[int]]:  # noqa: ANN001
    return run_generation(model, tokenizer, questions, max_new_tokens=NEW_TOKENS, batch_size=batch_size,
                          repetition_penalty=penalty, progress=False).token_ids


def _greedy_without_cache(model, tokenizer, question: str, penalty: float = 1.0) -> list[int]:  # noqa: ANN001
    """Reference: full forward of the whole sequence every step, penalty over all seen ids."""
    ids = prompt_ids(tokenizer, question)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1].clone()  # (vocab,)
            seen = torch.tensor(sorted(set(ids + new)))
            logits[seen] = torch.where(logits[seen] < 0, logits[seen] * penalty, logits[seen] / penalty)
            new.append(int(logits.argmax()))
            if new[-1] == tokenizer.eos_token_id:
                break
    return new


@pytest.mark.parametrize("kind", ["base", "lora", "ptuning", "prefix"])
def test_batched_answers_equal_one_at_a_time(kind, lively, lora_model, ptuning_model, prefix_model, tokenizer):
    model = {"base": lively, "lora": lora_model, "ptuning": ptuning_model, "prefix": prefix_model}[kind]
    model.eval()
    alone = [_token_ids(model, tokenizer, [q], batch_size=1)[0] for q in QUESTIONS]
    batched = _token_ids(model, tokenizer, QUESTIONS, batch_size=3)  # two batches, left padding
    assert batched == alone
    assert len({tuple(t) for t in alone}) == len(QUESTIONS)  # not one degenerate answer
    assert all(len(t) == NEW_TOKENS for t in alone)


def test_adapters_change_the_answers(lively, lora_model, ptuning_model, prefix_model, tokenizer):
    base = _token_ids(lively, tokenizer, QUESTIONS[:2], batch_size=2)
    assert _token_ids(lora_model, tokenizer, QUESTIONS[:2], batch_size=2) != base
    assert _token_ids(ptuning_model, tokenizer, QUESTIONS[:2], batch_size=2) != base
    assert _token_ids(prefix_model, tokenizer, QUESTIONS[:2], batch_size=2) != base


def test_prefix_loop_matches_peft_forward_without_cache(prefix_model, tokenizer):
    # The reference runs PEFT's own prefix-tuning forward (the one training uses) on the whole
    # sequence at every step; the batched loop must give the same tokens, penalty or not.
    prefix_model.eval()
    expected = [_greedy_without_cache(prefix_model, tokenizer, q) for q in QUESTIONS]
    assert _token_ids(prefix_model, tokenizer, QUESTIONS, batch_size=4) == expected


def test_prefix_repetition_penalty_matches_a_loop_without_cache(repetitive, tokenizer):
    model = _prefix(repetitive).eval()
    expected = [_greedy_without_cache(model, tokenizer, q, penalty=1.5) for q in QUESTIONS]
    assert _token_ids(model, tokenizer, QUESTIONS, batch_size=4, penalty=1.5) == expected
    assert _token_ids(model, tokenizer, QUESTIONS, batch_size=4) != expected  # the penalty matters


@pytest.mark.filterwarnings("ignore:Position ids are not supported")  # peft warns on every step
def test_ptuning_direct_path_matches_peft_generate_without_cache(ptuning_model, tokenizer):
    # Without a KV cache, PeftModel.generate prepends the virtual tokens to the whole sequence at
    # every step. With the cache, peft 0.21.2 on transformers 5.24 prepends them again before
    # every new token (the cache reaches peft's prepare_inputs_for_generation as `cache`, no
    # longer as `past_key_values`), so only its first token is right there.
    ptuning_model.eval()
    for question in QUESTIONS:
        ids = torch.tensor([prompt_ids(tokenizer, question)])
        out = ptuning_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
        assert _token_ids(ptuning_model, tokenizer, [question], batch_size=1)[0] == out[0, ids.shape[1]:].tolist()


def test_ptuning_direct_path_matches_a_loop_without_cache(ptuning_model, tokenizer):
    ptuning_model.eval()
    expected = [_greedy_without_cache(ptuning_model, tokenizer, q) for q in QUESTIONS]
    assert _token_ids(ptuning_model, tokenizer, QUESTIONS, batch_size=4) == expected


def test_ptuning_repetition_penalty_matches_a_loop_without_cache(repetitive, tokenizer):
    model = _ptuning(repetitive).eval()
    expected = [_greedy_without_cache(model, tokenizer, q, penalty=1.5) for q in QUESTIONS]
    assert _token_ids(model, tokenizer, QUESTIONS, batch_size=4, penalty=1.5) == expected
    assert _token_ids(model, tokenizer, QUESTIONS, batch_size=4) != expected  # the penalty matters


def test_repetition_penalty_matches_transformers_alone_and_batched(repetitive, tokenizer):
    for question in QUESTIONS:
        ids = torch.tensor([prompt_ids(tokenizer, question)])
        stock = repetitive.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.5)
        ours = _token_ids(repetitive, tokenizer, [question], batch_size=1, penalty=1.5)[0]
        assert ours == stock[0, ids.shape[1]:].tolist()
        assert ours != _token_ids(repetitive, tokenizer, [question], batch_size=1)[0]  # the penalty matters
    alone = [_token_ids(repetitive, tokenizer, [q], batch_size=1, penalty=1.5)[0] for q in QUESTIONS]
    assert _token_ids(repetitive, tokenizer, QUESTIONS, batch_size=5, penalty=1.5) == alone


def test_repetition_penalty_skips_padding_and_counts_new_tokens():
    pad, seen_in_prompt, generated = 2, 5, 7
    penalty = PromptRepetitionPenalty(
        2.0, prompt_ids=torch.tensor([[pad, pad, seen_in_prompt]]), prompt_mask=torch.tensor([[0, 0, 1]]), skip=3)
    scores = torch.full((1, 10), 4.0)
    scores[0, generated] = -4.0
    out = penalty(torch.tensor([[pad, pad, seen_in_prompt, generated]]), scores)
    expected = torch.full((1, 10), 4.0)
    expected[0, seen_in_prompt] = 2.0  # positive logits are divided
    expected[0, generated] = -8.0  # negative logits are multiplied
    assert torch.equal(out, expected)  # the padding token (2) is untouched


def test_answers_are_decoded_in_question_order(lively, tokenizer):
    result = run_generation(lively, tokenizer, QUESTIONS, max_new_tokens=NEW_TOKENS, batch_size=2, progress=False)
    assert result.answers == [tokenizer.decode(t, skip_special_tokens=True).strip() for t in result.token_ids]
    assert generate_answers(lively, tokenizer, QUESTIONS[::-1], max_new_tokens=NEW_TOKENS,
                            batch_size=2, progress=False) == result.answers[::-1]
    assert result.num_tokens == len(QUESTIONS) * NEW_TOKENS


def test_generation_stops_at_eos_and_restores_train_mode(lively, tokenizer):
    model = copy.deepcopy(lively)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():  # EOS wins every step
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 1e4
    model.lm_head = head
    model.train()
    result = run_generation(model, tokenizer, QUESTIONS[:2], max_new_tokens=NEW_TOKENS, progress=False)
    assert result.token_ids == [[tokenizer.eos_token_id]] * 2
    assert result.answers == ["", ""]
    assert model.training


def _base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_merged_lora_restores_exact_weights_and_gives_the_same_tokens(lora_model, tokenizer):
    lora_model.eval()
    before = _base_weights(lora_model)
    unmerged_ids = _token_ids(lora_model, tokenizer, QUESTIONS, batch_size=3)
    probe = torch.tensor([prompt_ids(tokenizer, QUESTIONS[0])])
    with torch.no_grad():
        unmerged_logits = lora_model(input_ids=probe).logits
    with merged_lora(lora_model):
        inside = _base_weights(lora_model)
        assert any(not torch.equal(inside[n], before[n]) for n in before)  # merging changed weights
        with torch.no_grad():
            torch.testing.assert_close(lora_model(input_ids=probe).logits, unmerged_logits, atol=1e-4, rtol=1e-4)
        assert _token_ids(lora_model, tokenizer, QUESTIONS, batch_size=3) == unmerged_ids
    after = _base_weights(lora_model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    with torch.no_grad():
        assert torch.equal(lora_model(input_ids=probe).logits, unmerged_logits)


def test_merged_lora_restores_weights_after_an_error(lora_model):
    before = _base_weights(lora_model)
    with pytest.raises(RuntimeError, match="boom"), merged_lora(lora_model):
        raise RuntimeError("boom")
    assert all(torch.equal(p, before[n]) for n, p in _base_weights(lora_model).items())


def test_merged_lora_refuses_non_lora_models(lively, ptuning_model):
    for model in (lively, ptuning_model):
        with pytest.raises(ModelError, match="LoRA"), merged_lora(model):
            pass


def test_disabled_adapters_generate_like_the_base_model(lively, lora_model, ptuning_model, prefix_model, tokenizer):
    base = _token_ids(lively, tokenizer, QUESTIONS[:3], batch_size=2)
    for model in (lora_model, ptuning_model, prefix_model):
        with model.disable_adapter():
            assert _token_ids(model, tokenizer, QUESTIONS[:3], batch_size=2) == base
    with lora_model.disable_adapter(), pytest.raises(ModelError, match="disable_adapter"), merged_lora(lora_model):
        pass


def _stock_generate(model, tokenizer, questions) -> list[list[int]]:  # noqa: ANN001
    """The code before the preallocated cache and the vocab-major head: ``generate`` on one left-padded batch."""
    ids, mask = generation._left_pad([prompt_ids(tokenizer, q) for q in questions], tokenizer.pad_token_id,
                                     torch.device("cpu"))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("kind", ["llama", "llama-lora", "neox"])
def test_same_tokens_as_generate_with_its_own_cache_and_head(kind, lively, lora_model, neox, tokenizer):
    model = {"llama": lively, "llama-lora": lora_model, "neox": neox}[kind].eval()
    questions = sorted(QUESTIONS, key=lambda q: len(prompt_ids(tokenizer, q)))  # run_generation's batches
    expected = _stock_generate(model, tokenizer, questions[:3]) + _stock_generate(model, tokenizer, questions[3:])
    ours = _token_ids(model, tokenizer, questions, batch_size=3)
    assert ours == expected
    assert len({tuple(t) for t in ours}) == len(QUESTIONS)  # not one degenerate answer
    if kind == "neox":
        assert [_token_ids(model, tokenizer, [q], batch_size=1)[0] for q in questions] == ours


def test_generation_uses_the_preallocated_cache(lively, tokenizer):
    layer_types = []

    def spy(model, capacity):  # noqa: ANN001, ANN202
        cache = real(model, capacity)
        layer_types.extend(type(layer) for layer in cache.layers)
        return cache

    real = generation.preallocated_cache
    generation.preallocated_cache = spy
    try:
        _token_ids(lively, tokenizer, QUESTIONS[:2], batch_size=2)
    finally:
        generation.preallocated_cache = real
    assert layer_types and all(t is PreallocatedLayer for t in layer_types)
    assert not issubclass(DynamicLayer, PreallocatedLayer)


def test_batches_are_sorted_by_prompt_length_and_answers_keep_question_order(lively, tokenizer, monkeypatch):
    widths: list[list[int]] = []
    real = generation._generate_ids

    def spy(model, ids, mask, *args):  # noqa: ANN001, ANN202
        widths.append(mask.sum(1).tolist())
        return real(model, ids, mask, *args)

    monkeypatch.setattr(generation, "_generate_ids", spy)
    result = run_generation(lively, tokenizer, QUESTIONS, max_new_tokens=NEW_TOKENS, batch_size=2, progress=False)
    lengths = sorted(len(prompt_ids(tokenizer, q)) for q in QUESTIONS)
    assert widths == [lengths[0:2], lengths[2:4], lengths[4:]]  # shortest prompts first: least padding
    monkeypatch.setattr(generation, "_generate_ids", real)
    assert result.token_ids == [_token_ids(lively, tokenizer, [q], batch_size=1)[0] for q in QUESTIONS]


def test_blank_line_stop_flags_tokens_after_half_the_answer(tokenizer):
    blank, newline, word = 1116, 198, 504  # "\n\n", "\n", "The"
    assert [tokenizer.decode([t]) for t in (blank, newline)] == ["\n\n", "\n"]
    stop = BlankLineStop(tokenizer, min_new=3, device=torch.device("cpu"))
    new = torch.tensor([[blank, word, word, blank, word],  # the first blank line is too early
                        [word, word, newline, newline, word],  # "\n" then "\n": a blank line at index 3
                        [word, newline, word, word, word]])  # a single newline never stops
    assert stop.stops(new).tolist() == [[False, False, False, True, False], [False, False, False, True, False],
                                        [False] * 5]
    assert stop.after(2)(torch.cat([new.new_zeros(3, 2), new[:, :4]], 1), None).tolist() == [True, True, False]
    assert stop(new[:, :2], None).tolist() == [False] * 3  # fewer than min_new tokens


def _forcing(model: torch.nn.Module, token: int, plan: dict[int, list[int]]) -> tuple[torch.nn.Module, list]:
    """A copy of ``model`` whose i-th forward makes rows ``plan[i]`` emit ``token``; clear the list to restart."""
    model, calls = copy.deepcopy(model), []

    def hook(_module, _args, out):  # noqa: ANN001, ANN202
        for row in plan.get(len(calls), []):
            out.logits[row, -1, token] = 1e4
        calls.append(1)

    model.register_forward_hook(hook)
    return model, calls


@pytest.mark.parametrize("kind", ["base", "ptuning", "prefix"])
def test_stop_at_blank_line_after_half_of_max_new_tokens(kind, lively, tokenizer):
    blank = 1116  # "\n\n"
    # Row 0 of the batch (the shorter prompt, question 1) writes a blank line as its 2nd token (too early:
    # half of 10 is 5) and its 7th; row 1 (question 0) only as its 2nd.
    forced, calls = _forcing(lively, blank, {1: [0, 1], 6: [0]})
    model = {"base": lambda m: m, "ptuning": _ptuning, "prefix": _prefix}[kind](forced).eval()
    kwargs = dict(max_new_tokens=NEW_TOKENS, batch_size=2, progress=False)
    plain = run_generation(model, tokenizer, QUESTIONS[:2], **kwargs)
    calls.clear()
    stopped = run_generation(model, tokenizer, QUESTIONS[:2], stop_at_blank_line=True, **kwargs)
    assert plain.token_ids[1][1] == plain.token_ids[1][6] == plain.token_ids[0][1] == blank
    assert stopped.token_ids[1] == plain.token_ids[1][:7]  # up to the blank line after half
    assert stopped.token_ids[0] == plain.token_ids[0]  # no blank line after half: all 10 tokens
    assert stopped.answers[1] == tokenizer.decode(plain.token_ids[1][:7], skip_special_tokens=True).strip()
    assert not stopped.answers[1].endswith("\n")
