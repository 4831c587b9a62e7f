"""A run's adapter folder: a standard PEFT LoRA on the ORIGINAL base, plus which base it belongs to.

An unlearned FILA/VILA model is W_res + s*B@A with W_res = W - s*B0@A0 (§3). On the original base
weights W that is the LoRA delta s(B A - B0 A0) = B' A' with A' = [A; A0] and B' = s[B, -B0]
(rank 2r, scaling folded in), so the adapter folder holds exactly that: plain
``PeftModel.from_pretrained(base, OUT/adapter)`` (vLLM, TGI, ...) and ``merge_and_unload()`` give the
unlearned model, and no full-size weight is stored. A plain LoRA start (B0 = 0) stays rank r.

Folders of earlier loku versions kept the replaced weights W_res in ``residual_base.safetensors`` and
the rank-r adapter, right only on W_res: :func:`attach_saved_adapter` still loads them (with a
warning), and :func:`loku.convert.convert_adapter` (``loku convert-adapter OLD NEW``) rewrites them in the
standard layout. The base is identified by :func:`loku.provenance.model_fingerprint`.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import ModelError
from .provenance import fingerprint_dtypes, fingerprints_match
from .save import atomic_write_json

ADAPTER_META = "loku_adapter.json"
RESIDUAL_FILE = "residual_base.safetensors"  # the layout of earlier loku versions (read, never written)
WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's names: how every PEFT loader finds the factors
LAYOUT = "standard-lora-on-original-base"
CONVERT_HINT = "loku convert-adapter {old} NEW"  # what to run on a folder of the old layout

# --------------------------------------------------------------------------- the math (pure)


def request_delta_factors(a: Tensor, b: Tensor, scaling: float, a0: Tensor | None = None,
                          b0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(A' [r', in], B' [out, r']) with B' A' = s (B A - B0 A0): an adapter's change as one LoRA of scaling 1.

    Without a start that was moved out of the base (a0/b0 None: the Gaussian start, B0 = 0) the
    factors are A and s B, rank r; with FILA's, [A; A0] and s [B, -B0], rank 2r.
    """
    if a0 is None or b0 is None:
        return a.detach().float().clone(), scaling * b.detach().float()
    return torch.cat([a, a0]).detach().float(), scaling * torch.cat([b, -b0], dim=1).detach().float()


def factor_moved_start(moved: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor]:
    """(A0 [r, in], B0 [out, r]) with s B0 A0 = ``moved`` [out, in] (= W - W_res), by its rank-r SVD.

    For folders and checkpoints that kept W_res but not the start's factors: W - W_res is s B0 A0
    up to the rounding of W_res, which the rank-r truncation drops.
    """
    from .initializers import truncated_svd

    u, s, vh = truncated_svd(moved.float(), rank)
    root = s.sqrt()
    return root[:, None] * vh, (u * root) / scaling


# --------------------------------------------------------------------------- writing


def lora_config(a: dict[str, Tensor], *, fan_in_fan_out: bool, base_model: str | None):
    """PEFT's config for factors of scaling 1: lora_alpha = r (no rsLoRA), per-layer ranks in rank_pattern."""
    from peft import LoraConfig

    ranks = {name: int(t.shape[0]) for name, t in a.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT matches pattern keys as regexes against the module name: escape the dots of a full name.
    other = {re.escape(name): r for name, r in ranks.items() if r != rank}
    return LoraConfig(r=rank, lora_alpha=rank, use_rslora=False, lora_dropout=0.0, target_modules=sorted(a),
                      rank_pattern=other, alpha_pattern=dict(other), fan_in_fan_out=fan_in_fan_out, bias="none",
                      base_model_name_or_path=base_model, inference_mode=True)


def save_adapter(folder: Path, a: dict[str, Tensor], b: dict[str, Tensor], *, fan_in_fan_out: bool,
                 meta: dict[str, Any]) -> None:
    """A standard PEFT LoRA folder from per-layer factors of scaling 1 (B @ A is the layer's change on the
    original base), plus loku's record of the base it belongs to. ``folder`` is written in place
    (callers write into a temporary folder renamed when complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    lora_config(a, fan_in_fan_out=fan_in_fan_out, base_model=meta.get("base_model")).save_pretrained(str(folder))
    tensors = {}
    for name in sorted(a):
        tensors[f"base_model.model.{name}.lora_A.weight"] = a[name].detach().float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b[name].detach().float().cpu().contiguous()
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    atomic_write_json(folder / ADAPTER_META, {**meta, "layout": LAYOUT, "residual_base": None})


# --------------------------------------------------------------------------- reading


def adapter_folder(adapter_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The loku adapter folder (``OUT/adapter`` or ``OUT``) and its record."""
    folder = Path(adapter_dir)
    if (folder / "adapter" / ADAPTER_META).is_file():
        folder = folder / "adapter"
    meta_path = folder / ADAPTER_META
    if not meta_path.is_file():
        raise ModelError(f"{folder}: not a loku adapter folder (no {ADAPTER_META}); pass OUT/adapter of a loku run")
    return folder, json.loads(meta_path.read_text())


def is_old_layout(meta: dict[str, Any]) -> bool:
    return bool(meta.get("residual_base"))


def old_layout_message(folder: Path) -> str:
    return (f"{folder}: adapter in the old layout (the replaced base weights in {RESIDUAL_FILE}), which only loku "
            f"loads correctly: PEFT, vLLM or TGI would silently build another model from it; convert it with "
            f"`{CONVERT_HINT.format(old=folder)}`")


def check_base(folder: Path, meta: dict[str, Any], model: torch.nn.Module) -> None:
    """Refuse a base that differs from the one the adapter was made on, saying which dtype to load if that is all."""
    expected = meta.get("base_fingerprint")
    if not expected or fingerprints_match(expected, model):
        return
    made_in = fingerprint_dtypes(expected)
    loaded_in = _float_dtypes(model)
    hint = ""
    if made_in and made_in != loaded_in and "float32" not in (made_in, loaded_in):
        # bf16 and fp16 roundings of a float32 checkpoint cannot be compared exactly (provenance.model_fingerprint).
        hint = (f"; if it is that model, it was loaded in {loaded_in} but the adapter was made on a "
                f"{made_in} load, and these cannot be matched for a float32 checkpoint: load it with "
                f"--dtype {made_in} or float32")
    raise ModelError(
        f"{folder}: this adapter was made on a different base model ({meta.get('base_model')}); "
        f"load that exact model with --model{hint}"
    )


def _residual(folder: Path, meta: dict[str, Any], model: torch.nn.Module) -> dict[str, Tensor]:
    residual = load_file(str(folder / meta["residual_base"]))
    params = dict(model.named_parameters())
    for name in residual:
        if name not in params:
            raise ModelError(f"{folder}: residual weight {name} does not exist in the base model")
    return residual


def attach_saved_adapter(model: torch.nn.Module, adapter_dir: str | os.PathLike):
    """Rebuild an unlearned model from its ORIGINAL base plus a loku adapter folder (a PeftModel).

    Refuses a base that differs from the one the adapter was made on. A folder of the old layout
    gets its residual base weights put in place first (and a warning naming ``loku convert-adapter``).
    """
    from peft import PeftModel

    folder, meta = adapter_folder(adapter_dir)
    check_base(folder, meta, model)
    if is_old_layout(meta):
        warnings.warn(old_layout_message(folder), stacklevel=2)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in _residual(folder, meta, model).items():
                params[name].copy_(value.to(params[name].dtype))
    return PeftModel.from_pretrained(model, str(folder), is_trainable=False)


def _float_dtypes(model: torch.nn.Module) -> str:
    names = {str(t.dtype).removeprefix("torch.") for t in model.state_dict().values() if t.is_floating_point()}
    return "+".join(sorted(names)) or "none"


# --------------------------------------------------------------------------- converting the old layout


def standard_factors(layers: dict[str, Any], start: dict[str, tuple[Tensor, Tensor]] | None
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor], bool]:
    """Per-layer factors of scaling 1 on the original base, (A', B', fan_in_fan_out), of LoRA ``layers``
    (loku.initializers.lora_layers) whose start ``start`` was moved out of the base (None: it was not)."""
    from .initializers import ADAPTER

    a_table, b_table, fan_in_fan_out = {}, {}, False
    for name, layer in layers.items():
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        a0, b0 = (t.to(a.device) for t in start[name]) if start is not None and name in start else (None, None)
        a_table[name], b_table[name] = (t.cpu() for t in request_delta_factors(a, b, layer.scaling[ADAPTER], a0, b0))
        fan_in_fan_out = bool(layer.fan_in_fan_out)
    return a_table, b_table, fan_in_fan_out


def start_from_residual(layers: dict[str, Any], residual: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """(A0, B0) of every layer whose base weight ``residual`` replaced (keys ``NAME.weight``), from the
    layers' CURRENT base weights, which must be the original W: s B0 A0 = W - W_res."""
    from .initializers import ADAPTER

    start = {}
    for name, layer in layers.items():
        if f"{name}.weight" not in residual:
            continue
        w = layer.get_base_layer().weight.detach().float()
        moved = w - residual[f"{name}.weight"].to(w.device).float()
        moved = moved.T if layer.fan_in_fan_out else moved  # GPT-2's Conv1D stores [in, out]
        start[name] = factor_moved_start(moved, layer.r[ADAPTER], layer.scaling[ADAPTER])
    return start
