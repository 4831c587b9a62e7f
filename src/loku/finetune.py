"""`loku finetune`: fine-tune a causal LM on question/answer (or plain text) data, loss on the answers.

What TOFU's benchmark needs before anything can be unlearned (docs/algorithms.md §7): a model that
learned the fictitious authors (the target) and one that learned all but the forget authors (the
reference, ``--exclude`` the forget split). Question/answer, prompt/completion and ``messages`` items are
formatted with ``--template`` as TOFU evaluation formats them (:func:`loku.chat.choose_template`: the
tokenizer's chat template by default; ``--template tofu`` for TOFU's strings, ChatML for SmolLM2), so
training and scoring see the same tokens; the prompt tokens are masked, the answer (the assistant turn) is
trained. Plain texts train on every token.

The recipe is TOFU's (``finetune.py`` of locuslab/tofu): AdamW, weight decay 0.01, a linear warm-up
over the first epoch then linear decay to 0, 5 epochs; TOFU's lr 1e-5 is for 7B-class models, small
models need more (the bench picks and records its own). One token-weighted NLL per optimizer step,
in float32. A checkpoint after every epoch (OUT.ckpt) makes a killed run resumable
(``--resume``) to the same weights as an uninterrupted one; the output folder (a plain model
folder, safetensors, plus ``finetune.json`` with the config, data hashes, per-epoch loss, versions
and seed) is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import data as data_mod
from .errors import ConfigError

__all__ = ["FinetuneConfig", "FinetuneResult", "add_arguments", "finetune", "lr_factor", "run", "training_set",
           "write_finetuned"]


@dataclass
class FinetuneConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "built-in name, model folder or hub id"})
    data: list[str] = field(default_factory=list, metadata={
        "action": "append", "help": "training data (repeatable): JSONL with question/answer (TOFU) or text, CSV, text"})
    exclude: list[str] = field(default_factory=list, metadata={
        "action": "append", "help": "leave out every item that is also in this file (repeatable): the TOFU "
                                    "reference model is --data full.jsonl --exclude forget10.jsonl"})
    out: str = field(default="runs/finetune", metadata={"help": "output model folder"})
    epochs: int = field(default=5, metadata={"help": "passes over the data (TOFU: 5)"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate (TOFU's 1e-5 is for 7B models; "
                                                      "SmolLM2-135M learns TOFU at 1e-4)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (TOFU: 0.01)"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up length in epochs, then linear "
                                                                "decay to 0 (TOFU: 1)"})
    batch_size: int = field(default=8, metadata={"help": "items per optimizer step"})
    max_length: int = field(default=512, metadata={"help": "tokens per item; longer items are an error"})
    template: str | None = field(default=None, metadata={
        "help": "how question/answer and messages items become tokens: chat (the tokenizer's chat template), tofu "
                "(TOFU's strings), none (as given), or a TOFU template name (chatml, llama2, phi, generic) "
                "[default: chat when the tokenizer has a chat template, else tofu]"})
    seed: int = field(default=0, metadata={"help": "seed of the data order"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the model's own code (off: safe)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out"})
    report_to: list[str] = field(default_factory=list, metadata={
        "action": "append", "help": "log each step's loss, lr and grad norm and each epoch's loss to tensorboard, "
                                    "wandb or trackio (comma-separated or repeated; default none)"})
    logging_dir: str | None = field(default=None, metadata={"help": "--report-to: folder of the logs "
                                                                    "(default: OUT/runs)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, mps or auto (a CUDA GPU when there "
                                                          "is one); weights stay float32, a GPU computes in bf16"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each layer's activations in the backward pass (less memory, more time)"})

    def validate(self) -> "FinetuneConfig":
        if not self.data:
            raise ConfigError("no training data: pass --data FILE (repeat it for several files)")
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError("--lr must be > 0, --weight-decay and --warmup-epochs >= 0")
        from .chat import check_template
        from .tracking import check_tracking

        check_template(self.template)
        check_tracking(self)
        from .devices import resolve_device

        resolve_device(self.device)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` (from 1/warmup), then linear decay to 0 at ``total_steps``:
    the multiplier of the peak learning rate for optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def training_set(cfg: FinetuneConfig) -> tuple[data_mod.TextSet, dict[str, Any]]:
    """Every --data item not in an --exclude file, as one set; and what was read (paths, hashes, counts)."""
    sets = [data_mod.load_text_set(path, "training data") for path in cfg.data]
    excluded = [data_mod.load_text_set(path, "excluded data") for path in cfg.exclude]
    drop = {data_mod._normalise(t) for s in excluded for t in s.texts}
    texts, qa, left_out = [], [], 0
    for s in sets:
        for i, text in enumerate(s.texts):
            if data_mod._normalise(text) in drop:
                left_out += 1
                continue
            texts.append(text)
            qa.append(s.qa[i] if s.qa is not None else None)
    if excluded and left_out == 0:
        raise ConfigError(f"--exclude {', '.join(cfg.exclude)}: none of its items is in --data; check the files")
    if not texts:
        raise ConfigError("every training item is excluded; nothing to train on")
    record = {"data": [{"path": s.path, "sha256": s.sha256, "items": len(s.texts)} for s in sets],
              "exclude": [{"path": s.path, "sha256": s.sha256, "items": len(s.texts)} for s in excluded],
              "items": len(texts), "left_out": left_out}
    combined = data_mod.TextSet(path=cfg.data[0] if len(cfg.data) == 1 else "+".join(cfg.data), role="training data",
                                texts=texts, sha256=hashlib.sha256(json.dumps([texts, qa], ensure_ascii=False).encode()).hexdigest(),
                                qa=qa if any(q is not None for q in qa) else None)
    return combined, record


@dataclass
class FinetuneResult:
    model: Any
    tokenizer: Any
    report: dict[str, Any]


def finetune(cfg: FinetuneConfig, *, model=None, tokenizer=None, resume: bool = False) -> FinetuneResult:
    """Fine-tune a copy of ``cfg.model`` (or of ``model``; the input is never modified) as the module says."""
    import copy

    from .checkpoint import discard as discard_checkpoint
    from .checkpoint import load_checkpoint, restore_rng, save_checkpoint, trainable_state
    from .devices import default_dtype, enable_gradient_checkpointing, resolve_device
    from .lm import IGNORE_INDEX, ensure_pad_token, progress_bar, token_nll
    from .models import load_model
    from .provenance import library_versions, model_fingerprint
    from .save import check_output_dir
    from .optim import train_steps
    from .tracking import open_tracking

    cfg.validate()
    text_set, record = training_set(cfg)
    if not resume:
        check_output_dir(cfg.out, cfg.overwrite)
        discard_checkpoint(cfg.out)
    if model is None:
        model, tokenizer = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, progress=cfg.progress)
    else:
        model = copy.deepcopy(model)
    fingerprint = model_fingerprint(model)
    tokenized = data_mod.tokenize_set(tokenizer, text_set, max_length=cfg.max_length, model=model,
                                      template=cfg.template)
    pad = ensure_pad_token(tokenizer)
    device = resolve_device(cfg.device)
    model.float().to(device).train()
    model.requires_grad_(True)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # float32 master weights (Adam's small steps), bf16 compute on a GPU that has it (loku.devices.default_dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=default_dtype(device) == "bfloat16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(tokenized) / cfg.batch_size)
    total, warmup = steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch)
    identity = {k: v for k, v in cfg.to_dict().items()
                if k not in ("progress", "overwrite", "out", "report_to", "logging_dir")}
    identity["data_sha256"] = text_set.sha256
    epochs: list[dict[str, Any]] = []
    start_epoch, step = 1, 0
    if resume:
        ckpt = load_checkpoint(cfg.out, identity, fingerprint)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in ckpt.trainable.items():
                params[name].copy_(value)
        optimizer.load_state_dict(ckpt.optimizer)
        restore_rng(ckpt)
        epochs, step = ckpt.state["epochs"], ckpt.state["step"]
        start_epoch = len(epochs) + 1
    started = time.time()
    tracked = open_tracking(cfg.report_to, cfg.logging_dir, cfg.out, cfg.to_dict(),
                            resume_step=step + 1 if resume else None)
    for epoch in range(start_epoch, cfg.epochs + 1):
        batches = data_mod.make_batches(tokenized, cfg.batch_size, pad, shuffle=True, seed=cfg.seed * 1000 + epoch)
        total_nll, total_tokens, t0 = 0.0, 0, time.time()

        def loss_of(batch):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll = token_nll(logits, batch["labels"])
            tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss = nll.sum() / max(tokens, 1)
            if not torch.isfinite(loss):
                raise ConfigError(f"non-finite loss at epoch {epoch}, step {step + 1}: lower --lr")
            return loss, (float(nll.detach().double().sum()), tokens)

        def logged(done: int, loss, sums) -> None:
            nonlocal step, total_nll, total_tokens
            step = done
            tracked.log_step(done, {"loss": float(loss.detach())}, 1, model, optimizer)
            total_nll, total_tokens = total_nll + sums[0], total_tokens + sums[1]

        shown = progress_bar(batches, total=len(batches), desc=f"fine-tuning epoch {epoch}/{cfg.epochs}",
                             enabled=cfg.progress)
        train_steps(model, optimizer, shown, loss_of, lr_at=lambda k: cfg.lr * lr_factor(k, warmup, total),
                    first_step=step, on_step=logged)
        epochs.append({"epoch": epoch, "loss": total_nll / max(total_tokens, 1), "steps": step,
                       "seconds": time.time() - t0})
        tracked.log_epoch(epochs[-1], step)
        save_checkpoint(cfg.out, state={"config": identity, "base_fingerprint": fingerprint, "epochs": epochs,
                                        "step": step}, trainable=trainable_state(model), residual={},
                        optimizer=optimizer)
        _failpoint("epoch")
    tracked.close()
    model.eval()
    report = {"config": cfg.to_dict(), "base_fingerprint": fingerprint, **record,
              "template": tokenized.template, "steps": step, "warmup_steps": warmup, "epochs": epochs,
              "seconds": time.time() - started, "versions": library_versions(), "resumed": resume}
    return FinetuneResult(model, tokenizer, report)


def _failpoint(name: str) -> None:
    """Where tests kill a run (monkeypatched); nothing in normal use."""


def write_finetuned(result: FinetuneResult, cfg: FinetuneConfig) -> Path:
    """The fine-tuned model folder (safetensors, tokenizer, finetune.json), atomically; the checkpoint goes."""
    from .checkpoint import discard as discard_checkpoint
    from .save import atomic_dir, atomic_write_json
    from .tracking import move_into_output

    out = Path(cfg.out)
    with atomic_dir(out) as tmp:
        result.model.save_pretrained(tmp)
        result.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "finetune.json", result.report)
    discard_checkpoint(out)
    move_into_output(cfg, out)
    return out


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .options import add_arguments as add_dataclass_arguments

    add_dataclass_arguments(parser, FinetuneConfig)
    parser.add_argument("--resume", action="store_true", help="continue the killed run writing to --out from its "
                                                               "last epoch (OUT.ckpt), with the same options")
    return parser


def run(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg = FinetuneConfig(**values)
    result = finetune(cfg, resume=args.resume)
    out = write_finetuned(result, cfg)
    last = result.report["epochs"][-1]
    print(f"loku: fine-tuned {result.report['items']} items for {cfg.epochs} epochs (last epoch's loss "
          f"{last['loss']:.4f}); model in {out}", file=sys.stdout)
    return 0

