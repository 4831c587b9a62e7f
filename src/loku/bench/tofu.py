"""`loku bench tofu`: the paper's TOFU experiment (Figure 5), target and reference models made here.

No TOFU-trained model exists offline, so the bench makes both with :mod:`loku.finetune` (cached,
keyed by the base model's fingerprint, the data and the recipe):

* the **target**, fine-tuned on the authors of the subset: ``retain_authors`` authors from the start of
  ``full.jsonl`` (TOFU's retain authors; ``retain_perturbed.jsonl`` covers the first 20) plus the
  authors of every forget split (the end of ``full.jsonl``: forget01 = the last 2 authors, forget05
  the last 10, forget10 the last 20);
* per forget split, the **reference**: the same data minus that split's authors, TOFU's retain-only
  model. Its truth ratios on the forget split are what forget quality compares against (KS test);
* per forget split, a **second reference** fine-tuned like the first with another seed (seed + 1: another
  data order). Its forget quality against the first is the check reported beside the results: the
  forget quality of a model that never saw the authors, i.e. how high forget quality can be expected to
  get, and how much of its spread is the fine-tuning's own noise.

Then every method (LoRA methods at every rank of ``ranks``, full fine-tuning methods once) unlearns
each forget split from the target for ``unlearn.max_epochs`` epochs (TOFU's 5; no stop rule: TOFU
reports every epoch), the retain set being the retain authors' QA. With ``held_out`` (holdout01/05/10:
TOFU's questions on authors that no model here was trained on) the runs stop by ``unlearn.stop_rule``
instead, that split as their validation set (docs/algorithms.md §12: the two-sided rule stops at the
held-out level); the state the rule keeps is scored once more as the run's final point. After every epoch the model is
scored on the forget split (TOFU's truth ratio -> forget quality against the reference) and on the
utility splits (retain authors, real authors, world facts: Prob, ROUGE-L recall, truth ratio ->
model utility), subsets as configured. Results: OUT/results.json, results.md, plots/figure5.png
(model utility against forget quality, one trajectory per method, one panel per rank). Every
(split, method, rank) is resumable and stored as it finishes; ``--jobs`` runs them side by side.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, DataError
from .base import BenchSettings, Store, config_values, existing_folder, read_json

__all__ = ["TofuBenchConfig", "author_rows", "load_tofu_bench_config", "run", "run_tofu_bench"]

AUTHOR_ITEMS = 20  # TOFU: 20 questions per author, authors in order in full.jsonl
FORGET_AUTHORS = {"forget01": 2, "forget05": 10, "forget10": 20}
HELD_OUT_SPLITS = ("holdout01", "holdout05", "holdout10")  # TOFU: questions on authors outside full.jsonl
SMOKE: dict[str, Any] = {
    "retain_authors": 2, "forget_splits": ["forget01"], "ranks": [2], "methods": ["lora-gd", "fila-ihl", "full-ga"],
    "finetune": {"epochs": 2, "lr": 1e-2, "batch_size": 4, "max_length": 32},
    "unlearn": {"max_epochs": 2, "batch_size": 2, "fisher_batches": 1, "eval_batch_size": 4, "max_length": 32},
    "evals": {"forget": 4, "retain": 4, "real_authors": 2, "world_facts": 2, "max_new_tokens": 4, "batch_size": 4},
}


@dataclass
class TofuEvals:
    """Items scored per split after every epoch (None: the whole split) and the generation length."""

    forget: int | None = None
    retain: int | None = 40
    real_authors: int | None = 40
    world_facts: int | None = 40
    max_new_tokens: int = 64
    batch_size: int = 8


@dataclass
class TofuBenchConfig(BenchSettings):
    GROWS = ("methods", "ranks", "forget_splits")  # may be added to a folder

    name: str = "custom"
    model: str = "smollm2-135m"
    retain_authors: int = 8
    forget_splits: list[str] = field(default_factory=lambda: ["forget01"])
    methods: list[str] = field(default_factory=lambda: ["lora-ga", "lora-gd", "lora-npo", "lora-ihl", "fila-ihl",
                                                        "full-ga", "full-gd", "npo"])
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    template: str | None = "tofu"  # TOFU's own strings (loku.chat): the benchmark reproduces TOFU
    seed: int = 0
    finetune: dict[str, Any] = field(default_factory=dict)  # loku finetune options of target and reference
    unlearn: dict[str, Any] = field(default_factory=dict)  # loku unlearn options of every run
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    evals: TofuEvals = field(default_factory=TofuEvals)
    held_out: str | None = None  # holdout01/05/10: the validation set of a stop rule; None: TOFU's fixed epochs
    data_dir: str | None = None
    cache_dir: str | None = None

    def validate(self) -> "TofuBenchConfig":
        from ..methods import METHODS

        bad = [s for s in self.forget_splits if s not in FORGET_AUTHORS]
        if bad or not self.forget_splits:
            raise ConfigError(f"forget_splits: choose from {', '.join(FORGET_AUTHORS)}, got {self.forget_splits!r}")
        if not 1 <= self.retain_authors <= 200 - max(FORGET_AUTHORS[s] for s in self.forget_splits):
            raise ConfigError(f"retain_authors must be between 1 and the authors before the forget split's, got "
                              f"{self.retain_authors}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from: "
                              f"{', '.join(METHODS)}")
        if not self.ranks or any(not isinstance(r, int) or r < 1 for r in self.ranks):
            raise ConfigError(f"ranks must be positive integers, got {self.ranks!r}")
        if self.held_out is not None and self.held_out not in HELD_OUT_SPLITS:
            raise ConfigError(f"held_out: choose from {', '.join(HELD_OUT_SPLITS)} (TOFU's questions on authors "
                              f"never trained on), or leave it out for TOFU's fixed epochs; got {self.held_out!r}")
        stop_options = sorted({k for opts in (self.unlearn, *self.method_options.values()) for k in opts
                               if k in ("stop_rule", "check_every", "stop_interval")})
        if stop_options and self.held_out is None:
            raise ConfigError(f"{', '.join(stop_options)}: TOFU runs a fixed number of epochs unless it has a "
                              "held-out set to stop at; add held_out: holdout01 (or drop the stop options)")
        from ..checks import check_unlearn

        for method in self.methods:
            check_unlearn(self.unlearn_config(method, self.ranks[0], "f.jsonl", "r.jsonl", "out"))
        self.finetune_config("t.jsonl", "out").validate()
        return self

    def check_data(self) -> dict[str, str]:
        from ..provenance import file_sha256

        folder = existing_folder(self.data_root()) / "tofu"
        names = ["full", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed",
                 *(f"{s}_perturbed" for s in self.forget_splits), *([self.held_out] if self.held_out else [])]
        missing = [n for n in names if not (folder / f"{n}.jsonl").is_file()]
        if missing:
            raise DataError(f"{folder}/{missing[0]}.jsonl: TOFU file not found ({len(missing)} missing); pass "
                            "--data-dir pointing at the shared data folder")
        return {f"tofu/{n}.jsonl": file_sha256(folder / f"{n}.jsonl") for n in names}

    def identity(self) -> dict[str, Any]:
        values = super().identity()
        if values["held_out"] is None:  # added later: folders made before it keep their identity
            del values["held_out"]
        return values

    def runs(self) -> list[tuple[str, str, int | None]]:
        """Every (forget split, method, rank) of the grid; full fine-tuning has no rank."""
        from ..methods import METHODS

        return [(s, m, r) for s in self.forget_splits for m in self.methods
                for r in (self.ranks if not METHODS[m].full_weights else [None])]

    @staticmethod
    def result_path(out: Path, split: str, method: str, rank: int | None) -> Path:
        """Where the bench folder ``out`` keeps the result of one run of the grid."""
        return out / split / (f"{method}" + (f"-r{rank}" if rank is not None else "") + ".json")

    def unlearn_config(self, method: str, rank: int | None, forget: str, retain: str, out: str,
                       model: str = "target", validation: str = "v.jsonl"):
        from ..config import load_config

        values = {**self.unlearn, **self.method_options.get(method, {}), "method": method, "forget": forget,
                  "retain": retain, "out": out, "model": model, "seed": self.seed, "template": self.template}
        if self.held_out is None:
            # TOFU runs a fixed number of epochs (run_one: unlearn(measure=False), no stop rule); given
            # thresholds only spare the held-out set it would need
            values.update(ma_threshold=0.0, el_threshold=0.0)
        else:
            values["validation"] = validation
        if rank is not None:
            values.update(rank=rank, lora_alpha=2 * rank)
        try:
            return load_config(None, values)
        except ConfigError as err:
            raise ConfigError(f"unlearn options of method {method}: {err}") from None

    def finetune_config(self, data: str, out: str):
        from ..finetune import FinetuneConfig

        return FinetuneConfig(**{"epochs": 5, "lr": 1e-5, **self.finetune, "model": self.model, "data": [data],
                                 "out": out, "template": self.template, "seed": self.seed, "progress": False})


def load_tofu_bench_config(name_or_path: str | None = "cpu", overrides: dict[str, Any] | None = None, *,
                           smoke: bool = False) -> TofuBenchConfig:
    values = config_values(name_or_path, "tofu", overrides, SMOKE if smoke else None)
    for key in ("methods", "forget_splits"):
        if isinstance(values.get(key), str):
            values[key] = [v.strip() for v in values[key].split(",") if v.strip()]
    if isinstance(values.get("ranks"), str):
        values["ranks"] = [int(v) for v in values["ranks"].split(",") if v.strip()]
    known = {f.name for f in dataclasses.fields(TofuBenchConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown bench option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    evals = values.pop("evals", None) or {}
    bad = sorted(set(evals) - {f.name for f in dataclasses.fields(TofuEvals)})
    if bad:
        raise ConfigError(f"evals: unknown option(s) {', '.join(bad)}")
    return TofuBenchConfig(**values, evals=TofuEvals(**evals))


# --------------------------------------------------------------------------- data


def _rows(root: Path, name: str) -> list[dict]:
    from ..metrics.tofu import load_tofu

    return load_tofu(name, data_dir=root)


def author_rows(cfg: TofuBenchConfig) -> dict[str, Any]:
    """The subset's QA: ``train`` (retain authors + every forget split's), ``retain`` (the retain authors'),
    per forget split its QA and the training set of its reference, and the evaluation rows."""
    root = cfg.data_root()
    full = _rows(root, "full")
    if len(full) != 200 * AUTHOR_ITEMS:
        raise DataError(f"{root}/tofu/full.jsonl: {len(full)} rows, TOFU has {200 * AUTHOR_ITEMS} (200 authors x 20)")
    widest = max(FORGET_AUTHORS[s] for s in cfg.forget_splits)
    retain = full[: cfg.retain_authors * AUTHOR_ITEMS]
    forget = {s: full[len(full) - FORGET_AUTHORS[s] * AUTHOR_ITEMS:] for s in cfg.forget_splits}
    train = retain + full[len(full) - widest * AUTHOR_ITEMS:]
    evals = cfg.evals
    retain_eval = _rows(root, "retain_perturbed")[: min(cfg.retain_authors, 20) * AUTHOR_ITEMS]
    out = {"train": train, "retain": retain, "forget": forget,
           "held_out": _rows(root, cfg.held_out) if cfg.held_out else None,
           "reference_train": {s: [r for r in train if r not in forget[s]] for s in cfg.forget_splits},
           "eval": {s: {"forget": _rows(root, f"{s}_perturbed")[: evals.forget],
                        "retain": retain_eval[: evals.retain],
                        "real_authors": _rows(root, "real_authors_perturbed")[: evals.real_authors],
                        "world_facts": _rows(root, "world_facts_perturbed")[: evals.world_facts]}
                    for s in cfg.forget_splits}}
    return out


def _write_qa(path: Path, rows: list[dict]) -> str:
    from ..save import atomic_write_text

    text = "".join(json.dumps({"question": r["question"], "answer": r["answer"]}, ensure_ascii=False) + "\n"
                   for r in rows)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return str(path)


# --------------------------------------------------------------------------- models made here


def finetuned(cfg: TofuBenchConfig, base, tokenizer, data_file: str, role: str, say: Callable[[str], None],
              seed_offset: int = 0):
    """The base fine-tuned on ``data_file`` with seed ``cfg.seed + seed_offset`` (from the cache when there,
    keyed by base, data and recipe, the seed included)."""
    from ..checkpoint import checkpoint_dir
    from ..finetune import finetune, write_finetuned
    from ..models import cache_dir, load_model
    from ..provenance import file_sha256, model_fingerprint

    ft = cfg.finetune_config(data_file, "unused")
    ft = dataclasses.replace(ft, seed=ft.seed + seed_offset)
    recipe = {k: v for k, v in ft.to_dict().items() if k not in ("out", "data", "progress", "overwrite", "model")}
    key = hashlib.sha256(json.dumps({"base": model_fingerprint(base), "data": file_sha256(data_file),
                                     "recipe": recipe}, sort_keys=True).encode()).hexdigest()[:16]
    folder = (Path(cfg.cache_dir) if cfg.cache_dir else cache_dir()) / "tofu" / f"{role}-{key}"
    if (folder / "finetune.json").is_file():
        say(f"loku bench tofu: using the cached {role} model {folder}")
        return load_model(str(folder), progress=False)[0], json.loads((folder / "finetune.json").read_text())
    say(f"loku bench tofu: fine-tuning the {role} model ({ft.epochs} epochs, lr {ft.lr:g})")
    result = finetune(dataclasses.replace(ft, out=str(folder)), model=base, tokenizer=tokenizer,
                      resume=checkpoint_dir(folder).is_dir())
    write_finetuned(result, dataclasses.replace(ft, out=str(folder)))
    return result.model, result.report


def tofu_scores(model, tokenizer, rows: dict[str, list[dict]], cfg: TofuBenchConfig,
                reference_ratios: list[float] | None) -> dict[str, Any]:
    """TOFU's numbers on the subset rows: per split Prob / ROUGE-L / truth ratio, model utility, forget quality."""
    from ..metrics.tofu import (UTILITY_METRICS, UTILITY_SPLITS, choose_template, evaluate_tofu_split,
                                forget_quality, model_utility)

    template = choose_template(model, tokenizer, cfg.template)
    splits = {role: evaluate_tofu_split(model, tokenizer, r, role=role, template=template,
                                        batch_size=cfg.evals.batch_size, max_new_tokens=cfg.evals.max_new_tokens)
              for role, r in rows.items()}
    values = {f"{s}/{m}": splits[s][m] for s in UTILITY_SPLITS for m in UTILITY_METRICS}
    ratios = splits["forget"]["per_item"]["truth_ratio"]
    return {"model_utility": model_utility(values), "utility_values": values, "forget_truth_ratios": ratios,
            "forget_quality": forget_quality(ratios, reference_ratios) if reference_ratios is not None else None,
            "template": template.name,
            "splits": {role: {k: v for k, v in s.items() if k not in ("per_item", "generations")}
                       for role, s in splits.items()}}


# --------------------------------------------------------------------------- running


def prepare(cfg: TofuBenchConfig, out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Target and reference models (cached) and their scores, stored once in OUT/shared.json."""
    from ..models import load_model

    base, tokenizer = load_model(cfg.model, progress=False)
    rows = author_rows(cfg)
    data = out / "data"
    files = {"train": _write_qa(data / "train.jsonl", rows["train"]),
             "retain": _write_qa(data / "retain.jsonl", rows["retain"]),
             "forget": {s: _write_qa(data / f"{s}.jsonl", rows["forget"][s]) for s in cfg.forget_splits},
             "held_out": _write_qa(data / f"{cfg.held_out}.jsonl", rows["held_out"]) if cfg.held_out else None}
    store = Store(out / "shared.json")
    target, target_log = finetuned(cfg, base, tokenizer, files["train"], "target", say)
    store.get("target_finetune", lambda: {k: target_log[k] for k in ("epochs", "items", "template", "seconds")})
    references = {}
    for split in cfg.forget_splits:
        ref_file = _write_qa(data / f"reference-{split}.jsonl", rows["reference_train"][split])
        ref, ref_log = finetuned(cfg, base, tokenizer, ref_file, f"reference-{split}", say)
        scores = store.get(f"reference/{split}", lambda: tofu_scores(ref, tokenizer, rows["eval"][split], cfg, None))
        store.get(f"reference_finetune/{split}", lambda: {k: ref_log[k] for k in ("epochs", "items", "seconds")})
        references[split] = scores["forget_truth_ratios"]
        store.get(f"reference_seed_quality/{split}", lambda: _second_reference_quality(
            cfg, base, tokenizer, ref_file, f"reference-{split}", rows["eval"][split], references[split], say))
        store.get(f"target/{split}", lambda: tofu_scores(target, tokenizer, rows["eval"][split], cfg,
                                                         references[split]))
        del ref
    return {"target": target, "tokenizer": tokenizer, "rows": rows, "files": files, "references": references,
            "store": store}


def _second_reference_quality(cfg: TofuBenchConfig, base, tokenizer, data_file: str, role: str,
                              rows: dict[str, list[dict]], reference_ratios: list[float],
                              say: Callable[[str], None]) -> dict[str, Any]:
    """The check of the reference: a second one fine-tuned on the same data with seed + 1, its forget
    quality against the first (a model that never saw the forget authors; near 1 when the fine-tuning's
    seed barely matters) and its model utility."""
    second, _ = finetuned(cfg, base, tokenizer, data_file, role, say, seed_offset=1)
    scores = tofu_scores(second, tokenizer, rows, cfg, reference_ratios)
    del second
    return {"seed": cfg.seed + 1, "forget_quality": scores["forget_quality"],
            "model_utility": scores["model_utility"], "forget_truth_ratios": scores["forget_truth_ratios"]}


def run_one(cfg: TofuBenchConfig, out: Path, split: str, method: str, rank: int | None, shared: dict[str, Any],
            say: Callable[[str], None], progress: bool = False) -> dict[str, Any]:
    """One (split, method, rank): unlearn for the configured epochs (or until the stop rule ends it, with a
    held-out set), TOFU's scores after each epoch and, for a stopped run, of the state the rule kept."""
    from ..checkpoint import STATE, checkpoint_dir
    from ..checkpoint import discard as discard_checkpoint
    from ..provenance import jsonable
    from ..save import atomic_write_json, merged_copy
    from ..trainer import unlearn

    result_path = cfg.result_path(out, split, method, rank)
    if result_path.is_file():
        return read_json(result_path)
    run_out = result_path.with_suffix("")
    tag = run_out.name
    ucfg = cfg.unlearn_config(method, rank, shared["files"]["forget"][split], shared["files"]["retain"], str(run_out),
                              validation=shared["files"]["held_out"])
    stopped = cfg.held_out is not None
    ucfg.progress, ucfg.overwrite = progress, False
    resume = (checkpoint_dir(run_out) / STATE).is_file()
    say(f"loku bench tofu: {split}, {tag}: {'resuming' if resume else 'unlearning'}")
    scores = Store(out / split / f"{tag}.epochs.json")
    started = time.time()

    def score(key: str, trained) -> dict[str, Any]:
        model = merged_copy(trained).eval()
        return scores.get(key, lambda: tofu_scores(model, shared["tokenizer"], shared["rows"]["eval"][split], cfg,
                                                   shared["references"][split]))

    # Without a held-out set TOFU runs a fixed number of epochs and scores each itself: the stop rule's
    # MA/EL would only cost time.
    result = unlearn(ucfg, model=shared["target"], tokenizer=shared["tokenizer"], resume=resume, measure=stopped,
                     on_epoch=lambda record, trained: score(str(record["epoch"]), trained))
    entry = {"split": split, "method": method, "rank": rank, "seed": ucfg.seed, "unlearn_config": ucfg.to_dict(),
             "trainable_share": result.report["trainable_share"],
             "epochs": [{**rec, "tofu": scores.data[str(rec["epoch"])]} for rec in result.report["epochs"]]}
    if stopped:  # the rule may keep an earlier state than the last epoch's: that state is the run's result
        entry["final"] = {"tofu": score("final", result.model), "outcome": result.report["outcome"],
                          "stop": result.report.get("stop"), "after": result.report["after"],
                          "epochs_run": len(result.report["epochs"])}
    entry["seconds"] = time.time() - started
    atomic_write_json(result_path, jsonable(entry))
    discard_checkpoint(run_out)
    (out / split / f"{tag}.epochs.json").unlink(missing_ok=True)
    last = (entry.get("final") or entry["epochs"][-1])["tofu"]
    say(f"loku bench tofu: {split}, {tag}: forget quality {last['forget_quality']:.3g}, model utility "
        f"{last['model_utility']:.3f} after {len(entry['epochs'])} epochs"
        + (f" ({entry['final']['outcome']}: the state the stop rule kept)" if stopped else ""))
    return entry


def run_tofu_bench(cfg: TofuBenchConfig, out: str | Path, *, progress: bool = True, jobs: int = 1,
                   command: list[str] | None = None, report_only: bool = False) -> dict[str, Any]:
    """Run (or continue) the TOFU bench in ``out``; returns the summary of results.json."""
    from .base import open_bench
    from .tofu_report import write_outputs

    out, record, say = open_bench(cfg, out, progress=progress, command=command, jobs=jobs, report_only=report_only,
                                  runs=len(cfg.runs()))
    started = time.time()
    if not report_only:
        shared = prepare(cfg, out, say)
        pending = [r for r in cfg.runs() if not cfg.result_path(out, *r).is_file()]
        if jobs > 1 and len(pending) > 1:
            from .jobs import run_tasks

            run_tasks(_task, {"/".join(str(part) for part in r if part is not None): (cfg, str(out), *r) for r in pending},
                      jobs, what="run")
        for split, method, rank in cfg.runs():  # serial, or the finished ones read back
            run_one(cfg, out, split, method, rank, shared, say, progress)
    summary = write_outputs(out, cfg, record, command=command, seconds=time.time() - started)
    say(f"loku bench tofu: results in {out / 'results.md'}")
    return summary


def _task(cfg: TofuBenchConfig, out: str, split: str, method: str, rank: int | None) -> None:
    from .jobs import per_worker, worker_say

    say = worker_say()
    run_one(cfg, Path(out), split, method, rank, per_worker(out, lambda: prepare(cfg, Path(out), say)), say)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .base import add_common_arguments

    add_common_arguments(parser, "tofu", "target and reference models",
                         "cpu (SmolLM2-135M, a TOFU subset, 2 CPU cores), paper (Phi-1.5 / Llama-2-7B, full TOFU, a GPU)")
    parser.add_argument("--methods", default=None, help="methods, comma-separated")
    parser.add_argument("--ranks", default=None, help="LoRA ranks, comma-separated (e.g. 4,8,16,32)")
    parser.add_argument("--forget-splits", dest="forget_splits", default=None, help="forget01,forget05,forget10")
    return parser


def run(args: argparse.Namespace) -> int:
    from .base import run_bench_command

    return run_bench_command(args, "tofu", load_tofu_bench_config, run_tofu_bench, methods=args.methods,
                             ranks=args.ranks, forget_splits=args.forget_splits)
