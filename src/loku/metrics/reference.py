"""Distance of an unlearned model to the model that never saw the forget set (ALGORITHMS.md §10).

When the forget set was planted into a model by fine-tuning, the model before planting is the
exact "retrained without the data" reference real deployments never have. Unlearning should end
near it, not merely below the stop thresholds. Each distance is reported as ``{"model",
"original", "gap"}`` (gap = model minus original), since the original's value is the target:

* ``forget_nll``   mean token NLL of the forget texts. A gap far above 0 marks the forgotten
  text (an overshoot a membership attack can see); near 0 is the goal.
* ``heldout_kl``   KL(p_original || p_model) per token on held-out text (token-weighted mean;
  the original's own value is 0).
* ``mia_auc``      membership-inference AUC, forget vs held-out texts (:mod:`loku.metrics.mia`),
  per attack. The original's AUC is the target, not 0.5 or 1.0.
* ``generation``   greedy continuations of the forget texts' first ``prompt_tokens`` tokens:
  ``repetition_rate`` (seq-rep-n of Welleck et al. 2019: the share of a continuation's n-grams
  that repeat an earlier n-gram of the same continuation, ``1 - unique/total``, mean over
  prompts), ``distinct_1`` / ``distinct_2`` (unique n-grams / n-grams over all continuations,
  Li et al. 2016) and ``agreement_f1`` (token-bag F1 of the model's continuation against the
  original's on the same prompt; the original's own value is 1). ``repetition_ratio`` is
  model / original.

Math on tensors is in pure functions (float32 log-probabilities, sums in float64); the model
functions batch with :func:`loku.lm.forward_rows` / :func:`loku.lm.greedy_generate`.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from loku.errors import ConfigError, DataError
from loku.lm import context_length, ensure_pad_token, forward_rows, greedy_generate, token_logprobs

__all__ = ["agreement_f1", "distinct_n", "generation_quality", "greedy_continuations", "heldout_kl", "kl_per_token",
           "reference_distances", "reference_stats", "repetition_rate", "sequence_nll", "token_ids"]


# ----------------------------------------------------------------------------- pure functions


def kl_per_token(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p || q) for each position: ``sum_v p_v (log p_v - log q_v)`` from logits ``[..., V]``, float32.

    Positions where ``p_v = 0`` add nothing (``0 log 0 = 0``), so ``-inf`` logits are allowed in p.
    """
    if p_logits.shape != q_logits.shape:
        raise ConfigError(f"KL needs logits of the same shape, got {tuple(p_logits.shape)} and "
                          f"{tuple(q_logits.shape)}: the two models must share a vocabulary")
    log_p = F.log_softmax(p_logits.float(), dim=-1)
    log_q = F.log_softmax(q_logits.float(), dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1).clamp(min=0.0)  # rounding can give -1e-9 for identical rows


def _ngrams(tokens: Sequence[Any], n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repetition_rate(tokens: Sequence[Any], n: int = 4) -> float:
    """seq-rep-n: ``1 - unique n-grams / n-grams`` of one sequence (0.0 when it has no n-gram)."""
    grams = _ngrams(list(tokens), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(sequences: Sequence[Sequence[Any]], n: int) -> float:
    """Unique n-grams / n-grams over all ``sequences`` together (0.0 when there is none)."""
    grams = [g for seq in sequences for g in _ngrams(list(seq), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def agreement_f1(prediction: Sequence[Any], reference: Sequence[Any]) -> float:
    """Bag-of-tokens F1 of ``prediction`` against ``reference`` (1.0 when both are empty)."""
    if not prediction and not reference:
        return 1.0
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def generation_quality(continuations: Sequence[Sequence[Any]], n: int = 4) -> dict[str, float]:
    """Repetition rate (mean seq-rep-``n``), distinct-1, distinct-2 and mean length of continuations."""
    if not continuations:
        raise DataError("no continuations to score")
    return {"repetition_rate": sum(repetition_rate(c, n) for c in continuations) / len(continuations),
            "distinct_1": distinct_n(continuations, 1), "distinct_2": distinct_n(continuations, 2),
            "mean_length": sum(len(c) for c in continuations) / len(continuations)}


def _gap(model_value: float | None, original_value: float | None) -> dict[str, float | None]:
    gap = None if model_value is None or original_value is None else model_value - original_value
    return {"model": model_value, "original": original_value, "gap": gap}


# ----------------------------------------------------------------------------- with models


def token_ids(tokenizer: Any, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each text without special tokens, cut to ``max_tokens``."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return [list(s)[:max_tokens] if max_tokens else list(s) for s in ids]


def sequence_nll(model: Any, tokenizer: Any, texts: Sequence[str], *, max_tokens: int | None = None,
                 batch_size: int = 8) -> list[float]:
    """Mean token NLL (nats) of each text, tokens 2..T scored; NaN for a text under 2 tokens."""
    seqs = token_ids(tokenizer, texts, max_tokens or context_length(model))
    out = [math.nan] * len(seqs)
    scorable = [s if len(s) >= 2 else [] for s in seqs]
    for i, logits in forward_rows(model, scorable, pad_id=ensure_pad_token(tokenizer), batch_size=batch_size):
        lp = token_logprobs(logits[:-1], torch.as_tensor(seqs[i][1:], device=logits.device))
        out[i] = float(-lp.double().mean())
    return out


def heldout_kl(original: Any, model: Any, tokenizer: Any, texts: Sequence[str], *, max_tokens: int | None = None,
               batch_size: int = 8) -> dict[str, float]:
    """Token-weighted mean KL(p_original || p_model) over every position of ``texts`` (predicting
    tokens 2..T and the one after the last), plus the largest per-text mean."""
    seqs = token_ids(tokenizer, texts, max_tokens or min(context_length(model), context_length(original)))
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise DataError("held-out KL: no text has 2 tokens")
    pad = ensure_pad_token(tokenizer)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    worst = 0.0
    # Both generators visit the rows in the same (length-sorted) order: one batch of each in memory.
    pairs = zip(forward_rows(original, seqs, pad_id=pad, batch_size=batch_size),
                forward_rows(model, seqs, pad_id=pad, batch_size=batch_size))
    for (i, p_logits), (j, logits) in pairs:
        assert i == j
        kl = kl_per_token(p_logits.to(logits.device), logits).double()
        total += kl.sum().cpu()
        count += kl.numel()
        worst = max(worst, float(kl.mean()))
    return {"kl": float(total) / count, "max_text_kl": worst, "tokens": count}


def greedy_continuations(model: Any, tokenizer: Any, texts: Sequence[str], *, prompt_tokens: int = 16,
                         new_tokens: int = 32, batch_size: int = 8) -> list[list[int]]:
    """Greedy continuation of each text's first ``prompt_tokens`` tokens, ``new_tokens`` long (no
    stop at EOS, so every model is scored on continuations of the same length)."""
    prompts = token_ids(tokenizer, texts, prompt_tokens)
    return greedy_generate(model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=batch_size,
                           stop_at_eos=False)


def reference_stats(original: Any, tokenizer: Any, forget: Sequence[str], heldout: Sequence[str], *,
                    max_tokens: int | None = None, prompt_tokens: int = 16, new_tokens: int = 32, rep_n: int = 4,
                    batch_size: int = 8) -> dict[str, Any]:
    """The original model's side of :func:`reference_distances`, computed once and reused for every
    model compared with it (the held-out KL needs the original itself)."""
    from loku.metrics.mia import mia_auc

    continuations = greedy_continuations(original, tokenizer, forget, prompt_tokens=prompt_tokens,
                                         new_tokens=new_tokens, batch_size=batch_size)
    return {"forget_nll": sequence_nll(original, tokenizer, forget, max_tokens=max_tokens, batch_size=batch_size),
            "mia_auc": mia_auc(original, tokenizer, forget, heldout, batch_size=batch_size, max_length=max_tokens)["auc"],
            "continuations": continuations,
            "generation": generation_quality(continuations, rep_n),
            "settings": {"max_tokens": max_tokens, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                         "rep_n": rep_n, "n_forget": len(forget), "n_heldout": len(heldout)}}


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def reference_distances(model: Any, tokenizer: Any, forget: Sequence[str], heldout: Sequence[str], *,
                        original: Any, original_stats: dict[str, Any] | None = None,
                        kl_texts: Sequence[str] | None = None, max_tokens: int | None = None,
                        prompt_tokens: int = 16, new_tokens: int = 32, rep_n: int = 4,
                        batch_size: int = 8) -> dict[str, Any]:
    """Every distance of the module docstring, model vs ``original``, each as {"model", "original", "gap"}.

    ``original_stats`` (:func:`reference_stats` with the same texts and settings) saves recomputing the
    original's side; ``kl_texts`` (default ``heldout``) are the held-out texts of the KL.
    """
    from loku.metrics.mia import mia_auc

    settings = {"max_tokens": max_tokens, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rep_n": rep_n,
                "n_forget": len(forget), "n_heldout": len(heldout)}
    if original_stats is None:
        original_stats = reference_stats(original, tokenizer, forget, heldout, max_tokens=max_tokens,
                                         prompt_tokens=prompt_tokens, new_tokens=new_tokens, rep_n=rep_n,
                                         batch_size=batch_size)
    elif original_stats.get("settings") != settings:
        raise ConfigError(f"original_stats were computed with {original_stats.get('settings')}, not {settings}; "
                          "compute them with the same texts and settings")
    nll = sequence_nll(model, tokenizer, forget, max_tokens=max_tokens, batch_size=batch_size)
    mia = mia_auc(model, tokenizer, forget, heldout, batch_size=batch_size, max_length=max_tokens)["auc"]
    kl = heldout_kl(original, model, tokenizer, list(kl_texts if kl_texts is not None else heldout),
                    max_tokens=max_tokens, batch_size=batch_size)
    continuations = greedy_continuations(model, tokenizer, forget, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                                         batch_size=batch_size)
    quality = generation_quality(continuations, rep_n)
    base = original_stats["generation"]
    generation = {name: _gap(quality[name], base[name]) for name in quality}
    generation["repetition_ratio"] = (quality["repetition_rate"] / base["repetition_rate"]
                                      if base["repetition_rate"] > 0 else None)
    agreement = [agreement_f1(a, b) for a, b in zip(continuations, original_stats["continuations"])]
    generation["agreement_f1"] = _gap(sum(agreement) / len(agreement), 1.0)
    return {
        "forget_nll": _gap(_mean(nll), _mean(original_stats["forget_nll"])),
        "forget_nll_per_text": {"model": nll, "original": original_stats["forget_nll"]},
        "heldout_kl": {**_gap(kl["kl"], 0.0), "max_text_kl": kl["max_text_kl"], "tokens": kl["tokens"]},
        "mia_auc": {name: _gap(mia[name], original_stats["mia_auc"][name]) for name in mia},
        "generation": generation,
        "continuations": {"model": [tokenizer.decode(c) for c in continuations[:4]],
                          "original": [tokenizer.decode(c) for c in original_stats["continuations"][:4]]},
        "settings": settings,
    }
