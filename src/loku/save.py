"""Writing results so a crash never leaves something that looks complete: temp name, then rename.

An unlearned FILA model is W_res + s*B@A. Re-attaching the adapter to the ORIGINAL base would
give W + s*B@A (a known bug of the public code, ALGORITHMS.md §3), so the adapter folder always
carries the residual base weights it needs and `attach_saved_adapter` puts them in place first.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError, DiskFull, ModelError

ADAPTER_META = "loku_adapter.json"
RESIDUAL_FILE = "residual_base.safetensors"


def _usual_permissions(path: str | Path, mode: int) -> None:
    """mkstemp/mkdtemp create private entries; a finished output gets the permissions the umask gives."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block succeeds it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _usual_permissions(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing non-empty output folder unless overwriting was asked for (checked before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: output folder exists and is not empty; choose another --out or pass --overwrite")
    return out


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, disk_full_hint: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    A full disk (or quota) becomes :class:`DiskFull`, one line naming ``final`` and the file, with
    ``disk_full_hint`` (default: free space and run again) as what to do.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        _usual_permissions(tmp, 0o777)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            name = Path(exc.filename).name if exc.filename else "it"
            hint = disk_full_hint or "free space (or choose a folder on another disk) and run again"
            raise DiskFull(f"{final}: disk full while writing {name} ({exc.strerror}), nothing half-written "
                           f"was kept; {hint}") from None
        raise


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with every adapter folded into its base weights."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model


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

    from .models import fingerprint_dtypes, fingerprints_match

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
            # bf16 and fp16 roundings of a float32 checkpoint cannot be compared exactly (models.model_fingerprint).
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
