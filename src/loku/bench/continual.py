"""`loku bench continual`: the paper's Figure 4, deletion requests one after another.

One planting holds every request: ``requests`` x ``sizes.n_forget`` rows of
``lm_extraction_{pool}_{split}.csv`` (request k = the k-th block of rows), mixed into Pile text as
``loku bench tdec`` plants (:mod:`loku.bench.planting`, cached). The held-out set is the first
``sizes.n_heldout`` rows of another split's file (``heldout_split``): TDEC text of the forget set's
kind that was never planted (the stop thresholds, the gate's calibration).

Each variant (a method and a :data:`loku.requests.STRATEGIES` strategy, optionally the gate) unlearns
the requests in order from the same planted model (:func:`loku.requests.unlearn_requests`: each
request its own stop rule, thresholds from the planted model, every earlier request measured again
after each one, relapses and requests not forgotten named). After each task k (task 0: the planted model) the model with
requests 1..k applied is scored: Pile / WikiText perplexity relative to the original model,
LAMBADA, PubMedQA, dialogue F1 (subsets, as configured). A variant with ``gate_fpr`` is also scored
through its gate after the last request, as deployed: each forget text under the adapters its prompt
(first 8 tokens) gets, each perplexity text under those it gets itself, and a dilution attack (the
forget prompts alone, after 96 tokens of Pile text and followed by them: extraction of the forget
continuation through the gate, with every adapter on and with none).

Variants are resumable (a killed sequence continues at its request and epoch) and run side by side
with ``--jobs``; results go to OUT/results.json, results.md and plots/figure4.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from ..errors import ConfigError, DataError
from .data import Sizes, bench_texts, clip_texts, forget_file, write_jsonl
from .planting import PlantingRecipe
from .base import BenchSettings, Store, config_values, existing_folder, read_json, section
from .tdec import EvalSubsets, downstream

__all__ = ["ContinualConfig", "gated_scores", "load_continual_config", "run", "run_continual"]

SMOKE: dict[str, Any] = {
    "requests": 2,
    "sizes": {"n_forget": 2, "forget_tokens": 16, "n_heldout": 4, "n_retain": 4, "retain_tokens": 16, "n_ppl": 4,
              "ppl_tokens": 24, "n_general": 16, "general_tokens": 16},
    "planting": {"epochs": 3, "lr": 1e-2, "forget_per_step": 2, "general_per_forget": 1},
    "unlearn": {"batch_size": 2, "max_epochs": 2, "fisher_batches": 1, "eval_batch_size": 4, "rank": 2},
    "evals": {"lambada": 2, "pubmedqa": 2, "dialogue": 1, "batch_size": 4},
}


@dataclass
class ContinualConfig(BenchSettings):
    GROWS = ("variants",)  # variants may be added to a folder; each records its own options

    name: str = "custom"
    model: str = "smollm2-135m"
    split: str = "0"  # the requests' rows come from lm_extraction_{pool}_{split}.csv
    heldout_split: str = "1"  # the held-out rows from lm_extraction_{pool}_{heldout_split}.csv
    pool: int = 32
    requests: int = 4
    seed: int = 0
    sizes: Sizes = field(default_factory=Sizes)  # n_forget: sequences PER REQUEST
    planting: PlantingRecipe = field(default_factory=PlantingRecipe)
    unlearn: dict[str, Any] = field(default_factory=dict)  # loku unlearn options of every request
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> method, strategy, gate_fpr, ...
    evals: EvalSubsets = field(default_factory=EvalSubsets)
    data_dir: str | None = None
    cache_dir: str | None = None

    def validate(self) -> "ContinualConfig":
        if not isinstance(self.requests, int) or self.requests < 2:
            raise ConfigError(f"requests must be an integer >= 2 (a sequence), got {self.requests!r}")
        if self.split == self.heldout_split:
            raise ConfigError("heldout_split must differ from split: the held-out rows must never be planted")
        if not self.variants:
            raise ConfigError("variants: give at least one (name: {method: ..., strategy: ...})")
        self.sizes.validate()
        self.planting.validate()
        for name in self.variants:
            self.request_config(name, "f.jsonl", "r.jsonl", "v.jsonl", "out")
        return self

    def check_data(self) -> dict[str, str]:
        from ..data import read_texts
        from ..provenance import file_sha256

        root = existing_folder(self.data_root())
        files = {}
        for split, rows in ((self.split, self.requests * self.sizes.n_forget), (self.heldout_split,
                                                                               self.sizes.n_heldout)):
            path = forget_file(root, split, self.pool)
            if not path.is_file():
                raise ConfigError(f"unknown split {split}: no {path}")
            if len(read_texts(path, role="forget")) < rows:
                raise DataError(f"{path}: fewer than {rows} rows ({self.requests} requests of {self.sizes.n_forget} "
                                "or the held-out set); lower requests or sizes")
            files[str(path.relative_to(root))] = file_sha256(path)
        return files

    def request_config(self, variant: str, forget: str, retain: str, validation: str, out: str,
                       model: str = "planted"):
        from ..checks import check_unlearn
        from ..config import load_config

        options = dict(self.variants[variant] or {})
        if "method" not in options:
            raise ConfigError(f"variant {variant}: give its method (e.g. fila-ihl)")
        values = {**self.unlearn, **options, "forget": forget, "retain": retain, "validation": validation,
                  "out": out, "model": model, "seed": self.seed}
        try:
            return check_unlearn(load_config(None, values))
        except ConfigError as err:
            raise ConfigError(f"variant {variant}: {err}") from None


def load_continual_config(name_or_path: str | None = "cpu", overrides: dict[str, Any] | None = None, *,
                          smoke: bool = False) -> ContinualConfig:
    values = config_values(name_or_path, "continual", overrides, SMOKE if smoke else None)
    known = {f.name for f in dataclasses.fields(ContinualConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown bench option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("split", "heldout_split"):
        if key in values:
            values[key] = str(values[key])
    return ContinualConfig(
        **{k: v for k, v in values.items() if k not in ("sizes", "planting", "evals")},
        sizes=section(Sizes, values.get("sizes"), "sizes"),
        planting=PlantingRecipe.from_dict(values.get("planting")) if values.get("planting") is not None
        else PlantingRecipe(),
        evals=section(EvalSubsets, values.get("evals"), "evals"),
    )


# --------------------------------------------------------------------------- texts and the planted model


def continual_texts(tokenizer, cfg: ContinualConfig) -> dict[str, Any]:
    """The requests' texts (a list per request), the held-out, retain, planting and perplexity texts."""
    from ..data import read_texts

    root, n = cfg.data_root(), cfg.sizes.n_forget
    sizes = dataclasses.replace(cfg.sizes, n_forget=n * cfg.requests)
    base = bench_texts(tokenizer, root, cfg.split, sizes, pool=cfg.pool, heldout="pile").texts
    rows = read_texts(forget_file(root, cfg.heldout_split, cfg.pool), role="held-out")
    heldout = clip_texts(tokenizer, rows, cfg.sizes.forget_tokens, min_tokens=cfg.sizes.forget_tokens)
    if len(heldout) < cfg.sizes.n_heldout:
        raise DataError(f"{forget_file(root, cfg.heldout_split, cfg.pool)}: only {len(heldout)} rows keep "
                        f"{cfg.sizes.forget_tokens} tokens, {cfg.sizes.n_heldout} held-out sequences asked")
    return {"requests": [base["forget"][k * n:(k + 1) * n] for k in range(cfg.requests)],
            "heldout": heldout[: cfg.sizes.n_heldout], "retain": base["retain"], "general": base["general"],
            "ppl_pile": base["ppl_pile"], "ppl_wiki": base["ppl_wiki"]}


def _files(folder: Path, texts: dict[str, Any]) -> dict[str, Any]:
    data = folder / "data"
    files = {"requests": [str(data / f"request-{k + 1:02d}.jsonl") for k in range(len(texts["requests"]))],
             "retain": str(data / "retain.jsonl"), "validation": str(data / "validation.jsonl")}
    for path, content in [*zip(files["requests"], texts["requests"]), (files["retain"], texts["retain"]),
                          (files["validation"], texts["heldout"])]:
        expected = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in content)
        if not Path(path).is_file() or Path(path).read_text(encoding="utf-8") != expected:
            write_jsonl(path, content)
    return files


def _planted(cfg: ContinualConfig, original, tokenizer, texts: dict[str, Any], say: Callable[[str], None]):
    from ..models import cache_dir
    from .planting import planted_model

    forget = [t for request in texts["requests"] for t in request]
    planted, meta, folder, _ = planted_model(
        original, tokenizer, base_name=cfg.model, forget=forget, general=texts["general"], recipe=cfg.planting,
        cache_root=Path(cfg.cache_dir) if cfg.cache_dir else cache_dir(), log=say)
    return planted, meta, folder


# --------------------------------------------------------------------------- the gate's view


PROMPT_TOKENS = 8  # the attacker's prompt: the first tokens of a forget text
DILUTION_TOKENS = 96  # ordinary text (Pile excerpts) put before or after that prompt
ATTACKS = {  # name -> (what the gate decides from, what the continuation is generated from), as token lists
    "prompt": (lambda p, b: p, lambda p, b: p),
    "preamble": (lambda p, b: b + p, lambda p, b: b + p),
    "suffix": (lambda p, b: p + b, lambda p, b: p),  # the decision from prompt + text; the leak from the prompt
}


def _groups(weights, items: list):
    """(one row of adapter weights [1, K], the items with exactly those weights) for each distinct row."""
    import torch

    for row in torch.unique(weights, dim=0):
        keep = (weights == row).all(dim=1).nonzero().flatten().tolist()
        yield row[None], [items[i] for i in keep]


def _continuation(model, context: list[int], target: list[int], n: int, pad: int) -> dict[str, float]:
    """MA of ``target`` after ``context`` (teacher-forced argmax), and of the greedy continuation of ``context``
    (as many tokens as ``target``): the share of tokens equal to it and its n-gram overlap (EL_n of one prefix)."""
    import torch

    from ..metrics.memorization import ngram_overlap
    from ..provenance import model_device

    device = model_device(model)
    full = torch.tensor([context + target], device=device)
    with torch.no_grad():
        logits = model(input_ids=full).logits[0].float()
        guess = logits[len(context) - 1: len(context) - 1 + len(target)].argmax(dim=-1).tolist()
        ids = torch.tensor([context], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(target),
                             min_new_tokens=len(target), do_sample=False, pad_token_id=pad)
    made = out[0, len(context):].tolist()
    return {"ma": sum(g == t for g, t in zip(guess, target)) / len(target),
            "reproduced": sum(g == t for g, t in zip(made, target)) / len(target),
            "el": ngram_overlap(made, target, min(n, len(target)))}


def dilution_attack(gated, tokenizer, requests: dict[str, list[str]], benign: list[str], *, el_n: int,
                    prompt_tokens: int = PROMPT_TOKENS, dilution_tokens: int = DILUTION_TOKENS) -> dict[str, Any]:
    """Extraction of each forget text's continuation from its first ``prompt_tokens`` tokens, the prompt alone,
    after ``dilution_tokens`` of ordinary text (preamble) and followed by them (suffix: the decision is made on
    prompt + text, the continuation generated from the prompt), each through the gate as deployed (decided from
    the input) and, for comparison, with every adapter on and with none (the planted model)."""
    import torch

    from ..data import tokenize_texts
    from ..lm import ensure_pad_token
    from ..provenance import model_device

    pad, names = ensure_pad_token(tokenizer), list(gated.gate.names)
    k_of = {n: k for k, n in enumerate(names)}
    benign_ids = [ids[:dilution_tokens] for ids in tokenize_texts(tokenizer, benign, max_length=1 << 20,
                                                                  source="benign texts")]
    fixed = {"adapters_on": torch.ones(1, len(names), dtype=torch.float64),
             "planted": torch.zeros(1, len(names), dtype=torch.float64)}
    rows: dict[str, dict[str, list]] = {a: {"through_gate": [], "adapters_on": [], "planted": [], "weight": []}
                                        for a in ATTACKS}
    i = 0
    for name, texts in requests.items():
        for ids in tokenize_texts(tokenizer, texts, max_length=1 << 20, source=f"{name} texts"):
            p, target, b = ids[:prompt_tokens], ids[prompt_tokens:], benign_ids[i % len(benign_ids)]
            i += 1
            for attack, (decide_on, context_of) in ATTACKS.items():
                weights = gated.route(torch.tensor([decide_on(p, b)], device=model_device(gated.model)))
                context = context_of(p, b)
                rows[attack]["weight"].append(float(weights[0, k_of[name]]))
                for setting, w in (("through_gate", weights), *fixed.items()):
                    with gated.weighted(w):
                        rows[attack][setting].append(_continuation(gated.model, context, target, el_n, pad))
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "dilution_tokens": dilution_tokens, "el_n": el_n,
                           "texts": i, "attacks": {}}
    for attack, found in rows.items():
        entry = {"adapter_on": sum(w > 0 for w in found["weight"]) / i, "mean_weight": sum(found["weight"]) / i}
        for setting in ("through_gate", *fixed):
            entry[setting] = {key: sum(r[key] for r in found[setting]) / i for key in ("ma", "el", "reproduced")}
        out["attacks"][attack] = entry
    return out


def gated_scores(gated, tokenizer, requests: dict[str, list[str]], ppl_texts: dict[str, list[str]],
                 benign: list[str], *, el_n: int, batch_size: int) -> dict[str, Any]:
    """Through the gate (:class:`loku.gate.GatedModel`) as deployed: MA / EL_n of each request's texts under the
    adapters their PROMPT (first :data:`PROMPT_TOKENS` tokens) gets, the perplexity of each set of ``ppl_texts``
    (each text routed on itself), and the dilution attack (:func:`dilution_attack`, ``benign`` around prompts)."""
    import math

    import torch

    from .. import measure
    from ..data import make_batches, tokenize_texts
    from ..lm import ensure_pad_token
    from ..metrics.perplexity import perplexity
    from ..provenance import model_device

    pad, model = ensure_pad_token(tokenizer), gated.model
    device = model_device(model)

    def ids_of(texts):
        return tokenize_texts(tokenizer, texts, max_length=1 << 20, source="gated texts")

    def route(token_lists):
        return torch.cat([gated.route(torch.tensor([t], device=device)) for t in token_lists])

    out: dict[str, Any] = {"requests": {}, "ppl": {}, "adapters_applied": {}, "decided_on": "prompt"}
    for name, texts in requests.items():
        ids = ids_of(texts)
        ma = el = 0.0
        for weights, part in _groups(route([t[:PROMPT_TOKENS] for t in ids]), ids):
            with gated.weighted(weights):
                ma += measure.memorization(model, make_batches(part, batch_size, pad)) * len(part)
                el += measure.extraction(model, make_batches(part, batch_size, pad), el_n) * len(part)
        out["requests"][name] = {"ma": ma / len(ids), "el": el / len(ids)}
    for key, texts in ppl_texts.items():
        total = tokens = applied = 0.0
        for weights, part in _groups(route(ids_of(texts)), texts):
            with gated.weighted(weights):
                scored = perplexity(model, tokenizer, part, batch_size=batch_size)
            total, tokens = total + scored["nll"] * scored["tokens"], tokens + scored["tokens"]
            applied += len(part) if bool((weights > 0).any()) else 0
        out["ppl"][key] = math.exp(total / tokens)
        out["adapters_applied"][key] = applied / len(texts)
    out["dilution"] = dilution_attack(gated, tokenizer, requests, benign, el_n=el_n)
    return out


# --------------------------------------------------------------------------- running


def prepare(cfg: ContinualConfig, out: Path, say: Callable[[str], None], *, model=None, tokenizer=None):
    """The original model, the texts and files, the planted model and the measurements shared by every
    variant (stored in OUT/shared.json)."""
    from ..models import load_model
    from .planting import measure_planting

    if model is None:
        model, tokenizer = load_model(cfg.model, progress=False)
    original = model.eval()
    texts = continual_texts(tokenizer, cfg)
    files = _files(out, texts)
    store = Store(out / "shared.json")
    store.get("original_downstream", lambda: downstream(original, tokenizer, texts, cfg))
    planted, meta, folder = _planted(cfg, original, tokenizer, texts, say)
    forget = [t for request in texts["requests"] for t in request]
    recorded = store.get("planting", lambda: {**meta, "cache_folder": str(folder), "measurements": measure_planting(
        original, planted, tokenizer, forget, texts["heldout"], texts["ppl_pile"],
        el_n=int(cfg.unlearn.get("el_n", 10)), batch_size=cfg.evals.batch_size)})
    if recorded.get("planted_fingerprint") != meta.get("planted_fingerprint"):
        raise ConfigError(f"{out}: measured on another planted model than the one in {folder}; choose another --out")
    store.get("planted_downstream", lambda: downstream(planted, tokenizer, texts, cfg))
    return {"original": original, "planted": planted, "tokenizer": tokenizer, "texts": texts, "files": files,
            "store": store}


def run_variant(cfg: ContinualConfig, out: Path, variant: str, shared: dict[str, Any],
                say: Callable[[str], None], progress: bool = False) -> dict[str, Any]:
    """One variant's sequence of requests, then its per-task and gated scores (``variants/NAME.json``)."""
    from ..checkpoint import checkpoint_dir
    from ..checkpoint import discard as discard_checkpoint
    from ..provenance import jsonable
    from ..requests import apply_deltas, unlearn_requests
    from ..save import atomic_write_json

    result_path = out / "variants" / f"{variant}.json"
    if result_path.is_file():
        done = read_json(result_path)
        if done.get("options") != cfg.variants[variant]:
            raise ConfigError(f"{result_path}: variant {variant} was run with other options ({done.get('options')}); "
                              "rename the variant or delete that file")
        return done
    files, texts, tokenizer = shared["files"], shared["texts"], shared["tokenizer"]
    seq_out = out / "variants" / variant
    configs = [cfg.request_config(variant, f, files["retain"], files["validation"], str(seq_out),
                                  model=f"{cfg.model} planted with {cfg.requests} requests") for f in files["requests"]]
    for c in configs:
        c.progress, c.save_model = progress, False
    resume = checkpoint_dir(seq_out).is_dir()
    say(f"loku bench continual: {variant}: {'resuming' if resume else 'unlearning'} {cfg.requests} requests")
    started = time.time()
    result = unlearn_requests(configs, model=shared["planted"], tokenizer=tokenizer, resume=resume)
    seconds = time.time() - started
    tasks = []
    for k in range(1, len(result.deltas) + 1):
        model_k = apply_deltas(result.original, result.deltas[:k]).eval()
        tasks.append({"task": k, "downstream": downstream(model_k, tokenizer, texts, cfg)})
        del model_k
    entry = {"variant": variant, "options": cfg.variants[variant], "seed": cfg.seed,
             "report": {k: v for k, v in result.report.items()}, "tasks": tasks,
             "runs": [{k: r[k] for k in ("outcome", "epochs_run", "thresholds", "epochs", "flops", "seconds")
                       if k in r} for r in result.runs],
             "seconds": {"unlearn": seconds, "evaluation": time.time() - started - seconds}}
    if result.gate is not None:
        names = [d.name for d in result.deltas]
        from ..gate import GatedModel

        entry["gated"] = gated_scores(GatedModel(result.model, result.gate), tokenizer,
                                      dict(zip(names, texts["requests"])),
                                      {"ppl_pile": texts["ppl_pile"], "ppl_wiki": texts["ppl_wiki"]}, texts["ppl_pile"],
                                      el_n=configs[0].el_n, batch_size=cfg.evals.batch_size)
    atomic_write_json(result_path, jsonable(entry))
    discard_checkpoint(seq_out)
    say(f"loku bench continual: {variant}: done in {seconds:.0f} s; relapses: {len(result.report['relapses'])}, "
        f"not forgotten: {len(result.report['not_forgotten'])}")
    return entry


def run_continual(cfg: ContinualConfig, out: str | Path, *, progress: bool = True, jobs: int = 1,
                  command: list[str] | None = None, report_only: bool = False, model=None,
                  tokenizer=None) -> dict[str, Any]:
    """Run (or continue) the continual bench in ``out``; returns the summary of results.json."""
    from .continual_report import write_outputs
    from .base import open_bench

    out, record, say = open_bench(cfg, out, progress=progress, command=command, jobs=jobs, report_only=report_only,
                                  variants=list(cfg.variants))
    started = time.time()
    if not report_only:
        say(f"loku bench continual: planting {cfg.requests} requests into {cfg.model} (cached) and measuring it")
        shared = prepare(cfg, out, say, model=model, tokenizer=tokenizer)
        pending = [v for v in cfg.variants if not (out / "variants" / f"{v}.json").is_file()]
        if jobs > 1 and len(pending) > 1:
            from .jobs import run_tasks

            run_tasks(_variant_task, {v: (cfg, str(out), v) for v in pending}, jobs, what="variant")
        for variant in cfg.variants:  # serial, or the finished ones read back
            run_variant(cfg, out, variant, shared, say, progress)
    summary = write_outputs(out, cfg, record, command=command, seconds=time.time() - started)
    say(f"loku bench continual: results in {out / 'results.md'}")
    return summary


def _variant_task(cfg: ContinualConfig, out: str, variant: str) -> None:
    from .jobs import per_worker, worker_say

    say = worker_say()
    run_variant(cfg, Path(out), variant, per_worker(out, lambda: prepare(cfg, Path(out), say)), say)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .base import add_common_arguments

    add_common_arguments(parser, "continual", "planted models",
                         "cpu (SmolLM2-135M on 2 CPU cores), paper (GPT-Neo-125M, a GPU)")
    return parser


def run(args: argparse.Namespace) -> int:
    from .base import run_bench_command

    return run_bench_command(args, "continual", load_continual_config, run_continual)
