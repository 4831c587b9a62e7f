"""Optional backend: any lm-evaluation-harness task list, run on the model already in memory.

The model is wrapped with ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=...)``
(a PEFT-wrapped model is passed as its base model, whose LoRA layers stay active), and
``lm_eval.simple_evaluate`` runs the tasks; its whole results dict (configs included, made
JSON-safe) is kept as ``"native"`` and written by ``loku eval`` as ``lm_eval_results.json``. The
default list is the paper's nine reasoning tasks; they download their data from the hub. ``include_path`` adds folders of custom task
YAMLs (e.g. tasks over local JSON files, ``dataset_path: json`` + ``dataset_kwargs.data_files``).

Install with ``pip install 'loku[lm-eval]'``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from loku.errors import ConfigError

__all__ = ["PAPER_TASKS", "json_safe", "lm_eval_available", "run_lm_eval", "summarize_lm_eval_results"]

PAPER_TASKS = ("lambada_openai", "hellaswag", "winogrande", "copa", "arc_easy", "arc_challenge", "piqa",
               "mathqa", "pubmedqa")
INSTALL_HINT = "pip install 'loku[lm-eval]'"


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ConfigError(f"the lm-eval backend needs lm-evaluation-harness ({err.name or err} is missing): "
                          f"{INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


def _unwrap_peft(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def json_safe(value: Any) -> Any:
    """``value`` with every leaf JSON-writable, as lm-eval's own results writer makes it (NumPy numbers ->
    numbers, sets and tuples -> lists, anything else -> its str), NaN/inf -> null (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)  # NumPy / torch scalars
    if callable(item) and getattr(value, "ndim", 0) == 0:
        try:
            return json_safe(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def summarize_lm_eval_results(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from ``simple_evaluate``'s output ("acc,none" -> "acc"; numbers only)."""
    summary: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            entry = summary.setdefault(task, {})
            for key, value in metrics.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or key == "sample_len":
                    continue
                name, _, filt = key.partition(",")
                name = name if filt in ("", "none") else f"{name}[{filt}]"
                entry[name] = float(value) if math.isfinite(float(value)) else None
    for task, counts in (results.get("n-samples") or {}).items():
        if task in summary and isinstance(counts, dict) and "effective" in counts:
            summary[task]["n"] = int(counts["effective"])
    return summary


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] = PAPER_TASKS,
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    seed: int = 0,
    max_length: int | None = None,
    bootstrap_iters: int = 0,
) -> dict:
    """Run lm-eval ``tasks`` on the in-memory ``model``; returns ``{"tasks": {task: {metric: v}}, ...}``.

    ``limit`` is lm-eval's (first N documents per task, or a fraction if < 1). ``bootstrap_iters=0``
    skips standard-error bootstrapping (much faster; lm-eval then reports no stderr for some metrics).
    """
    tasks = [t.strip() for t in tasks if t and t.strip()]
    if not tasks:
        raise ConfigError("no lm-eval tasks given; name at least one (e.g. lambada_openai)")
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    paths = None
    if include_path is not None:
        paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path)]
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)}; see `lm-eval ls tasks` "
                          f"or pass a folder of task YAMLs as include_path")
    lm_kwargs: dict[str, Any] = {"pretrained": _unwrap_peft(model), "tokenizer": tokenizer, "batch_size": batch_size}
    if max_length is not None:
        lm_kwargs["max_length"] = max_length
    lm = HFLM(**lm_kwargs)
    was_training = model.training
    model.eval()
    try:
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    if raw is None:  # non-zero ranks in distributed runs
        return {"tasks": {}, "lm_eval_version": getattr(lm_eval, "__version__", None)}
    return {
        "tasks": summarize_lm_eval_results(raw),
        "n_shot": dict(raw.get("n-shot") or {}),
        "versions": {k: v for k, v in (raw.get("versions") or {}).items()},
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "limit": limit,
        # The harness's whole results dict (task configs, versions, n-shot, ...); loku eval writes it as
        # lm_eval_results.json beside eval.json.
        "native": json_safe(raw),
    }
