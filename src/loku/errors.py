"""Errors loku raises for problems the user can fix. Messages name the file (and line) and what to do."""
from __future__ import annotations

import errno
from typing import Any

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class LokuError(Exception):
    """Base class: a problem with the user's input or setup, reported in one clear line."""


class DataError(LokuError, ValueError):
    """A forget/retain/validation/eval file that cannot be used as given."""


class ConfigError(LokuError, ValueError):
    """An option or combination of options that cannot work (unknown method, rank too large, ...)."""


class ModelError(LokuError, ValueError):
    """A model that cannot be loaded or adapted (missing folder, custom code, no matching target)."""


class TrainingDiverged(LokuError, RuntimeError):
    """NaN/inf appeared in a loss or the Fisher; the last good state is kept."""


class DiskFull(LokuError, OSError):
    """No space left while writing an output; the half-written temporary folder has been removed."""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def describe_error(err: BaseException, args: Any = None) -> tuple[int, str]:
    """(exit code, one line naming the problem and what to do) for an error that reached the CLI.

    2: the input or the setup (a loku error, a file or disk problem); 130: interrupted; 1: anything
    else (a library failure), with a hint and ``--debug`` for the traceback.
    """
    out = getattr(args, "resume", None) or getattr(args, "out", None)
    if isinstance(err, KeyboardInterrupt):
        again = (f"; run again, or continue from the last finished epoch with `loku unlearn --resume {out}`"
                 if getattr(args, "command", None) == "unlearn" and out else "; run again")
        return EXIT_INTERRUPTED, f"interrupted; no half-written output was kept{again}"
    if isinstance(err, LokuError):
        return 2, f"error: {_one_line(err)}"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return 1, ("error: out of memory; lower --batch-size (and --fisher-batch-size / --eval-batch-size), pass "
                   "--max-length, or use --dtype bfloat16 or a smaller model")
    if isinstance(err, OSError):
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        what = err.strerror or _one_line(err)
        if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            hint = "free space (or choose a folder on another disk) and run again"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = "check the permissions of that path (or choose another one) and run again"
        else:
            hint = "check that path and run again"
        return 2, f"error: {where}{what}; {hint}"
    name = type(err).__name__
    if isinstance(err, RuntimeError):
        hint = ("a library failed (often a model or dtype this combination does not support); try --dtype float32 "
                "or another model, and run again with --debug to see the traceback (report it if it persists)")
    else:
        hint = "this is a bug in loku or a library: run again with --debug to see the traceback and report it"
    return 1, f"error: {name}: {_one_line(err)[:500]}; {hint}"
