"""Optional dependencies (pyproject's extras): importing one that is missing names the extra to install."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import LokuError


class MissingExtra(LokuError, ImportError):
    """An optional package is not installed. An ImportError too, so code that can do without it still can."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``module`` imported, or one :class:`MissingExtra` line: what needs it and the pip command that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(f"{purpose} needs the {module.split('.')[0]} package, which is not installed: "
                           f"pip install 'loku[{extra}]'") from err
