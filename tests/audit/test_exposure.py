"""Exposure: the estimates on hand-made scores, batched scoring against a one-at-a-time reference,
and the audit on the tiny model: an unseen canary is near chance, a memorised one is exposed and extracted."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fedpeft.adapters import get_trainable_state
from fedpeft.audit.canary import make_canaries
from fedpeft.audit.exposure import (
    _common_prefix,
    audit_canaries,
    empirical_exposure,
    extrapolated_exposure,
    sample_candidates,
    score_canary,
    suffix_log_likelihoods,
)
from fedpeft.config import AuditConfig, TrainConfig
from fedpeft.data.prompts import tokenize_example, tokenize_examples
from fedpeft.peft_methods import build_peft_method, wrap_model
from fedpeft.trainer import local_steps

CANDIDATES = 100
MAX_SEQ_LEN = 128


def test_empirical_exposure_counts_candidates_at_least_as_likely():
    exposure, rank = empirical_exposure(3.0, np.array([1.0, 2.0, 3.0, 4.0]))
    assert rank == 3  # the truth, the tie and the 4.0
    assert exposure == pytest.approx(math.log2(5 / 3))
    assert empirical_exposure(9.0, np.array([1.0, 2.0, 3.0]))[0] == pytest.approx(2.0)  # log2(4 / 1): the bound


def test_extrapolated_exposure_is_minus_log2_of_the_fitted_cdf():
    ll = np.random.default_rng(0).normal(-20.0, 1.0, 20000)  # a skew-normal with no skew
    assert extrapolated_exposure(-20.0, ll, 30.0) == pytest.approx(1.0, abs=0.1)  # median: half more likely
    four_sigma = -math.log2(0.5 * math.erfc(4 / math.sqrt(2)))  # P(Z <= -4) = 3.2e-5: 14.9 bits
    assert extrapolated_exposure(-16.0, ll, 30.0) == pytest.approx(four_sigma, abs=0.5)
    assert extrapolated_exposure(100.0, ll, 30.0) == 30.0  # capped at log2 |R|
    assert extrapolated_exposure(-20.0, np.full(50, -3.0), 30.0) is None  # nothing to fit


def test_candidates_are_seeded_distinct_and_never_the_secret():
    canary = make_canaries(AuditConfig(canaries=1, secret_digits=3), 0)[0][0]
    cands = sample_candidates(canary, 900, seed=1)
    assert len(set(cands)) == 900 and canary.secret not in cands and all(len(c) == 3 for c in cands)
    assert cands == sample_candidates(canary, 900, seed=1) != sample_candidates(canary, 900, seed=2)


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    peft_model = wrap_model(copy.deepcopy(model), build_peft_method("lora", {"r": 8, "dropout": 0.0}))
    with torch.no_grad():  # a non-zero adapter, so scoring it differs from scoring the base model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft_model


def _reference(model: torch.nn.Module, ids: list[int], start: int) -> float:
    """One record alone, the whole sequence, log_softmax over the vocabulary."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -len(ids):]  # (seq, vocab)
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_batched_scoring_matches_scoring_each_record_alone(sharp, tokenizer, method):
    model = _lora(sharp) if method == "lora" else wrap_model(copy.deepcopy(sharp), build_peft_method("ptuning", {}))
    model.eval()
    canary = make_canaries(AuditConfig(canaries=1), 0)[0][0]
    answers = [canary.answer, canary.with_secret("12"), canary.with_secret("123456789012345"), canary.with_secret("7")]
    examples = [tokenize_example(tokenizer, canary.question, a, MAX_SEQ_LEN) for a in answers]  # unequal lengths
    start = _common_prefix([e.input_ids for e in examples])
    expected = [_reference(model, e.input_ids, start) for e in examples]
    for reuse in (True, False):
        got = suffix_log_likelihoods(model, examples, start, pad_token_id=tokenizer.pad_token_id, batch_size=3,
                                     reuse_prefix=reuse)
        assert got.tolist() == pytest.approx(expected, abs=1e-3)


def _memorise(model: torch.nn.Module, tokenizer, canary) -> None:
    examples = tokenize_examples(tokenizer, [{"question": canary.question, "answer": canary.answer}], MAX_SEQ_LEN)
    cfg = TrainConfig(learning_rate=1e-2, batch_size=1, local_epochs=40, max_steps=40)
    local_steps(model, examples, cfg, seed=0, pad_token_id=tokenizer.pad_token_id, progress=False)


def test_a_memorised_canary_is_exposed_and_extracted_and_unseen_ones_are_not(sharp, tokenizer):
    model = wrap_model(copy.deepcopy(sharp), build_peft_method("lora", {"r": 8, "dropout": 0.0}))
    planted, unseen = make_canaries(AuditConfig(canaries=3), 0)
    kwargs = {"candidates": CANDIDATES, "seed": 0, "max_seq_len": MAX_SEQ_LEN}
    before = score_canary(model, tokenizer, planted[0], planted=True, **kwargs)
    _memorise(model, tokenizer, planted[0])  # only planted[0] is trained on; the other five are controls
    state, _ = get_trainable_state(model), model.train()
    scores = audit_canaries(model, tokenizer, planted[:1], planted[1:] + unseen, progress=False, **kwargs)
    assert model.training and all(torch.equal(state[k], v) for k, v in get_trainable_state(model).items())
    hit, controls = scores[0], scores[1:]
    assert before.rank > 1 and before.exposure < 4  # not exposed before training
    assert hit.planted and hit.rank == 1 and hit.exposure == pytest.approx(math.log2(CANDIDATES + 1))
    assert hit.exposure_extrapolated > 20  # beyond what 100 candidates can show empirically
    assert hit.extracted and planted[0].secret in hit.generated
    assert not any(c.planted or c.extracted for c in controls)
    assert np.mean([c.exposure for c in controls]) < 3  # chance: 1/ln 2 = 1.4 bits on average
    assert max(c.exposure_extrapolated for c in controls) < 8
