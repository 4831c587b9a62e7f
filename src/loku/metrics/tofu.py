"""TOFU metrics (Maini et al. 2024; docs/algorithms.md section 7).

Each QA item is formatted and split into prompt and answer tokens exactly as locuslab/tofu's
``convert_raw_data_to_model_format`` does (:class:`QATemplate`, :func:`qa_token_pair`): full text
``question_start + question + question_end + answer_tag + answer``, tokenised once with the
tokenizer's special tokens; the first ``len(tokenize(question_start + question + question_end,
add_special_tokens=True))`` tokens are the prompt (context, never scored); the remaining tokens
plus the tokenizer's EOS (which TOFU's labels include) are the answer tokens. Tags per model
family as in TOFU's ``config/model_config.yaml``: ``llama2`` ``"[INST] "``, ``" [/INST]"``,
``""``; ``phi`` (and ``generic``, TOFU's tags for phi / stablelm / pythia) ``"Question: "``,
``"\\n"``, ``"Answer: "`` -- so ``"Answer: "`` is part of the scored answer there, as in TOFU.
``chatml`` (SmolLM2, Qwen) is loku's own choice; TOFU had no such model. Greedy generation starts
from the prompt text encoded on its own, as TOFU's ``run_generation`` does. ``chat`` (the default when
the tokenizer has a chat template) scores the items in the model's own chat format instead
(:class:`loku.chat.ChatTemplate`); ``none`` writes question and answer as given.

Definitions, per QA item, scoring only the answer tokens (the prompt is context):

* ``NLL(a)`` = mean over the answer's tokens of ``-log p(token | prompt, previous tokens)``.
* **Prob** = ``exp(-NLL(answer))``. For Real Authors / World Facts it is normalised over the
  options: ``P_true / (P_true + sum_k P_perturbed_k)`` with ``P = exp(-NLL)``.
* **ROUGE-L recall** of the greedy answer (decoded without special tokens, stripped) against
  the reference answer (``rouge_score``, ``use_stemmer=True``).
* **Truth ratio** ``R = exp(mean_k NLL(perturbed_k) - NLL(paraphrased))``
  ``= P_paraphrased / geometric-mean_k P_perturbed_k``. The "paraphrased" answer is
  ``paraphrased_answer`` (forget / retain files) or, where a file has none (Real Authors,
  World Facts), the true ``answer`` -- as the TOFU code does.
  Split summaries: on the forget split ``mean(min(R, 1/R))``; elsewhere the utility value
  ``mean(max(0, 1 - 1/R))`` = ``mean(max(0, 1 - P_pert/P_para))``.
* **Forget quality** = p-value of the two-sided KS test (``scipy.stats.ks_2samp``) between the
  per-item ``R`` of the evaluated model on the forget split and those of a retain-only
  reference model (a reference log, see :func:`save_reference_log`).
* **Model utility** = harmonic mean of the 9 numbers {retain, real_authors, world_facts} x
  {Prob, ROUGE-L recall, truth-ratio utility value} (0 if any of them is 0).

The TOFU evaluation reads ``{forget}_perturbed`` (forget), ``retain_perturbed`` (retain),
``real_authors_perturbed`` and ``world_facts_perturbed``. ``legacy_300=True`` keeps only the
first 300 items of each (the original pipeline's ``ds_size=300``); ``limit`` then keeps the
first ``limit`` of those.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

from loku.errors import ConfigError, DataError
from loku.save import atomic_write_text

# The question/answer templates live with the chat templates (loku.chat); TOFU's scoring uses them.
from loku.chat import TEMPLATES, QATemplate, choose_template, qa_token_pair  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from loku.chat import ChatTemplate

__all__ = [
    "HUB_DATASET",
    "QATemplate",
    "SCORING_VERSION",
    "TEMPLATES",
    "TOFU_SPLITS",
    "answer_nll",
    "check_reference",
    "choose_template",
    "evaluate_tofu",
    "evaluate_tofu_split",
    "forget_quality",
    "load_reference_log",
    "load_tofu",
    "model_utility",
    "normalized_prob",
    "prob_from_nll",
    "qa_token_pair",
    "rouge_l_recall",
    "save_reference_log",
    "truth_ratio",
    "truth_ratio_forget_stat",
    "truth_ratio_utility",
]

HUB_DATASET = "locuslab/TOFU"
TOFU_SPLITS = (
    "full", "forget01", "forget05", "forget10", "retain90", "retain95", "retain99",
    "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
    "holdout01", "holdout05", "holdout10", "real_authors", "real_authors_perturbed",
    "world_facts", "world_facts_perturbed",
)
EVAL_SPLITS = {  # role -> file, in the order they are evaluated
    "forget": "{forget}_perturbed",
    "retain": "retain_perturbed",
    "real_authors": "real_authors_perturbed",
    "world_facts": "world_facts_perturbed",
}
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("prob", "rouge_l_recall", "truth_ratio")
NORMALIZED_PROB_SPLITS = ("real_authors", "world_facts")
LEGACY_SIZE = 300
REFERENCE_FORMAT = "loku-tofu-reference"


# ----------------------------------------------------------------------------- loading

def _validate_rows(rows: list[dict], source: str) -> list[dict]:
    has_para = ["paraphrased_answer" in r for r in rows]
    for i, row in enumerate(rows, start=1):
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError(f"{source}: row {i}: {key!r} must be a non-empty string; fix that row")
        if any(has_para) and not isinstance(row.get("paraphrased_answer"), str):
            raise DataError(f"{source}: row {i}: 'paraphrased_answer' missing or not a string while other rows "
                            f"have one; give every row a paraphrased_answer")
        if "perturbed_answer" in row:
            pert = row["perturbed_answer"]
            if not isinstance(pert, list) or not pert or not all(isinstance(p, str) and p.strip() for p in pert):
                raise DataError(f"{source}: row {i}: 'perturbed_answer' must be a non-empty list of non-empty "
                                f"strings; fix that row")
    return rows


def _resolve_tofu_file(name: str, data_dir: str | Path | None) -> Path | None:
    path = Path(name)
    if path.suffix == ".jsonl" or path.is_file():
        return path
    if data_dir is None:
        return None
    for candidate in (Path(data_dir) / "tofu" / f"{name}.jsonl", Path(data_dir) / f"{name}.jsonl"):
        if candidate.is_file():
            return candidate
    if name in TOFU_SPLITS:  # a data folder without TOFU: the split comes from the hub
        return None
    raise DataError(f"{Path(data_dir) / 'tofu' / (name + '.jsonl')}: TOFU split {name!r} not found; "
                    f"pass the data folder that holds tofu/*.jsonl, or no data folder to load it from the hub")


def load_tofu(
    name_or_path: str | Path,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Rows (dicts with ``question``, ``answer``, ...) of one TOFU split.

    ``name_or_path``: a ``.jsonl`` file, or a split name (``"forget10_perturbed"``, ...) read from
    ``data_dir/tofu/<name>.jsonl`` when ``data_dir`` holds it, else from the Hugging Face hub
    (``datasets.load_dataset("locuslab/TOFU", name)``). Raises :class:`DataError` on bad files.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    name = str(name_or_path)
    path = _resolve_tofu_file(name, data_dir)
    if path is not None:
        from loku.data import load_qa_jsonl

        rows = load_qa_jsonl(path, role=f"TOFU {path.stem}")
        source = str(path)
    else:
        if name not in TOFU_SPLITS:
            raise ConfigError(f"unknown TOFU split {name!r}; choose one of: {', '.join(TOFU_SPLITS)}")
        rows = _load_from_hub(name)
        source = f"{HUB_DATASET}:{name}"
    rows = _validate_rows([dict(r) for r in rows], source)
    return rows if limit is None else rows[:limit]


def _load_from_hub(name: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"loading TOFU split {name!r} from the hub needs the 'datasets' package: "
                        f"pip install datasets (or pass --data-dir with the tofu/*.jsonl files)") from None
    try:
        ds = datasets.load_dataset(HUB_DATASET, name, split="train")
    except Exception as err:  # network / hub errors come in many types
        raise DataError(f"{HUB_DATASET}:{name}: could not load from the hub ({str(err).splitlines()[0]}); "
                        f"check the connection, or pass --data-dir with tofu/{name}.jsonl (a local copy: "
                        f"datasets.load_dataset({HUB_DATASET!r}, {name!r}, split='train').to_json("
                        f"'tofu/{name}.jsonl'))") from None
    return [dict(r) for r in ds]


# ----------------------------------------------------------------------------- templates


#: Version of loku's TOFU scoring conventions (templates above, EOS scored after the answer, split
#: of the tokens after the prompt's own token count). Recorded in every evaluation and reference
#: log; a reference with another version was scored differently and is refused.
SCORING_VERSION = 2


# ----------------------------------------------------------------------------- pure metrics

def prob_from_nll(mean_nll: Tensor) -> Tensor:
    return torch.exp(-mean_nll.float())


def normalized_prob(true_nll: Tensor, perturbed_nll: Tensor) -> Tensor:
    """``P_true / (P_true + sum_k P_pert_k)`` per item; ``perturbed_nll`` is [N, K] (NaN = absent)."""
    p_true = prob_from_nll(true_nll)
    p_pert = torch.nan_to_num(prob_from_nll(perturbed_nll), nan=0.0).sum(-1)
    return p_true / (p_true + p_pert)


def truth_ratio(paraphrased_nll: Tensor, perturbed_nll: Tensor) -> Tensor:
    """``R = exp(mean_k NLL_pert_k - NLL_para)`` per item (mean-per-token NLLs; NaN = absent)."""
    return torch.exp(torch.nanmean(perturbed_nll.float(), dim=-1) - paraphrased_nll.float())


def truth_ratio_forget_stat(ratios: Tensor) -> float:
    """TOFU's forget-split summary ``mean(min(R, 1/R))`` (1 = no preference between answers)."""
    r = ratios.float()
    return float(torch.minimum(r, 1 / r).mean())


def truth_ratio_utility(ratios: Tensor) -> float:
    """The utility value ``mean(max(0, 1 - 1/R))`` = ``mean(max(0, 1 - P_pert/P_para))``."""
    return float(torch.clamp(1 - 1 / ratios.float(), min=0).mean())


_SCORER = None


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall (LCS / reference length in stemmed tokens) of ``prediction`` against ``reference``."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_SCORER.score(reference, prediction)["rougeL"].recall)


def forget_quality(unlearned_ratios: Sequence[float] | Tensor, reference_ratios: Sequence[float] | Tensor) -> float:
    """Two-sided KS-test p-value between two samples of truth ratios (1 = indistinguishable)."""
    from scipy.stats import ks_2samp

    a = [float(x) for x in (unlearned_ratios.tolist() if isinstance(unlearned_ratios, Tensor) else unlearned_ratios)]
    b = [float(x) for x in (reference_ratios.tolist() if isinstance(reference_ratios, Tensor) else reference_ratios)]
    if not a or not b:
        raise ConfigError("forget quality needs truth ratios from both models; one sample is empty")
    return float(ks_2samp(a, b, alternative="two-sided").pvalue)


def model_utility(values: Mapping[str, float] | Sequence[float]) -> float:
    """Harmonic mean of the utility values (TOFU: 9 of them); 0 if any value is 0."""
    vals = list(values.values()) if isinstance(values, Mapping) else list(values)
    if not vals:
        raise ConfigError("model utility needs at least one value")
    if any(v is None or not math.isfinite(v) or v < 0 for v in vals):
        raise ConfigError(f"model utility values must be finite and >= 0, got {vals}")
    if any(v == 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


# ----------------------------------------------------------------------------- model scoring

def answer_nll(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    template: "QATemplate | ChatTemplate",
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "tofu",
) -> Tensor:
    """Mean per-token NLL of each answer given its templated question, [N] float32."""
    from loku.lm import score_continuations

    pairs = [qa_token_pair(tokenizer, template, q, a) for q, a in zip(questions, answers)]
    return score_continuations(model, tokenizer, pairs, batch_size=batch_size, progress=progress,
                               desc=desc).mean_nll


def _perturbed_matrix(flat: Tensor, counts: list[int]) -> Tensor:
    width = max(counts)
    out = torch.full((len(counts), width), float("nan"))
    pos = 0
    for i, k in enumerate(counts):
        out[i, :k] = flat[pos : pos + k]
        pos += k
    return out


def evaluate_tofu_split(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict],
    *,
    role: str,
    template: "QATemplate | ChatTemplate",
    batch_size: int = 8,
    max_new_tokens: int = 128,
    progress: bool = False,
) -> dict:
    """Prob, ROUGE-L recall and truth ratio on one split (``role``: forget/retain/real_authors/world_facts)."""
    from loku.lm import greedy_generate

    if not rows:
        raise DataError(f"TOFU {role} split has no rows")
    questions = [r["question"] for r in rows]
    answers = [r["answer"] for r in rows]
    true_nll = answer_nll(model, tokenizer, questions, answers, template=template, batch_size=batch_size,
                          progress=progress, desc=f"tofu {role} answers")
    per_item: dict[str, list[float]] = {}
    result: dict[str, Any] = {"n": len(rows)}

    has_pert = all("perturbed_answer" in r for r in rows)
    pert_nll = None
    if has_pert:
        counts = [len(r["perturbed_answer"]) for r in rows]
        flat_q = [q for q, k in zip(questions, counts) for _ in range(k)]
        flat_a = [p for r in rows for p in r["perturbed_answer"]]
        flat = answer_nll(model, tokenizer, flat_q, flat_a, template=template, batch_size=batch_size,
                          progress=progress, desc=f"tofu {role} perturbed")
        pert_nll = _perturbed_matrix(flat, counts)

    if role in NORMALIZED_PROB_SPLITS and pert_nll is not None:
        prob = normalized_prob(true_nll, pert_nll)
    else:
        prob = prob_from_nll(true_nll)
    per_item["prob"] = prob.tolist()
    result["prob"] = float(prob.mean())

    # TOFU's run_generation re-encodes the prompt text on its own (with special tokens)
    prompts = [template.prompt_ids(tokenizer, q) for q in questions]
    outs = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress, desc=f"tofu {role} generate")
    generations = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    rouge = [rouge_l_recall(g, a) for g, a in zip(generations, answers)]
    per_item["rouge_l_recall"] = rouge
    result["rouge_l_recall"] = sum(rouge) / len(rouge)

    if pert_nll is not None:
        if all("paraphrased_answer" in r for r in rows):
            para_nll = answer_nll(model, tokenizer, questions, [r["paraphrased_answer"] for r in rows],
                                  template=template, batch_size=batch_size, progress=progress,
                                  desc=f"tofu {role} paraphrased")
        else:
            para_nll = true_nll
        ratios = truth_ratio(para_nll, pert_nll)
        per_item["truth_ratio"] = ratios.tolist()
        result["truth_ratio"] = (truth_ratio_forget_stat(ratios) if role == "forget"
                                 else truth_ratio_utility(ratios))
        result["truth_ratio_mean"] = float(ratios.mean())
    else:
        result["truth_ratio"] = None
    result["generations"] = generations
    result["per_item"] = per_item
    return result


# ----------------------------------------------------------------------------- reference logs

_MAKE_REFERENCE = ("evaluate the retain-only model with loku itself (`loku eval --suite tofu --tofu-forget {split}` "
                   "with the same --tofu-template / --tofu-legacy-300 / --limit as this evaluation) and pass its "
                   "eval.json or a reference log written by loku.metrics.tofu.save_reference_log")


def save_reference_log(
    path: str | Path,
    truth_ratios: Sequence[float] | Tensor,
    *,
    forget_split: str,
    template: str,
    legacy_300: bool = False,
    model: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a retain-only reference model's per-item forget-split truth ratios (JSON, atomic).

    ``template`` is the name of the :class:`QATemplate` they were scored with; it, the forget
    split, ``legacy_300``, the number of items and :data:`SCORING_VERSION` are recorded so that
    :func:`evaluate_tofu` can refuse to compare against a reference scored differently.
    """
    ratios = truth_ratios.tolist() if isinstance(truth_ratios, Tensor) else [float(r) for r in truth_ratios]
    if not ratios or not all(math.isfinite(r) and r > 0 for r in ratios):
        raise ConfigError("reference truth ratios must be a non-empty list of positive finite numbers")
    if template not in (*TEMPLATES, "chat"):
        raise ConfigError(f"unknown TOFU template {template!r}; choose one of: {', '.join((*TEMPLATES, 'chat'))}")
    payload = {"format": REFERENCE_FORMAT, "version": 2, "scoring_version": SCORING_VERSION,
               "forget_split": forget_split, "template": template, "legacy_300": bool(legacy_300),
               "model": model, "n": len(ratios), "truth_ratios": ratios}
    if extra:
        payload["extra"] = dict(extra)
    atomic_write_text(Path(path), json.dumps(payload, indent=2))


def load_reference_log(path: str | Path) -> dict:
    """Read the truth ratios of a retain-only reference model, with how they were scored.

    Accepts a log written by :func:`save_reference_log` or a loku ``eval.json`` whose ``tofu``
    suite ran. Returns ``{"truth_ratios", "forget_split", "template", "legacy_300", "n",
    "scoring_version", "model", "source"}`` (missing fields are None; :func:`check_reference`
    refuses such a reference). An ``eval_log_forget.json`` of the original TOFU code is refused:
    its truth ratios come from TOFU's own pipeline (its model family's tags, bf16 batches, its
    ``ds_size``, tokenizer and truncation), none of which the log records, so loku cannot show
    that they were scored like this evaluation, and a KS test between them would compare
    different things.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: TOFU reference log not found; " + _MAKE_REFERENCE.format(split="<split>"))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno}: invalid JSON ({err.msg}); the reference log is damaged") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a TOFU reference log must be a JSON object")
    if data.get("format") == REFERENCE_FORMAT:
        out = {key: data.get(key) for key in ("truth_ratios", "forget_split", "template", "legacy_300", "n",
                                              "scoring_version", "model")}
        out["source"] = "loku reference log"
    elif isinstance(data.get("suites"), dict) and isinstance(data["suites"].get("tofu"), dict):
        tofu = data["suites"]["tofu"]
        ratios = tofu.get("forget_truth_ratios")
        out = {key: tofu.get(key) for key in ("forget_split", "template", "legacy_300", "scoring_version")}
        out.update(truth_ratios=ratios, n=len(ratios) if isinstance(ratios, list) else None,
                   model=(data.get("meta") or {}).get("model"), source="loku eval.json")
    elif "avg_paraphrased_loss" in data and "average_perturb_loss" in data:
        raise DataError(f"{path}: this is an eval_log_forget.json of the original TOFU code; its truth ratios were "
                        f"computed by TOFU's pipeline under conventions the log does not record (prompt tags of its "
                        f"model family, tokenizer, ds_size, truncation, bf16 batching), so loku cannot show they were "
                        f"scored like this evaluation and a KS test against them would compare different things; "
                        + _MAKE_REFERENCE.format(split="<split>"))
    else:
        raise DataError(f"{path}: not a TOFU reference log (expected format {REFERENCE_FORMAT!r} or a loku eval.json "
                        f"with a tofu suite); " + _MAKE_REFERENCE.format(split="<split>"))
    ratios = out["truth_ratios"]
    if (not isinstance(ratios, list) or not ratios
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0
                       for r in ratios)):
        raise DataError(f"{path}: 'truth_ratios' must be a non-empty list of positive numbers")
    out["truth_ratios"] = [float(r) for r in ratios]
    return out


def check_reference(ref: Mapping[str, Any], *, template: str, forget_split: str, legacy_300: bool,
                    n: int | None = None, source: str = "the TOFU reference") -> None:
    """Refuse (:class:`ConfigError`) a reference not scored like this evaluation.

    It must record the same :data:`SCORING_VERSION`, template, forget split and ``legacy_300``
    setting, and (when ``n`` is given) hold the truth ratios of exactly ``n`` forget items (the
    same first ``n`` items: ``legacy_300`` and ``limit`` both cut the split from the front).
    """
    how = _MAKE_REFERENCE.format(split=forget_split)
    if ref.get("scoring_version") != SCORING_VERSION:
        found = ref.get("scoring_version")
        raise ConfigError(f"{source} was scored with loku's TOFU conventions version {found!r}, this evaluation with "
                          f"version {SCORING_VERSION} (prompt tags, answer tokens and EOS changed), so their truth "
                          f"ratios are not comparable; {how}")
    problems = []
    if ref.get("template") != template:
        problems.append(f"template {ref.get('template')!r} (this evaluation: {template!r})")
    if ref.get("forget_split") != forget_split:
        problems.append(f"forget split {ref.get('forget_split')!r} (this evaluation: {forget_split!r})")
    if not isinstance(ref.get("legacy_300"), bool) or ref["legacy_300"] != bool(legacy_300):
        problems.append(f"legacy_300 {ref.get('legacy_300')!r} (this evaluation: {bool(legacy_300)!r})")
    if n is not None and len(ref.get("truth_ratios") or ()) != n:
        problems.append(f"{len(ref.get('truth_ratios') or ())} forget items (this evaluation: {n})")
    if problems:
        raise ConfigError(f"{source} was computed with {'; '.join(problems)}, so a KS test against it would compare "
                          f"different things; {how}")


# ----------------------------------------------------------------------------- the benchmark

def evaluate_tofu(
    model: Any,
    tokenizer: Any,
    *,
    data_dir: str | Path | None = None,
    forget_split: str = "forget10",
    reference_log: str | Path | Mapping | None = None,
    legacy_300: bool = False,
    limit: int | None = None,
    template: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    progress: bool = False,
    files: dict | None = None,
) -> dict:
    """The TOFU evaluation: per-split metrics, model utility and (with a reference) forget quality.

    ``reference_log``: a path accepted by :func:`load_reference_log` or its loaded dict; it is
    checked by :func:`check_reference` before any model work. ``files``, if given, collects
    ``{path: role}`` of the local files read (for provenance records).
    """
    if forget_split not in ("forget01", "forget05", "forget10"):
        raise ConfigError(f"unknown TOFU forget split {forget_split!r}; choose forget01, forget05 or forget10")
    tmpl = choose_template(model, tokenizer, template)
    ref = None
    if reference_log is not None:
        ref = dict(reference_log) if isinstance(reference_log, Mapping) else load_reference_log(reference_log)
        ref_source = "the TOFU reference" if isinstance(reference_log, Mapping) else f"{reference_log}"
    out: dict[str, Any] = {"template": tmpl.name, "scoring_version": SCORING_VERSION, "forget_split": forget_split,
                           "legacy_300": legacy_300, "limit": limit, "splits": {}}
    split_rows: dict[str, list[dict]] = {}
    for role, pattern in EVAL_SPLITS.items():
        name = pattern.format(forget=forget_split)
        rows = load_tofu(name, data_dir=data_dir)
        if files is not None:
            found = _resolve_tofu_file(name, data_dir)
            if found is not None:
                files[str(found)] = f"tofu {role}"
        if legacy_300:
            rows = rows[:LEGACY_SIZE]
        if limit is not None:
            rows = rows[:limit]
        split_rows[role] = rows
    if ref is not None:  # scored like this evaluation, on the same items: checked before any scoring
        check_reference(ref, template=tmpl.name, forget_split=forget_split, legacy_300=legacy_300,
                        n=len(split_rows["forget"]), source=ref_source)
    for role, rows in split_rows.items():
        out["splits"][role] = evaluate_tofu_split(model, tokenizer, rows, role=role, template=tmpl,
                                                  batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                  progress=progress)
    values = {f"{s}/{m}": out["splits"][s][m] for s in UTILITY_SPLITS for m in UTILITY_METRICS}
    out["utility_values"] = values
    out["model_utility"] = model_utility(values) if all(v is not None for v in values.values()) else None
    forget_ratios = out["splits"]["forget"]["per_item"].get("truth_ratio")
    out["forget_truth_ratios"] = forget_ratios
    out["forget_quality"] = None
    if ref is not None:
        out["forget_quality"] = forget_quality(forget_ratios, ref["truth_ratios"])
        out["reference"] = {"n": len(ref["truth_ratios"]), "forget_split": ref.get("forget_split"),
                            "template": ref.get("template"), "legacy_300": ref.get("legacy_300"),
                            "model": ref.get("model"), "source": ref.get("source"),
                            "path": None if isinstance(reference_log, Mapping) else str(reference_log)}
    return out
