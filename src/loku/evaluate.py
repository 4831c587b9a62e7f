"""Evaluation suites and the ``loku eval`` command.

Suites (each one registered function; ``all`` runs them in this order):

* ``tdec``      -- MA and EL_10 (docs/algorithms.md section 6) on the forget file (default
  ``tdec/forget/lm_extraction_32_0.csv``) and on as many held-out Pile validation excerpts
  (``tdec/eval/pile.csv``), sequences cut to 200 tokens. ``forgotten`` = forget MA <= MA threshold
  and forget EL <= EL threshold, where the thresholds are held-out means measured BEFORE unlearning
  (section 6): taken from the run's report.json (a loku output folder or its adapter), measured on a
  base model (``--thresholds-from``), or given as numbers. The evaluated model's own held-out
  numbers are reported but never used as thresholds (unlearning lowers them too); with no
  pre-unlearning thresholds ``forgotten`` is null ("undetermined").
* ``ppl``       -- perplexity on Pile validation (``pile.csv``), WikiText (``wikitext.csv``) and
  DM-Mathematics (``valid_dm_mathematics.csv``).
* ``reasoning`` -- built-in LAMBADA and PubMedQA (:mod:`loku.metrics.reasoning`), plus any
  lm-eval task list (:mod:`loku.metrics.lm_eval_backend`) when asked.
* ``dialogue``  -- unigram F1 on the four dialogue sets (:mod:`loku.metrics.dialogue`).
* ``tofu``      -- TOFU Prob / ROUGE-L / truth ratio, model utility, forget quality with a
  reference log (:mod:`loku.metrics.tofu`).
* ``mia``       -- membership-inference AUC, forget texts (members) vs held-out Pile texts.
* ``attacks``   -- (only when named; not part of ``all``) the attacks of docs/algorithms.md §13 on the
  forget texts: the relearning check, the quantization attack (Linear weights rounded to int8 per row
  and to NF4 in blocks of 64, as bitsandbytes) and prefix probing (:mod:`loku.metrics.attacks`);
  with ``--reference`` the reference is quantized and probed the same way and is the relearning control.

``loku eval --reference ORIGINAL`` adds the distances to the model that never saw the forget set
(docs/algorithms.md section 10) and ``--relearn`` the relearning check (section 11, ``--reference``
as its control), on the tdec suite's texts (:mod:`loku.metrics.reference`).

``limit`` keeps the first N items of every set (N forget sequences for tdec/mia).

The suites' options are the fields of :class:`loku.eval_options.EvalOptions`, each declared once
there with its help and range; they are the flags of ``loku eval`` and, through
:func:`loku.config.suite_option`, the ``--eval-*`` flags of ``loku unlearn``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from loku.data import is_dataset_source, source_sha256
from loku.errors import ConfigError, DataError
from loku.eval_options import ALL_SUITES, DEFAULT_FORGET, EXTRA_SUITES, EvalCommand, EvalOptions
from loku.lm import context_length, ensure_pad_token, per_sequence
from loku.options import add_arguments, cli_fields, values_from
from loku.provenance import default_data_dir, jsonable, library_versions, model_device, set_seed
from loku.registry import Registry
from loku.save import atomic_write_text

__all__ = [
    "ALL_SUITES",
    "EXTRA_SUITES",
    "EvalOptions",
    "SUITES",
    "add_eval_arguments",
    "measure_heldout",
    "render_eval_markdown",
    "report_thresholds",
    "resolve_thresholds",
    "run_eval_command",
    "run_suites",
    "write_eval_outputs",
]

SUITES: Registry = Registry("eval suite")
TDEC_TOKENS = 200


def _use(opts: EvalOptions, path: Path, role: str) -> Path:
    return opts.use(path, role)


def _texts(opts: EvalOptions, path: Path, role: str) -> list[str]:
    from loku.data import read_texts

    return read_texts(_use(opts, path, role), role=role)


# ----------------------------------------------------------------------------- suites

def _token_batches(tokenizer: Any, texts: list[str], source: str, batch_size: int, max_length: int):
    from loku.data import make_batches, tokenize_texts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # longer excerpts are cut to max_length on purpose
        seqs = tokenize_texts(tokenizer, texts, max_length=max_length, source=source, on_overflow="truncate")
    return make_batches(seqs, batch_size, ensure_pad_token(tokenizer))


def _ma_el(model: Any, batches: list[dict], el_n: int, progress: bool, desc: str) -> dict:
    """MA and EL_n (§6), and the extraction strength (§14; MA is OpenUnlearning's exact memorization)."""
    from loku.metrics.memorization import extraction_likelihood, extraction_strength, memorization_accuracy

    ma_t = per_sequence(memorization_accuracy, model, batches, bar=f"{desc} MA" if progress else None)
    el_t = per_sequence(extraction_likelihood, model, batches, bar=f"{desc} EL_{el_n}" if progress else None,
                        n=el_n, progress=progress)
    es_t = per_sequence(extraction_strength, model, batches)
    return {"ma": float(ma_t.mean()), f"el_{el_n}": float(el_t.mean()), "extraction_strength": float(es_t.mean()),
            "n": int(ma_t.numel()),
            "per_item": {"ma": ma_t.tolist(), f"el_{el_n}": el_t.tolist(), "extraction_strength": es_t.tolist()}}


UNDETERMINED = ("undetermined (no pre-unlearning thresholds: pass --thresholds-from BASE_MODEL, or "
                "--ma-threshold and --el-threshold, or evaluate a loku output folder whose report.json has them)")


def _tdec_sets(opts: EvalOptions) -> tuple[Path, list[str], list[str]]:
    """The forget texts and as many held-out Pile excerpts (the same ones for every model)."""
    forget_path = Path(opts.forget_path or opts.data_dir / DEFAULT_FORGET)
    forget = opts.take(_texts(opts, forget_path, "forget"))
    heldout = _texts(opts, opts.eval_file("pile.csv"), "held-out")[: len(forget)]
    return forget_path, forget, heldout


def measure_heldout(model: Any, tokenizer: Any, opts: EvalOptions) -> dict:
    """MA and EL_n of ``model`` on the tdec held-out excerpts: the thresholds, when ``model`` is the
    model before unlearning (``loku eval --thresholds-from``)."""
    _, _, heldout = _tdec_sets(opts)
    batches = _token_batches(tokenizer, heldout, "pile.csv", opts.batch_size, TDEC_TOKENS)
    return _ma_el(model, batches, opts.el_n, opts.progress, "tdec heldout")


@SUITES.register("tdec")
def suite_tdec(model: Any, tokenizer: Any, opts: EvalOptions) -> dict:
    forget_path, forget, heldout = _tdec_sets(opts)
    out: dict[str, Any] = {"forget_file": str(forget_path), "max_tokens": TDEC_TOKENS}
    for name, texts, source in (("forget", forget, str(forget_path)), ("heldout", heldout, "pile.csv")):
        batches = _token_batches(tokenizer, texts, source, opts.batch_size, TDEC_TOKENS)
        out[name] = _ma_el(model, batches, opts.el_n, opts.progress, f"tdec {name}")
    key = f"el_{opts.el_n}"
    given = {"source": "self"} if opts.thresholds == "self" else opts.thresholds
    if given is not None and not isinstance(given, dict):
        raise ConfigError(f"thresholds must be a dict with 'ma' and 'el', 'self' or None, got {given!r}")
    if given is None:
        thresholds = None
    elif given.get("ma") is None:  # the evaluated model is the model before unlearning
        thresholds = {"ma": out["heldout"]["ma"], key: out["heldout"][key]}
    else:
        if given.get("el_n") is not None and int(given["el_n"]) != opts.el_n:
            raise ConfigError(f"the thresholds are for EL_{given['el_n']} but this evaluation measures EL_{opts.el_n}; "
                              f"pass --el-n {given['el_n']}")
        el = given.get("el", given.get(key))
        if el is None:
            raise ConfigError("thresholds need both 'ma' and 'el'")
        thresholds = {"ma": float(given["ma"]), key: float(el)}
    out["thresholds"] = thresholds
    out["threshold_source"] = None if given is None else given.get("source", "given")
    out["thresholds_from"] = None if given is None else given.get("from")
    for extra in ("note", "warning"):
        if given is not None and given.get(extra):
            out[f"thresholds_{extra}"] = given[extra]
    if thresholds is None:
        out["forgotten"] = None
        out["forgotten_note"] = UNDETERMINED
    else:
        out["forgotten"] = bool(out["forget"]["ma"] <= thresholds["ma"] and out["forget"][key] <= thresholds[key])
    return out


@SUITES.register("ppl")
def suite_ppl(model: Any, tokenizer: Any, opts: EvalOptions) -> dict:
    from loku.metrics.perplexity import perplexity

    max_length = min(1024, context_length(model))
    out = {}
    for name, file in (("pile", "pile.csv"), ("wikitext", "wikitext.csv"),
                       ("dm_mathematics", "valid_dm_mathematics.csv")):
        texts = opts.take(_texts(opts, opts.eval_file(file), f"{name} perplexity"))
        res = perplexity(model, tokenizer, texts, batch_size=opts.batch_size, max_length=max_length,
                         stride=max_length, progress=opts.progress)
        out[name] = {**{k: res[k] for k in ("ppl", "nll", "tokens") if k in res}, "n": len(texts)}
    return out


@SUITES.register("reasoning")
def suite_reasoning(model: Any, tokenizer: Any, opts: EvalOptions) -> dict:
    from loku.metrics.reasoning import evaluate_lambada, evaluate_pubmedqa

    out: dict[str, Any] = {}
    for name, score, file, role in (("lambada", evaluate_lambada, "lambada.csv", "LAMBADA"),
                                    ("pubmedqa", evaluate_pubmedqa, "pubmed_qa.csv", "PubMedQA")):
        if opts.limit_of(name) != 0:
            out[name] = score(model, tokenizer, _use(opts, opts.eval_file(file), role), limit=opts.limit_of(name),
                              batch_size=opts.batch_size, progress=opts.progress)
    if opts.lm_eval_tasks:
        from loku.metrics.lm_eval_backend import run_lm_eval

        out["lm_eval"] = run_lm_eval(model, tokenizer, list(opts.lm_eval_tasks), batch_size=opts.batch_size,
                                     limit=opts.lm_eval_limit if opts.lm_eval_limit is not None else opts.limit,
                                     include_path=opts.lm_eval_include_path, seed=opts.seed)
    return out


@SUITES.register("dialogue")
def suite_dialogue(model: Any, tokenizer: Any, opts: EvalOptions) -> dict:
    from loku.metrics.dialogue import DIALOGUE_SETS, evaluate_dialogue

    out: dict[str, Any] = {}
    for name in DIALOGUE_SETS:
        path = _use(opts, opts.eval_file(f"{name}.json"), f"dialogue {name}")
        out[name] = evaluate_dialogue(model, tokenizer, path, limit=opts.limit_of("dialogue"),
                                      batch_size=opts.batch_size, progress=opts.progress)
    out["mean_f1"] = sum(out[n]["f1"] for n in DIALOGUE_SETS) / len(DIALOGUE_SETS)
    return out


@SUITES.register("tofu")
def suite_tofu(model: Any, tokenizer: Any, opts: EvalOptions) -> dict:
    from loku.metrics.tofu import evaluate_tofu

    if opts.tofu_reference is not None:
        _use(opts, Path(opts.tofu_reference), "TOFU reference log")
    collected: dict[str, str] = {}
    out = evaluate_tofu(model, tokenizer, data_dir=opts.data_dir, forget_split=opts.tofu_forget_split,
                        reference_log=opts.tofu_reference, legacy_300=opts.tofu_legacy_300, limit=opts.limit,
                        template=opts.tofu_template, batch_size=opts.batch_size,
                        max_new_tokens=opts.tofu_max_new_tokens, progress=opts.progress, files=collected)
    opts.files.update(collected)
    return out


@SUITES.register("mia")
def suite_mia(model: Any, tokenizer: Any, opts: EvalOptions) -> dict:
    from loku.metrics.mia import mia_auc

    forget_path = Path(opts.forget_path or opts.data_dir / DEFAULT_FORGET)
    members = opts.take(_texts(opts, forget_path, "forget"))
    # Non-members: held-out Pile excerpts after the ones tdec uses, as many as the members.
    pile = _texts(opts, opts.eval_file("pile.csv"), "held-out")
    nonmembers = pile[len(pile) // 2:][: len(members)]
    res = mia_auc(model, tokenizer, members, nonmembers)
    return {**jsonable(res), "n_members": len(members), "n_nonmembers": len(nonmembers)}


@SUITES.register("attacks")
def suite_attacks(model: Any, tokenizer: Any, opts: EvalOptions) -> dict:
    from loku.metrics.attacks import attack_suite

    return attack_suite(model, tokenizer, opts, max_tokens=TDEC_TOKENS)


# ----------------------------------------------------------------------------- the runner

def expand_suites(suites: Sequence[str]) -> list[str]:
    names: list[str] = []
    for item in suites:
        for name in str(item).split(","):
            name = name.strip()
            if not name:
                continue
            if name == "all":
                names.extend(ALL_SUITES)
            elif name in SUITES:
                names.append(name)
            else:
                raise ConfigError(f"unknown eval suite {name!r}; choose from: "
                                  f"{', '.join(ALL_SUITES + EXTRA_SUITES)}, all")
    out = list(dict.fromkeys(names))
    if not out:
        raise ConfigError(f"no eval suite given; choose from: {', '.join(ALL_SUITES + EXTRA_SUITES)}, all")
    return out


def check_suite_options(cfg: Any) -> None:
    """``loku unlearn --eval-suites``: the suites exist and their data folder is there, before any training."""
    if not cfg.eval_suites:
        return
    expand_suites([cfg.eval_suites])
    folder = Path(cfg.eval_data_dir) if cfg.eval_data_dir else default_data_dir()
    if not folder.is_dir():
        raise ConfigError(f"{folder}: evaluation data folder not found; pass --eval-data-dir or set LOKU_DATA_DIR")


def run_suites(
    model: Any,
    tokenizer: Any,
    suites: Sequence[str],
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    forget_path: str | Path | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
    model_name: str | None = None,
    adapter: str | None = None,
    dtype: str | None = None,
    **options: Any,
) -> dict:
    """Run the named suites (``"all"`` expands) and return a JSON-serialisable result dict.

    ``options`` are further :class:`EvalOptions` fields (``tofu_reference``, ``tofu_legacy_300``,
    ``lm_eval_tasks``, ``thresholds``, ...). The result has ``"suites"`` (one entry per suite)
    and ``"meta"`` (seed, dtype, limit, library versions, sha256 of every data file read, timings).
    Every suite starts from ``seed``, so its numbers do not depend on which suites ran before it.
    """
    names = expand_suites(suites)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found; pass --data-dir or set LOKU_DATA_DIR")
    unknown = set(options) - set(EvalOptions.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown evaluation option(s): {', '.join(sorted(unknown))}")
    opts = EvalOptions(data_dir=data_dir, limit=limit, forget_path=forget_path, batch_size=batch_size, seed=seed,
                       progress=progress, **options).validate()
    set_seed(seed)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        if progress:
            print(f"loku eval: {name} ...", file=sys.stderr, flush=True)
        set_seed(seed)
        results[name] = jsonable(SUITES.get(name)(model, tokenizer, opts))
        timings[name] = round(time.perf_counter() - t0, 2)
    n_params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else None
    meta = {
        "model": model_name,
        "adapter": adapter,
        "model_class": type(model).__name__,
        "dtype": dtype or _dtype_of(model),
        "n_parameters": n_params,
        "suites": names,
        "limit": limit,
        "seed": seed,
        "batch_size": batch_size,
        "data_dir": str(data_dir),
        "options": jsonable({k: v for k, v in options.items() if not callable(v)}),  # not a loader
        "data_files": {p: {"role": role, "sha256": source_sha256(p)} for p, role in sorted(opts.files.items())},
        "versions": library_versions(),
        "device": str(model_device(model)),
        "started": started,
        "seconds": timings,
    }
    return {"meta": meta, "suites": results}


def _dtype_of(model: Any) -> str | None:
    try:
        names = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}
    except AttributeError:
        return None
    return "+".join(sorted(names)) or None


# ----------------------------------------------------------------------------- outputs

def flatten_metrics(suites: dict) -> dict[str, str]:
    """``{"suite.metric.path": formatted value}`` for the scalar results of each suite (no per-item lists)."""
    rows: list[tuple[str, str]] = []
    for name, suite in suites.items():
        _flatten(name, suite, rows)
    return dict(rows)


def _flatten(prefix: str, value: Any, rows: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("per_item", "generations", "samples", "forget_truth_ratios", "utility_values"):
                continue
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, rows)
    elif isinstance(value, bool):
        rows.append((prefix, "yes" if value else "no"))
    elif isinstance(value, float):
        rows.append((prefix, f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"))
    elif isinstance(value, int):
        rows.append((prefix, str(value)))
    elif isinstance(value, str) and len(value) <= 60:
        rows.append((prefix, value.replace("|", "\\|")))
    elif value is None:
        rows.append((prefix, "-"))


def render_eval_markdown(results: dict) -> str:
    """eval.md: run facts, then one ``| metric | value |`` table per suite (a run's report.md is
    :func:`loku.report.render_run_markdown`)."""
    meta = results.get("meta", {})
    lines = ["# loku eval", ""]
    for key in ("model", "adapter", "dtype", "suites", "limit", "seed", "data_dir", "started"):
        value = meta.get(key)
        if value is not None:
            lines.append(f"- {key}: {', '.join(value) if isinstance(value, list) else value}")
    versions = meta.get("versions") or {}
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform" and v))
    for name, suite in (results.get("suites") or {}).items():
        rows: list[tuple[str, str]] = []
        _flatten("", suite, rows)
        seconds = (meta.get("seconds") or {}).get(name)
        lines += ["", f"## {name}" + (f" ({seconds:.0f} s)" if isinstance(seconds, (int, float)) else ""), "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        if isinstance(suite, dict) and suite.get("threshold_source"):
            origin = "; ".join(str(suite[k]) for k in ("thresholds_from", "thresholds_note") if suite.get(k))
            lines += ["", f"thresholds: {suite['threshold_source']}" + (f" ({origin})" if origin else "")]
            if suite.get("thresholds_warning"):
                lines += ["", f"warning: {suite['thresholds_warning']}"]
        if isinstance(suite, dict) and suite.get("forgotten_note") and suite.get("forgotten") is None:
            lines += ["", f"forgotten: {suite['forgotten_note']}"]
    files = meta.get("data_files") or {}
    if files:
        lines += ["", "## data files", "", "| file | sha256 |", "|---|---|"]
        lines += [f"| {p} | `{info['sha256'][:16]}` |" for p, info in files.items()]
    return "\n".join(lines) + "\n"


LM_EVAL_FILE = "lm_eval_results.json"


def _split_lm_eval_native(results: dict) -> tuple[dict, dict | None]:
    """(results without the lm-eval harness's native results, those results): the native dict (configs
    and all) goes to its own file beside eval.json, which names it instead."""
    lm_eval = ((results.get("suites") or {}).get("reasoning") or {}).get("lm_eval")
    if not isinstance(lm_eval, dict) or "native" not in lm_eval:
        return results, None
    native = lm_eval["native"]
    reasoning = {**results["suites"]["reasoning"],
                 "lm_eval": {**{k: v for k, v in lm_eval.items() if k != "native"}, "native_file": LM_EVAL_FILE}}
    return {**results, "suites": {**results["suites"], "reasoning": reasoning}}, native


def write_eval_outputs(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``eval.json`` and ``eval.md`` into ``out_dir`` (each atomically), and the lm-eval harness's own
    results file (``lm_eval_results.json``) when lm-eval tasks ran; returns the first two paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, native = _split_lm_eval_native(results)
    if native is not None:
        atomic_write_text(out / LM_EVAL_FILE, json.dumps(native, indent=2, allow_nan=False) + "\n")
    text = json.dumps(jsonable(results), indent=2, allow_nan=False)
    json_path, md_path = out / "eval.json", out / "eval.md"
    atomic_write_text(json_path, text + "\n")
    atomic_write_text(md_path, render_eval_markdown(results))
    return json_path, md_path


# ----------------------------------------------------------------------------- CLI

def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``loku eval`` options to ``parser``: one flag per field of :class:`EvalCommand` and of
    :class:`EvalOptions` (help, default and range are declared in the fields)."""
    add_arguments(parser, EvalCommand)
    add_arguments(parser, EvalOptions)
    return parser


def eval_config(args: argparse.Namespace) -> tuple[EvalCommand, EvalOptions]:
    """The parsed ``loku eval`` flags as the command's and the suites' options, each validated."""
    cmd = EvalCommand(**values_from(EvalCommand, args)).validate()
    opts = EvalOptions(**values_from(EvalOptions, args)).validate()
    from loku.devices import use_device

    use_device(cmd.device, cmd.device_map)  # every model loku eval loads
    return cmd, opts


def suite_kwargs(opts: EvalOptions) -> dict[str, Any]:
    """The command-line options of ``opts`` as :func:`run_suites` keywords."""
    return {f.name: getattr(opts, f.name) for f in cli_fields(EvalOptions)}


def run_report_path(model: str | os.PathLike, adapter: str | os.PathLike | None) -> Path | None:
    """The report.json of the loku run whose output is being evaluated, if it is one.

    With ``adapter``: ``OUT/adapter`` or ``OUT`` of that run; without: ``--model OUT`` or ``OUT/model``.
    """
    if adapter is not None:
        folder = Path(adapter)
        candidates = [folder / "report.json", folder.parent / "report.json"]
    else:
        folder = Path(model)
        candidates = [folder / "report.json"]
        if folder.name == "model" and (folder / "config.json").is_file():
            candidates.append(folder.parent / "report.json")
    return next((c for c in candidates if c.is_file()), None)


def report_thresholds(path: str | os.PathLike, el_n: int, forget_path: str | os.PathLike | None = None) -> dict | None:
    """The stop-rule thresholds a loku run recorded (``report.json`` "thresholds": {"ma", "el", "source"}),
    measured on its validation set before unlearning; None when the report has none.

    With ``forget_path`` (the file tdec will read), a "warning" says when the run unlearned another
    forget file (``report.json`` "data": {"forget": {"path", "sha256"}}).
    """
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read the run's report ({err}); pass --thresholds-from BASE_MODEL or "
                        f"--ma-threshold and --el-threshold instead") from None
    th = report.get("thresholds") if isinstance(report, dict) else None
    if not isinstance(th, dict) or th.get("ma") is None or th.get("el") is None:
        return None
    run_el_n = (report.get("config") or {}).get("el_n")
    if run_el_n is not None and int(run_el_n) != el_n:
        raise ConfigError(f"{path}: the run's EL threshold is for EL_{run_el_n}, this evaluation measures EL_{el_n}; "
                          f"pass --el-n {run_el_n} (or give --ma-threshold and --el-threshold)")
    out = {"ma": float(th["ma"]), "el": float(th["el"]), "el_n": run_el_n, "source": "run report",
           "from": str(path), "note": th.get("source")}
    run_forget = ((report.get("data") or {}).get("forget") or {})
    if forget_path is not None and run_forget.get("sha256") \
            and (Path(forget_path).is_file() or is_dataset_source(forget_path)) \
            and source_sha256(forget_path) != run_forget["sha256"]:
        out["warning"] = (f"the run unlearned another forget file ({run_forget.get('path')}); pass --forget with "
                          f"that file to evaluate what it forgot")
    return out


def resolve_thresholds(cmd: EvalCommand, opts: EvalOptions, suites: Sequence[str]) -> dict | None:
    """The pre-unlearning tdec thresholds for ``loku eval``: explicit numbers, else measured on
    ``--thresholds-from``, else the run's report.json; None when there are none (or no tdec suite).

    When ``--thresholds-from`` names the evaluated model itself (no adapter), its own held-out means
    are the thresholds and are taken from the tdec pass instead of measuring the model twice.
    """
    cmd.validate()  # both thresholds or neither, not with --thresholds-from
    if "tdec" not in suites:
        return None
    if cmd.ma_threshold is not None:
        return {"ma": cmd.ma_threshold, "el": cmd.el_threshold, "source": "given"}
    if cmd.thresholds_from:
        base = str(cmd.thresholds_from)
        if base == str(cmd.model) and cmd.adapter is None:
            return {"source": "base model", "from": base,
                    "note": "the evaluated model is the base: its own held-out means"}
        return measure_base_thresholds(base, cmd, opts)
    report = run_report_path(cmd.model, cmd.adapter)
    if report is None:
        return None
    return report_thresholds(report, opts.el_n, opts.forget_path or opts.data_dir / DEFAULT_FORGET)


def measure_base_thresholds(base: str, cmd: EvalCommand, opts: EvalOptions) -> dict:
    """Load the model before unlearning, measure its held-out MA/EL_n (the tdec held-out excerpts), free it."""
    import gc

    from loku.models import load_model

    if not opts.data_dir.is_dir():
        raise DataError(f"{opts.data_dir}: data folder not found; pass --data-dir or set LOKU_DATA_DIR")
    opts = dataclasses.replace(opts, thresholds=None, files={})  # the base's files are not the evaluation's
    if opts.progress:
        print(f"loku eval: measuring the thresholds on {base} ...", file=sys.stderr, flush=True)
    set_seed(opts.seed)
    model, tokenizer = load_model(base, dtype=cmd.dtype, trust_remote_code=cmd.trust_remote_code,
                                  progress=opts.progress)
    held = measure_heldout(model, tokenizer, opts)
    del model, tokenizer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"ma": held["ma"], "el": held[f"el_{opts.el_n}"], "el_n": opts.el_n, "source": "base model",
            "from": base, "note": f"held-out means of {held['n']} pile.csv excerpts, {cmd.dtype}"}


def add_reference_checks(results: dict, model: Any, tokenizer: Any, cmd: EvalCommand, opts: EvalOptions) -> None:
    """``--reference`` / ``--relearn``: the distances to the never-trained model and the relearning check
    (:func:`loku.metrics.reference.reference_and_relearn`) join the suites' results, timed, their files hashed."""
    from loku.metrics.reference import reference_and_relearn

    started = time.perf_counter()
    set_seed(opts.seed)
    extra = reference_and_relearn(model, tokenizer, opts, reference=cmd.reference, relearn=cmd.relearn,
                                  dtype=cmd.dtype, trust_remote_code=cmd.trust_remote_code)
    results["suites"].update(jsonable(extra))
    meta = results["meta"]
    meta["suites"] = [*meta["suites"], *extra]
    meta["reference"] = cmd.reference
    meta["seconds"]["reference+relearn"] = round(time.perf_counter() - started, 2)
    for path, role in opts.files.items():
        meta["data_files"].setdefault(path, {"role": role, "sha256": source_sha256(path)})


def load_evaluated(cmd: EvalCommand, opts: EvalOptions) -> tuple[Any, Any, dict | None, EvalOptions]:
    """(model, tokenizer, the gate's note, options) of ``loku eval``: an output folder with a saved gate is
    evaluated through it (each text routed on its own input, so one text a batch: each sequence keeps
    its own decision while EL continues it), unless --no-gate or --adapter."""
    from loku.gate import has_gate, load_gated
    from loku.models import load_model

    if cmd.adapter is None and has_gate(cmd.model):
        if not cmd.gate:
            note = {"folder": str(cmd.model), "routed": False, "note": "--no-gate: every adapter on (the merged model)"}
        else:
            model, tokenizer = load_gated(cmd.model, dtype=cmd.dtype, progress=opts.progress)
            gate = model.gate
            return model, tokenizer, {"folder": str(cmd.model), "routed": True, "mode": gate.mode,
                                      "window": gate.window, "requests": list(gate.names),
                                      "note": "each text routed on its own input, evaluated one text a batch"}, \
                dataclasses.replace(opts, batch_size=1)
    elif not cmd.gate:
        note = {"routed": False, "note": f"--no-gate: {cmd.model} has no gate"}
    else:
        note = None
    model, tokenizer = load_model(cmd.model, adapter=cmd.adapter, dtype=cmd.dtype,
                                  trust_remote_code=cmd.trust_remote_code, progress=opts.progress)
    return model, tokenizer, note, opts


def run_eval_command(args: argparse.Namespace) -> int:
    """``loku eval``: load the model, run the suites, write OUT/eval.json and OUT/eval.md."""
    from loku.models import load_model

    cmd, opts = eval_config(args)
    suites = expand_suites(cmd.suite or ["all"])
    if opts.forget_path is not None:  # a bad --forget (file, dataset, hub id) fails before the model loads
        from loku.data import read_texts

        read_texts(opts.forget_path, role="forget")
    thresholds = resolve_thresholds(cmd, opts, suites)
    set_seed(opts.seed)
    model, tokenizer, gate_note, opts = load_evaluated(cmd, opts)
    load_reference = None
    if cmd.reference is not None and "attacks" in suites:
        def load_reference():  # the attacks suite loads it when it runs and frees it after
            return load_model(cmd.reference, dtype=cmd.dtype, trust_remote_code=cmd.trust_remote_code,
                              progress=opts.progress)
    results = run_suites(model, tokenizer, suites, model_name=str(cmd.model), adapter=cmd.adapter, dtype=cmd.dtype,
                         thresholds=thresholds, load_reference=load_reference, **suite_kwargs(opts))
    results["meta"]["gate"] = gate_note
    if "attacks" in suites:  # the attacks suite ran the relearning check already
        cmd = dataclasses.replace(cmd, relearn=False)
    if cmd.reference is not None or cmd.relearn:
        add_reference_checks(results, model, tokenizer, cmd, opts)
    json_path, md_path = write_eval_outputs(results, cmd.out)
    if cmd.output_format == "openunlearning":
        from loku.metrics.openunlearning import write_openunlearning

        print(f"loku eval: wrote {write_openunlearning(results, cmd.out)} (OpenUnlearning's key names)")
    tdec = results["suites"].get("tdec")
    if tdec is not None:
        verdict = ({True: "yes", False: "no"}[tdec["forgotten"]] + f" (thresholds: {tdec['threshold_source']})"
                   if tdec["forgotten"] is not None else tdec["forgotten_note"])
        print(f"loku eval: tdec forgotten: {verdict}")
        if tdec.get("thresholds_warning"):
            print(f"loku eval: warning: {tdec['thresholds_warning']}", file=sys.stderr)
    print(f"loku eval: wrote {json_path} and {md_path}")
    return 0
