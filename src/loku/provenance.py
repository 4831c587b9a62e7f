"""What a result needs beside its numbers to be reproduced and audited: seeds, library versions,
data hashes, JSON-safe values, the shared data folder. One copy of each, used by every writer."""
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
