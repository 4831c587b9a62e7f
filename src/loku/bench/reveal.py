"""`loku bench reveal`: Reveal-and-Release where the truth is known (docs/algorithms.md §9).

One TDEC split is planted as ``loku bench tdec`` plants it (same sizes and recipe, so the two benches
share the cached planted model). The request holds only the first ``prefix_tokens`` tokens of each
planted sequence, as fragments (TDEC rows have no description); the rest of each sequence is hidden.
Three ways to unlearn, all with the same method and options, each measured on the REAL planted text
(EL_10, MA), the held-out TDEC rows (MA) and Pile perplexity against the original model:

* ``real-text`` (upper bound): ``loku unlearn`` on the planted sequences themselves, stop rule on them.
* ``self-generated``: ``loku unlearn --reveal`` (:func:`loku.release.reveal_and_release`): rounds of
  reveal -> unlearn on what the model generated, one orthogonal adapter a round, each round's stop rule
  on its own generated set. Scored after every round.
* ``random-text`` (lower bound): as many Pile excerpts as the rounds collected, as long as their texts
  on average (``pile.csv`` rows 0-200, never planted), trained for as many epochs as all rounds
  together with the stop rule off: the same compute, no knowledge of the request.

Coverage: the n-gram recall (n = 4) of the hidden part of each sequence by the collected texts, after
every query, for each instruction selector and seed on the planted model (the curves), and per round of
the self-generated arm. Every arm is a task (``--jobs`` runs them side by side) whose result is kept in
OUT/arms/NAME.json; results go to OUT/results.json, results.md and plots/reveal.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from .data import Sizes, bench_texts, forget_file, role_texts, write_jsonl
from .planting import PlantingRecipe
from .base import BenchSettings, Store, config_values, existing_folder, read_json, section
from .reveal_report import ARMS

__all__ = ["ARMS", "RevealBenchConfig", "load_reveal_config", "run", "run_reveal_bench"]

N = 4  # n of the coverage recall

SMOKE: dict[str, Any] = {
    "prefix_tokens": 6,
    "sizes": {"n_forget": 2, "forget_tokens": 16, "n_heldout": 4, "n_retain": 4, "retain_tokens": 16, "n_ppl": 4,
              "ppl_tokens": 24, "n_general": 16, "general_tokens": 16},
    "planting": {"epochs": 3, "lr": 1e-2, "forget_per_step": 2, "general_per_forget": 1},
    "unlearn": {"batch_size": 2, "max_epochs": 2, "fisher_batches": 1, "eval_batch_size": 4, "rank": 2},
    "reveal": {"rounds": 2, "budget": 4, "max_new_tokens": 12},
    "coverage": {"selectors": ["neural-ucb", "random"], "seeds": [0], "budget": 4},
}


@dataclass
class RevealBenchConfig(BenchSettings):
    name: str = "custom"
    model: str = "smollm2-135m"
    split: str = "0"
    pool: int = 32
    prefix_tokens: int = 16  # what the request gives of each planted sequence
    method: str = "fila-ihl"
    seed: int = 0
    sizes: Sizes = field(default_factory=Sizes)
    planting: PlantingRecipe = field(default_factory=PlantingRecipe)
    unlearn: dict[str, Any] = field(default_factory=dict)  # loku unlearn options of every arm
    reveal: dict[str, Any] = field(default_factory=dict)  # --reveal-* options (rounds, budget, ...) without the prefix
    coverage: dict[str, Any] = field(default_factory=lambda: {"selectors": ["neural-ucb", "ucb1", "random"],
                                                              "seeds": [0, 1, 2], "budget": 48})
    eval_batch_size: int = 8
    data_dir: str | None = None
    cache_dir: str | None = None

    def validate(self) -> "RevealBenchConfig":
        from ..reveal import SELECTORS

        self.sizes.validate()
        self.planting.validate()
        if not isinstance(self.prefix_tokens, int) or not 1 <= self.prefix_tokens <= self.sizes.forget_tokens - N:
            raise ConfigError(f"prefix_tokens must be between 1 and sizes.forget_tokens - {N} (something must stay "
                              f"hidden), got {self.prefix_tokens!r}")
        unknown = [s for s in self.coverage.get("selectors", []) if s not in SELECTORS]
        if unknown or not self.coverage.get("seeds") or int(self.coverage.get("budget", 0)) < 1:
            raise ConfigError(f"coverage: selectors from {', '.join(SELECTORS.names())}, at least one seed and a "
                              f"budget >= 1 (unknown: {', '.join(unknown) or 'none'})")
        self.unlearn_config("f.jsonl", "r.jsonl", "v.jsonl", "out")
        self.unlearn_config(None, "r.jsonl", "v.jsonl", "out", reveal=__file__)  # any existing file stands for the request
        return self

    def check_data(self) -> dict[str, str]:
        from ..provenance import file_sha256

        path = forget_file(existing_folder(self.data_root()), self.split, self.pool)
        if not path.is_file():
            raise ConfigError(f"unknown split {self.split}: no {path}")
        return {str(path.relative_to(self.data_root())): file_sha256(path)}

    def unlearn_config(self, forget: str | None, retain: str, validation: str, out: str, *, reveal: str | None = None,
                       **options):
        from ..checks import check_unlearn
        from ..config import load_config

        values = {**self.unlearn, "method": self.method, "forget": forget, "retain": retain, "validation": validation,
                  "out": out, "model": f"{self.model} planted", "seed": self.seed, "progress": False, **options}
        if reveal is not None:
            values.update({f"reveal_{k}": v for k, v in self.reveal.items()}, reveal=reveal, strategy="orthogonal")
        try:
            return check_unlearn(load_config(None, values))
        except ConfigError as err:
            raise ConfigError(f"unlearn/reveal options: {err}") from None


def load_reveal_config(name_or_path: str | None = "cpu", overrides: dict[str, Any] | None = None, *,
                       smoke: bool = False) -> RevealBenchConfig:
    values = config_values(name_or_path, "reveal", overrides, SMOKE if smoke else None)
    known = {f.name for f in dataclasses.fields(RevealBenchConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown bench option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "split" in values:
        values["split"] = str(values["split"])
    return RevealBenchConfig(
        **{k: v for k, v in values.items() if k not in ("sizes", "planting")},
        sizes=section(Sizes, values.get("sizes"), "sizes"),
        planting=PlantingRecipe.from_dict(values.get("planting")) if values.get("planting") is not None
        else PlantingRecipe())


# --------------------------------------------------------------------------- measuring


def scores(model, tokenizer, texts: dict[str, list[str]], cfg: RevealBenchConfig) -> dict[str, Any]:
    """EL_10 / MA of the real planted text, MA of the held-out rows, Pile perplexity."""
    from ..metrics.perplexity import perplexity
    from ..metrics.relearn import memorization_of_texts

    forget = memorization_of_texts(model, tokenizer, texts["forget"], batch_size=cfg.eval_batch_size)
    heldout = memorization_of_texts(model, tokenizer, texts["heldout"], batch_size=cfg.eval_batch_size, with_el=False)
    return {"ma": forget["ma"], "el": forget["el_10"], "heldout_ma": heldout["ma"],
            "ppl_pile": perplexity(model, tokenizer, texts["ppl_pile"], batch_size=cfg.eval_batch_size)["ppl"]}


def hidden_parts(tokenizer, texts: list[str], prefix_tokens: int) -> tuple[list[str], list[list[int]]]:
    """The request's fragments (each text's first ``prefix_tokens`` tokens) and the hidden rest's ids."""
    from ..lm import encode

    ids = [encode(tokenizer, t, special=False) for t in texts]
    return [tokenizer.decode(i[:prefix_tokens]) for i in ids], [i[prefix_tokens:] for i in ids]


def coverage(tokenizer, revealed: list[str], hidden: list[list[int]]) -> float:
    """Mean n-gram recall of the hidden parts by the revealed texts."""
    from ..lm import encode
    from ..reveal import ngram_recall

    found = [encode(tokenizer, t, special=False) for t in revealed]
    return sum(ngram_recall(h, found, N) for h in hidden) / len(hidden)


# --------------------------------------------------------------------------- preparing and the arms


def prepare(cfg: RevealBenchConfig, out: Path, say: Callable[[str], None], *, model=None, tokenizer=None):
    """The original and planted models, the texts and files, and the scores every arm compares with."""
    from ..models import cache_dir, load_model
    from .planting import measure_planting, planted_model

    if model is None:
        model, tokenizer = load_model(cfg.model, progress=False)
    original = model.eval()
    texts = bench_texts(tokenizer, cfg.data_root(), cfg.split, cfg.sizes, pool=cfg.pool, heldout="tdec").texts
    fragments, hidden = hidden_parts(tokenizer, texts["forget"], cfg.prefix_tokens)
    data = out / "data"
    files = {role: str(write_jsonl(data / f"{role}.jsonl", texts[role])) for role in ("forget", "retain", "heldout")}
    request = data / "request.json"
    request.write_text(json.dumps({"fragments": fragments}, ensure_ascii=False, indent=1), encoding="utf-8")
    files["request"] = str(request)
    planted, meta, folder, _ = planted_model(
        original, tokenizer, base_name=cfg.model, forget=texts["forget"], general=texts["general"],
        recipe=cfg.planting, cache_root=Path(cfg.cache_dir) if cfg.cache_dir else cache_dir(), log=say)
    store = Store(out / "shared.json")
    store.get("planting", lambda: {**meta, "cache_folder": str(folder), "measurements": measure_planting(
        original, planted, tokenizer, texts["forget"], texts["heldout"], texts["ppl_pile"],
        batch_size=cfg.eval_batch_size)})
    store.get("original", lambda: scores(original, tokenizer, texts, cfg))
    store.get("planted", lambda: scores(planted, tokenizer, texts, cfg))
    return {"original": original, "planted": planted, "tokenizer": tokenizer, "texts": texts, "files": files,
            "hidden": hidden, "fragments": fragments, "store": store}


def _real_text(cfg, out: Path, shared) -> dict[str, Any]:
    from ..trainer import unlearn

    files = shared["files"]
    run_cfg = cfg.unlearn_config(files["forget"], files["retain"], files["heldout"], str(out / "arms" / "real-text.run"),
                                 overwrite=True)
    result = unlearn(run_cfg, model=shared["planted"], tokenizer=shared["tokenizer"])
    return {"outcome": result.report["outcome"], "epochs_run": result.report["epochs_run"],
            "forget_texts": len(shared["texts"]["forget"]),
            "scores": scores(result.model, shared["tokenizer"], shared["texts"], cfg)}


def _self_generated(cfg, out: Path, shared, arm: str = "self-generated", **options: Any) -> dict[str, Any]:
    import shutil

    from ..checkpoint import discard as discard_checkpoint
    from ..release import resumable, reveal_and_release
    from ..requests import apply_deltas

    files, tokenizer = shared["files"], shared["tokenizer"]
    run_out = out / "arms" / f"{arm}.run"
    run_cfg = cfg.unlearn_config(None, files["retain"], files["heldout"], str(run_out), reveal=files["request"],
                                 overwrite=True, **options)
    # a bench restarted after a kill goes on after the arm's last finished round
    release = reveal_and_release(run_cfg, model=shared["planted"], tokenizer=tokenizer, say=lambda m: None,
                                 resume=resumable(run_out))
    rounds, collected, retain = [], [], [" ".join(t.split()) for t in shared["texts"]["retain"]]
    for k, record in enumerate(release.rounds):
        texts = [json.loads(line)["text"] for line in Path(record["forget"]).read_text(encoding="utf-8").splitlines()]
        collected += texts
        entry = {**{key: record[key] for key in ("round", "queries", "collected", "repeated", "novel", "new_ngram_share",
                                                  "mean_reward", "refused", "seconds_reveal")},
                 "outcome": record.get("outcome"), "stop_verdict": record.get("stop_verdict"),
                 "epochs_run": record.get("epochs_run", 0),
                 "coverage": coverage(tokenizer, texts, shared["hidden"]) if texts else 0.0,
                 "coverage_so_far": coverage(tokenizer, collected, shared["hidden"]) if collected else 0.0,
                 "tokens": [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts],
                 "retain_verbatim": sum(any(r in " ".join(t.split()) for r in retain) for t in texts)}
        unlearned = [r for r in release.rounds[: k + 1] if "request" in r]
        if "request" in record:
            model_k = apply_deltas(shared["planted"], release.requests.deltas[: len(unlearned)]).eval()
            entry["scores"] = scores(model_k, tokenizer, shared["texts"], cfg)
            del model_k
        rounds.append(entry)
    shutil.rmtree(f"{run_out}.reveal", ignore_errors=True)
    discard_checkpoint(run_out)
    # the last round that unlearned (a final round can stop the loop before unlearning anything)
    final = next((r["scores"] for r in reversed(rounds) if "scores" in r), None)
    lengths = [n for r in rounds if r["outcome"] is not None for n in r["tokens"]]
    return {"stopped": release.stopped, "rounds": rounds, "scores": final,
            "epochs_run": sum(r["epochs_run"] for r in rounds), "forget_texts": len(lengths),
            "mean_tokens": sum(lengths) / len(lengths) if lengths else 0,
            "mean_overlap": release.requests.report.get("mean_overlap") if release.requests is not None else None}


def _coverage(cfg, out: Path, shared) -> dict[str, Any]:
    from ..reveal import Request, RevealSettings, reveal

    request = Request("", shared["fragments"], shared["files"]["request"])
    curves: dict[str, list[list[float]]] = {}
    max_new = int(cfg.reveal.get("max_new_tokens", 48))
    for selector in cfg.coverage["selectors"]:
        for seed in cfg.coverage["seeds"]:
            settings = RevealSettings(budget=int(cfg.coverage["budget"]), selector=selector, max_new_tokens=max_new,
                                      seed=int(seed))
            result = reveal(shared["planted"], shared["tokenizer"], request, settings,
                            retain_texts=shared["texts"]["retain"])
            by_query = {item["query"]: item["text"] for item in result["items"]}
            found, curve = [], []
            for t in range(settings.budget):  # recall after each query, from the texts collected so far
                if t in by_query:
                    found.append(by_query[t])
                curve.append(coverage(shared["tokenizer"], found, shared["hidden"]) if found else 0.0)
            curves.setdefault(selector, []).append(curve)
    return {"curves": curves}


def _random_text(cfg, out: Path, shared) -> dict[str, Any]:
    from ..trainer import unlearn

    generated = read_json(out / "arms" / "self-generated.json")
    if not generated["forget_texts"]:
        return {"skipped": "the self-generated arm unlearned nothing", "scores": None}
    n_tokens = max(12, round(generated["mean_tokens"]))
    texts = role_texts(shared["tokenizer"], cfg.data_root(), "heldout", generated["forget_texts"], n_tokens)
    path = write_jsonl(out / "data" / "random-text.jsonl", texts)
    files = shared["files"]
    run_cfg = cfg.unlearn_config(str(path), files["retain"], files["heldout"], str(out / "arms" / "random-text.run"),
                                 overwrite=True, max_epochs=max(1, generated["epochs_run"]))
    # Exactly as many epochs as the self-generated arm ran, scored below: nothing to measure on the way.
    result = unlearn(run_cfg, model=shared["planted"], tokenizer=shared["tokenizer"], measure=False)
    return {"epochs_run": result.report["epochs_run"], "forget_texts": len(texts), "tokens_each": n_tokens,
            "scores": scores(result.model, shared["tokenizer"], shared["texts"], cfg)}


def _self_generated_fragments(cfg, out: Path, shared) -> dict[str, Any]:
    """The self-generated arm with each round's stop rule on the request's fragments (§9, §12): two-sided,
    checked every optimizer step, against the held-out texts cut to the fragments' length."""
    return _self_generated(cfg, out, shared, "self-generated-fragments", reveal_stop_on="fragments",
                           stop_rule="two-sided", check_every=1)


_ARM_FUNCTIONS = {"real-text": _real_text, "self-generated": _self_generated,
                  "self-generated-fragments": _self_generated_fragments, "coverage": _coverage,
                  "random-text": _random_text}


def run_arm(cfg: RevealBenchConfig, out: Path, arm: str, shared, say: Callable[[str], None]) -> dict[str, Any]:
    from ..checkpoint import discard as discard_checkpoint
    from ..provenance import jsonable
    from ..save import atomic_write_json

    path = out / "arms" / f"{arm}.json"
    if path.is_file():
        return read_json(path)
    say(f"loku bench reveal: {arm}")
    started = time.time()
    entry = {"arm": arm, **_ARM_FUNCTIONS[arm](cfg, out, shared), "seconds": time.time() - started,
             "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(path, jsonable(entry))
    discard_checkpoint(out / "arms" / f"{arm}.run")
    say(f"loku bench reveal: {arm} done in {entry['seconds']:.0f} s")
    return entry


def _arm_task(cfg: RevealBenchConfig, out: str, arm: str) -> None:
    from .jobs import per_worker, worker_say

    say = worker_say()
    run_arm(cfg, Path(out), arm, per_worker(out, lambda: prepare(cfg, Path(out), say)), say)


def run_reveal_bench(cfg: RevealBenchConfig, out: str | Path, *, progress: bool = True, jobs: int = 1,
                     command: list[str] | None = None, report_only: bool = False, model=None,
                     tokenizer=None) -> dict[str, Any]:
    """Run (or continue) the reveal bench in ``out``; returns the summary of results.json."""
    from .base import open_bench
    from .jobs import run_tasks
    from .reveal_report import write_outputs

    out, record, say = open_bench(cfg, out, progress=progress, command=command, jobs=jobs, report_only=report_only)
    started = time.time()
    if not report_only:
        say(f"loku bench reveal: planting split {cfg.split} into {cfg.model} (cached) and measuring it")
        shared = prepare(cfg, out, say, model=model, tokenizer=tokenizer)
        independent = [a for a in ARMS[:-1] if not (out / "arms" / f"{a}.json").is_file()]
        if jobs > 1 and len(independent) > 1:
            run_tasks(_arm_task, {a: (cfg, str(out), a) for a in independent}, jobs, what="arm")
        for arm in ARMS:
            run_arm(cfg, out, arm, shared, say)
    summary = write_outputs(out, cfg, record, command=command, seconds=time.time() - started)
    say(f"loku bench reveal: results in {out / 'results.md'}")
    return summary


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .base import add_common_arguments

    add_common_arguments(parser, "reveal", "planted models", "cpu (SmolLM2-135M on 2 CPU cores), paper (a GPU)")
    return parser


def run(args: argparse.Namespace) -> int:
    from .base import run_bench_command

    return run_bench_command(args, "reveal", load_reveal_config, run_reveal_bench)
