"""A run's adapter folder: the PEFT adapter, the residual base weights, and which base it belongs to.

An unlearned FILA model is W_res + s*B@A. Re-attaching the adapter to the ORIGINAL base would
give W + s*B@A (a known bug of the public code, docs/algorithms.md §3), so the adapter folder always
carries the residual base weights it needs and :func:`attach_saved_adapter` puts them in place
first. The base is identified by :func:`loku.provenance.model_fingerprint`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import ModelError
from .provenance import fingerprint_dtypes, fingerprints_match
from .save import atomic_write_json

ADAPTER_META = "loku_adapter.json"
RESIDUAL_FILE = "residual_base.safetensors"


def save_adapter(model, folder: Path, *, residual: dict[str, torch.Tensor] | None, meta: dict[str, Any]) -> None:
    """PEFT adapter files, plus the residual base weights (FILA/VILA) and what base they belong to."""
    model.save_pretrained(folder, safe_serialization=True)
    if residual:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in residual.items()}, str(folder / RESIDUAL_FILE))
    atomic_write_json(folder / ADAPTER_META, {**meta, "residual_base": RESIDUAL_FILE if residual else None})


def attach_saved_adapter(model: torch.nn.Module, adapter_dir: str | os.PathLike):
    """Rebuild an unlearned model from its ORIGINAL base plus a loku adapter folder.

    Returns a PeftModel whose base holds W_res where FILA/VILA replaced weights, so the result is
    exactly the unlearned model. Refuses a base that differs from the one the adapter was made on.
    """
    from peft import PeftModel

    folder = Path(adapter_dir)
    if (folder / "adapter" / ADAPTER_META).is_file():
        folder = folder / "adapter"
    meta_path = folder / ADAPTER_META
    if not meta_path.is_file():
        raise ModelError(f"{folder}: not a loku adapter folder (no {ADAPTER_META}); pass OUT/adapter of a loku run")
    meta = json.loads(meta_path.read_text())
    expected = meta.get("base_fingerprint")
    if expected and not fingerprints_match(expected, model):
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
    if meta.get("residual_base"):
        residual = load_file(str(folder / meta["residual_base"]))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in residual.items():
                if name not in params:
                    raise ModelError(f"{folder}: residual weight {name} does not exist in the base model")
                params[name].copy_(value.to(params[name].dtype))
    return PeftModel.from_pretrained(model, str(folder), is_trainable=False)


def _float_dtypes(model: torch.nn.Module) -> str:
    names = {str(t.dtype).removeprefix("torch.") for t in model.state_dict().values() if t.is_floating_point()}
    return "+".join(sorted(names)) or "none"
