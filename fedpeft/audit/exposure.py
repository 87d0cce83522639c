"""Exposure of a canary's secret under a model, and whether greedy generation extracts it.

Carlini et al. 2019, "The Secret Sharer" (https://arxiv.org/abs/1802.08232), §4. The model
scores the true record and ``n`` records with random secrets of the same length, each as the
log-likelihood of the answer tokens after the shared prompt and answer prefix (exactly the
token ids training saw: :func:`fedpeft.data.prompts.tokenize_example`). With ``c`` candidates
scoring at least as high as the truth, the rank among all ``|R| = 10**digits`` secrets is
estimated as ``|R| (1 + c) / (1 + n)``, so

* empirical exposure ``= log2 |R| - log2 rank = log2((1 + n) / (1 + c))``, at most
  ``log2(1 + n)`` (11 bits for 2000 candidates);
* extrapolated exposure (§4.3) ``= -log2 F(x)``, where ``F`` is a skew-normal fitted to the
  candidates' log-perplexities and ``x`` the true secret's: it can reach ``log2 |R|`` (30 bits
  for 9 digits) with a few thousand candidates.

A secret the model has not seen is exchangeable with the candidates, so its exposure is about
``1/ln 2 = 1.4`` bits on average whatever the model prefers.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
from peft import PeftModel
from scipy import stats
from tqdm.auto import tqdm
from transformers import Cache, PreTrainedTokenizerBase

from fedpeft.audit.canary import Canary, random_secret
from fedpeft.data.prompts import TokenizedExample, collate, tokenize_example
from fedpeft.errors import ConfigError
from fedpeft.generation import Model, eval_mode, model_device, run_generation


@dataclass
class CanaryScore:
    """One canary's audit result (a row of ``report.json``)."""

    name: str
    secret: str
    planted: bool
    log_likelihood: float  # nats of the secret (and the record's end) given prompt and answer prefix
    rank: int  # 1 + candidates scoring at least as high as the true secret
    candidates: int
    exposure: float  # empirical, bits
    exposure_extrapolated: float | None  # skew-normal fit, bits; None if all candidates tie
    generated: str = ""
    extracted: bool = False  # greedy generation contains the secret

    def to_dict(self) -> dict:
        return asdict(self)


def sample_candidates(canary: Canary, n: int, seed: int) -> list[str]:
    """``n`` distinct random secrets of the canary's length, none equal to its secret (seeded)."""
    digits = len(canary.secret)
    if n >= 10**digits:
        raise ConfigError(f"audit.candidates: {n} candidates besides the true secret do not exist among the "
                          f"{10**digits} secrets of {digits} digits; use fewer candidates or more secret_digits")
    rng = random.Random(f"fedpeft-candidates-{seed}-{canary.name}")
    out: dict[str, None] = {}
    while len(out) < n:
        s = random_secret(rng, digits)
        if s != canary.secret:
            out[s] = None
    return list(out)


def _common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest token prefix all ``rows`` share."""
    first, n = rows[0], min(len(r) for r in rows)
    for row in rows[1:]:
        n = next((i for i in range(n) if row[i] != first[i]), n)
    return n


def suffix_log_likelihoods(model: Model, examples: list[TokenizedExample], start: int, *, pad_token_id: int,
                           batch_size: int = 32, reuse_prefix: bool = True) -> torch.Tensor:
    """Sum of the log-probabilities (nats) of each example's tokens from position ``start`` on.

    The shared first ``start`` tokens (prompt and answer prefix, most of each record) are run
    once and their KV cache reused for every batch, unless the adapter is a prompt-learning one
    (its virtual tokens come first) or ``reuse_prefix`` is off.

    Args:
        model: A base model or PeftModel (prompt-learning virtual tokens are handled).
        examples: Tokenized records sharing their first ``start`` tokens.
        start: First scored position (``>= 1``).
        pad_token_id: Padding id (padding is masked).
        batch_size: Records per forward pass.
        reuse_prefix: Run the shared prefix once (same scores up to float rounding, faster).

    Returns:
        ``(len(examples),)`` float64 tensor.
    """
    device, out = model_device(model), []
    with eval_mode(model), torch.no_grad():
        prefix = None
        if reuse_prefix and not _prompt_learning(model):
            prefix = _run_prefix(model, torch.tensor([examples[0].input_ids[:start]], device=device))
        for first in range(0, len(examples), batch_size):
            batch = collate(examples[first:first + batch_size], pad_token_id)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (batch, seq)
            logits = _target_logits(model, ids, mask, start, prefix).float()  # (batch, seq - start, vocab)
            # log-softmax of the target tokens only (batch, seq - start): no second vocab-sized tensor
            token_logp = logits.gather(-1, ids[:, start:, None]).squeeze(-1) - logits.logsumexp(dim=-1)
            out.append((token_logp * mask[:, start:]).sum(dim=1).double().cpu())
    return torch.cat(out)


def _prompt_learning(model: Model) -> bool:
    return isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning


def _run_prefix(model: Model, prefix: torch.Tensor) -> tuple[Cache, torch.Tensor]:
    """KV cache of ``prefix`` (1, start) and the logits (1, vocab) its last position gives."""
    out = model(input_ids=prefix, use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1]


def _target_logits(model: Model, ids: torch.Tensor, mask: torch.Tensor, start: int,
                   prefix: tuple[Cache, torch.Tensor] | None) -> torch.Tensor:
    """Logits (batch, seq - start, vocab) predicting tokens ``start ..`` of right-padded ``ids`` (batch, seq)."""
    if prefix is None:
        keep = ids.shape[1] - start + 1  # logits at start-1 .. end predict tokens start .. end
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits[:, -keep:-1]
    cache, last = copy.deepcopy(prefix[0]), prefix[1]
    cache.batch_repeat_interleave(ids.shape[0])
    full_mask = torch.cat([mask.new_ones(ids.shape[0], start), mask[:, start:]], dim=1)
    logits = model(input_ids=ids[:, start:], attention_mask=full_mask, cache=cache).logits
    return torch.cat([last.expand(ids.shape[0], -1)[:, None], logits[:, :-1]], dim=1)


def empirical_exposure(true_ll: float, candidate_ll: np.ndarray) -> tuple[float, int]:
    """``(exposure in bits, rank)``: ``log2((1 + n) / rank)`` with ``rank = 1 + #(candidates >= true)``."""
    rank = 1 + int((candidate_ll >= true_ll).sum())
    return math.log2((1 + len(candidate_ll)) / rank), rank


def extrapolated_exposure(true_ll: float, candidate_ll: np.ndarray, max_bits: float) -> float | None:
    """``-log2 F(-true_ll)``, ``F`` a skew-normal fitted to the candidates' ``-ll``, in ``[0, max_bits]``.

    Returns None when the candidates' scores are all equal (no distribution to fit).
    """
    nll = -np.asarray(candidate_ll, dtype=np.float64)
    if np.ptp(nll) == 0 or not np.isfinite(nll).all():
        return None
    a, loc, scale = stats.skewnorm.fit(nll)
    log_cdf = float(stats.skewnorm.logcdf(-true_ll, a, loc, scale))
    return float(min(max(-log_cdf / math.log(2), 0.0), max_bits))


def _check_fits(example: TokenizedExample, canary: Canary, eos_id: int, max_seq_len: int) -> None:
    """Raises ConfigError when ``data.max_seq_len`` cut the canary's answer (its EOS is gone)."""
    if example.input_ids[-1] != eos_id:
        raise ConfigError(f"data.max_seq_len={max_seq_len} cuts the canary record {canary.question!r} short, so its "
                          "secret was not trained on as a whole; raise data.max_seq_len and run the job again")


def score_canary(model: Model, tokenizer: PreTrainedTokenizerBase, canary: Canary, *, candidates: int, seed: int,
                 planted: bool, system_prompt: str | None = None, max_seq_len: int = 384,
                 batch_size: int = 32) -> CanaryScore:
    """Rank ``canary``'s secret among ``candidates`` random ones by the model's likelihood.

    Args:
        model: The model under audit (left in the train/eval mode it was in, unchanged).
        tokenizer: Its tokenizer.
        canary: The canary.
        candidates: Random secrets to compare with (seeded by ``seed`` and the canary).
        seed: The job's seed.
        planted: Whether the canary was trained on (recorded in the result).
        system_prompt: ``data.system_prompt`` of the job (the training format).
        max_seq_len: ``data.max_seq_len`` of the job.
        batch_size: Records scored per forward pass.

    Returns:
        The canary's score; ``generated``/``extracted`` are filled by :func:`audit_canaries`.

    Raises:
        ConfigError: if ``max_seq_len`` cuts the record, or ``candidates`` exceed the secrets there are.
    """
    secrets = [canary.secret, *sample_candidates(canary, candidates, seed)]
    examples = [tokenize_example(tokenizer, canary.question, canary.with_secret(s), max_seq_len, system_prompt)
                for s in secrets]
    _check_fits(examples[0], canary, tokenizer.eos_token_id, max_seq_len)
    start = _common_prefix([e.input_ids for e in examples])  # prompt + answer prefix
    ll = suffix_log_likelihoods(model, examples, start, pad_token_id=tokenizer.pad_token_id,
                                batch_size=batch_size).numpy()
    exposure, rank = empirical_exposure(ll[0], ll[1:])
    max_bits = len(canary.secret) * math.log2(10)
    return CanaryScore(canary.name, canary.secret, planted, float(ll[0]), rank, candidates, exposure,
                       extrapolated_exposure(ll[0], ll[1:], max_bits))


def greedy_answers(model: Model, tokenizer: PreTrainedTokenizerBase, canaries: list[Canary], *,
                   system_prompt: str | None = None) -> list[str]:
    """Greedy answers (no repetition penalty) to the canaries' questions, long enough to hold the record."""
    longest = max(len(tokenizer(c.answer, add_special_tokens=False)["input_ids"]) for c in canaries)
    return run_generation(model, tokenizer, [c.question for c in canaries], system_prompt=system_prompt,
                          max_new_tokens=longest + 4, repetition_penalty=1.0, progress=False).answers


def audit_canaries(model: Model, tokenizer: PreTrainedTokenizerBase, planted: list[Canary], unseen: list[Canary], *,
                   candidates: int, seed: int, system_prompt: str | None = None, max_seq_len: int = 384,
                   batch_size: int = 32, progress: bool = True) -> list[CanaryScore]:
    """Score every planted and unseen canary and check what greedy generation gives.

    Args: as in :func:`score_canary`; ``progress`` shows a bar over canaries.

    Returns:
        One score per canary, planted first, each with ``generated`` and ``extracted`` set.
    """
    labelled = [(c, True) for c in planted] + [(c, False) for c in unseen]
    scores = [score_canary(model, tokenizer, c, candidates=candidates, seed=seed, planted=p,
                           system_prompt=system_prompt, max_seq_len=max_seq_len, batch_size=batch_size)
              for c, p in tqdm(labelled, desc="canaries", unit="canary", disable=not progress)]
    answers = greedy_answers(model, tokenizer, [c for c, _ in labelled], system_prompt=system_prompt)
    for score, answer in zip(scores, answers):
        score.generated, score.extracted = answer, score.secret in answer
    return scores
