"""The sequence of requests (docs/algorithms.md §8): the checks before any model is loaded, the loop that
unlearns each request with :func:`loku.trainer.unlearn` on the original weights plus the earlier deltas,
its checkpoint (every finished request) and resume, and continuing a finished sequence's output folder."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import data as data_mod
from .. import measure
from ..checkpoint import RESUME_MAY_CHANGE, STATE, checkpoint_dir, read_state
from ..checkpoint import discard as discard_checkpoint
from ..checks import check_unlearn
from ..config import UnlearnConfig, check_forget_files_distinct
from ..errors import ConfigError, ModelError
from ..save import atomic_dir, atomic_write_json
from ..stop import make_stop_rule
from ..strategies import STRATEGIES
from .delta import Delta, _lora_layers, apply_deltas, extract_delta, read_delta, stacked_model, write_delta
from .output import SEQUENCE, sequence_report


KIND = "requests"  # the sequence's checkpoint state says so, beside a single run's


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
        check_unlearn(c)
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
    from .. import distributed as dist
    from ..trainer import guard_output, master_dtype, unlearn
    from ..models import load_model, model_fingerprint

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
    from ..lm import ensure_pad_token

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
        # A request killed mid-training continues from its last epoch (the trainer's own checkpoint, which
        # keeps the adapter's start too); otherwise it starts again.
        mid_request = resume and (checkpoint_dir(cfg.out) / STATE).is_file()
        # Every request anchored to the model before the first (§8): its reference, bands and thresholds.
        # ``current`` is this request's own copy: trained in place, one copy of the model less.
        result = unlearn(cfg, model=current, tokenizer=tokenizer, accelerator=accelerator, resume=mid_request,
                         train_in_place=True, original=original,
                         stop=make_stop_rule(cfg, held_out=_held_out_before_first(original, state)),
                         extra_loss=lambda adapted: STRATEGIES.get(strategy)(deltas, _lora_layers(adapted), cfg))
        del current
        deltas.append(extract_delta(name, cfg.forget, result.model, result.start))
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
            (ckpt / f"{name}.start.safetensors").unlink(missing_ok=True)  # an earlier loku kept the start here
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
    from ..gate import honest_gate, text_features

    window, stride = cfg.gate_window, max(1, cfg.gate_window // 2)
    forget = {name: text_features(model, batches, window=window, stride=stride)
              for name, batches in forget_batches.items()}
    return honest_gate(forget, text_features(model, heldout, window=window, stride=stride), fpr=cfg.gate_fpr,
                       shrinkage=cfg.gate_shrinkage, window=window, stride=stride, mode=cfg.gate_mode)


def request_batches(cfg: UnlearnConfig, tokenizer, model, forget_set: data_mod.TextSet, pad: int) -> list[dict]:
    """A request's forget set tokenized as its own run tokenizes it, in evaluation batches."""
    from ..trainer import model_context, tokenize_sets

    sets = tokenize_sets(cfg, tokenizer, model_context(model, cfg), forget_set, None, None, model=model)
    return data_mod.make_batches(sets.forget_ids, cfg.eval_batch_size, pad)


def measure_request(model, batches: list[dict], el_n: int) -> dict[str, float]:
    """MA and EL_n of one request's forget set (the stop rule's numbers, §6)."""
    model.eval()
    return {"ma": measure.memorization(model, batches), "el": measure.extraction(model, batches, el_n)}


def _held_out_before_first(original, state: dict):
    """Thresholds not given are the validation set's MA/EL on the model before the first request (the
    first request's own "before"; measured once per validation file, kept in the sequence's state)."""

    def held_out(run) -> dict[str, float]:
        cache = state.setdefault("validation_before", {})
        key = run.cfg.validation if run.cfg.stop_on is None else f"{run.cfg.validation} cut to --stop-on {run.cfg.stop_on}"
        if key not in cache:
            cache[key] = (
                {"ma": run.before["val_ma"], "el": run.before["val_el"]} if not state["finished"]
                else measure_request(original, run.eval_batches["validation"], run.cfg.el_n))
        return cache[key]

    return held_out


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
