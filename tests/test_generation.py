"""Generation: batching, the direct P-Tuning path and merged LoRA give the reference tokens.

The tiny random Llama of the fixtures produces one token forever (its weights are too small
to separate the logits), which would make every equality below hold trivially. The tests use
copies with larger random weights: ``lively`` (std 0.3) never repeats itself and answers each
question differently; ``repetitive`` (std 0.1) loops, so the repetition penalty changes it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, get_peft_model

from fedpeft.data.prompts import prompt_ids
from fedpeft.errors import ModelError
from fedpeft.generation import PromptRepetitionPenalty, generate_answers, merged_lora, run_generation

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


def _ptuning(model: torch.nn.Module) -> PeftModel:
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=32)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    _perturb(list(peft_model.prompt_encoder.parameters()), seed=1, std=0.5)
    return peft_model


def _prefix(model: torch.nn.Module) -> PeftModel:
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prefix_projection=True,
                                encoder_hidden_size=32)
    peft_model = get_peft_model(copy.deepcopy(model), config)
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


@pytest.fixture
def ptuning_model(lively) -> PeftModel:
    return _ptuning(lively)


@pytest.fixture
def prefix_model(lively) -> PeftModel:
    return _prefix(lively)


@pytest.fixture
def lora_model(lively) -> PeftModel:
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(copy.deepcopy(lively), config)
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
