"""Errors loku raises for problems the user can fix. Messages name the file (and line) and what to do."""
from __future__ import annotations


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
