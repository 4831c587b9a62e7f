"""What a result needs beside its numbers to be reproduced and audited: seeds, library versions,
data hashes, the base model's fingerprint, JSON-safe values, the shared data folder. One copy of
each, used by every writer."""
from __future__ import annotations

import hashlib
import math
import os
import platform
import random
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

LIBRARIES = ("loku", "torch", "transformers", "peft", "accelerate", "safetensors", "numpy", "scipy", "rouge-score",
             "lm-eval", "datasets")


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) from one number."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def library_versions() -> dict[str, str | None]:
    """Python, the platform and the version of every library a result depends on (None: not installed)."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of the file's bytes, so reports pin exactly which data was used."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def jsonable(value: Any) -> Any:
    """Tensors and NumPy values -> numbers/lists, NaN/inf -> None, paths -> str: ``json.dumps(allow_nan=False)`` works."""
    if isinstance(value, torch.Tensor):
        return jsonable(value.item() if value.dim() == 0 else value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def default_data_dir() -> Path:
    """The shared data folder: $LOKU_DATA_DIR, else ../shared/data beside the working directory."""
    env = os.environ.get("LOKU_DATA_DIR")
    return Path(env) if env else Path.cwd().parent / "shared" / "data"


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


# ----------------------------------------------------------------------------- the base model

FINGERPRINT_VERSION = "loku-fp2"
# Canonical roundings the weights are hashed in. Loading one checkpoint in float32, bfloat16 or float16
# gives weights whose rounding to one of these agrees (see model_fingerprint), unlike their raw bytes.
_CANONICAL = (("bf16", torch.bfloat16), ("fp16", torch.float16))


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def model_fingerprint(model: torch.nn.Module) -> str:
    """Identify the exact base a run started from, whatever dtype it was loaded in.

    Returns ``"loku-fp2:<loaded dtypes>:bf16=<sha256>:fp16=<sha256>"``: sha256 over parameter names,
    shapes and the weights rounded to bfloat16, and the same rounded to float16 (integer/bool buffers
    hashed as they are). The loaded dtypes are recorded for error messages only.

    Why two roundings: a float32 load rounded to bf16 equals a bf16 load of the same checkpoint (the
    same single rounding), and likewise for fp16; but fp16 -> bf16 is a double rounding that differs
    from fp32 -> bf16 in about 1 element in 16, so no single canonical dtype serves all three loads.
    Two fingerprints match (:func:`fingerprints_match`) when one canonical hash agrees. Changing any
    weight by more than one bf16 step (0.8 % relative) changes both hashes, and smaller changes to
    many weights almost surely push some across a rounding boundary, so another base, or a
    fine-tuned copy of the same one, is still refused. Not matched: bf16 vs fp16 loads of a float32
    checkpoint (each rounding loses what the other keeps); a bf16 or fp16 checkpoint matches in
    every pair. Cost: one pass over the weights, hashing 4 bytes per parameter.
    """
    hashers = {key: hashlib.sha256() for key, _ in _CANONICAL}
    loaded: set[str] = set()
    for name, tensor in sorted(model.state_dict().items()):
        header = f"{name}\0{tuple(tensor.shape)}\0".encode()
        if tensor.is_floating_point():
            loaded.add(str(tensor.dtype).removeprefix("torch."))
            for key, dtype in _CANONICAL:
                hashers[key].update(header)
                hashers[key].update(_tensor_bytes(tensor.detach().to(dtype)))
        else:
            raw = _tensor_bytes(tensor)
            for h in hashers.values():
                h.update(header)
                h.update(raw)
    parts = [FINGERPRINT_VERSION, "+".join(sorted(loaded)) or "none"]
    parts += [f"{key}={h.hexdigest()}" for key, h in hashers.items()]
    return ":".join(parts)


def _legacy_fingerprint(model: torch.nn.Module) -> str:
    """The loku-fp1 fingerprint (raw bytes: only equal for the same dtype); read for older adapters."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def parse_fingerprint(fingerprint: str) -> dict[str, str]:
    """``{"loaded": dtypes, "bf16": hash, "fp16": hash}``; ``{"legacy": hash}`` for a loku-fp1 one."""
    parts = str(fingerprint).split(":")
    if parts[0] != FINGERPRINT_VERSION:
        return {"legacy": str(fingerprint)}
    out = {"loaded": parts[1] if len(parts) > 1 else ""}
    for part in parts[2:]:
        key, _, value = part.partition("=")
        out[key] = value
    return out


def fingerprints_match(expected: str, model: torch.nn.Module) -> bool:
    """Is ``model`` the base that ``expected`` (a :func:`model_fingerprint`) was taken from?"""
    want = parse_fingerprint(expected)
    if "legacy" in want:
        return _legacy_fingerprint(model) == want["legacy"]
    have = parse_fingerprint(model_fingerprint(model))
    return any(want.get(key) and want.get(key) == have.get(key) for key, _ in _CANONICAL)


def fingerprint_dtypes(fingerprint: str) -> str | None:
    """The dtype(s) the model was loaded in when ``fingerprint`` was taken (None for a loku-fp1 one)."""
    return parse_fingerprint(fingerprint).get("loaded") or None
