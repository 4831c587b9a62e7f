"""``loku convert-adapter OLD NEW``: an adapter folder of an earlier loku (LoRA on the residual base W_res,
plus ``residual_base.safetensors``) rewritten as a standard LoRA on the original base (loku.adapters, §3)."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from .adapters import (ADAPTER_META, RESIDUAL_FILE, _residual, adapter_folder, check_base, is_old_layout,
                       save_adapter, standard_factors, start_from_residual)
from .errors import ConfigError, ModelError
from .initializers import ADAPTER, lora_layers
from .models import load_model
from .save import atomic_dir, check_output_dir


def convert_adapter(old: str | os.PathLike, new: str | os.PathLike, *, model: str | None = None,
                    overwrite: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    """Rewrite an old-layout loku adapter folder (LoRA + ``residual_base.safetensors``) as a standard LoRA on
    the original base, written atomically to ``new``. ``model``: the base (default: the one the folder names).
    Returns what was done, with the largest difference between the old and the new layer weights."""
    from peft import PeftModel

    folder, meta = adapter_folder(old)
    if not is_old_layout(meta):
        raise ConfigError(f"{folder}: already a standard LoRA on the original base (no {RESIDUAL_FILE}); "
                          "PEFT loads it as it is, nothing to convert")
    if not (folder / meta["residual_base"]).is_file():
        raise ModelError(f"{folder / meta['residual_base']}: missing; copy the adapter folder whole and convert again")
    new_path = check_output_dir(new, overwrite)
    if new_path.resolve() == folder.resolve():
        raise ConfigError(f"{new_path}: the converted adapter must go to another folder than the old one")
    base_name = model or meta.get("base_model")
    if not base_name:
        raise ConfigError(f"{folder / ADAPTER_META}: names no base model; pass it with --model")
    base, _ = load_model(base_name, dtype="float32", trust_remote_code=trust_remote_code, progress=False)
    check_base(folder, meta, base)
    residual = _residual(folder, meta, base)
    peft_model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)  # on the ORIGINAL weights
    layers = lora_layers(peft_model)
    a, b, fan_in_fan_out = standard_factors(layers, start_from_residual(layers, residual))
    error = _conversion_error(layers, residual, a, b)
    with atomic_dir(new_path) as tmp:
        save_adapter(tmp, a, b, fan_in_fan_out=fan_in_fan_out,
                     meta={**{k: v for k, v in meta.items() if k not in ("residual_base", "layout")},
                           "base_model": meta.get("base_model") or base_name, "converted_from": str(folder)})
        card = folder / "README.md"
        if card.is_file():  # the run's card, if the old folder had one
            (tmp / "README.md").write_bytes(card.read_bytes())
    return {"old": str(folder), "new": str(new_path), "base_model": base_name,
            "rank": max(int(t.shape[0]) for t in a.values()), "max_weight_difference": error}


@torch.no_grad()
def _conversion_error(layers: dict[str, Any], residual: dict[str, Tensor], a: dict[str, Tensor],
                      b: dict[str, Tensor]) -> float:
    """max |(W + B'A') - (W_res + s B A)| over every layer: the old model against the converted one."""
    worst = 0.0
    for name, layer in layers.items():
        w = layer.get_base_layer().weight.detach().float().cpu()
        w = w.T if layer.fan_in_fan_out else w
        w_res = residual.get(f"{name}.weight")
        w_res = w if w_res is None else (w_res.float().T if layer.fan_in_fan_out else w_res.float())
        old = w_res + layer.scaling[ADAPTER] * (layer.lora_B[ADAPTER].weight.float().cpu()
                                                @ layer.lora_A[ADAPTER].weight.float().cpu())
        worst = max(worst, float((w + b[name] @ a[name] - old).abs().max()))
    return worst
