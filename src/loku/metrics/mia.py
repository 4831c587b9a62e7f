"""Membership-inference attacks (MIA) on the forget set -- an addition beyond the LoKU paper.

After unlearning, the forget texts should look like text the model never saw. Four standard
reference-free attacks give one score per text; each is oriented so that HIGHER means "more
likely a member", and the attack's AUC against held-out non-members is reported (0.5 = the
attack cannot tell them apart; 1 = members all score above non-members).

* ``loss``     -- minus the mean token NLL (Yeom et al. 2018).
* ``zlib``     -- minus the log-perplexity (mean token NLL) divided by the zlib entropy of the
  text, ``len(zlib.compress(text.encode("utf-8")))`` bytes (Carlini et al. 2021, as in their
  extraction code and the Min-K% reference code); the ratio discounts texts that are easy for
  any compressor.
* ``min_k``    -- Min-K% Prob (Shi et al. 2023): mean of the ``k`` fraction of lowest token
  log-probabilities; members have fewer surprising tokens.
* ``min_k_pp`` -- Min-K%++ (Zhang et al. 2024): each token's log-probability is standardised
  by the model's own next-token distribution, ``z_t = (log p(x_t) - mu_t) / sigma_t`` with
  ``mu_t = E_{v~p}[log p(v)]`` and ``sigma_t^2 = E_{v~p}[(log p(v) - mu_t)^2]``; the score is
  the mean of the ``k`` fraction of lowest ``z_t``.
* ``min_k_40`` -- Min-K% Prob with K fixed at 40%, whatever ``k`` is: MUSE's privleak statistic
  (docs/algorithms.md §14, :func:`privleak`).

Texts are tokenized without special tokens and truncated to the model's context length (or
``max_length``); tokens 2..T are scored as in :mod:`loku.metrics.perplexity`. All math is
float32 on log-probabilities ``logit - logsumexp``. ``k`` tokens means ``max(1, floor(k * n))``
of the ``n`` scored tokens. A text with fewer than 2 tokens has no score (NaN) and is left out
of the AUCs.
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from loku.errors import ConfigError, DataError
from loku.lm import context_length, ensure_pad_token, forward_rows, token_logprobs

__all__ = ["ATTACKS", "PRIVLEAK_ATTACK", "auc", "mia_auc", "mia_scores", "min_k_plus_plus_score", "min_k_score",
           "privleak", "text_scores", "token_zscores", "zlib_entropy"]

ATTACKS = ("loss", "zlib", "min_k", "min_k_pp", "min_k_40")
PRIVLEAK_ATTACK, PRIVLEAK_K = "min_k_40", 0.4  # MUSE's privleak: Min-K% Prob with K = 40%


# ----------------------------------------------------------------------------- pure scores

def _check_k(k: float) -> None:
    if not 0 < k <= 1:
        raise ConfigError(f"k (fraction of lowest-scoring tokens) must be in (0, 1], got {k}")


def _mean_lowest(values: Tensor, k: float) -> float:
    """Mean of the ``max(1, floor(k * n))`` smallest entries (the epsilon absorbs 0.29*100 = 28.99..)."""
    _check_k(k)
    values = values.reshape(-1).float()
    if values.numel() == 0:
        raise DataError("no scored tokens: a text needs at least 2 tokens for a Min-K% score")
    count = max(1, int(math.floor(k * values.numel() + 1e-9)))
    return float(torch.topk(values, count, largest=False).values.mean())


def min_k_score(token_logprobs: Tensor, k: float = 0.2) -> float:
    """Min-K% Prob: mean of the ``k`` fraction of lowest token log-probabilities of one text."""
    return _mean_lowest(token_logprobs, k)


def token_zscores(logits: Tensor, targets: Tensor, eps: float = 1e-6) -> Tensor:
    """Min-K%++ per-token ``z_t = (log p(x_t) - mu_t) / sigma_t`` under the next-token distribution.

    ``logits`` ``[n, V]`` are the predictions for ``targets`` ``[n]`` (already shifted). ``mu`` and
    ``sigma`` are the mean and standard deviation of ``log p(v)`` for ``v ~ p``; the variance is
    computed centred (``E[(log p - mu)^2]``, equal to ``E[(log p)^2] - mu^2`` but without its
    cancellation), and tokens with probability 0 (``-inf`` logits) add nothing. ``sigma`` is
    floored at ``eps`` so a one-hot distribution gives a large finite ``z``, not NaN.
    """
    scores = logits.float()
    logp = scores - torch.logsumexp(scores, dim=-1, keepdim=True)
    p = logp.exp()
    finite = p > 0
    mu = torch.where(finite, p * logp, torch.zeros_like(p)).sum(-1)
    centred = torch.where(finite, logp - mu.unsqueeze(-1), torch.zeros_like(p))
    sigma = (p * centred.square()).sum(-1).sqrt().clamp(min=eps)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (picked - mu) / sigma


def min_k_plus_plus_score(logits: Tensor, targets: Tensor, k: float = 0.2) -> float:
    """Min-K%++: mean of the ``k`` fraction of lowest :func:`token_zscores` of one text."""
    return _mean_lowest(token_zscores(logits, targets), k)


def zlib_entropy(text: str) -> int:
    """Length in bytes of the zlib-compressed UTF-8 text (Carlini et al.'s reference entropy)."""
    return len(zlib.compress(text.encode("utf-8")))


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """P(random member scores above random non-member), ties counting 1/2 (Mann-Whitney U / n1 n0).

    Uses average ranks, so it is exact with ties and O(n log n). NaN scores are not allowed.
    """
    from scipy.stats import rankdata

    members = np.asarray(member_scores, dtype=np.float64).reshape(-1)
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64).reshape(-1)
    if members.size == 0 or nonmembers.size == 0:
        raise DataError(f"AUC needs at least one member and one non-member score "
                        f"(got {members.size} and {nonmembers.size})")
    if np.isnan(members).any() or np.isnan(nonmembers).any():
        raise DataError("AUC scores contain NaN; drop texts without a score first")
    ranks = rankdata(np.concatenate([members, nonmembers]))
    n1, n0 = members.size, nonmembers.size
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def privleak(auc_model: float | None, auc_retrained: float | None) -> float | None:
    """MUSE's privleak (docs/algorithms.md §14): ``(AUC_unlearned - AUC_retrained) / AUC_retrained * 100``.

    MUSE (and OpenUnlearning, which flips its own AUC to match) orients the AUC so that a model that
    still knows the forget set scores near 0; loku's :func:`auc` is the usual "members score higher"
    one, so MUSE's AUC is ``1 - auc`` here. About -100: not unlearned; 0: like the retrained model;
    large positive: over-unlearned (the forget set now looks LESS likely than unseen text).
    None when an AUC is missing or the retrained model's MUSE AUC is 0 (the ratio is undefined)."""
    if auc_model is None or auc_retrained is None or not 0 <= auc_retrained < 1:
        return None
    muse_model, muse_retrained = 1.0 - float(auc_model), 1.0 - float(auc_retrained)
    return (muse_model - muse_retrained) / muse_retrained * 100.0


def text_scores(token_lp: Tensor, logits: Tensor, targets: Tensor, zlib_bytes: int, k: float) -> dict[str, float]:
    """All four member-high scores of one text from its scored tokens' log-probs and logits."""
    mean_nll = float(-token_lp.mean())
    return {
        "loss": -mean_nll,
        "zlib": -mean_nll / max(zlib_bytes, 1),
        "min_k": min_k_score(token_lp, k),
        "min_k_pp": min_k_plus_plus_score(logits, targets, k),
        PRIVLEAK_ATTACK: min_k_score(token_lp, PRIVLEAK_K),
    }


# ----------------------------------------------------------------------------- with a model

def mia_scores(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    k: float = 0.2,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> dict[str, list[float]]:
    """Per-text scores ``{attack: [score per text]}`` (higher = more likely member), texts in order.

    Texts are truncated to their first ``max_length`` tokens (default: the model's context
    length); when a text is cut, the zlib entropy is taken of the decoded kept tokens so both
    halves of the ratio describe the same text. Texts with fewer than 2 tokens score NaN.
    """
    _check_k(k)
    limit = max_length or context_length(model)
    if limit < 2:
        raise ConfigError(f"max_length must be >= 2 to score any token, got {limit}")
    texts = list(texts)
    encoded = [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    seqs = [ids[:limit] for ids in encoded]
    out: dict[str, list[float]] = {name: [math.nan] * len(texts) for name in ATTACKS}
    scorable = [s if len(s) >= 2 else [] for s in seqs]
    for i, logits in forward_rows(model, scorable, pad_id=ensure_pad_token(tokenizer), batch_size=batch_size,
                                  progress=progress, desc="membership inference"):
        targets = torch.as_tensor(seqs[i][1:], device=logits.device)
        lp = token_logprobs(logits[:-1], targets)
        text = texts[i] if len(seqs[i]) == len(encoded[i]) else tokenizer.decode(seqs[i])
        for name, value in text_scores(lp, logits[:-1], targets, zlib_entropy(text), k).items():
            out[name][i] = value
    return out


def mia_auc(
    model: Any,
    tokenizer: Any,
    members: Sequence[str],
    nonmembers: Sequence[str],
    *,
    k: float = 0.2,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> dict:
    """AUC of each attack, members (forget texts) vs non-members (held-out texts).

    Returns ``{"auc": {attack: float}, "k": k, "n_scored": {"members": n, "nonmembers": n},
    "scores": {"members": {attack: [...]}, "nonmembers": {attack: [...]}}}``; texts without a
    score (under 2 tokens) are left out of the AUCs. Raises :class:`DataError` if a side has
    no scorable text.
    """
    kwargs = dict(k=k, batch_size=batch_size, max_length=max_length, progress=progress)
    sides = {"members": mia_scores(model, tokenizer, members, **kwargs),
             "nonmembers": mia_scores(model, tokenizer, nonmembers, **kwargs)}
    kept = {side: {name: [v for v in values if not math.isnan(v)] for name, values in scores.items()}
            for side, scores in sides.items()}
    for side, given in (("members", members), ("nonmembers", nonmembers)):
        if not kept[side]["loss"]:
            raise DataError(f"membership inference: none of the {len(given)} {side} texts has 2 tokens to score")
    return {
        "auc": {name: auc(kept["members"][name], kept["nonmembers"][name]) for name in ATTACKS},
        "k": k,
        "n_scored": {side: len(kept[side]["loss"]) for side in kept},
        "scores": sides,
    }
