"""Distance of an unlearned model to the model that never saw the forget set (docs/algorithms.md §10).

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
* ``privleak``     MUSE's privleak (:func:`loku.metrics.mia.privleak`, docs/algorithms.md §14) from the
  Min-40% AUCs of the model and of the original (the exact "retrained" model): 0 is the target.
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
from loku.lm import (context_length, ensure_pad_token, eval_mode, forward_rows, greedy_generate, pad_sequences,
                     token_logprobs)
from loku.provenance import model_device

__all__ = ["agreement_f1", "check_same_vocabulary", "distinct_n", "generation_quality", "greedy_continuations",
           "heldout_kl", "kl_per_token", "reference_distances", "reference_stats", "reference_suite", "repetition_rate",
           "reference_and_relearn", "sequence_nll", "token_ids"]


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
    device = model_device(model)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    worst = 0.0
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    with eval_mode(original), eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = [seqs[i] for i in order[start:start + batch_size]]
            ids, mask = (t.to(device) for t in pad_sequences(rows, pad))
            p_logits = original(input_ids=ids.to(model_device(original)),
                                attention_mask=mask.to(model_device(original))).logits.to(device)
            q_logits = model(input_ids=ids, attention_mask=mask).logits
            kl = kl_per_token(p_logits, q_logits).double()  # [B, T], padding rows masked below
            valid = mask.bool()
            total += kl[valid].sum().cpu()
            count += int(valid.sum())
            per_text = (kl * valid).sum(1) / valid.sum(1)
            worst = max(worst, float(per_text.max()))
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
            "mia_auc": mia_auc(original, tokenizer, forget, heldout, batch_size=batch_size,
                               max_length=max_tokens)["auc"],
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
    from loku.metrics.mia import PRIVLEAK_ATTACK, mia_auc, privleak

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
        # .get: split records made before min_k_40 was scored have no original AUC for it
        "mia_auc": {name: _gap(mia[name], original_stats["mia_auc"].get(name)) for name in mia},
        "privleak": privleak(mia[PRIVLEAK_ATTACK], original_stats["mia_auc"].get(PRIVLEAK_ATTACK)),
        "generation": generation,
        "continuations": {"model": [tokenizer.decode(c) for c in continuations[:4]],
                          "original": [tokenizer.decode(c) for c in original_stats["continuations"][:4]]},
        "settings": settings,
    }


# ----------------------------------------------------------------------------- loku eval --reference


def check_same_vocabulary(tokenizer: Any, reference_tokenizer: Any, reference_name: str = "the reference") -> None:
    """The distances compare next-token distributions, so both models must share one tokenizer."""
    if tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise ConfigError(f"{reference_name}: its tokenizer is not the evaluated model's "
                          f"({len(reference_tokenizer)} vs {len(tokenizer)} tokens), so the distributions cannot be "
                          "compared; pass as --reference the model the evaluated one was made from")


def reference_suite(model: Any, tokenizer: Any, opts: Any, reference: Any, *, max_tokens: int = 200,
                    prompt_tokens: int = 32, new_tokens: int = 64, rep_n: int = 4) -> dict[str, Any]:
    """``loku eval --reference MODEL``: :func:`reference_distances` of ``model`` to ``reference`` (the model
    that never saw the forget set) on the tdec suite's texts: the forget file (``--forget``, default
    ``tdec/forget/lm_extraction_32_0.csv``, its first ``--limit`` rows) and as many held-out ``pile.csv``
    excerpts, cut to ``max_tokens`` tokens. ``opts`` is the suites' :class:`loku.eval_options.EvalOptions`."""
    from pathlib import Path

    from loku.data import read_texts
    from loku.eval_options import DEFAULT_FORGET
    from loku.provenance import jsonable

    forget_path = Path(opts.forget_path or opts.data_dir / DEFAULT_FORGET)
    pile = opts.eval_file("pile.csv")
    for path, role in ((forget_path, "forget"), (pile, "held-out")):
        opts.use(path, role)
    forget = opts.take(read_texts(forget_path, role="forget"))
    heldout = read_texts(pile, role="held-out")[: len(forget)]
    out = reference_distances(model, tokenizer, forget, heldout, original=reference, max_tokens=max_tokens,
                              prompt_tokens=prompt_tokens, new_tokens=new_tokens, rep_n=rep_n,
                              batch_size=opts.batch_size)
    out["forget_file"] = str(forget_path)
    return jsonable(out)


def reference_and_relearn(model: Any, tokenizer: Any, opts: Any, *, reference: str | None = None,
                          relearn: bool = False, dtype: str = "float32", trust_remote_code: bool = False
                          ) -> dict[str, Any]:
    """What ``loku eval --reference MODEL`` / ``--relearn`` add to the suites' results: ``{"reference": ...}``
    (:func:`reference_suite`) and/or ``{"relearn": ...}`` (:func:`loku.metrics.relearn.relearn_suite`, with
    ``reference`` as control). ``reference`` is loaded here (built-in name, folder or hub id) and freed after."""
    import gc

    from loku.metrics.relearn import relearn_suite
    from loku.models import load_model

    out: dict[str, Any] = {}
    original = None
    if reference is not None:
        original, reference_tokenizer = load_model(reference, dtype=dtype, trust_remote_code=trust_remote_code,
                                                   progress=opts.progress)
        check_same_vocabulary(tokenizer, reference_tokenizer, reference)
        out["reference"] = {"model": str(reference), **reference_suite(model, tokenizer, opts, original)}
    if relearn:
        out["relearn"] = relearn_suite(model, tokenizer, opts, original=original)
    del original
    gc.collect()
    return out
