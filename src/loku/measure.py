"""What the unlearning loop measures: the stop-rule metrics of a state (docs/algorithms.md §6), the
``loku eval`` suites before and after, and the cost (FLOPs, peak memory)."""
from __future__ import annotations

import math
from typing import Any

import torch

from . import lm
from .config import UnlearnConfig
from .provenance import model_device


def memorization(model, batches) -> float:
    from .metrics import memorization_accuracy

    return lm.mean_over_batches(memorization_accuracy, model, batches)


def extraction(model, batches, n: int, progress: bool = False) -> float:
    from .metrics import extraction_likelihood

    return lm.mean_over_batches(extraction_likelihood, model, batches, n=n, progress=progress)


def heldout_scores(model, batches) -> tuple[float, float]:
    """(MA, perplexity) of the held-out batches from one float32 forward pass per batch."""
    from .metrics.memorization import memorization_and_nll

    device = model_device(model)
    ma, total, count = [], 0.0, 0
    with lm.eval_mode(model):
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            values, nll, tokens = memorization_and_nll(model, b["input_ids"], b["attention_mask"], b["labels"])
            ma.append(values.float().cpu())
            total, count = total + float(nll), count + tokens
    values = torch.cat(ma) if ma else torch.zeros(0)
    return (float(values.mean()) if values.numel() else float("nan")), math.exp(total / max(count, 1))


def evaluate_state(model, eval_batches: dict[str, list], el_n: int, *, with_el: bool,
                   ma_threshold: float | None = None, progress: bool = False) -> dict[str, Any]:
    """MA (always), EL (when asked, or once forget MA already passes: the same stopping epoch) and held-out PPL."""
    model.eval()
    out: dict[str, Any] = {"forget_ma": memorization(model, eval_batches["forget"])}
    if eval_batches["validation"]:
        out["val_ma"], out["val_ppl"] = heldout_scores(model, eval_batches["validation"])
    if with_el or (ma_threshold is not None and out["forget_ma"] <= ma_threshold):
        out["forget_el"] = extraction(model, eval_batches["forget"], el_n, progress)
        if with_el and eval_batches["validation"]:
            out["val_el"] = extraction(model, eval_batches["validation"], el_n, progress)
    else:
        out["forget_el"] = None
    return out


def run_eval_suites(model, tokenizer, cfg: UnlearnConfig, thresholds: dict | str) -> dict | None:
    """The ``loku eval`` suites named by ``--eval-suites`` on ``model`` (result of run_suites), or None.

    ``thresholds``: "self" before unlearning (the model is its own pre-unlearning reference), the run's
    stop-rule thresholds after it, so tdec's "forgotten" uses the values from before unlearning.
    """
    if not cfg.eval_suites:
        return None
    from .evaluate import run_suites

    return run_suites(model, tokenizer, [cfg.eval_suites], seed=cfg.seed, progress=cfg.progress,
                      model_name=cfg.model, thresholds=thresholds, **cfg.eval_options())


def estimate_flops(n_params: int, *, full: bool, tokens_trained: int, fisher_tokens: int, eval_tokens: int,
                   measurements: int, reference: bool = False) -> dict[str, float]:
    """Dense-transformer estimate: forward 2N per token, backward 4N (2N when base weights are frozen),
    plus 2N per token for the frozen reference model's forward (NPO, KL retain term); a Fisher
    pass is a forward and a backward (6N per token).

    Evaluation counts the teacher-forced passes only (EL's generated tokens are not counted).
    """
    per_token_train = (6 if full else 4) * n_params + (2 * n_params if reference else 0)
    return {"training": float(per_token_train * tokens_trained), "fisher": float(6 * n_params * fisher_tokens),
            "evaluation_teacher_forced": float(2 * n_params * eval_tokens * measurements)}


def token_count(batches: list[dict]) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
