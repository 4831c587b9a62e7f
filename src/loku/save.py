"""Writing results so a crash never leaves something that looks complete: temp name, then rename.

The adapter folder of a run (LoRA weights plus residual base weights) is written and read by
:mod:`loku.adapters`.
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

from .errors import ConfigError, DiskFull
from .provenance import jsonable


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
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=jsonable) + "\n")


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
