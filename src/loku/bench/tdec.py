"""`loku bench tdec`: the paper's Table 1, measured against the model that never saw the data.

For each model and each TDEC split (``lm_extraction_{pool}_{split}.csv``, each split its own
planting):

1. the texts of the split (:mod:`loku.bench.data`: forget, held-out, retain, planting pool,
   perplexity sets, disjoint rows);
2. the forget set planted into the model mixed into general text (:mod:`loku.bench.planting`,
   cached on disk), with the original and planted numbers that show it worked;
3. once per split: the planted model's pre-unlearning measurements (the stop thresholds are its
   held-out MA / EL), its downstream scores, the original model's side of the reference distances
   and the relearning control (the original given the relearning fine-tune);
4. every method from the same planted model (``loku.trainer``'s phases, exactly what
   ``unlearn()`` runs, with step 3's measurement reused), then on the unlearned model: Pile /
   WikiText perplexity, LAMBADA, PubMedQA, dialogue F1 (subsets, as configured), the distances to
   the original model (:mod:`loku.metrics.reference`) and the relearning check
   (:mod:`loku.metrics.relearn`), the quantization attack and prefix probing
   (:mod:`loku.metrics.attacks`: forget MA / EL_10 after int8 and NF4 rounding, next to the planted
   and the original model rounded the same way, measured once per split; greedy continuations of
   forget prompts plain, after unrelated Pile text and shifted), OpenUnlearning's exact_memorization,
   extraction_strength and privleak (:mod:`loku.metrics.openunlearning`), wall time and FLOPs.

Every (model, split, method) result is written atomically to the bench folder as it finishes and
a rerun skips finished ones (a method killed mid-run continues from its per-epoch checkpoint);
adding splits, methods or models to a bench folder extends it, while a folder made with another
configuration (sizes, recipe, training options, evaluation subsets, seed, data files) is refused.
Unknown method or split names fail before any work. At the end (and with ``--report-only``)
``results.json``, ``results.md`` and the plots are written from every finished result in the
folder (:mod:`loku.bench.summary`, :mod:`loku.bench.plots`).

Configurations: ``--config cpu`` (``configs/bench-tdec-cpu.yaml``: SmolLM2-135M on 2 CPU cores),
``--config paper`` (``configs/bench-tdec-paper.yaml``: GPT-Neo, 32 x 200 tokens, for a GPU), or a
YAML file; ``--smoke`` shrinks any of them to a few seconds on a tiny model (CI).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, DataError
from . import jobs as jobs_mod
from .base import (BenchSettings, Store, check_known, config_values, existing_folder,
                   free_memory, read_json, section, slug)
from .data import HELDOUT_SOURCES, ROWS, Sizes, forget_file
from .planting import PlantingRecipe

__all__ = ["BenchConfig", "DEFAULT_METHODS", "SMOKE", "add_arguments", "load_bench_config", "run", "run_bench"]

DEFAULT_METHODS = ["full-ga", "full-gd", "lora-gd", "lora-ihl", "fila-gd", "fila-ihl", "vila-ihl", "npo"]

# --smoke: everything tiny, for CI on a tiny random model (applied on top of the chosen config).
SMOKE: dict[str, Any] = {
    "sizes": {"n_forget": 4, "forget_tokens": 16, "n_heldout": 4, "n_retain": 4, "retain_tokens": 16, "n_ppl": 4,
              "ppl_tokens": 24, "n_general": 16, "general_tokens": 16},
    "planting": {"epochs": 3, "lr": 1e-2, "forget_per_step": 2, "general_per_forget": 1},
    "unlearn": {"batch_size": 2, "max_epochs": 2, "fisher_batches": 1, "eval_batch_size": 4, "rank": 2},
    "evals": {"lambada": 2, "pubmedqa": 2, "dialogue": 1, "batch_size": 4},
    "reference": {"prompt_tokens": 4, "new_tokens": 4},
    "relearn": {"steps": [1, 2], "batch_size": 2},
    "attacks": {"prompt_tokens": 4, "shift": 2, "context_tokens": 8, "batch_size": 4},
}


@dataclass
class EvalSubsets:
    """Items of each downstream set scored after unlearning (None: not scored)."""

    lambada: int | None = 32
    pubmedqa: int | None = 8
    dialogue: int | None = 4  # dialogues per dialogue set (4 sets)
    batch_size: int = 8


@dataclass
class ReferenceOptions:
    prompt_tokens: int = 8  # forget-text prefix the generations continue
    new_tokens: int = 24
    rep_n: int = 4  # n of the repetition rate (seq-rep-n)
    kl_texts: str = "heldout"  # held-out texts of KL(original || unlearned): heldout or ppl_pile


@dataclass
class BenchConfig(BenchSettings):
    """One benchmark configuration; ``models``, ``splits`` and ``methods`` may grow in an existing folder."""

    # The attack settings change no unlearning, only the attack numbers, which each run records with its
    # settings (attacks.*.settings): a folder made before the attacks were measured stays readable.
    GROWS = ("models", "splits", "methods", "attacks")

    name: str = "custom"
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    splits: list[str] = field(default_factory=lambda: ["0", "1", "2"])
    pool: int = 32  # the forget files lm_extraction_{pool}_{split}.csv
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seed: int = 0
    plant: bool = True  # False: the model memorized the forget set in pre-training (GPT-Neo on TDEC)
    heldout: str = "tdec"  # held-out sequences: the split file's unplanted rows (tdec) or Pile excerpts (pile)
    sizes: Sizes = field(default_factory=Sizes)
    planting: PlantingRecipe = field(default_factory=PlantingRecipe)
    unlearn: dict[str, Any] = field(default_factory=dict)  # loku unlearn options for every method
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-method overrides
    evals: EvalSubsets = field(default_factory=EvalSubsets)
    reference: ReferenceOptions = field(default_factory=ReferenceOptions)
    relearn: Any = None  # RelearnSettings (set in __post_init__; metrics import torch lazily)
    attacks: Any = None  # AttackSettings (quantization schemes, prefix probes), set in __post_init__
    data_dir: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        from ..metrics.relearn import RelearnSettings

        if self.relearn is None:
            self.relearn = RelearnSettings()
        if self.attacks is None:
            from ..metrics.attacks import AttackSettings

            self.attacks = AttackSettings()

    # ------------------------------------------------------------------ checks

    def validate(self) -> "BenchConfig":
        from ..config import METHODS

        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ConfigError("models: give at least one model (built-in name, folder or hub id)")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(METHODS)}")
        if not self.methods:
            raise ConfigError(f"no method given; choose from: {', '.join(METHODS)}")
        if not self.splits:
            raise ConfigError("no split given (e.g. --splits 0,1,2)")
        if len(set(self.methods)) != len(self.methods) or len(set(self.splits)) != len(self.splits):
            raise ConfigError("a method or split is listed twice")
        self.sizes.validate()
        self.planting.validate()
        for part, names, allow_none in ((self.evals, ("lambada", "pubmedqa", "dialogue"), True),
                                        (self.evals, ("batch_size",), False),
                                        (self.reference, ("prompt_tokens", "new_tokens", "rep_n"), False)):
            for name in names:
                value = getattr(part, name)
                if (value is None and allow_none) or (isinstance(value, int) and not isinstance(value, bool)
                                                      and value >= 1):
                    continue
                kind = "evals" if part is self.evals else "reference"
                raise ConfigError(f"{kind}.{name} must be a positive integer{' or null' if allow_none else ''}, "
                                  f"got {value!r}")
        if not isinstance(self.plant, bool) or not isinstance(self.pool, int) or not isinstance(self.seed, int):
            raise ConfigError("plant must be true or false, pool and seed integers")
        self.relearn.validate()
        self.attacks.validate()
        if self.attacks.shift + self.attacks.prompt_tokens >= self.sizes.forget_tokens:
            raise ConfigError(f"attacks: shift ({self.attacks.shift}) + prompt_tokens ({self.attacks.prompt_tokens}) "
                              f"leave no forget token to predict in texts of sizes.forget_tokens "
                              f"({self.sizes.forget_tokens}); lower them")
        if self.heldout not in HELDOUT_SOURCES:
            raise ConfigError(f"heldout must be one of {', '.join(HELDOUT_SOURCES)}, got {self.heldout!r}")
        if self.heldout == "tdec" and not self.plant:
            raise ConfigError("heldout: tdec needs plant: true (a model that memorized TDEC in pre-training saw "
                              "every row of the split files); use heldout: pile")
        if self.reference.kl_texts not in ("heldout", "ppl_pile"):
            raise ConfigError(f"reference.kl_texts must be heldout or ppl_pile, got {self.reference.kl_texts!r}")
        if self.sizes.n_forget < 2:
            raise ConfigError("sizes.n_forget must be at least 2 (the relearning check trains on one half and "
                              "measures the other)")
        from ..checks import check_unlearn

        for method in self.methods:
            check_unlearn(self.unlearn_config(method, "f.jsonl", "r.jsonl", "v.jsonl", "out"))
        bad = sorted(set(self.method_options) - set(METHODS))
        if bad:
            raise ConfigError(f"method_options for unknown method(s) {', '.join(bad)}; choose from: "
                              f"{', '.join(METHODS)}")
        return self

    def check_data(self) -> dict[str, str]:
        """Every file the bench reads exists (before any model is loaded); returns {path: sha256}."""
        from ..provenance import file_sha256

        root = existing_folder(self.data_root())
        missing = [s for s in self.splits if not forget_file(root, s, self.pool).is_file()]
        if missing:
            folder = root / "tdec" / "forget"
            have = sorted(p.stem.rsplit("_", 1)[1] for p in folder.glob(f"lm_extraction_{self.pool}_*.csv"))
            raise ConfigError(f"unknown split(s) {', '.join(missing)}: no "
                              f"{folder}/lm_extraction_{self.pool}_SPLIT.csv; "
                              f"splits there: {', '.join(have) or 'none'}")
        if self.heldout == "tdec":  # the held-out rows follow the forget rows in each split's file
            from ..data import read_texts

            needed = self.sizes.n_forget + self.sizes.n_heldout
            for split in self.splits:
                path = forget_file(root, split, self.pool)
                if len(read_texts(path, role="forget")) < needed:
                    raise DataError(f"{path}: fewer than {needed} rows: {self.sizes.n_heldout} held-out sequences "
                                    f"asked after the {self.sizes.n_forget} forget rows; lower sizes.n_heldout "
                                    "or use heldout: pile")
        names = {name for name, _, _ in ROWS.values()}
        if self.evals.lambada:
            names.add("lambada.csv")
        if self.evals.pubmedqa:
            names.add("pubmed_qa.csv")
        if self.evals.dialogue:
            from ..metrics.dialogue import DIALOGUE_SETS

            names.update(f"{d}.json" for d in DIALOGUE_SETS)
        files = [root / "tdec" / "eval" / n for n in sorted(names)]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise DataError(f"{absent[0]}: evaluation file not found ({len(absent)} missing); pass --data-dir pointing "
                            "at the shared data folder")
        return {str(f.relative_to(root)): file_sha256(f) for f in files}

    # ------------------------------------------------------------------ per method

    def unlearn_config(self, method: str, forget: str, retain: str, validation: str, out: str,
                       model: str = "planted"):
        from ..config import load_config

        values = {**self.unlearn, **self.method_options.get(method, {}),
                  "method": method, "forget": forget, "retain": retain, "validation": validation, "out": out,
                  "model": model, "seed": self.seed}
        try:
            return load_config(None, values)
        except ConfigError as err:
            raise ConfigError(f"unlearn options of method {method}: {err}") from None


# --------------------------------------------------------------------------- loading


def load_bench_config(name_or_path: str | None = "cpu", overrides: dict[str, Any] | None = None, *,
                      smoke: bool = False) -> BenchConfig:
    """A :class:`BenchConfig` from a named or YAML configuration, with ``--smoke`` and flag overrides on top."""
    from ..metrics.attacks import AttackSettings
    from ..metrics.relearn import RelearnSettings

    values = config_values(name_or_path, "tdec", overrides, SMOKE if smoke else None)
    if "model" in values:  # --model (comma-separated) or a YAML `model:` replaces the list of models
        model = values.pop("model")
        values["models"] = [m.strip() for m in model.split(",") if m.strip()] if isinstance(model, str) else model
    check_known(BenchConfig, values, "unknown bench option(s)")
    for key in ("models", "splits", "methods"):
        if isinstance(values.get(key), str):
            values[key] = [v.strip() for v in values[key].split(",") if v.strip()]
        if key in values:
            values[key] = [str(v) for v in values[key]]
    cfg = BenchConfig(
        **{k: v for k, v in values.items() if k not in ("sizes", "planting", "evals", "reference", "relearn",
                                                         "attacks")},
        sizes=section(Sizes, values.get("sizes"), "sizes"),
        planting=PlantingRecipe.from_dict(values.get("planting")) if values.get("planting") is not None
        else PlantingRecipe(),
        evals=section(EvalSubsets, values.get("evals"), "evals"),
        reference=section(ReferenceOptions, values.get("reference"), "reference"),
        relearn=RelearnSettings.from_dict(values.get("relearn")),
        attacks=AttackSettings.from_dict(values.get("attacks")),
    )
    if not isinstance(cfg.unlearn, dict) or not isinstance(cfg.method_options, dict):
        raise ConfigError("unlearn and method_options must be mappings of option: value")
    return cfg


# --------------------------------------------------------------------------- running


def downstream(model, tokenizer, texts: dict[str, list[str]], cfg: BenchConfig) -> dict[str, Any]:
    """Pile / WikiText perplexity, LAMBADA, PubMedQA and dialogue F1 (the configured subsets) and their seconds."""
    from ..evaluate import run_suites
    from ..metrics.perplexity import perplexity

    started = time.time()
    ev = cfg.evals
    # perplexity on the bench's own excerpts (data.ROWS: apart from every other role), not the ppl suite's sets
    out: dict[str, Any] = {key: perplexity(model, tokenizer, texts[key], batch_size=ev.batch_size)["ppl"]
                           for key in ("ppl_pile", "ppl_wiki")}
    limits = {"lambada": ev.lambada or 0, "pubmedqa": ev.pubmedqa or 0, "dialogue": ev.dialogue or 0}
    suites = [suite for suite, sets in (("reasoning", ("lambada", "pubmedqa")), ("dialogue", ("dialogue",)))
              if any(limits[name] for name in sets)]
    if suites:
        scores = run_suites(model, tokenizer, suites, data_dir=cfg.data_root(), batch_size=ev.batch_size,
                            seed=cfg.seed, set_limits=limits)["suites"]
        for key, suite, name, metric in (("lambada", "reasoning", "lambada", "accuracy"),
                                         ("pubmedqa", "reasoning", "pubmedqa", "accuracy"),
                                         ("dialogue_f1", "dialogue", "mean_f1", None)):
            if name in scores.get(suite, {}):
                value = scores[suite][name]
                out[key] = value if metric is None else value[metric]
    out["seconds"] = time.time() - started
    return out


def _reference_kwargs(cfg: BenchConfig) -> dict[str, Any]:
    r = cfg.reference
    return {"prompt_tokens": r.prompt_tokens, "new_tokens": r.new_tokens, "rep_n": r.rep_n,
            "batch_size": cfg.evals.batch_size}


def unlearn_from(cfg, model, tokenizer, *, before: dict | None, resume: bool):
    """``loku.trainer.unlearn`` with the pre-unlearning measurement ``before`` (the same planted model and
    batches for every method of a split) reused instead of measured again. Returns (RunResult, its ``before``)."""
    from ..trainer import unlearn

    result = unlearn(cfg, model=model, tokenizer=tokenizer, resume=resume, before=before)
    return result, result.report["before"]


@dataclass
class SplitContext:
    """What every method of one (model, split) starts from: texts, files, the planted model and the
    measurements taken once (``store``: the split's split.json)."""

    cfg: BenchConfig
    model_name: str
    split: str
    split_dir: Path
    texts: dict[str, list[str]]
    files: dict[str, str]
    store: "Store"
    original: Any
    planted: Any
    tokenizer: Any
    original_scores: dict
    reference_stats: dict | None
    control: dict | None
    attacks_before: dict | None = None  # the planted model's quantization numbers (the attack's reference)


def run_split(cfg: BenchConfig, model_name: str, original, tokenizer, split: str, folder: Path,
              original_scores: dict, say: Callable[[str], None], progress: bool) -> dict[str, Any]:
    """Plant (cached), measure once, then every method of ``cfg.methods`` not finished yet."""
    ctx = prepare_split(cfg, model_name, original, tokenizer, split, folder, original_scores, say, progress)
    return {method: run_method(ctx, method, say, progress) for method in cfg.methods}


def prepare_split(cfg: BenchConfig, model_name: str, original, tokenizer, split: str, folder: Path,
                  original_scores: dict, say: Callable[[str], None], progress: bool) -> SplitContext:
    """The split's texts and files, its planted model (cached) and its once-per-split measurements."""
    from ..models import cache_dir
    from ..provenance import file_sha256
    from . import data as bench_data
    from .planting import measure_planting, planted_model

    split_dir = folder / f"split-{split}"
    texts = bench_data.bench_texts(tokenizer, cfg.data_root(), split, cfg.sizes, pool=cfg.pool,
                                   heldout=cfg.heldout)
    files = {}
    for role, name in (("forget", "forget"), ("retain", "retain"), ("heldout", "validation")):
        path = split_dir / "data" / f"{name}.jsonl"
        if not path.is_file() or path.read_text(encoding="utf-8") != "".join(
                json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts.texts[role]):
            bench_data.write_jsonl(path, texts.texts[role])
        files[name] = str(path)
    store = Store(split_dir / "split.json")
    forget_sha = file_sha256(forget_file(cfg.data_root(), split, cfg.pool))
    recorded = store.get("data", lambda: {"forget_file_sha256": forget_sha, "texts_sha256": texts.sha256(),
                                          "sources": texts.sources})
    if recorded["texts_sha256"] != texts.sha256():
        raise ConfigError(f"{split_dir}: this split was run on other texts (the data files or the tokenizer changed); "
                          "choose another --out")
    t = texts.texts

    if cfg.plant:
        def measure(orig, planted):
            return measure_planting(orig, planted, tokenizer, t["forget"], t["heldout"], t["ppl_pile"],
                                    el_n=int(cfg.unlearn.get("el_n", 10)), batch_size=cfg.evals.batch_size)

        cache_root = Path(cfg.cache_dir) if cfg.cache_dir else cache_dir()
        planted, meta, cache_folder, _ = planted_model(
            original, tokenizer, base_name=model_name, forget=t["forget"], general=t["general"], recipe=cfg.planting,
            cache_root=cache_root, progress=progress, log=say)
        # Measured here, not kept in the cache: the held-out texts are not part of the planting's key.
        recorded = store.get("planting", lambda: {k: v for k, v in meta.items()}
                             | {"cache_folder": str(cache_folder), "measurements": measure(original, planted)})
        if recorded.get("planted_fingerprint") != meta.get("planted_fingerprint"):
            raise ConfigError(f"{split_dir}: the results of this split were measured on another planted model than "
                              f"the one in {cache_folder} (planted again since?); choose another --out, or delete "
                              f"{split_dir} to run the split again")
    else:
        planted = original
    say(f"loku bench: split {split}: measuring the planted model once")
    store.get("planted_downstream",
              lambda: downstream(planted, tokenizer, t, cfg) if cfg.plant else dict(original_scores))
    # The held-out val_ppl of the original, for the per-epoch perplexity curves (relative to the original).
    store.get("original_heldout_ppl", lambda: _val_ppl(original, tokenizer, t["heldout"], cfg))
    reference_stats = control = None
    if cfg.plant:
        from ..metrics.reference import reference_distances, reference_stats as make_stats
        from ..metrics.relearn import relearn_curve, split_halves

        reference_stats = store.get("reference_stats", lambda: make_stats(
            original, tokenizer, t["forget"], t["heldout"], **_reference_kwargs(cfg)))
        store.get("planted_reference", lambda: reference_distances(
            planted, tokenizer, t["forget"], t["heldout"], original=original, original_stats=reference_stats,
            kl_texts=t[cfg.reference.kl_texts], **_reference_kwargs(cfg)))
        train, test = split_halves(t["forget"])
        control = store.get("relearn_control", lambda: relearn_curve(original, tokenizer, train, test, cfg.relearn))
        store.get("original_attacks", lambda: model_attacks(original, tokenizer, t, cfg))
        store.get("original_openunlearning", lambda: openunlearning_metrics(original, tokenizer, t, cfg, None))
    planted_attacks = store.get("planted_attacks", lambda: model_attacks(planted, tokenizer, t, cfg))
    store.get("planted_openunlearning", lambda: openunlearning_metrics(
        planted, tokenizer, t, cfg, store.data.get("planted_reference")))
    return SplitContext(cfg, model_name, split, split_dir, t, files, store, original, planted, tokenizer,
                        original_scores, reference_stats, control, planted_attacks["quantization"]["model"])


def openunlearning_metrics(model, tokenizer, texts: dict[str, list[str]], cfg: BenchConfig,
                           reference: dict | None) -> dict[str, Any]:
    """OpenUnlearning's exact_memorization and extraction_strength on the split's forget texts, and privleak
    from the distances to the original (the exact "retrained" model; None without planting)."""
    from ..metrics.openunlearning import forget_memorization

    out = forget_memorization(model, tokenizer, texts["forget"], batch_size=cfg.evals.batch_size)
    out["privleak"] = (reference or {}).get("privleak")
    return out


def model_attacks(model, tokenizer, texts: dict[str, list[str]], cfg: BenchConfig,
                  reference_numbers: dict | None = None) -> dict[str, Any]:
    """The quantization attack and the prefix probes of §13 on the split's forget texts, the unrelated
    text being the split's Pile perplexity excerpts; ``reference_numbers``: the planted model's."""
    from ..metrics.attacks import prefix_probes, quantization_attack

    started = time.time()
    out = {"quantization": quantization_attack(model, tokenizer, texts["forget"], settings=cfg.attacks,
                                               reference_numbers=reference_numbers),
           "probing": prefix_probes(model, tokenizer, texts["forget"], texts["ppl_pile"], settings=cfg.attacks)}
    out["seconds"] = time.time() - started
    return out


def run_method(ctx: SplitContext, method: str, say: Callable[[str], None], progress: bool) -> dict[str, Any]:
    """One method from the split's planted model, then its evaluation; the stored result if it has one."""
    from ..checkpoint import STATE, checkpoint_dir
    from ..checkpoint import discard as discard_checkpoint
    from ..provenance import jsonable
    from ..save import atomic_write_json, merged_copy

    cfg, split, t, files = ctx.cfg, ctx.split, ctx.texts, ctx.files
    result_path = ctx.split_dir / "runs" / f"{method}.json"
    if result_path.is_file():
        say(f"loku bench: split {split}, {method}: finished earlier, skipped")
        return read_json(result_path)
    out = ctx.split_dir / "runs" / method
    ucfg = cfg.unlearn_config(method, files["forget"], files["retain"], files["validation"], str(out),
                              model=f"{ctx.model_name} planted with split {split}" if cfg.plant else ctx.model_name)
    ucfg.progress = progress
    ucfg.overwrite = False
    resume = (checkpoint_dir(out) / STATE).is_file()
    say(f"loku bench: split {split}, {method}: {'resuming' if resume else 'unlearning'}")
    started = time.time()
    result, run_before = unlearn_from(ucfg, ctx.planted, ctx.tokenizer, before=ctx.store.reload().get("before"),
                                      resume=resume)
    unlearn_seconds = time.time() - started
    ctx.store.get("before", lambda: run_before)
    report = result.report
    evaluated = merged_copy(result.model).eval()
    t_eval = time.time()
    scores = downstream(evaluated, ctx.tokenizer, t, cfg)
    entry: dict[str, Any] = {
        "model": ctx.model_name, "split": split, "method": method, "seed": ucfg.seed,
        "outcome": report["outcome"], "epochs_run": report["epochs_run"],
        "epochs_to_success": report["epochs_to_success"], "max_epochs": ucfg.max_epochs,
        "thresholds": report["thresholds"], "before": report["before"], "after": report["after"],
        "epochs": report["epochs"], "trainable_share": report["trainable_share"],
        "trainable_parameters": report["trainable_parameters"], "total_parameters": report["total_parameters"],
        "flops": report["flops"], "init": report.get("init"), "peak_memory_bytes": report["peak_memory_bytes"],
        "downstream": scores, "unlearn_config": ucfg.to_dict(), "data": report["data"],
        "stop": report.get("stop"),  # the two-sided rule's bands, checks and verdict (§12); None for the paper's
    }
    if cfg.plant:
        from ..metrics.reference import reference_distances
        from ..metrics.relearn import relearning_check

        t_ref = time.time()
        entry["reference"] = reference_distances(
            evaluated, ctx.tokenizer, t["forget"], t["heldout"], original=ctx.original,
            original_stats=ctx.reference_stats, kl_texts=t[cfg.reference.kl_texts], **_reference_kwargs(cfg))
        entry["reference"]["seconds"] = time.time() - t_ref
        entry["relearn"] = relearning_check(evaluated, ctx.tokenizer, t["forget"], control=ctx.control,
                                            settings=cfg.relearn)
    entry["openunlearning"] = openunlearning_metrics(evaluated, ctx.tokenizer, t, cfg, entry.get("reference"))
    entry["attacks"] = model_attacks(evaluated, ctx.tokenizer, t, cfg, reference_numbers=ctx.attacks_before)
    entry["seconds"] = {"unlearn": report["seconds"]["total"], "init": report["seconds"]["init"],
                        "unlearn_wall": unlearn_seconds, "evaluation": time.time() - t_eval}
    atomic_write_json(result_path, jsonable(entry))
    discard_checkpoint(out)
    del result, evaluated
    free_memory()
    say(f"loku bench: split {split}, {method}: {entry['outcome']} after {entry['epochs_run']} epoch(s); "
        f"EL {entry['after'].get('forget_el', float('nan')):.3f}, MA {entry['after']['forget_ma']:.3f}, Pile PPL "
        f"{scores['ppl_pile']:.2f} (original {ctx.original_scores['ppl_pile']:.2f}); "
        f"{unlearn_seconds:.0f} s + {entry['seconds']['evaluation']:.0f} s evaluation")
    return entry


def _val_ppl(model, tokenizer, texts: list[str], cfg: BenchConfig) -> float:
    """Held-out perplexity computed as the trainer does per epoch (``val_ppl``), for ratios to the original."""
    from .. import measure
    from ..data import make_batches, tokenize_texts
    from ..lm import ensure_pad_token

    ids = tokenize_texts(tokenizer, texts, max_length=1 << 20, source="held-out set")
    batch = int(cfg.unlearn.get("eval_batch_size", 8))
    return measure.heldout_scores(model, make_batches(ids, batch, ensure_pad_token(tokenizer)))[1]


def measure_original(cfg: BenchConfig, folder: Path, model_name: str, original, tokenizer,
                     say: Callable[[str], None]) -> dict[str, Any]:
    """The original model's downstream scores (once per model, in ``original.json``)."""
    from . import data as bench_data

    store = Store(folder / "original.json")
    store.get("model", lambda: {"name": model_name, "parameters": sum(p.numel() for p in original.parameters())})

    def measure() -> dict[str, Any]:  # the texts are read only when the scores are not stored yet
        say(f"loku bench: measuring {model_name} itself (perplexity, LAMBADA, PubMedQA, dialogue)")
        texts = bench_data.bench_texts(tokenizer, cfg.data_root(), cfg.splits[0], cfg.sizes, pool=cfg.pool,
                                       heldout=cfg.heldout)
        return downstream(original, tokenizer, texts.texts, cfg)

    return store.get("downstream", measure)


def run_bench(cfg: BenchConfig, out: str | Path, *, progress: bool = True, command: list[str] | None = None,
              report_only: bool = False, jobs: int = 1) -> dict[str, Any]:
    """Run (or continue) the bench in ``out``; returns the summary written to ``out/results.json``.

    ``jobs`` > 1 runs the (split, method) runs in that many worker processes (:mod:`loku.bench.jobs`),
    the CPU cores shared out between them."""
    from ..models import load_model
    from .base import open_bench
    from .summary import write_outputs

    out, record, say = open_bench(cfg, out, progress=progress, command=command, jobs=jobs, report_only=report_only,
                                  models=cfg.models, splits=cfg.splits, methods=cfg.methods)
    started = time.time()
    if not report_only:
        if jobs > 1:
            run_in_processes(cfg, out, jobs, say=say, progress=progress)
        for model_name in ([] if jobs > 1 else cfg.models):
            folder = out / slug(model_name)
            say(f"loku bench: loading {model_name}")
            original, tokenizer = load_model(model_name, progress=progress)
            original.eval()
            original_scores = measure_original(cfg, folder, model_name, original, tokenizer, say)
            for split in cfg.splits:
                run_split(cfg, model_name, original, tokenizer, split, folder, original_scores, say, progress)
            del original
            free_memory()
    summary = write_outputs(out, cfg, record, command=command, seconds=time.time() - started)
    say(f"loku bench: results in {out / 'results.md'}")
    return summary


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``loku bench tdec``."""
    parser.add_argument("--config", default="cpu",
                        help="cpu (SmolLM2-135M on 2 CPU cores), paper (GPT-Neo, 32 x 200 tokens, GPU) or a YAML file "
                             "[default: cpu]")
    parser.add_argument("--out", default=None, help="bench folder (results, resumable) [default: runs/bench-tdec-NAME]")
    parser.add_argument("--model", default=None, help="model(s) instead of the config's: built-in name, folder or hub "
                                                      "id; comma-separated for several")
    parser.add_argument("--splits", default=None, help="TDEC splits, comma-separated (e.g. 0,1,2)")
    parser.add_argument("--methods", default=None,
                        help=f"methods, comma-separated [default: {','.join(DEFAULT_METHODS)}]")
    parser.add_argument("--seed", type=int, default=None, help="seed of unlearning (the planting recipe has its own)")
    parser.add_argument("--max-epochs", type=int, default=None, help="give up after this many epochs")
    parser.add_argument("--data-dir", default=None,
                        help="shared data folder [default: $LOKU_DATA_DIR or ../shared/data]")
    parser.add_argument("--cache-dir", default=None, help="where planted models are cached [default: $LOKU_CACHE]")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and epochs (seconds on a tiny model; CI)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes running (split, method) runs side by side, the CPU cores shared "
                             "out between them (2 on a 2-core machine: one thread each) [default: 1]")
    parser.add_argument("--report-only", action="store_true",
                        help="only write results.json / results.md / plots from the finished results in --out")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress messages and bars")
    from ..devices import add_device_arguments

    return add_device_arguments(parser)  # every model the bench loads, plants, unlearns and measures


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    overrides: dict[str, Any] = {"model": args.model, "splits": args.splits, "methods": args.methods,
                                 "seed": args.seed, "data_dir": args.data_dir, "cache_dir": args.cache_dir}
    if args.max_epochs is not None:
        overrides["unlearn"] = {"max_epochs": args.max_epochs}
    return load_bench_config(args.config, overrides, smoke=args.smoke)


def run(args: argparse.Namespace) -> int:
    """``loku bench tdec``: 0 when every (model, split, method) has a result."""
    from ..devices import use_device
    from .base import command_line, finish_command

    use_device(args.device)
    cfg = config_from_args(args)
    out = args.out or f"runs/bench-tdec-{cfg.name}"
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    summary = run_bench(cfg, out, progress=args.progress, command=command_line(), report_only=args.report_only,
                        jobs=args.jobs)
    return finish_command("tdec", summary, out, args.report_only)


# --------------------------------------------------------------------------- --jobs N: tasks in worker processes
# Tasks wait only for what they need, so no two processes ever compute the same thing: each model's own
# downstream scores, then each split's planting and once-per-split measurements, then, as soon as a split's
# measurements are there, its (model, split, method) runs not finished yet, in the order of ``cfg.methods``
# (slow methods first there keep the end short). Every result is the file the serial bench would write.

_loaded: dict[str, Any] = {}  # this worker's models and its last split's context


def run_in_processes(cfg: BenchConfig, out: Path, jobs: int, *, say: Callable[[str], None], progress: bool) -> None:
    """Run the bench's tasks in ``jobs`` worker processes (see the module docstring)."""
    threads = jobs_mod.threads_per_job(jobs)
    say(f"loku bench: {jobs} worker processes, {threads} thread(s) each")
    failures: list[str] = []
    with jobs_mod.pool(jobs) as pool:
        def submit(task):
            return pool.submit(_worker_task, cfg, str(out), *task, progress)

        pending = {submit((m, None, None)): (m, None, None) for m in cfg.models}
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                model, split, method = pending.pop(future)
                name = "/".join(str(part) for part in (model, split, method) if part is not None)
                if not jobs_mod.succeeded(future, name, failures):  # what needed this task is not run
                    say(f"loku bench: {failures[-1]}")
                    continue
                if split is None:  # the model's scores are there: plant and measure its splits
                    pending.update({submit((model, s, None)): (model, s, None) for s in cfg.splits})
                elif method is None:  # the split is measured: its runs
                    pending.update({submit((model, split, m)): (model, split, m) for m in cfg.methods})
    if failures:
        raise jobs_mod.BenchTasksFailed(f"{len(failures)} bench task(s) failed (finished results are kept; rerun "
                                        "to retry): " + "; ".join(failures))


def _worker_task(cfg, out: str, model_name: str, split: str | None, method: str | None, progress: bool) -> None:
    from ..models import load_model

    say = jobs_mod.worker_say(progress)
    if _loaded.get("model_name") != model_name:
        _loaded.clear()
        original, tokenizer = load_model(model_name, progress=False)
        _loaded.update(model_name=model_name, original=original.eval(), tokenizer=tokenizer)
    original, tokenizer = _loaded["original"], _loaded["tokenizer"]
    folder = Path(out) / slug(model_name)
    scores = measure_original(cfg, folder, model_name, original, tokenizer, say)
    if split is None:
        return
    ctx = _loaded.get("split")
    if ctx is None or ctx.split != split:
        _loaded.pop("split", None)
        free_memory()
        ctx = prepare_split(cfg, model_name, original, tokenizer, split, folder, scores, say, progress=False)
        _loaded["split"] = ctx
    if method is not None:
        run_method(ctx, method, say, progress=False)
