"""What a request leaves (docs/algorithms.md §8): its change Delta W = s (B A - B0 A0) per target layer, the
models built from a list of them (folded into the weights, or stacked as one frozen adapter each), the
overlap of the input subspaces the adapters read, and the delta's file. Pure tensor code and safetensors."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import ConfigError, ModelError


def subspace_overlap(a_i: Tensor, a_k: Tensor) -> float:
    """||A_i A_k^T||_F / (||A_i||_F ||A_k||_F), in [0, 1]: 0 when the adapters read orthogonal input subspaces."""
    a_i, a_k = a_i.double(), a_k.double()
    scale = float(torch.linalg.norm(a_i) * torch.linalg.norm(a_k))
    return float(torch.linalg.norm(a_i @ a_k.T)) / scale if scale > 0 else 0.0


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


def _lora_layers(model) -> dict[str, Any]:
    from ..initializers import lora_layers

    return lora_layers(getattr(model, "module", model))  # DDP wraps the model in .module


def extract_delta(name: str, forget: str, model, start: dict[str, tuple[Tensor, Tensor]] | None) -> Delta:
    """The request's change Delta W = s (B A - B0 A0) of every LoRA layer of the trained ``model``."""
    from ..adapters import standard_factors
    from ..initializers import ADAPTER

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
