"""Per-epoch checkpoints so a killed run resumes to exactly the result of an uninterrupted one.

A checkpoint folder (``OUT.ckpt``) is replaced whole after each epoch (temp name, then rename):
the trainable tensors, the residual base weights and the adapter's start (A0, B0) as safetensors, the optimizer state (read back
with ``torch.load(weights_only=True)``, never unpickling code), RNG states and the run's records.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import ConfigError, ModelError
from .save import atomic_dir, atomic_file, atomic_write_json

STATE = "state.json"
TRAINABLE = "trainable.safetensors"
RESIDUAL = "residual.safetensors"
START = "start.safetensors"  # FILA/VILA's (A0, B0): the saved adapter is s(BA - B0A0) on the original base
OPTIMIZER = "optimizer.pt"
RNG = "rng.safetensors"
BEST = "best.safetensors"  # the stop rule's chosen state so far, where it keeps one (loku.stop)

# Options that may differ between the killed run and its resumption without changing the result.
RESUME_MAY_CHANGE = {"max_epochs", "progress", "overwrite", "out", "resume", "report_to", "logging_dir",
                     "gradient_checkpointing"}  # the same result, tested


def checkpoint_dir(out: str | Path) -> Path:
    """The checkpoint folder of output ``out`` (``OUT.ckpt`` beside it); only this module knows the layout."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def discard(out: str | Path) -> None:
    """Remove the checkpoint of output ``out`` (the complete output supersedes it); nothing if there is none."""
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)


@dataclass
class Checkpoint:
    state: dict[str, Any]  # epoch, epoch records, before, thresholds, counters, config, fingerprint
    trainable: dict[str, torch.Tensor]
    residual: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] = field(default_factory=dict)
    start: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    start_saved: bool = True  # False: a checkpoint of an earlier loku, which kept only the residual


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    state["python"] = torch.tensor(list(json.dumps(random.getstate()).encode()), dtype=torch.uint8)
    np_state = np.random.get_state()
    state["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_pos"] = torch.tensor([np_state[2]], dtype=torch.int64)
    return state


def _restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"][0]), 0, 0.0))


def save_start(path: Path, start: dict[str, tuple[Tensor, Tensor]] | None) -> None:
    """An adapter's start (A0, B0) per layer (an empty file: a start that stays in the adapter), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{kind}/{name}": t.detach().contiguous().cpu() for name, pair in (start or {}).items()
               for kind, t in zip(("a0", "b0"), pair)}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"moved_out_of_base": str(start is not None)})


def load_start(path: Path) -> dict[str, tuple[Tensor, Tensor]] | None:
    with safe_open(str(path), framework="pt") as handle:
        if handle.metadata()["moved_out_of_base"] != "True":
            return None
    tensors = load_file(str(path))
    names = {key.split("/", 1)[1] for key in tensors}
    return {name: (tensors[f"a0/{name}"], tensors[f"b0/{name}"]) for name in names}


def save_checkpoint(out: str | Path, *, state: dict[str, Any], trainable: dict[str, torch.Tensor],
                    residual: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    start: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                    best: dict[str, torch.Tensor] | None = None) -> Path:
    folder = checkpoint_dir(out)
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / TRAINABLE))
        if residual and (folder / RESIDUAL).is_file():
            os.link(folder / RESIDUAL, tmp / RESIDUAL)  # fixed for the whole run: written once, linked after
        elif residual:
            save_file({k: v.detach().cpu().contiguous() for k, v in residual.items()}, str(tmp / RESIDUAL))
        if (folder / START).is_file():
            os.link(folder / START, tmp / START)  # fixed for the whole run too
        else:
            save_start(tmp / START, start)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        save_file(_rng_state(), str(tmp / RNG))
        if best:
            save_file({k: v.detach().cpu().contiguous() for k, v in best.items()}, str(tmp / BEST))
        atomic_write_json(tmp / STATE, state)
    return folder


def read_state(out: str | Path) -> dict[str, Any]:
    """The records of the checkpoint of the run writing to ``out`` (its config among them)."""
    state_file = checkpoint_dir(out) / STATE
    if not state_file.is_file():
        raise ConfigError(f"{state_file}: no checkpoint to resume from; run without --resume to start afresh")
    return json.loads(state_file.read_text())


def load_checkpoint(out: str | Path, config: dict[str, Any], base_fingerprint: str,
                    defaults: dict[str, Any] | None = None) -> Checkpoint:
    """Read the checkpoint of the run writing to ``out``; refuse one made with other settings or another base.
    ``defaults``: every option's default (an option newer than the checkpoint had its default then)."""
    folder = checkpoint_dir(out)
    state = read_state(out)
    saved = {**(defaults or {}), **state["config"]}
    changed = sorted(k for k in config if k not in RESUME_MAY_CHANGE and saved.get(k) != config[k])
    if changed:
        raise ConfigError(f"{folder}: the checkpoint was made with other settings ({', '.join(changed)}); "
                          f"resume with the original options")
    if state["base_fingerprint"] != base_fingerprint:
        raise ModelError(f"{folder}: the checkpoint was made on a different base model; resume with the same --model")
    residual = load_file(str(folder / RESIDUAL)) if (folder / RESIDUAL).is_file() else {}
    optimizer = torch.load(folder / OPTIMIZER, weights_only=True, map_location="cpu")
    best = load_file(str(folder / BEST)) if (folder / BEST).is_file() else {}
    saved = (folder / START).is_file()
    return Checkpoint(state, load_file(str(folder / TRAINABLE)), residual, optimizer, load_file(str(folder / RNG)),
                      best=best, start=load_start(folder / START) if saved else None, start_saved=saved)


def restore_rng(checkpoint: Checkpoint) -> None:
    _restore_rng(checkpoint.rng)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint keeps: every parameter that trains."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def restore_weights(model, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
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
