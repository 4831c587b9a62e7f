"""The unlearning loop (docs/algorithms.md §6), as phases a reader can follow top to bottom:

    prepare -> measure_before -> adapt -> [train_epoch -> decide -> save_epoch -> on_epoch]* -> finish
                                          (train_until_stop; when to stop and which state to keep: stop.py)

:func:`unlearn` is the one entry every caller uses (the CLI, a sequence of requests, the benches); what
they vary is given to it, never written into the :class:`Run` between phases: the stop rule (with
its thresholds, :mod:`loku.stop`), a "before" measurement shared by several runs, the model a run is
anchored to, an extra loss term, a per-epoch callback, or no measuring at all (a caller that scores
the epochs itself). The math lives in losses.py, fisher.py
and initializers.py; data in data.py; metrics in measure.py and metrics/; several processes in
distributed.py. Runs unchanged under ``accelerate launch`` (only the main process writes).
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from . import data as data_mod
from . import devices
from . import distributed as dist
from . import measure
from . import tracking
from .checkpoint import (checkpoint_dir, load_checkpoint, restore_rng, restore_weights, save_checkpoint,
                         trainable_state)
from .checks import check_unlearn
from .config import UnlearnConfig, option_defaults
from .errors import ConfigError, TrainingDiverged
from .initializers import lora_layers, moved_start
from .lm import context_length, ensure_pad_token, is_conv1d
from .models import check_rank, load_model, resolve_targets
from .provenance import model_fingerprint, set_seed
from .save import check_output_dir
from .stop import StopRule, make_stop_rule


@dataclass
class Sets:
    """Tokenized forget / retain / validation sets and their provenance."""

    forget: data_mod.TextSet
    retain: data_mod.TextSet | None
    validation: data_mod.TextSet | None
    forget_ids: data_mod.TokenizedSet
    retain_ids: data_mod.TokenizedSet
    validation_ids: data_mod.TokenizedSet
    stop_on: data_mod.TextSet | None = None  # --stop-on: what the stop rule measures instead of the forget set
    stop_on_ids: data_mod.TokenizedSet | None = None

    def measured(self) -> tuple[data_mod.TokenizedSet, data_mod.TokenizedSet]:
        """(the set the stop rule measures, the held-out set it is measured against): the forget and validation
        sets, or the --stop-on texts and the validation set cut to their longest length (a 16-token fragment's
        MA and EL against 16-token held-out text, not against whole sequences with more context)."""
        if self.stop_on_ids is None:
            return self.forget_ids, self.validation_ids
        cut = max(len(ids) for ids in self.stop_on_ids.ids)
        held = self.validation_ids
        return self.stop_on_ids, data_mod.TokenizedSet([ids[:cut] for ids in held.ids],
                                                       [min(n, cut) for n in held.prompt_lengths], held.template)


@dataclass
class RunResult:
    model: torch.nn.Module  # the unlearned model (a PeftModel for LoRA methods)
    tokenizer: Any
    report: dict[str, Any]
    # FILA/VILA's start (A0, B0) per layer, moved out of the base: the adapter saved on the ORIGINAL base is
    # s (B A - B0 A0) (loku.adapters). None: the start stayed in the adapter (or no adapter).
    start: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class Run:
    """One run's state between phases. Filled in phase order; ``epochs`` grows by one record an epoch."""

    cfg: UnlearnConfig
    accelerator: Any
    model: Any
    tokenizer: Any
    sets: Sets
    eval_batches: dict[str, list]
    base_fingerprint: str
    checkpoint: Any = None  # the checkpoint resumed from, if any
    resumed: bool = False
    started: float = field(default_factory=time.time)
    before: dict[str, Any] = field(default_factory=dict)
    suites_before: dict | None = None
    # False: no MA/EL measurement before, per epoch or after, and no stop rule: exactly max_epochs epochs.
    measuring: bool = True
    # The model the run is anchored to when it is not the run's own start: for a sequence of requests
    # (loku.requests), the model before its FIRST request. The reference logits of every term with the
    # trait needs_reference and the two-sided rule's bands come from it; None: the run's own start.
    original: Any = None
    reference: Any = None  # frozen model the losses compare against (the original, else a copy of the start)
    optimizer: Any = None
    targets: list[str] = field(default_factory=list)
    init_stats: dict[str, Any] = field(default_factory=dict)
    residual: dict[str, torch.Tensor] = field(default_factory=dict)  # base weights FILA/VILA replaced (checkpoints)
    start: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    init_seconds: float = 0.0
    fisher_tokens: int = 0
    epochs: list[dict[str, Any]] = field(default_factory=list)
    tokens_trained: int = 0
    optimizer_steps: int = 0
    # A term added to every micro-batch's loss (the continual loop's O-LoRA penalty, loku.requests);
    # its value is logged as loss_extra. None: the loss is the method's alone.
    extra_loss: Callable[[Any], torch.Tensor] | None = None
    stop_rule: Any = None  # loku.stop.StopRule: when to stop, which state to keep, the thresholds
    on_epoch: Callable[[dict[str, Any], Any], None] | None = None  # (epoch record, unwrapped model) after saving
    tracking: tracking.Tracking = field(default_factory=tracking.Tracking)  # --report-to (main process only)

    @property
    def pad(self) -> int:
        return self.tokenizer.pad_token_id

    def log(self, message: str) -> None:
        if self.cfg.progress:
            self.accelerator.print(message)

    def on_main(self, fn):
        return dist.main_then_broadcast(self.accelerator, fn)

    @property
    def succeeded(self) -> bool:
        return bool(self.epochs) and self.epochs[-1].get("success", False)

    @property
    def stopped(self) -> bool:
        """The stop rule ended the run (the paper's rule: only by succeeding; never when not measuring)."""
        return bool(self.epochs) and self.epochs[-1].get("stopped", self.epochs[-1].get("success", False))


# --------------------------------------------------------------------------- the run, top to bottom


ExtraLoss = Callable[[Any], torch.Tensor]  # the model -> a term added to every micro-batch's loss


def unlearn(cfg: UnlearnConfig, *, model=None, tokenizer=None, accelerator=None, resume: bool = False,
            stop: StopRule | None = None, before: dict[str, Any] | None = None, original=None,
            extra_loss: Callable[[Any], ExtraLoss | None] | None = None,
            on_epoch: Callable[[dict[str, Any], Any], None] | None = None, measure: bool = True,
            train_in_place: bool = False) -> RunResult:
    """Run one unlearning job. The model passed in (or loaded) is never modified: a copy is trained.

    With ``resume`` the run continues from the checkpoint of ``cfg.out`` (written after every epoch)
    and ends with exactly the result the uninterrupted run would have had.

    ``stop``: the stop rule (default: ``cfg.stop_rule``'s, thresholds from the config or the held-out set).
    ``before``: the pre-unlearning measurement of this very model and data, taken once for several runs.
    ``original``: the model the run is anchored to when it is not its own start (a sequence's model before
    its first request): the reference of the terms that need one and the two-sided rule's bands.
    ``extra_loss``: given the adapted model, the term to add to the loss (or None); its value is logged
    as ``loss_extra``. ``on_epoch(record, model)``: called after each epoch's checkpoint.
    ``measure=False``: no MA/EL measurement and no stop rule, exactly ``max_epochs`` epochs (a caller that
    scores the epochs itself with ``on_epoch``); the report then holds no before/after numbers.
    ``train_in_place``: ``model`` is trained itself, not a copy (a caller handing over a copy it made).
    """
    run = prepare(cfg, model=model, tokenizer=tokenizer, accelerator=accelerator, resume=resume, stop=stop,
                  train_in_place=train_in_place)
    run.original, run.measuring, run.on_epoch = original, measure, on_epoch
    measure_before(run, before=before)
    adapt(run)
    if extra_loss is not None:
        run.extra_loss = extra_loss(run.model)
    train_until_stop(run)
    return finish(run)


def train_until_stop(run: Run) -> None:
    """[train_epoch -> decide -> save_epoch]* until the stop rule holds or ``max_epochs`` have run."""
    cfg = run.cfg
    bar = tqdm(range(len(run.epochs) + 1, cfg.max_epochs + 1), desc="unlearning", unit="epoch",
               disable=not cfg.progress or not run.accelerator.is_main_process)
    for epoch in ([] if run.stopped else bar):
        record = train_epoch(run, epoch)
        decide(run, record)
        save_epoch(run)
        if run.on_epoch is not None:
            run.on_epoch(record, run.accelerator.unwrap_model(run.model))
        if "forget_ma" in record:
            bar.set_postfix(ma=f"{record['forget_ma']:.3f}",
                            el="-" if record.get("forget_el") is None else f"{record['forget_el']:.3f}")
        if run.stopped:
            break
    bar.close()
    run.stop_rule.keep_best(run)


# --------------------------------------------------------------------------- prepare


def prepare(cfg: UnlearnConfig, *, model=None, tokenizer=None, accelerator=None, resume: bool = False,
            stop: StopRule | None = None, train_in_place: bool = False) -> Run:
    """Check everything that can be checked cheaply, then load and tokenize: bad input fails in seconds."""
    check_unlearn(cfg)
    if len(cfg.forget_files()) > 1:
        raise ConfigError(f"several --forget files ({', '.join(cfg.forget_files())}) are a sequence of deletion "
                          "requests: run them with loku.requests.unlearn_requests (`loku unlearn` does)")
    set_seed(cfg.seed)
    accelerator = accelerator or dist.make_accelerator(cfg.device)
    devices.check_distributed(accelerator)
    if accelerator.is_main_process and cfg.out and not resume:
        guard_output(cfg)
    forget_set, retain_set, validation_set = load_sets(cfg)
    stop_on = data_mod.load_text_set(cfg.stop_on, "stop-on") if cfg.stop_on else None
    if stop_on is not None and validation_set is not None:
        data_mod.check_validation_not_forget(stop_on.texts, validation_set.texts, cfg.stop_on, cfg.validation)
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=master_dtype(cfg), trust_remote_code=cfg.trust_remote_code,
                                      progress=cfg.progress, quantization=devices.quantization_of(cfg),
                                      device=accelerator.device)
    else:
        model = model if train_in_place else copy.deepcopy(model)
        if master_dtype(cfg) == "float32":
            model.float()
    pad = ensure_pad_token(tokenizer)
    sets = tokenize_sets(cfg, tokenizer, model_context(model, cfg), forget_set, retain_set, validation_set, model=model,
                         stop_on=stop_on)
    if not cfg.method_spec().full_weights:  # bad --targets / --rank fail now, not after the "before" evaluation
        check_rank(model, resolve_targets(model, cfg.targets), cfg.rank)
    fingerprint = model_fingerprint(model)
    checkpoint = load_checkpoint(cfg.out, cfg.to_dict(), fingerprint, option_defaults()) if resume else None
    devices.place(model, accelerator.device).eval()
    measured, held_out = sets.measured()
    eval_batches = {"forget": data_mod.make_batches(measured, cfg.eval_batch_size, pad),
                    "validation": data_mod.make_batches(held_out, cfg.eval_batch_size, pad)}
    # A resumed run re-logs the steps after its checkpoint: the killed run's later events are purged.
    resume_step = checkpoint.state["epochs"][-1].get("optimizer_steps", 0) + 1 if checkpoint is not None else None
    return Run(cfg=cfg, accelerator=accelerator, model=model, tokenizer=tokenizer, sets=sets,
               eval_batches=eval_batches, base_fingerprint=fingerprint, checkpoint=checkpoint, resumed=resume,
               stop_rule=stop if stop is not None else make_stop_rule(cfg),
               tracking=tracking.open_tracking(cfg.report_to, cfg.logging_dir, cfg.out, cfg.to_dict(),
                                               is_main_process=accelerator.is_main_process, resume_step=resume_step))


def guard_output(cfg: UnlearnConfig) -> None:
    """Refuse to overwrite a finished output or an unfinished run's checkpoint unless told to."""
    check_output_dir(cfg.out, cfg.overwrite)
    stale = checkpoint_dir(cfg.out)
    if stale.exists() and not cfg.overwrite:
        raise ConfigError(f"{stale}: an unfinished run left this checkpoint; continue it with --resume {cfg.out} "
                          f"or start afresh with --overwrite")
    shutil.rmtree(stale, ignore_errors=True)


def load_sets(cfg: UnlearnConfig) -> tuple[data_mod.TextSet, data_mod.TextSet | None, data_mod.TextSet | None]:
    """Read every input file before any model is loaded, so bad input fails in seconds."""
    forget = data_mod.load_text_set(cfg.forget, "forget")
    retain = data_mod.load_text_set(cfg.retain, "retain") if cfg.retain else None
    validation = data_mod.load_text_set(cfg.validation, "validation") if cfg.validation else None
    if retain is not None:
        data_mod.check_forget_not_in_retain(forget.texts, retain.texts, cfg.forget, cfg.retain)
    if validation is not None:
        data_mod.check_validation_not_forget(forget.texts, validation.texts, cfg.forget, cfg.validation)
    if validation is None and (cfg.ma_threshold is None or cfg.el_threshold is None):
        raise ConfigError(
            "the stop rule needs held-out thresholds: pass --validation FILE (sequences never trained on), "
            "or both --ma-threshold and --el-threshold"
        )
    return forget, retain, validation


def model_context(model, cfg: UnlearnConfig) -> int:
    data_mod.check_max_length(cfg.max_length, context_length(model), cfg.model)
    return cfg.max_length or context_length(model)


def tokenize_sets(cfg, tokenizer, context: int, forget, retain, validation, model=None, stop_on=None) -> Sets:
    """Token ids of each set; question/answer and chat items get ``--template`` (the chat template by default),
    the prompt masked."""
    overflow = "truncate" if cfg.truncate else "error"

    def tok(text_set):
        if text_set is None:
            return data_mod.TokenizedSet([], [])
        return data_mod.tokenize_set(tokenizer, text_set, max_length=context, on_overflow=overflow,
                                     model_context=not cfg.max_length, model=model,
                                     template=cfg.template)

    return Sets(forget, retain, validation, tok(forget), tok(retain), tok(validation), stop_on,
                tok(stop_on) if stop_on is not None else None)


def master_dtype(cfg: UnlearnConfig) -> str:
    """The dtype the trained weights are kept in.

    Full fine-tuning keeps float32 master weights under --dtype bfloat16 and computes in bf16
    (autocast): Adam's steps of lr 5e-5 are below bf16's resolution for most weights, so bf16
    weights would silently drop most updates. LoRA adapters are float32 already (PEFT).
    """
    return "float32" if cfg.method_spec().full_weights else cfg.dtype


def compute_autocast(cfg: UnlearnConfig, device: torch.device):
    """bf16 autocast around the training forward passes when float32 master weights stand in for bf16 ones."""
    return torch.autocast(device.type, dtype=getattr(torch, cfg.dtype), enabled=master_dtype(cfg) != cfg.dtype)


# --------------------------------------------------------------------------- measure before


def measure_before(run: Run, before: dict[str, Any] | None = None) -> None:
    """The original model's numbers; its held-out MA/EL are the stop thresholds (Jang et al.'s protocol).

    ``before``: that measurement taken once for several runs from the same model (a bench's methods of
    one split), used instead of measuring again; the stop rule is calibrated all the same."""
    cfg = run.cfg
    if not run.measuring:
        return
    if run.checkpoint is None and before is not None:
        run.before = copy.deepcopy(before)
        run.suites_before = None
    elif run.checkpoint is None:
        run.log("loku: measuring the model before unlearning")
        run.before = run.on_main(lambda: measure.evaluate_state(run.model, run.eval_batches, cfg.el_n, with_el=True,
                                                                progress=cfg.progress))
        run.suites_before = run.on_main(lambda: measure.run_eval_suites(run.model, run.tokenizer, cfg, "self"))
    else:
        run.before = run.checkpoint.state["before"]
        run.suites_before = run.checkpoint.state.get("suites_before")
    run.stop_rule.set_thresholds(run)
    if run.checkpoint is None:
        run.stop_rule.calibrate(run)
    else:
        run.stop_rule.restore(run.checkpoint.state.get("stop"), run.checkpoint.best)


def threshold_source(cfg: UnlearnConfig) -> str:
    """Where the stop-rule thresholds came from, each on its own: a given number or the held-out set."""
    given = {"MA": cfg.ma_threshold is not None, "EL": cfg.el_threshold is not None}
    if all(given.values()):
        return "given"
    if not any(given.values()):
        return "validation set, before unlearning"
    return " and ".join(f"{name} {'given' if is_given else 'from the validation set, before unlearning'}"
                        for name, is_given in given.items())


# --------------------------------------------------------------------------- adapt


def adapt(run: Run) -> None:
    """Reference copy, adapter + initialiser (or the checkpoint's weights), optimizer; wrap for the processes."""
    from .losses import needs_reference

    cfg, method = run.cfg, run.cfg.method_spec()
    if needs_reference(*cfg.loss_terms()):
        # One reference for both sides (docs/algorithms.md §8, §12): in a sequence the model before the first
        # request, shared, not copied; anchoring to the run's start instead keeps every earlier request's drift.
        run.reference = (run.original if run.original is not None
                         else copy.deepcopy(run.model).eval().requires_grad_(False))
    # Each process takes its share of the Fisher batches; fisher.py all-reduces sums and counts.
    fisher_batch = cfg.fisher_batch_size or cfg.batch_size
    fisher_forget = data_mod.make_batches(run.sets.forget_ids, fisher_batch, run.pad)[: cfg.fisher_batches]
    retain_sample = fisher_retain_sample(run.sets.retain_ids, len(run.sets.forget_ids), cfg)
    fisher_retain = data_mod.make_batches(retain_sample, fisher_batch, run.pad)[: cfg.fisher_batches]
    started = time.time()
    run.model, run.targets, run.init_stats, run.residual = adapt_model(
        run.model, cfg, dist.shard(fisher_forget, run.accelerator), dist.shard(fisher_retain, run.accelerator),
        run_initializer=run.checkpoint is None)
    if cfg.gradient_checkpointing:  # after the initialiser: its Fisher pass keeps its own activations
        devices.enable_gradient_checkpointing(run.model)
    if uses_fisher(cfg):
        run.fisher_tokens = measure.token_count(fisher_forget) + measure.token_count(fisher_retain)
        run.init_stats["fisher_sequences"] = {name: sum(int(b["input_ids"].shape[0]) for b in batches)
                                              for name, batches in (("forget", fisher_forget),
                                                                    ("retain", fisher_retain))}
    if run.checkpoint is not None:
        run.start = resumed_start(run.model, run.checkpoint)
        run.residual = restore_weights(run.model, run.checkpoint)
        run.init_stats = run.checkpoint.state["init"]
        run.init_seconds = run.checkpoint.state["init_seconds"]
    else:
        run.init_seconds = time.time() - started
        if not method.full_weights:
            run.start = moved_start(lora_layers(run.model), method.init)
    if "eps_dominated_share" in run.init_stats:
        share = run.init_stats["eps_dominated_share"]
        run.log(f"loku: {method.init} initialised {len(run.targets)} layers; eps={cfg.fisher_eps:g} dominates "
                f"{share:.1%} of the relative-Fisher entries"
                + (" (the ratio is mostly F_forget/eps: consider a smaller --fisher-eps)" if share > 0.5 else ""))
    params = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate(), weight_decay=cfg.weight_decay,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2))
    if run.checkpoint is not None:
        optimizer.load_state_dict(run.checkpoint.optimizer)
        restore_rng(run.checkpoint)
        run.epochs = list(run.checkpoint.state["epochs"])
        run.tokens_trained = run.checkpoint.state["tokens_trained"]
        run.optimizer_steps = run.epochs[-1].get("optimizer_steps", 0) if run.epochs else 0
    run.model, run.optimizer = run.accelerator.prepare(run.model, optimizer)


def resumed_start(model, checkpoint) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """The adapter's start of a resumed run: the checkpoint's, or, for a checkpoint of an earlier loku that
    kept only the residual base, factored from it (the model's base weights are still the original ones)."""
    if checkpoint.start_saved or not checkpoint.residual:
        return checkpoint.start
    from .adapters import start_from_residual

    return start_from_residual(lora_layers(model), checkpoint.residual)


def fisher_retain_sample(retain: data_mod.TokenizedSet, n_forget: int, cfg: UnlearnConfig) -> data_mod.TokenizedSet:
    """The retain sequences of the Fisher pass: a seeded sample of ``cfg.fisher_retain_sequences`` of them
    (default: as many as the forget set has; 0: all), kept in file order.

    The retain Fisher only has to show which weights general text relies on; a pass over a retain set
    16x the forget set made FILA's initialisation cost more than the epochs it saves (docs/algorithms.md §2).
    """
    wanted = n_forget if cfg.fisher_retain_sequences is None else cfg.fisher_retain_sequences
    if wanted == 0 or wanted >= len(retain):
        return retain
    generator = torch.Generator().manual_seed(cfg.seed + 20_000)
    keep = sorted(torch.randperm(len(retain), generator=generator)[:wanted].tolist())
    return data_mod.TokenizedSet([retain.ids[i] for i in keep], [retain.prompt_lengths[i] for i in keep],
                                 retain.template)


def uses_fisher(cfg: UnlearnConfig) -> bool:
    from .initializers import INITIALIZERS

    init = cfg.method_spec().init
    return init is not None and INITIALIZERS.trait(init, "uses_fisher")


def adapt_model(model, cfg: UnlearnConfig, forget_batches, retain_batches, *,
                run_initializer: bool = True) -> tuple[Any, list[str], dict, dict]:
    """Wrap the model for the method: all weights trainable, or a LoRA adapter started by an initialiser.

    Returns (model, target names, init stats, residual base weights keyed by parameter name): the
    residual is kept for initialisers with the trait ``replaces_base``, so a resumed run restores
    exactly these base weights (the saved adapter needs only the start, :func:`adapt`).
    """
    method = cfg.method_spec()
    if method.full_weights:
        for p in model.parameters():
            p.requires_grad_(True)
        return model, [], {}, {}
    from peft import LoraConfig, get_peft_model

    from .fisher import fisher_memory_budget

    if getattr(model, "is_quantized", False):  # --load-in-4bit/8bit: norms in float32, input gradients
        model = devices.prepare_quantized(model, cfg.gradient_checkpointing)
    from .initializers import INITIALIZERS, InitContext, apply_initializer

    targets = resolve_targets(model, cfg.targets)
    check_rank(model, targets, cfg.rank)
    modules = dict(model.named_modules())
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      fan_in_fan_out=any(is_conv1d(modules[t]) for t in targets), bias="none")
    peft_model = get_peft_model(model, lora)
    if not run_initializer:  # resuming: the checkpoint supplies the adapter and residual weights
        return peft_model, targets, {}, {}
    # Float32 Fisher buffers of every target (43 GB for Llama-2-7B) are accumulated in groups of
    # layers that fit half of the free GPU memory; on CPU in one pass.
    ctx = InitContext(forget_batches=forget_batches, retain_batches=retain_batches, fisher_mode=cfg.fisher_mode,
                      eps=cfg.fisher_eps, svd=cfg.svd, progress=cfg.progress,
                      fisher_max_bytes=fisher_memory_budget(next(model.parameters()).device))
    stats = apply_initializer(peft_model, method.init, ctx)
    residual = {}
    if INITIALIZERS.trait(method.init, "replaces_base"):
        base_modules = dict(peft_model.get_base_model().named_modules())
        residual = {f"{t}.weight": base_modules[t].get_base_layer().weight.detach().clone() for t in targets}
    return peft_model, targets, stats, residual


# --------------------------------------------------------------------------- train one epoch


def train_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One pass over the forget set, each forget batch paired with a retain batch; returns the epoch's record."""
    from .losses import uses_retain

    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    started = time.time()
    forget_batches = data_mod.make_batches(run.sets.forget_ids, cfg.batch_size, run.pad, shuffle=True,
                                           seed=cfg.seed + epoch)
    retain_batches = (data_mod.make_batches(run.sets.retain_ids, cfg.batch_size, run.pad, shuffle=True,
                                            seed=cfg.seed + 10_000 + epoch) if run.sets.retain_ids else [])
    pairs = data_mod.pair_batches(forget_batches, retain_batches or None)
    world = accelerator.num_processes
    group = dist.step_group_size(cfg.one_step_per_epoch, cfg.grad_accum, len(pairs), world)
    steps = dist.plan_steps(pairs, group, world, accelerator.process_index)
    with_retain = uses_retain(cfg.loss_terms()[1])
    sums: dict[str, float] = {}
    micro_batches = 0
    model.eval()  # no dropout while unlearning (Jang et al.); gradients flow as usual
    devices.checkpointed_layers_train(model)  # --gradient-checkpointing: only in training mode (transformers)
    for share in steps:
        run.optimizer.zero_grad(set_to_none=True)
        step_sums: dict[str, float] = {}
        for i, ((fb, rb), weight) in enumerate(share, start=1):
            fb = {k: v.to(accelerator.device) for k, v in fb.items()}
            rb = {k: v.to(accelerator.device) for k, v in rb.items()} if rb is not None and with_retain else None
            with contextlib.nullcontext() if i == len(share) else accelerator.no_sync(model):
                with compute_autocast(cfg, accelerator.device):
                    loss, parts = batch_loss(model, run.reference, fb, rb, cfg)
                if run.extra_loss is not None:
                    extra = run.extra_loss(model)
                    loss = loss + extra
                    parts["extra"] = float(extra.detach())
                if not torch.isfinite(loss):
                    raise diverged(run, epoch, micro_batches + 1)
                accelerator.backward(loss * weight)
            if weight:  # weight 0: a padding pass that keeps the processes in step
                micro_batches += 1
                for key, value in parts.items():
                    sums[f"loss_{key}"] = sums.get(f"loss_{key}", 0.0) + float(value)
                    step_sums[f"loss_{key}"] = step_sums.get(f"loss_{key}", 0.0) + float(value)
                run.tokens_trained += int(fb["attention_mask"].sum()) + (int(rb["attention_mask"].sum()) if rb else 0)
            failpoint("step")
        run.tracking.log_step(run.optimizer_steps + 1, step_sums, sum(w > 0 for _, w in share), model, run.optimizer)
        run.optimizer.step()
        run.optimizer_steps += 1
        if run.stop_rule.after_step(run):  # the two-sided rule's checks between epochs' ends
            break
    return {"epoch": epoch, "optimizer_steps": run.optimizer_steps,
            **dist.mean_over_processes(accelerator, sums, micro_batches), "seconds": time.time() - started}


def batch_loss(model, reference, forget: dict, retain: dict | None, cfg: UnlearnConfig):
    """One micro-batch's unlearning loss: the model on the forget (and retain) batch, the frozen
    reference model too where the loss compares against it. Returns (loss, parts for the logs)."""
    from . import losses  # looked up at call time, so the loss can be swapped (tests inject NaN this way)

    def logits(m, batch):
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    forget_term, retain_term = cfg.loss_terms()
    ref_f = ref_r = None
    if reference is not None:
        # Only the sides whose term compares against the reference (IHL + KL needs no reference forget pass).
        forget_side, retain_side = losses.reference_sides(forget_term, retain_term)
        with torch.no_grad():
            ref_f = logits(reference, forget) if forget_side else None
            ref_r = logits(reference, retain) if retain is not None and retain_side else None
    return losses.unlearning_loss(
        forget_term, logits(model, forget), forget["labels"], logits(model, retain) if retain is not None else None,
        retain["labels"] if retain is not None else None, retain_term=retain_term, ref_forget_logits=ref_f,
        ref_retain_logits=ref_r, gamma=cfg.gamma, alpha=cfg.alpha, npo_beta=cfg.npo_beta,
        ihl_margin=cfg.ihl_margin, undial_beta=cfg.undial_beta)


def diverged(run: Run, epoch: int, step: int) -> TrainingDiverged:
    out = run.cfg.out
    kept = (f"the last good state is the checkpoint of epoch {epoch - 1} in {checkpoint_dir(out)}"
            if epoch > 1 and out else "no epoch had finished, so no checkpoint was kept")
    return TrainingDiverged(f"non-finite loss at epoch {epoch}, step {step}; {kept}: lower --lr, "
                            "or use a bounded loss (ihl)")


# --------------------------------------------------------------------------- decide, save


def decide(run: Run, record: dict[str, Any]) -> None:
    """Measure the epoch's state and apply the stop rule (loku.stop; the paper's: forget MA and EL at or
    below the thresholds). Not measuring: the record as trained, and the run goes on."""
    cfg = run.cfg
    started = time.time()
    if run.measuring:
        unwrapped = run.accelerator.unwrap_model(run.model)
        ma_threshold = run.stop_rule.thresholds["ma"]
        record.update(run.on_main(lambda: measure.evaluate_state(unwrapped, run.eval_batches, cfg.el_n,
                                                                 with_el=cfg.el_every_epoch,
                                                                 ma_threshold=ma_threshold, progress=cfg.progress)))
        run.stop_rule.after_epoch(run, record)
    record["seconds"] += time.time() - started
    run.epochs.append(record)
    run.tracking.log_epoch(record, run.optimizer_steps)


def save_epoch(run: Run) -> None:
    """The per-epoch checkpoint (main process), so a killed run resumes to the same result."""
    if not run.cfg.out:
        return
    state = {"config": run.cfg.to_dict(), "base_fingerprint": run.base_fingerprint, "before": run.before,
             "suites_before": run.suites_before, "epochs": run.epochs, "tokens_trained": run.tokens_trained,
             "init": run.init_stats, "init_seconds": run.init_seconds}
    if (stop := run.stop_rule.state()) is not None:
        state["stop"] = stop
    if run.accelerator.is_main_process:
        save_checkpoint(run.cfg.out, state=state, trainable=trainable_state(run.accelerator.unwrap_model(run.model)),
                        residual=run.residual, optimizer=run.optimizer, start=run.start,
                        best=run.stop_rule.best_weights())
    run.accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- finish


def finish(run: Run) -> RunResult:
    """The "after" numbers and the report (everything report.json holds besides config and versions)."""
    cfg, accelerator = run.cfg, run.accelerator
    model = accelerator.unwrap_model(run.model).eval()
    thresholds = run.stop_rule.thresholds
    after = suites_after = None
    if run.measuring:
        after = run.on_main(lambda: measure.evaluate_state(model, run.eval_batches, cfg.el_n, with_el=True,
                                                           progress=cfg.progress))
        suites_after = run.on_main(lambda: measure.run_eval_suites(model, run.tokenizer, cfg, {
            **thresholds, "el_n": cfg.el_n, "source": "run", "note": threshold_source(cfg)}))
    n_total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    eval_tokens = sum(measure.token_count(b) for b in run.eval_batches.values())
    sets = run.sets
    report = {
        "outcome": "not measured" if not run.measuring else "success" if run.succeeded else "failed",
        "epochs_run": len(run.epochs),
        "epochs_to_success": len(run.epochs) if run.succeeded else None,
        "thresholds": {**thresholds, "source": threshold_source(cfg)} if thresholds is not None else None,
        "precision": {"weights": master_dtype(cfg), "compute": cfg.dtype},
        "before": run.before,
        "after": after,
        "suites": {"before": run.suites_before, "after": suites_after} if cfg.eval_suites else None,
        "epochs": run.epochs,
        "targets": run.targets,
        "init": run.init_stats,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "trainable_share": n_trainable / n_total,
        "processes": accelerator.num_processes,
        "flops": measure.estimate_flops(
            n_total, full=cfg.method_spec().full_weights,
            tokens_trained=dist.sum_over_processes(accelerator, run.tokens_trained), fisher_tokens=run.fisher_tokens,
            eval_tokens=eval_tokens, measurements=len(run.epochs) + 2, reference=run.reference is not None),
        "seconds": {"init": run.init_seconds, "total": time.time() - run.started},
        "peak_memory_bytes": measure.peak_memory_bytes(),
        "base_fingerprint": run.base_fingerprint,
        "resumed": run.resumed,
        "data": {name: {"path": s.path, "sha256": s.sha256, "sequences": len(ids), "qa_template": ids.template}
                 for name, s, ids in (("forget", sets.forget, sets.forget_ids), ("retain", sets.retain, sets.retain_ids),
                                      ("validation", sets.validation, sets.validation_ids),
                                      ("stop_on", sets.stop_on, sets.stop_on_ids)) if s is not None},
    }
    if (stop := run.stop_rule.report()) is not None:  # the two-sided rule: bands, checks, the state kept
        report["stop"] = stop
    run.tracking.close()
    return RunResult(model=model, tokenizer=run.tokenizer, report=report, start=run.start)


def failpoint(name: str) -> None:
    """Fault injection for the crash tests: LOKU_FAILPOINT=step:N kills this process (SIGKILL) at the N-th step."""
    spec = os.environ.get("LOKU_FAILPOINT")
    if not spec or not spec.startswith(name + ":"):
        return
    _FAILPOINT_COUNTS[name] = _FAILPOINT_COUNTS.get(name, 0) + 1
    if _FAILPOINT_COUNTS[name] == int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)


_FAILPOINT_COUNTS: dict[str, int] = {}
