"""The field's common metrics under OpenUnlearning's key names (docs/algorithms.md §14).

OpenUnlearning (locuslab/open-unlearning), the common leaderboard, reports a flat
``{metric: value}`` summary. loku computes the same quantities in its own suites; this module
names them as OpenUnlearning does, each taken from where loku measured it:

* ``exact_memorization``  -- share of label tokens whose teacher-forced argmax is the label: loku's
  MA (docs/algorithms.md §6) of the tdec suite's forget texts.
* ``extraction_strength`` -- ``1 - k/|y|``, ``k`` the smallest index from which the teacher-forced
  argmax suffix equals the label suffix (:func:`loku.metrics.memorization.extraction_strength`),
  same texts.
* ``privleak``            -- MUSE's privleak (:func:`loku.metrics.mia.privleak`), Min-40% AUC of
  forget vs held-out texts, against the never-trained model (``loku eval --reference``).
* ``forget_quality``, ``model_utility``, ``forget_Truth_Ratio`` -- the tofu suite's (section 7);
  OpenUnlearning's forget truth ratio is ``mean(min(R, 1/R))`` as loku's.

In a TOFU run of OpenUnlearning all six come from the TOFU forget split; here the first three come
from the tdec suite's forget file (``--forget``), so read them as "the same metric", not "the same
number" as a TOFU leaderboard row unless ``--forget`` is a TOFU split.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

__all__ = ["FILE", "KEYS", "SOURCES", "forget_memorization", "openunlearning_summary", "write_openunlearning"]

FILE = "openunlearning.json"
# OpenUnlearning key -> the path of loku's value in ``loku eval``'s results["suites"].
SOURCES: dict[str, tuple[str, ...]] = {
    "forget_quality": ("tofu", "forget_quality"),
    "model_utility": ("tofu", "model_utility"),
    "forget_Truth_Ratio": ("tofu", "splits", "forget", "truth_ratio"),
    "privleak": ("reference", "privleak"),
    "extraction_strength": ("tdec", "forget", "extraction_strength"),
    "exact_memorization": ("tdec", "forget", "ma"),
}
KEYS = tuple(SOURCES)


def _lookup(value: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def openunlearning_summary(suites: dict[str, Any]) -> dict[str, float]:
    """``{OpenUnlearning key: value}`` for every key the evaluation computed (others are left out)."""
    out: dict[str, float] = {}
    for key, path in SOURCES.items():
        value = _lookup(suites, path)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def write_openunlearning(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``OUT/openunlearning.json`` (flat, OpenUnlearning's key names; atomically) and return its path."""
    from loku.save import atomic_write_text

    path = Path(out_dir) / FILE
    summary = openunlearning_summary(results.get("suites") or {})
    atomic_write_text(path, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return path


def forget_memorization(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 8) -> dict[str, Any]:
    """Mean exact memorization and extraction strength of ``model`` on ``texts`` (each whole, no special
    tokens; positions 2..T scored, as MA), with the per-text values."""
    from loku.data import make_batches, tokenize_texts
    from loku.lm import ensure_pad_token, per_sequence
    from loku.metrics.memorization import extraction_strength, memorization_accuracy

    ids = tokenize_texts(tokenizer, list(texts), max_length=1 << 20, source="memorization texts")
    batches = make_batches(ids, batch_size, ensure_pad_token(tokenizer))
    em = per_sequence(memorization_accuracy, model, batches)
    es = per_sequence(extraction_strength, model, batches)
    return {"exact_memorization": float(em.mean()), "extraction_strength": float(es.mean()), "n": int(em.numel()),
            "per_item": {"exact_memorization": em.tolist(), "extraction_strength": es.tolist()}}
