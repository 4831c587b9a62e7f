"""The unlearning loop (ALGORITHMS.md §6): adapt, train on paired forget/retain batches, stop by EL/MA.

Thin orchestration: the math lives in losses.py, fisher.py and init.py; data in data.py; metrics
in metrics/. Runs unchanged under ``accelerate launch`` (batches are sharded by process index,
only the main process writes).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as data_mod
from .config import UnlearnConfig
from .errors import ConfigError, TrainingDiverged
from .checkpoint import checkpoint_dir, load_checkpoint, restore_rng, save_checkpoint
from .save import check_output_dir
from .models import check_rank, is_conv1d, load_model, model_fingerprint, resolve_targets


@dataclass
class Sets:
    """Tokenized forget / retain / validation sets and their provenance."""

    forget: data_mod.TextSet
    retain: data_mod.TextSet | None
    validation: data_mod.TextSet | None
    forget_ids: data_mod.TokenizedSet
    retain_ids: data_mod.TokenizedSet
    validation_ids: data_mod.TokenizedSet


@dataclass
class RunResult:
    model: torch.nn.Module  # the unlearned model (a PeftModel for LoRA methods)
    tokenizer: Any
    report: dict[str, Any]
    residual: dict[str, torch.Tensor] = field(default_factory=dict)  # base weights FILA/VILA replaced


def make_accelerator():
    """accelerate's Accelerator; a multi-process launch without CUDA runs on CPU processes (gloo)."""
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=launched and not torch.cuda.is_available())


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def master_dtype(cfg: UnlearnConfig) -> str:
    """The dtype the trained weights are kept in.

    Full fine-tuning keeps float32 master weights under --dtype bfloat16 and computes in bf16
    (autocast): Adam's steps of lr 5e-5 are below bf16's resolution for most weights, so bf16
    weights would silently drop about half of the updates. LoRA adapters are float32 already (PEFT).
    """
    return "float32" if cfg.method_spec().adapter == "full" else cfg.dtype


def compute_autocast(cfg: UnlearnConfig, device: torch.device):
    """bf16 autocast around the training forward passes when float32 master weights stand in for bf16 ones."""
    mixed = master_dtype(cfg) != cfg.dtype
    return torch.autocast(device.type, dtype=getattr(torch, cfg.dtype), enabled=mixed)


def load_sets(cfg: UnlearnConfig) -> tuple[data_mod.TextSet, data_mod.TextSet | None, data_mod.TextSet | None]:
    """Read every input file before any model is loaded, so bad input fails in seconds."""
    forget = data_mod.load_text_set(cfg.forget, "forget")
    retain = data_mod.load_text_set(cfg.retain, "retain") if cfg.retain else None
    validation = data_mod.load_text_set(cfg.validation, "validation") if cfg.validation else None
    if retain is not None:
        data_mod.check_forget_not_in_retain(forget.texts, retain.texts, cfg.forget, cfg.retain)
    if validation is None and (cfg.ma_threshold is None or cfg.el_threshold is None):
        raise ConfigError(
            "the stop rule needs held-out thresholds: pass --validation FILE (sequences never trained on), "
            "or both --ma-threshold and --el-threshold"
        )
    return forget, retain, validation


def model_context(model, cfg: UnlearnConfig) -> int:
    if cfg.max_length:
        return cfg.max_length
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model.config, key, None)
        if value:
            return int(value)
    return 2048


def tokenize_sets(cfg, tokenizer, context: int, forget, retain, validation, model=None) -> Sets:
    """Token ids of each set; question/answer items get the model's TOFU template, the question masked."""
    overflow = "truncate" if cfg.truncate else "error"

    def tok(text_set):
        if text_set is None:
            return data_mod.TokenizedSet([], [])
        return data_mod.tokenize_set(tokenizer, text_set, max_length=context, on_overflow=overflow,
                                     model_context=not cfg.max_length, model=model)

    return Sets(forget, retain, validation, tok(forget), tok(retain), tok(validation))


# --------------------------------------------------------------------------- metrics over batches


def per_sequence(metric: Callable, model, batches: list[dict], **kwargs) -> torch.Tensor:
    values = [metric(model, b["input_ids"].to(_device(model)), attention_mask=b["attention_mask"].to(_device(model)),
                     **kwargs) for b in batches]
    return torch.cat(values).float().cpu() if values else torch.zeros(0)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def memorization(model, batches) -> float:
    from .metrics import memorization_accuracy

    return float(per_sequence(memorization_accuracy, model, batches).mean())


def extraction(model, batches, n: int, progress: bool = False) -> float:
    from .metrics import extraction_likelihood

    return float(per_sequence(extraction_likelihood, model, batches, n=n, progress=progress).mean())


def heldout_perplexity(model, batches) -> float:
    """Token-weighted perplexity of the held-out set, float32 log-probs summed in float64."""
    from .losses import IGNORE_INDEX, token_nll

    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            b = {k: v.to(_device(model)) for k, v in b.items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(token_nll(logits, b["labels"]).double().sum())
            count += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    return math.exp(total / max(count, 1))


# --------------------------------------------------------------------------- adapting the model


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapt_model(model, cfg: UnlearnConfig, forget_batches, retain_batches, *,
                run_initializer: bool = True) -> tuple[Any, list[str], dict, dict]:
    """Wrap the model for the method: all weights trainable, or a LoRA adapter started by an initialiser.

    Returns (model, target names, init stats, residual base weights keyed by parameter name).
    """
    method = cfg.method_spec()
    if method.adapter == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, [], {}, {}
    from peft import LoraConfig, get_peft_model

    from .init import InitContext, apply_initializer

    targets = resolve_targets(model, cfg.targets)
    check_rank(model, targets, cfg.rank)
    modules = dict(model.named_modules())
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      fan_in_fan_out=any(is_conv1d(modules[t]) for t in targets), bias="none")
    peft_model = get_peft_model(model, lora)
    if not run_initializer:  # resuming: the checkpoint supplies the adapter and residual weights
        return peft_model, targets, {}, {}
    ctx = InitContext(forget_batches=forget_batches, retain_batches=retain_batches, fisher_mode=cfg.fisher_mode,
                      eps=cfg.fisher_eps, svd=cfg.svd, progress=cfg.progress)
    stats = apply_initializer(peft_model, method.init, ctx)
    residual = {}
    if method.init in ("fila", "vila"):
        base_modules = dict(peft_model.get_base_model().named_modules())
        residual = {f"{t}.weight": base_modules[t].get_base_layer().weight.detach().clone() for t in targets}
    return peft_model, targets, stats, residual


# --------------------------------------------------------------------------- the loop


def unlearn(cfg: UnlearnConfig, *, model=None, tokenizer=None, accelerator=None, resume: bool = False) -> RunResult:
    """Run one unlearning job. The model passed in (or loaded) is never modified: a copy is trained.

    With ``resume`` the run continues from the checkpoint of ``cfg.out`` (written after every epoch)
    and ends with exactly the result the uninterrupted run would have had.
    """
    from .losses import needs_reference

    cfg.validate()
    started = time.time()
    set_seed(cfg.seed)
    accelerator = accelerator or make_accelerator()
    if accelerator.is_main_process and cfg.out and not resume:
        check_output_dir(cfg.out, cfg.overwrite)
        stale = checkpoint_dir(cfg.out)
        if stale.exists() and not cfg.overwrite:
            raise ConfigError(f"{stale}: an unfinished run left this checkpoint; continue it with --resume {cfg.out} "
                              f"or start afresh with --overwrite")
        shutil.rmtree(stale, ignore_errors=True)
    forget_set, retain_set, validation_set = load_sets(cfg)
    check_eval_suites(cfg)
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=master_dtype(cfg), trust_remote_code=cfg.trust_remote_code,
                                      progress=cfg.progress)
    else:
        model = copy.deepcopy(model)
        if master_dtype(cfg) == "float32":
            model.float()
    data_mod.ensure_pad_token(tokenizer)
    sets = tokenize_sets(cfg, tokenizer, model_context(model, cfg), forget_set, retain_set, validation_set, model=model)
    if cfg.method_spec().adapter == "lora":  # bad --targets / --rank fail now, not after the "before" evaluation
        check_rank(model, resolve_targets(model, cfg.targets), cfg.rank)
    base_fingerprint = model_fingerprint(model)
    checkpoint = load_checkpoint(cfg.out, cfg.to_dict(), base_fingerprint) if resume else None
    model.to(accelerator.device).eval()

    pad = tokenizer.pad_token_id
    eval_batches = {
        "forget": data_mod.make_batches(sets.forget_ids, cfg.eval_batch_size, pad),
        "validation": data_mod.make_batches(sets.validation_ids, cfg.eval_batch_size, pad),
    }
    log = accelerator.print if cfg.progress else (lambda *a, **k: None)
    on_main = functools.partial(main_then_broadcast, accelerator)

    # Thresholds and "before" numbers come from the original model (Jang et al.'s protocol).
    if checkpoint is None:
        log("loku: measuring the model before unlearning")
        before = on_main(lambda: evaluate_state(model, eval_batches, cfg, with_el=True))
        suites_before = on_main(lambda: run_eval_suites(model, tokenizer, cfg, "self"))
    else:
        before = checkpoint.state["before"]
        suites_before = checkpoint.state.get("suites_before")
    ma_threshold = cfg.ma_threshold if cfg.ma_threshold is not None else before["val_ma"]
    el_threshold = cfg.el_threshold if cfg.el_threshold is not None else before["val_el"]

    method = cfg.method_spec()
    reference = None
    if needs_reference(method.loss, cfg.retain_term):
        reference = copy.deepcopy(model).eval().requires_grad_(False)

    # Each process takes its share of the Fisher batches; fisher.py all-reduces sums and counts.
    shard = slice(accelerator.process_index, None, accelerator.num_processes)
    fisher_forget = data_mod.make_batches(sets.forget_ids, cfg.batch_size, pad)[: cfg.fisher_batches]
    fisher_retain = data_mod.make_batches(sets.retain_ids, cfg.batch_size, pad)[: cfg.fisher_batches]
    init_forget, init_retain = fisher_forget[shard], fisher_retain[shard]
    t_init = time.time()
    model, targets, init_stats, residual = adapt_model(model, cfg, init_forget, init_retain,
                                                       run_initializer=checkpoint is None)
    if checkpoint is not None:
        residual = restore_weights(model, checkpoint)
        init_stats = checkpoint.state["init"]
    init_seconds = time.time() - t_init if checkpoint is None else checkpoint.state["init_seconds"]
    if "eps_dominated_share" in init_stats:
        share = init_stats["eps_dominated_share"]
        log(f"loku: {method.init} initialised {len(targets)} layers; eps={cfg.fisher_eps:g} dominates {share:.1%} of "
            f"the relative-Fisher entries" + (" (the ratio is mostly F_forget/eps: consider a smaller --fisher-eps)"
                                              if share > 0.5 else ""))
    params = trainable_parameters(model)
    n_total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate(), weight_decay=cfg.weight_decay,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2))
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint.optimizer)
        restore_rng(checkpoint)
    model, optimizer = accelerator.prepare(model, optimizer)

    epochs: list[dict[str, Any]] = list(checkpoint.state["epochs"]) if checkpoint else []
    tokens_trained = checkpoint.state["tokens_trained"] if checkpoint else 0
    optimizer_steps = epochs[-1].get("optimizer_steps", 0) if epochs else 0
    first_epoch = len(epochs) + 1
    outcome = "success" if epochs and epochs[-1]["success"] else "failed"
    epoch_bar = tqdm(range(first_epoch, cfg.max_epochs + 1), desc="unlearning", unit="epoch",
                     disable=not cfg.progress or not accelerator.is_main_process)
    for epoch in ([] if outcome == "success" else epoch_bar):
        t_epoch = time.time()
        forget_batches = data_mod.make_batches(sets.forget_ids, cfg.batch_size, pad, shuffle=True, seed=cfg.seed + epoch)
        retain_batches = (data_mod.make_batches(sets.retain_ids, cfg.batch_size, pad, shuffle=True,
                                                seed=cfg.seed + 10_000 + epoch) if sets.retain_ids else [])
        pairs = data_mod.pair_batches(forget_batches, retain_batches or None)
        world = accelerator.num_processes
        steps = plan_steps(pairs, step_group_size(cfg, len(pairs), world), world, accelerator.process_index)
        sums: dict[str, float] = {}
        micro_batches = 0
        model.eval()  # no dropout while unlearning (Jang et al.); gradients flow as usual
        for share in steps:
            optimizer.zero_grad(set_to_none=True)
            for i, ((fb, rb), weight) in enumerate(share, start=1):
                fb = {k: v.to(accelerator.device) for k, v in fb.items()}
                use_retain = rb is not None and method.loss != "ga" and cfg.retain_term != "none"
                rb = {k: v.to(accelerator.device) for k, v in rb.items()} if use_retain else None
                with contextlib.nullcontext() if i == len(share) else accelerator.no_sync(model):
                    with compute_autocast(cfg, accelerator.device):
                        loss, parts = batch_loss(model, reference, method.loss, fb, rb, cfg)
                    if not torch.isfinite(loss):
                        kept = (f"the last good state is the checkpoint of epoch {epoch - 1} in "
                                f"{checkpoint_dir(cfg.out)}" if epoch > 1 and cfg.out
                                else "no epoch had finished, so no checkpoint was kept")
                        raise TrainingDiverged(f"non-finite loss at epoch {epoch}, step {micro_batches + 1}; {kept}: "
                                               "lower --lr, or use a bounded loss (ihl)")
                    accelerator.backward(loss * weight)
                if weight:  # weight 0: a padding pass that keeps the processes in step
                    micro_batches += 1
                    for key, value in parts.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                    tokens_trained += int(fb["attention_mask"].sum()) + (int(rb["attention_mask"].sum()) if rb else 0)
                failpoint("step")
            optimizer.step()
        optimizer_steps += len(steps)
        record = {"epoch": epoch, "optimizer_steps": optimizer_steps,
                  **epoch_mean_losses(accelerator, sums, micro_batches)}
        unwrapped = accelerator.unwrap_model(model)
        record.update(on_main(lambda: evaluate_state(unwrapped, eval_batches, cfg, with_el=cfg.el_every_epoch,
                                                     ma_threshold=ma_threshold)))
        record["success"] = bool(record["forget_ma"] <= ma_threshold and record.get("forget_el") is not None
                                 and record["forget_el"] <= el_threshold)
        record["seconds"] = time.time() - t_epoch
        epochs.append(record)
        if cfg.out:
            state = {"config": cfg.to_dict(), "base_fingerprint": base_fingerprint, "before": before,
                     "suites_before": suites_before,
                     "epochs": epochs, "tokens_trained": tokens_trained, "init": init_stats,
                     "init_seconds": init_seconds}
            if accelerator.is_main_process:
                save_checkpoint(cfg.out, state=state, trainable=trainable_state(unwrapped), residual=residual,
                                optimizer=optimizer)
            accelerator.wait_for_everyone()
        epoch_bar.set_postfix(ma=f"{record['forget_ma']:.3f}",
                              el="-" if record.get("forget_el") is None else f"{record['forget_el']:.3f}")
        if record["success"]:
            outcome = "success"
            break
    epoch_bar.close()

    model = accelerator.unwrap_model(model).eval()
    after = on_main(lambda: evaluate_state(model, eval_batches, cfg, with_el=True))
    suites_after = on_main(lambda: run_eval_suites(model, tokenizer, cfg, {
        "ma": ma_threshold, "el": el_threshold, "el_n": cfg.el_n, "source": "run", "note": threshold_source(cfg)}))
    report = {
        "outcome": outcome,
        "epochs_run": len(epochs),
        "epochs_to_success": len(epochs) if outcome == "success" else None,
        "thresholds": {"ma": ma_threshold, "el": el_threshold, "source": threshold_source(cfg)},
        "precision": {"weights": master_dtype(cfg), "compute": cfg.dtype},
        "before": before,
        "after": after,
        "suites": {"before": suites_before, "after": suites_after} if cfg.eval_suites else None,
        "epochs": epochs,
        "targets": targets,
        "init": init_stats,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "trainable_share": n_trainable / n_total,
        "processes": accelerator.num_processes,
        "flops": estimate_flops(n_total, method.adapter, int(accelerator.reduce(torch.tensor(tokens_trained,
                                device=accelerator.device), "sum")), fisher_forget, fisher_retain, method.init,
                                eval_batches, len(epochs), reference=reference is not None),
        "seconds": {"init": init_seconds, "total": time.time() - started},
        "peak_memory_bytes": peak_memory_bytes(),
        "base_fingerprint": base_fingerprint,
        "resumed": resume,
        "data": {name: {"path": s.path, "sha256": s.sha256, "sequences": len(ids), "qa_template": ids.template}
                 for name, s, ids in (("forget", sets.forget, sets.forget_ids), ("retain", sets.retain, sets.retain_ids),
                                      ("validation", sets.validation, sets.validation_ids)) if s is not None},
    }
    return RunResult(model=model, tokenizer=tokenizer, report=report, residual=residual)


def step_group_size(cfg: UnlearnConfig, n_micro_batches: int, world: int) -> int:
    """Micro-batches per optimizer step of the whole job: the whole epoch (Jang et al.), or accumulation x processes."""
    return n_micro_batches if cfg.one_step_per_epoch else cfg.grad_accum * world


def plan_steps(pairs: list, group_size: int, world: int, rank: int) -> list[list[tuple[Any, float]]]:
    """One epoch's micro-batches as optimizer steps, and this process's share of each step.

    Every ``group_size`` consecutive micro-batches make one optimizer step of the whole job (the
    last group may be shorter). They are dealt round-robin to the ``world`` processes with weight
    ``world / len(group)``: DDP averages gradients over processes, so the step's gradient is the
    mean over the group's micro-batches, exactly the single-process gradient, short last group
    included. A process left without a micro-batch takes a copy of the group's first with weight
    0: every process makes the same number of backward passes, so DDP's all-reduce never waits
    for a process that has run out of batches.
    """
    steps = []
    for start in range(0, len(pairs), group_size):
        group = pairs[start : start + group_size]
        mine = group[rank::world]
        padding = math.ceil(len(group) / world) - len(mine)
        steps.append([(pair, world / len(group)) for pair in mine] + [(group[0], 0.0)] * padding)
    return steps


def threshold_source(cfg: UnlearnConfig) -> str:
    """Where the stop-rule thresholds came from, each on its own: a given number or the held-out set."""
    given = {"MA": cfg.ma_threshold is not None, "EL": cfg.el_threshold is not None}
    if all(given.values()):
        return "given"
    if not any(given.values()):
        return "validation set, before unlearning"
    return " and ".join(f"{name} {'given' if is_given else 'from the validation set, before unlearning'}"
                        for name, is_given in given.items())


def batch_loss(model, reference, loss: str, forget: dict, retain: dict | None, cfg: UnlearnConfig):
    """One micro-batch's unlearning loss: the model on the forget (and retain) batch, the frozen
    reference model too where the loss compares against it. Returns (loss, parts for the logs)."""
    from . import losses  # looked up at call time, so the loss can be swapped (tests inject NaN this way)

    def logits(m, batch):
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    ref_f = ref_r = None
    if reference is not None:
        with torch.no_grad():
            ref_f = logits(reference, forget)
            ref_r = logits(reference, retain) if retain is not None else None
    return losses.unlearning_loss(
        loss, logits(model, forget), forget["labels"], logits(model, retain) if retain is not None else None,
        retain["labels"] if retain is not None else None, ref_forget_logits=ref_f, ref_retain_logits=ref_r,
        gamma=cfg.gamma, alpha=cfg.alpha, retain_term=cfg.retain_term, npo_beta=cfg.npo_beta)


def epoch_mean_losses(accelerator, sums: dict[str, float], n_pairs: int) -> dict[str, float]:
    """Mean of each loss part over the epoch's micro-batches of every process."""
    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys] + [n_pairs], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, "sum")
    return {f"loss_{k}": float(totals[i] / max(float(totals[-1]), 1.0)) for i, k in enumerate(keys)}


def main_then_broadcast(accelerator, fn: Callable[[], Any]) -> Any:
    """Compute on the main process only and hand the result to every process (metrics, thresholds)."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box = [fn() if accelerator.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def restore_weights(model, checkpoint) -> dict[str, torch.Tensor]:
    """Put the checkpoint's residual base weights and trainable tensors into a freshly adapted model."""
    from peft import PeftModel

    with torch.no_grad():
        if checkpoint.residual:
            base = model.get_base_model() if isinstance(model, PeftModel) else model
            modules = dict(base.named_modules())
            for key, value in checkpoint.residual.items():
                layer = modules[key.removesuffix(".weight")]
                layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
                layer.weight.copy_(value)
        params = dict(model.named_parameters())
        for name, value in checkpoint.trainable.items():
            params[name].copy_(value)
    return dict(checkpoint.residual)


def failpoint(name: str) -> None:
    """Fault injection for the crash tests: LOKU_FAILPOINT=step:N kills this process (SIGKILL) at the N-th step."""
    spec = os.environ.get("LOKU_FAILPOINT")
    if not spec or not spec.startswith(name + ":"):
        return
    _FAILPOINT_COUNTS[name] = _FAILPOINT_COUNTS.get(name, 0) + 1
    if _FAILPOINT_COUNTS[name] == int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)


_FAILPOINT_COUNTS: dict[str, int] = {}


def evaluate_state(model, eval_batches, cfg: UnlearnConfig, *, with_el: bool, ma_threshold: float | None = None) -> dict:
    """MA (always), EL (when asked, or once forget MA already passes: the same stopping epoch) and held-out PPL."""
    model.eval()
    out: dict[str, Any] = {"forget_ma": memorization(model, eval_batches["forget"])}
    if eval_batches["validation"]:
        out["val_ma"] = memorization(model, eval_batches["validation"])
        out["val_ppl"] = heldout_perplexity(model, eval_batches["validation"])
    if with_el or (ma_threshold is not None and out["forget_ma"] <= ma_threshold):
        out["forget_el"] = extraction(model, eval_batches["forget"], cfg.el_n, cfg.progress)
        if with_el and eval_batches["validation"]:
            out["val_el"] = extraction(model, eval_batches["validation"], cfg.el_n, cfg.progress)
    else:
        out["forget_el"] = None
    return out


def check_eval_suites(cfg: UnlearnConfig) -> None:
    """Unknown suite names or a missing data folder fail before any model is loaded."""
    if not cfg.eval_suites:
        return
    from .errors import DataError
    from .evaluate import default_data_dir, expand_suites

    expand_suites([cfg.eval_suites])
    folder = Path(cfg.eval_data_dir) if cfg.eval_data_dir else default_data_dir()
    if not folder.is_dir():
        raise DataError(f"{folder}: evaluation data folder not found; pass --eval-data-dir or set LOKU_DATA_DIR")


def run_eval_suites(model, tokenizer, cfg: UnlearnConfig, thresholds: dict | str) -> dict | None:
    """The ``loku eval`` suites named by ``--eval-suites`` on ``model`` (result of run_suites), or None.

    ``thresholds``: "self" before unlearning (the model is its own pre-unlearning reference), the run's
    stop-rule thresholds after it, so tdec's "forgotten" uses the values from before unlearning.
    """
    if not cfg.eval_suites:
        return None
    from .evaluate import default_data_dir, run_suites

    return run_suites(model, tokenizer, [cfg.eval_suites], data_dir=cfg.eval_data_dir or default_data_dir(),
                      limit=cfg.eval_limit, batch_size=cfg.eval_batch_size, seed=cfg.seed, progress=cfg.progress,
                      model_name=cfg.model, thresholds=thresholds)


def estimate_flops(n_params: int, adapter: str, tokens_trained: int, fisher_forget, fisher_retain, init: str | None,
                   eval_batches, epochs: int, *, reference: bool = False) -> dict[str, float]:
    """Dense-transformer estimate: forward 2N per token, backward 4N (2N when base weights are frozen),
    plus 2N per token for the frozen reference model's forward (NPO, KL retain term).

    Evaluation counts the teacher-forced passes only (EL's generated tokens are not counted).
    """
    per_token_train = (6 if adapter == "full" else 4) * n_params + (2 * n_params if reference else 0)
    fisher_tokens = sum(int(b["attention_mask"].sum()) for b in [*fisher_forget, *fisher_retain])
    fisher = 6 * n_params * fisher_tokens if init in ("fila", "vila") else 0.0
    eval_tokens = sum(int(b["attention_mask"].sum()) for bs in eval_batches.values() for b in bs)
    return {"training": float(per_token_train * tokens_trained), "fisher": float(fisher),
            "evaluation_teacher_forced": float(2 * n_params * eval_tokens * (epochs + 2))}


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
