"""Continual unlearning (docs/algorithms.md §8): deletion requests unlearned one after another.

Each request is one run of the trainer's phases (prepare -> measure_before -> adapt ->
[train_epoch -> decide -> save_epoch]* -> finish) on the model the earlier requests left, with its own
stop rule. After each request every request so far is measured again; one that had met its stop rule
and is back above its own thresholds is a relapse, named in the report; one that never met it is "not
forgotten", named apart (it cannot relapse).

What a request leaves is a low-rank change of its target weights,

    Delta_k = s (B_k A_k - B_k^0 A_k^0)

(B^0 = 0 for a Gaussian start; FILA moves its start B^0 A^0 out of the base weight, §3). It is kept as
a LoRA adapter on the ORIGINAL base weights (factors [A_k; A_k^0] and s [B_k, -B_k^0], rank 2r for
FILA, r otherwise), so it needs no residual base and can be switched off on its own (``loku.gate``).
The model request k trains on is always built the same way, the original weights plus the earlier
deltas in request order, so a sequence resumed after a crash starts each request from the same
weights as an uninterrupted one. What a request is held to is the model before the FIRST request (the
sequence's ``original``), never the model the earlier requests left: the reference logits of every term
with the trait ``needs_reference`` (the KL retain term, NPO, UNDIAL), the two-sided rule's held-out band
and the thresholds. Anchored to the previous model, each request would keep every earlier request's drift
as its target (Pile perplexity x1.16, 1.64, 2.21, 3.36 over 4 merge requests). The original is the one
frozen copy the sequence keeps anyway (the deltas are applied to it), so the anchor costs no memory.

Strategies (registry ``STRATEGIES``; a strategy gives the extra loss term of a request, its traits
say what is kept):

- ``merge``: every request trains a fresh adapter, FILA computed on the current model (the
  earlier requests folded in): the paper's setting. The result is one merged model.
- ``stack``: the same training (a frozen adapter adds a fixed matrix to a weight, so training on the
  folded sum is the same function and gradient), but the result keeps one adapter per request,
  all active and frozen, which the gate can switch one by one. In float32 the stacked model
  reproduces the sequential one up to rounding (tests/test_requests.py); in 16-bit dtypes it differs
  by the rounding of folding the deltas into 16-bit base weights.
- ``orthogonal`` (O-LoRA): stack plus lambda * sum_{i<k} ||A_i A_k^T||_F^2 between the new adapter's
  down-projection A_k and every earlier one (A's rows span the input subspace an adapter reads).

The overlap ||A_i A_k^T||_F / (||A_i||_F ||A_k||_F) of the trained A's is reported for every pair and
layer. Only LoRA methods are supported (a full fine-tune leaves no low-rank delta to keep). On resume,
finished requests are not redone and a request interrupted mid-training continues from its last
finished epoch (the trainer's per-epoch checkpoint, beside the adapter's start kept by this module).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import data as data_mod
from . import measure
from .adapters import request_delta_factors  # noqa: F401  (the math lives in loku.adapters)
from .checkpoint import RESUME_MAY_CHANGE, STATE, checkpoint_dir, read_state
from .checkpoint import discard as discard_checkpoint
from .checkpoint import load_start as _load_start, save_start as _save_start
from .config import UnlearnConfig, check_forget_files_distinct
from .errors import ConfigError, ModelError
from .initializers import moved_start
from .strategies import STRATEGIES, orthogonal_penalty  # noqa: F401 - the sequence's strategies
from .save import atomic_dir, atomic_write_json, atomic_write_text

KIND = "requests"  # the sequence's checkpoint state says so, beside a single run's


# --------------------------------------------------------------------------- the math (pure)


def subspace_overlap(a_i: Tensor, a_k: Tensor) -> float:
    """||A_i A_k^T||_F / (||A_i||_F ||A_k||_F), in [0, 1]: 0 when the adapters read orthogonal input subspaces."""
    a_i, a_k = a_i.double(), a_k.double()
    scale = float(torch.linalg.norm(a_i) * torch.linalg.norm(a_k))
    return float(torch.linalg.norm(a_i @ a_k.T)) / scale if scale > 0 else 0.0


def _above(value: dict[str, float], limit: dict[str, float]) -> bool:
    return value["ma"] > limit["ma"] or value["el"] > limit["el"]


def forgetting(matrix: Sequence[dict[str, Any]], requests: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Relapses and requests not forgotten (§8), from the MA/EL matrix and each request's outcome and thresholds.

    ``matrix`` rows are ``{"after": name_k, "measured": {name_j: {"ma", "el"}}}`` in request order (a row
    "before" is skipped; a request missing from a row, its forget file deleted, is not judged there);
    ``requests`` are ``{"name", "outcome", "thresholds": {"ma", "el"}}`` (a sequence's report rows).

    A request has met its stop rule once its own run succeeded or a measurement has it at or below both
    thresholds (the rule's condition). ``relapses``: every (after request k, earlier request j) where j had
    met it and is back above a threshold. ``not_forgotten``: each request that never met it, with its last
    measurement: it cannot relapse (it was never forgotten), and counting it as a relapse after every later
    request hid that its MA may well be falling.
    """
    limits = {r["name"]: r["thresholds"] for r in requests}
    met = {r["name"] for r in requests if r["outcome"] == "success"}
    found, last, done = [], {}, []
    for row in matrix:
        if row["after"] == "before":
            continue
        for name in [*done, row["after"]]:
            if name not in row["measured"]:
                continue
            value, limit = row["measured"][name], limits[name]
            entry = {"after": row["after"], "request": name, "ma": value["ma"], "el": value["el"],
                     "ma_threshold": limit["ma"], "el_threshold": limit["el"]}
            last[name] = entry
            if not _above(value, limit):
                met.add(name)
            elif name in met and name != row["after"]:
                found.append(entry)
        done.append(row["after"])
    return {"relapses": found, "not_forgotten": [last[n] for n in done if n not in met and n in last]}


def forgetting_lines(report: dict[str, Any]) -> list[str]:
    """The relapses and the requests not forgotten (§8), one line each, for a report.md / results.md."""
    def named(entries: list[dict[str, Any]]) -> str:
        return "; ".join(f"{r['request']} after {r['after']} (MA {r['ma']:.3f}, EL {r['el']:.3f})"
                         for r in entries) or "none"

    return [f"Relapses (met the stop rule, then back above its thresholds): {named(report['relapses'])}  ",
            f"Not forgotten (never met the stop rule; last measured): {named(report.get('not_forgotten', []))}"]


# --------------------------------------------------------------------------- strategies


@dataclass
class Delta:
    """What request ``name`` changed: per target layer (module name) Delta W = b @ a in [out, in] orientation."""

    name: str
    forget: str
    a: dict[str, Tensor]
    b: dict[str, Tensor]
    reads: dict[str, Tensor]  # the trained A_k [r, in]: the subspace the adapter reads (overlap, penalty)
    fan_in_fan_out: bool = False  # GPT-2's Conv1D stores its weight [in, out]

    def tensors(self) -> dict[str, Tensor]:
        return {f"{kind}/{layer}": t.contiguous() for kind, table in (("a", self.a), ("b", self.b),
                                                                      ("reads", self.reads))
                for layer, t in table.items()}

    @classmethod
    def from_tensors(cls, name: str, forget: str, tensors: dict[str, Tensor], fan_in_fan_out: bool) -> "Delta":
        tables: dict[str, dict[str, Tensor]] = {"a": {}, "b": {}, "reads": {}}
        for key, value in tensors.items():
            kind, layer = key.split("/", 1)
            tables[kind][layer] = value
        return cls(name, forget, tables["a"], tables["b"], tables["reads"], fan_in_fan_out)


# --------------------------------------------------------------------------- building models from deltas


@torch.no_grad()
def apply_deltas(model: torch.nn.Module, deltas: Sequence[Delta]) -> torch.nn.Module:
    """A copy of the plain ``model`` with every delta added to its weights, in request order (float32 sums)."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for delta in deltas:
        for layer, a in delta.a.items():
            weight = modules[layer].weight
            change = delta.b[layer].to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
            weight.copy_((weight.float() + (change.T if delta.fan_in_fan_out else change)).to(weight.dtype))
    return model


@torch.no_grad()
def stacked_model(model: torch.nn.Module, deltas: Sequence[Delta]):
    """A PeftModel on a copy of the plain ``model``: one frozen LoRA adapter per request (named after it),
    all active. Each adapter has scaling 1 and the delta's factors, so it adds exactly Delta_k."""
    from peft import LoraConfig, get_peft_model

    peft_model = None
    for delta in deltas:
        rank = next(iter(delta.a.values())).shape[0]
        lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=sorted(delta.a),
                          fan_in_fan_out=delta.fan_in_fan_out, bias="none")
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(model), lora, adapter_name=delta.name)
        else:
            peft_model.add_adapter(delta.name, lora)
        modules = dict(peft_model.get_base_model().named_modules())
        for layer, a in delta.a.items():
            target = modules[layer]
            target.lora_A[delta.name].weight.copy_(a)
            target.lora_B[delta.name].weight.copy_(delta.b[layer])
    if peft_model is None:
        raise ConfigError("no request to stack")
    peft_model.base_model.set_adapter([d.name for d in deltas], inference_mode=True)
    peft_model.requires_grad_(False)
    return peft_model.eval()


# --------------------------------------------------------------------------- the sequence


@dataclass
class RequestsResult:
    model: torch.nn.Module  # merge: the merged model; stack/orthogonal: a PeftModel, one adapter per request
    tokenizer: Any
    report: dict[str, Any]
    deltas: list[Delta]
    original: torch.nn.Module  # the model before the first request (the gate's base)
    runs: list[dict[str, Any]] = field(default_factory=list)  # each request's trainer report
    gate: Any = None  # loku.gate.Gate with --gate-fpr: GatedModel(result.model, result.gate)
    state: dict[str, Any] | None = None  # the sequence's record (sequence.json: what a later request continues)


def request_configs(requests: UnlearnConfig | Sequence[UnlearnConfig],
                    forget: Sequence[str] | None = None) -> list[UnlearnConfig]:
    """One config per request: the base config with each forget file (``forget``, else the base's
    ``--forget`` list), or the given per-request configs as they are."""
    if isinstance(requests, UnlearnConfig):
        files = list(forget) if forget is not None else requests.forget_files()
        return [dataclasses.replace(requests, forget=f) for f in files]
    if forget is not None:
        raise ConfigError("pass either one base config and the forget files, or one config per request")
    return [dataclasses.replace(c) for c in requests]


def check_requests(configs: Sequence[UnlearnConfig], earlier: Sequence[str] = ()) -> list[data_mod.TextSet]:
    """Everything that can fail before a model is loaded: options, the same file twice, requests sharing
    texts, one base model, a LoRA method. ``earlier``: the forget files of a previous run this sequence
    continues (those still on disk are read for the overlap check). Returns each request's forget set."""
    if not configs:
        raise ConfigError("no deletion request: pass --forget FILE (repeat it for a sequence)")
    for c in configs:
        if len(c.forget_files()) != 1:
            raise ConfigError(f"a request has one --forget file, got {c.forget!r}")
    check_forget_files_distinct([*earlier, *(c.forget for c in configs)])
    for c in configs:
        c.validate()
        if c.method_spec().full_weights:
            raise ConfigError(f"method {c.method} trains every weight; a sequence of requests keeps each request as "
                              "a LoRA adapter: use a LoRA method (lora-ihl, fila-ihl, ...)")
    models = sorted({c.model for c in configs})
    if len(models) > 1:
        raise ConfigError(f"the requests name different models ({', '.join(models)}); a sequence unlearns one "
                          "model: pass the same --model to every request")
    sets = [data_mod.load_text_set(c.forget, "forget") for c in configs]
    kept = [data_mod.load_text_set(f, "forget") for f in earlier if Path(f).is_file()]
    data_mod.check_requests_disjoint([*kept, *sets])
    return sets


# --------------------------------------------------------------------------- continuing a finished sequence

SEQUENCE = "sequence.json"  # in a sequence's output folder: what a later request continues from


@dataclass
class Previous:
    """A finished sequence's output folder, read back to unlearn one more request after it."""

    folder: Path
    state: dict[str, Any]
    deltas: list[Delta]

    @property
    def base_model(self) -> str:
        return self.state["config"]["model"]

    @property
    def forget_files(self) -> list[str]:
        return [f["forget"] for f in self.state["finished"]]


def previous_sequence(model: str | None) -> Previous | None:
    """``--model`` naming the output folder of an earlier sequence (its sequence.json): that sequence, else None."""
    if not model or not (Path(model) / SEQUENCE).is_file():
        return None
    folder = Path(model)
    import json

    state = json.loads((folder / SEQUENCE).read_text(encoding="utf-8"))
    if state.get("kind") != KIND:
        raise ConfigError(f"{folder / SEQUENCE}: not the record of a sequence of requests")
    return Previous(folder, state, [read_delta(folder / "requests" / f["name"], f) for f in state["finished"]])


def write_delta(folder: Path, delta: Delta) -> None:
    """``delta`` as FOLDER/delta.safetensors (what :func:`read_delta` reads back exactly)."""
    save_file(delta.tensors(), str(folder / "delta.safetensors"),
              metadata={"fan_in_fan_out": str(delta.fan_in_fan_out), "forget": delta.forget})


def read_delta(folder: Path, finished: dict[str, Any]) -> Delta:
    """The delta in FOLDER of the sequence's ``finished`` entry (its name and forget file)."""
    path = folder / "delta.safetensors"
    if not path.is_file():
        raise ModelError(f"{path}: missing; the folder of the earlier requests is incomplete (copy it whole)")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    return Delta.from_tensors(finished["name"], finished["forget"], load_file(str(path)),
                              meta["fan_in_fan_out"] == "True")


def _continued(previous: Previous, configs: list[UnlearnConfig], strategy: str) -> list[UnlearnConfig]:
    """The earlier requests' configs followed by the new ones, every one on the earlier sequence's base."""
    if strategy != previous.state["strategy"]:
        raise ConfigError(f"{previous.folder} was made with --strategy {previous.state['strategy']}; pass the same "
                          f"--strategy to continue it (got {strategy})")
    earlier = [UnlearnConfig(**values) for values in previous.state["requests"]]
    return [*earlier, *(dataclasses.replace(c, model=previous.base_model) for c in configs)]


def unlearn_requests(requests: UnlearnConfig | Sequence[UnlearnConfig], forget: Sequence[str] | None = None, *,
                     strategy: str | None = None, out: str | None = None, model=None, tokenizer=None,
                     accelerator=None, resume: bool = False, previous: Previous | None = None) -> RequestsResult:
    """Unlearn deletion requests one after another (docs/algorithms.md §8).

    ``requests``: one base config (its ``--forget`` list, or ``forget``) or one config per request,
    each with its own stop rule, thresholds and options. ``strategy`` (default: the first config's)
    names an entry of :data:`STRATEGIES`; ``out`` (default: the first config's) is the sequence's
    output folder, whose checkpoint folder OUT.ckpt holds every finished request, so ``resume``
    continues a killed sequence without redoing them. Thresholds not given as numbers are measured
    on each request's validation set on the model BEFORE the first request (as the single run does),
    so every request is held to the bar of the original model throughout. ``previous``: a finished
    sequence (in memory) these requests continue, as ``--model ITS_FOLDER`` continues one on disk.
    """
    from . import distributed as dist
    from .trainer import adapt, finish, guard_output, master_dtype, measure_before, prepare, train_until_stop
    from .models import load_model, model_fingerprint

    configs = request_configs(requests, forget)
    first = configs[0]
    strategy = strategy or first.strategy
    out = out or first.out
    STRATEGIES.get(strategy)  # an unknown name fails here, listing the known ones
    if first.gate_fpr is not None and not STRATEGIES.trait(strategy, "keeps_adapters"):
        raise ConfigError(f"--gate-fpr switches each request's own adapter, which --strategy {strategy} folds into "
                          "the weights: use --strategy stack or orthogonal")
    if previous is None and model is None:
        previous = previous_sequence(first.model)
    forget_sets: list[data_mod.TextSet | None] = list(
        check_requests(configs, earlier=previous.forget_files if previous else ()))
    if previous is not None:
        configs = _continued(previous, configs, strategy)
        forget_sets = [_earlier_set(f) for f in previous.forget_files] + forget_sets
        first = configs[0]
    seq_cfg = dataclasses.replace(first, out=out)
    accelerator = accelerator or dist.make_accelerator(first.device)
    ckpt = checkpoint_dir(out)
    if accelerator.is_main_process and not resume:
        guard_output(seq_cfg)
    if model is None:
        model, tokenizer = load_model(first.model, dtype=master_dtype(first), trust_remote_code=first.trust_remote_code,
                                      progress=first.progress)
    original = copy.deepcopy(model).to(accelerator.device).eval()
    from .lm import ensure_pad_token

    pad = ensure_pad_token(tokenizer)
    fingerprint = model_fingerprint(original)
    if previous is not None and fingerprint != previous.state["base_fingerprint"]:
        raise ModelError(f"{previous.folder}: its requests were unlearned from another base model than "
                         f"{previous.base_model} is now (the weights' fingerprint differs); continue it on the very "
                         "base it was made from")
    names = [f"request-{k:02d}" for k in range(1, len(configs) + 1)]
    forget_batches = {name: request_batches(c, tokenizer, original, s, pad)
                      for name, c, s in zip(names, configs, forget_sets) if s is not None}
    state = _fresh_state(seq_cfg, configs, strategy, fingerprint, forget_sets, previous)
    deltas: list[Delta] = []
    if resume:
        state, deltas = _resume(out, state)
    elif previous is not None:  # the earlier requests, as they finished; their forget sets measured from now on
        state.update({key: copy.deepcopy(previous.state[key]) for key in ("matrix", "finished", "validation_before")})
        deltas = list(previous.deltas)
    else:  # task 0 of the paper: every request measured on the model before unlearning
        state["matrix"] = [{"after": "before",
                            "measured": {n: measure_request(original, forget_batches[n], c.el_n)
                                         for n, c in zip(names, configs)}}]
    current = apply_deltas(original, deltas)
    for k in range(len(deltas), len(configs)):
        name, cfg = names[k], dataclasses.replace(configs[k], out=str(ckpt / names[k]), overwrite=True)
        # A request killed mid-training continues from its last epoch (the trainer's own checkpoint) once
        # its adapter's start is on disk too; otherwise it starts again.
        start_file = ckpt / f"{name}.start.safetensors"
        mid_request = resume and (checkpoint_dir(cfg.out) / STATE).is_file() and start_file.is_file()
        run = prepare(cfg, model=current, tokenizer=tokenizer, accelerator=accelerator, resume=mid_request)
        del current
        run.original = original  # every request anchored to the model before the first (§8): no compounding
        measure_before(run)
        _hold_to_original(run, cfg, original, state)
        adapt(run)
        layers = _lora_layers(run.model)
        if mid_request:
            start = _load_start(start_file)
        else:
            start = moved_start(layers, cfg.method_spec().init)
            if accelerator.is_main_process:
                _save_start(start_file, start)
        run.extra_loss = STRATEGIES.get(strategy)(deltas, layers, cfg)
        train_until_stop(run)
        result = finish(run)
        deltas.append(extract_delta(name, cfg.forget, result.model, start))
        current = apply_deltas(original, deltas)
        state["matrix"].append({"after": name, "measured": {
            n: measure_request(current, forget_batches[n], c.el_n) for n, c in zip(names[: k + 1], configs)
            if n in forget_batches}})
        state["finished"].append({"name": name, "forget": cfg.forget, "outcome": result.report["outcome"],
                                  "epochs_run": result.report["epochs_run"],
                                  "thresholds": result.report["thresholds"], "run": result.report})
        if accelerator.is_main_process:
            _save_request(ckpt, state, deltas[-1])
            discard_checkpoint(cfg.out)  # the request's per-epoch checkpoint
            start_file.unlink(missing_ok=True)
        accelerator.wait_for_everyone()
    result = sequence_result(state, deltas, strategy, original, tokenizer, merged=current)
    if first.gate_fpr is not None:
        result.gate, result.report["gate"] = fit_request_gate(
            result.model, forget_batches, heldout_batches(first, tokenizer, original, pad), first)
    return result


def sequence_result(state: dict[str, Any], deltas: list[Delta], strategy: str, original: torch.nn.Module,
                    tokenizer, merged: torch.nn.Module | None = None) -> RequestsResult:
    """The sequence that ``state`` records (its finished requests, ``deltas``) as :func:`unlearn_requests`
    returns it, without a gate: its report and its model on ``original`` (the model before the first request).
    ``merged``: ``apply_deltas(original, deltas)`` where the caller has it already (one copy of the model less)."""
    if STRATEGIES.trait(strategy, "keeps_adapters"):
        final = stacked_model(original, deltas)
    else:
        final = merged if merged is not None else apply_deltas(original, deltas)
    return RequestsResult(model=final, tokenizer=tokenizer, report=sequence_report(state, deltas), deltas=deltas,
                          original=original, runs=[f["run"] for f in state["finished"]], state=state)


def heldout_batches(cfg: UnlearnConfig, tokenizer, model, pad: int) -> list[dict]:
    """The validation set (held-out text) in evaluation batches, tokenized as the runs tokenize it."""
    return request_batches(cfg, tokenizer, model, data_mod.load_text_set(cfg.validation, "validation"), pad)


def fit_request_gate(model, forget_batches: dict[str, list[dict]], heldout: list[dict], cfg: UnlearnConfig):
    """The gate of a stacked result (loku.gate) and its rates as :func:`loku.gate.honest_gate` measures them:
    calibrated on every other held-out sequence, its false-positive rate reported on the others, its
    true-positive rate cross-fitted over each forget set (never on texts it was fitted on)."""
    from .gate import honest_gate, text_features

    window, stride = cfg.gate_window, max(1, cfg.gate_window // 2)
    forget = {name: text_features(model, batches, window=window, stride=stride)
              for name, batches in forget_batches.items()}
    return honest_gate(forget, text_features(model, heldout, window=window, stride=stride), fpr=cfg.gate_fpr,
                       shrinkage=cfg.gate_shrinkage, window=window, stride=stride, mode=cfg.gate_mode)


def request_batches(cfg: UnlearnConfig, tokenizer, model, forget_set: data_mod.TextSet, pad: int) -> list[dict]:
    """A request's forget set tokenized as its own run tokenizes it, in evaluation batches."""
    from .trainer import model_context, tokenize_sets

    sets = tokenize_sets(cfg, tokenizer, model_context(model, cfg), forget_set, None, None, model=model)
    return data_mod.make_batches(sets.forget_ids, cfg.eval_batch_size, pad)


def measure_request(model, batches: list[dict], el_n: int) -> dict[str, float]:
    """MA and EL_n of one request's forget set (the stop rule's numbers, §6)."""
    model.eval()
    return {"ma": measure.memorization(model, batches), "el": measure.extraction(model, batches, el_n)}


def _hold_to_original(run, cfg: UnlearnConfig, original, state: dict) -> None:
    """Thresholds not given are the validation set's MA/EL on the model before the first request."""
    if cfg.ma_threshold is not None and cfg.el_threshold is not None:
        return
    cache = state.setdefault("validation_before", {})
    if cfg.validation not in cache:
        batches = run.eval_batches["validation"]
        cache[cfg.validation] = ({"ma": run.before["val_ma"], "el": run.before["val_el"]} if not state["finished"]
                                 else measure_request(original, batches, cfg.el_n))
    values = cache[cfg.validation]
    run.ma_threshold = cfg.ma_threshold if cfg.ma_threshold is not None else values["ma"]
    run.el_threshold = cfg.el_threshold if cfg.el_threshold is not None else values["el"]


def _lora_layers(model) -> dict[str, Any]:
    from .initializers import lora_layers

    return lora_layers(getattr(model, "module", model))  # DDP wraps the model in .module


def extract_delta(name: str, forget: str, model, start: dict[str, tuple[Tensor, Tensor]] | None) -> Delta:
    """The request's change Delta W = s (B A - B0 A0) of every LoRA layer of the trained ``model``."""
    from .adapters import standard_factors
    from .initializers import ADAPTER

    layers = _lora_layers(model)
    a_table, b_table, fan_in_fan_out = standard_factors(layers, start)
    reads = {layer_name: layer.lora_A[ADAPTER].weight.detach().float().cpu().clone()
             for layer_name, layer in layers.items()}
    return Delta(name, forget, a_table, b_table, reads, fan_in_fan_out)


def overlaps(deltas: Sequence[Delta]) -> list[dict[str, Any]]:
    """The subspace overlap of every earlier request's A with every later one's, per shared layer."""
    rows = []
    for k, later in enumerate(deltas):
        for earlier in deltas[:k]:
            per_layer = {layer: subspace_overlap(earlier.reads[layer], later.reads[layer])
                         for layer in later.reads if layer in earlier.reads}
            values = list(per_layer.values())
            rows.append({"earlier": earlier.name, "later": later.name,
                         "mean": sum(values) / len(values) if values else None,
                         "max": max(values) if values else None, "per_layer": per_layer})
    return rows


def sequence_report(state: dict, deltas: Sequence[Delta]) -> dict[str, Any]:
    pairs = overlaps(deltas)
    means = [p["mean"] for p in pairs if p["mean"] is not None]
    return {
        "strategy": state["strategy"],
        "requests": [{k: v for k, v in f.items() if k != "run"} for f in state["finished"]],
        "matrix": state["matrix"],
        **forgetting(state["matrix"], state["finished"]),
        "overlaps": pairs,
        "mean_overlap": sum(means) / len(means) if means else None,
        "thresholds_source": "given, or each request's validation set on the model before the first request",
        "base_fingerprint": state["base_fingerprint"],
        "resumed": state.get("resumed", False),
    }


# --------------------------------------------------------------------------- checkpoint of the sequence


def _fresh_state(seq_cfg: UnlearnConfig, configs, strategy: str, fingerprint: str, forget_sets,
                 previous: Previous | None = None) -> dict:
    earlier = previous.state["sha256"] if previous is not None else []
    sha = [s.sha256 if s is not None else earlier[i] for i, s in enumerate(forget_sets)]
    return {"kind": KIND, "config": seq_cfg.to_dict(), "requests": [c.to_dict() for c in configs],
            "strategy": strategy, "base_fingerprint": fingerprint, "sha256": sha, "matrix": [], "finished": [],
            "validation_before": {}, "continues": str(previous.folder) if previous is not None else None}


def _earlier_set(path: str) -> data_mod.TextSet | None:
    """An earlier request's forget set, or None (with a warning) when its file is gone: deleted data is not
    measured again, so a relapse of that request cannot be seen."""
    if Path(path).is_file():
        return data_mod.load_text_set(path, "forget")
    import warnings

    warnings.warn(f"{path}: the forget file of an earlier request is gone; that request is no longer measured "
                  "(its relapse cannot be detected): restore the file to keep checking it")
    return None


def _save_request(ckpt: Path, state: dict, delta: Delta) -> None:
    """The finished request's delta, then the state naming it (so a crash in between redoes only that request)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    with atomic_dir(ckpt / delta.name) as tmp:
        write_delta(tmp, delta)
    atomic_write_json(ckpt / STATE, state)


def _resume(out: str, fresh: dict) -> tuple[dict, list[Delta]]:
    ckpt = checkpoint_dir(out)
    state = read_state(out)
    if state.get("kind") != KIND:
        raise ConfigError(f"{ckpt}: this checkpoint is of a single run, not of a sequence of requests; resume it "
                          "with one --forget")
    if state["base_fingerprint"] != fresh["base_fingerprint"]:
        raise ModelError(f"{ckpt}: the checkpoint was made on a different base model; resume with the same --model")
    changed = sorted({key for old, new in zip(state["requests"], fresh["requests"]) for key in new
                      if key not in RESUME_MAY_CHANGE and old.get(key) != new[key]}
                     | ({"strategy"} if state["strategy"] != fresh["strategy"] else set())
                     | ({"forget"} if state["sha256"] != fresh["sha256"] or len(state["requests"]) != len(
                         fresh["requests"]) else set()))
    if changed:
        raise ConfigError(f"{ckpt}: the checkpoint was made with other requests or settings ({', '.join(changed)}); "
                          "resume with the original files and options")
    deltas = []
    for finished in state["finished"]:  # this sequence's own requests, else those of the sequence it continues
        folder = ckpt / finished["name"]
        if not folder.is_dir() and state.get("continues"):
            folder = Path(state["continues"]) / "requests" / finished["name"]
        deltas.append(read_delta(folder, finished))
    state["resumed"] = True
    return state, deltas


# --------------------------------------------------------------------------- output


def write_requests(result: RequestsResult, cfg: UnlearnConfig, out: str | None = None,
                   extra: Callable[[Path], None] | None = None) -> Path:
    """The sequence's output folder, written under a temporary name then renamed: report.json/.md,
    ``adapters/`` (one PEFT adapter per request on the original base, whatever the strategy), and
    ``model/`` (the final model, every request folded in) unless ``save_model`` is off."""
    from .cards import requests_card_body, write_cards
    from .provenance import library_versions
    from .models import transformers_progress
    from .save import merged_copy

    out_path = Path(out or cfg.out)
    report = {"config": cfg.to_dict(), "versions": library_versions(), **result.report}
    with atomic_dir(out_path) as tmp, transformers_progress(cfg.progress):
        if result.deltas:
            stacked = stacked_model(result.original, result.deltas)
            stacked.save_pretrained(tmp / "adapters", safe_serialization=True)
            atomic_write_json(tmp / "adapters" / "loku_requests.json",
                              {"base_model": cfg.model, "base_fingerprint": report["base_fingerprint"],
                               "adapters": [d.name for d in result.deltas],
                               "forget": [d.forget for d in result.deltas],
                               "note": "each adapter is its request's change on the ORIGINAL base weights"})
            if result.gate is not None:  # what GatedModel.from_pretrained(OUT) and `loku eval --model OUT` route with
                from .gate import GATE_DIR, adapter_fingerprints, save_gate

                save_gate(result.gate, tmp / GATE_DIR, adapter_fingerprints(stacked, result.gate.names),
                          report.get("gate"))
            if cfg.save_model:
                merged_copy(result.model).save_pretrained(tmp / "model")
                result.tokenizer.save_pretrained(tmp / "model")
                write_cards(tmp, report, requests_card_body(report, result.runs), {"model": "transformers"})
        for delta in result.deltas:  # what `--model THIS_FOLDER --forget NEXT` continues from
            (tmp / "requests" / delta.name).mkdir(parents=True)
            write_delta(tmp / "requests" / delta.name, delta)
        if result.state is not None:
            atomic_write_json(tmp / SEQUENCE, result.state)
        atomic_write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", render_requests_markdown(report))
        if extra is not None:  # more files of the caller's (loku unlearn --reveal: the rounds' data)
            extra(tmp)
    discard_checkpoint(out_path)
    return out_path


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def gate_markdown(gate: dict[str, Any]) -> list[str]:
    """The gate's lines of report.md: its settings, honest rates and any warning."""
    lines = [f"Gate (target false-positive rate {gate['fpr_target']:g}, {gate.get('mode', 'hard')}, windows of "
             f"{gate.get('window', '-')} tokens, calibrated on {gate['calibrated_on']} held-out texts): false-positive rate "
             f"{gate['false_positive_rate']['any']:.3f} on {gate['reported_on']} other held-out texts (steps of "
             f"{1 / gate['reported_on']:.3f}); true-positive rate on forget texts it was not fitted on (cross-fitted), "
             "whole texts / first window: " + ", ".join(
                 f"{n} {_rate(v)} / {_rate(gate.get('true_positive_rate_prompts', {}).get(n))}"
                 for n, v in gate["true_positive_rate"].items())]
    lines += [f"Gate warning: {w}" for w in gate.get("warnings", [])]
    return lines


def render_requests_markdown(report: dict[str, Any]) -> str:
    names = [r["name"] for r in report["requests"]]
    lines = [f"# loku: {len(names)} deletion requests, strategy {report['strategy']}", "",
             "| request | forget | outcome | epochs | MA threshold | EL threshold |", "|---|---|---|---|---|---|"]
    for r in report["requests"]:
        lines.append(f"| {r['name']} | {r['forget']} | {r['outcome']} | {r['epochs_run']} | "
                     f"{r['thresholds']['ma']:.4f} | {r['thresholds']['el']:.4f} |")
    lines += ["", "MA / EL of every request so far, after each request:", "",
              "| after | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in report["matrix"]:
        cells = [f"{row['measured'][n]['ma']:.3f} / {row['measured'][n]['el']:.3f}" if n in row["measured"] else ""
                 for n in names]
        lines.append(f"| {row['after']} | " + " | ".join(cells) + " |")
    lines += ["", *forgetting_lines(report)]
    if report.get("gate"):
        lines += gate_markdown(report["gate"])
    if report["mean_overlap"] is not None:
        lines.append(f"Mean subspace overlap of the adapters' A: {report['mean_overlap']:.4f}")
    if report.get("reveal"):
        lines += ["", f"Reveal-and-Release rounds ({report['reveal']['request']}): {report['reveal']['stopped']}", "",
                  "| round | queries | collected | repeated | new (enough new n-grams) | mean reward | request | outcome |",
                  "|---" * 8 + "|"]
        for r in report["reveal"]["rounds"]:
            lines.append(f"| {r['round']} | {r['queries']} | {r['collected']} | {r['repeated']} | {r.get('novel', '-')} | "
                         f"{r['mean_reward']:.3f} | {r.get('request', '-')} | {r.get('outcome', 'not unlearned')} |")
    return "\n".join(lines) + "\n"
