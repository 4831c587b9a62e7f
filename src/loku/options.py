"""One declaration per option: a dataclass field carries its default, help text and valid range.

Options are declared TRL-style, ``name: type = field(default=..., metadata={"help": ...})``; the
command-line flags (:func:`add_arguments`) and the type and range checks (:func:`check_fields`) are
built from those fields, so a new option is one field. Metadata keys, all optional but ``help``:

``help``      the flag's help text
``range``     valid values of a number: ``">= 1"``, ``"> 0"``, ``"[0, 1]"``, ``"[0, 1)"``, ...
``choices``   the allowed values
``flag``      the flag when it is not ``--field-name`` (``"--no-progress"`` for a bool that is on
              at the command line unless the flag is given)
``metavar``, ``required``, ``action`` (``"append"``)   passed on to argparse
``cli``       False: not a command-line option (set by code)
``suite_option``  (in :class:`loku.config.UnlearnConfig`) the :class:`loku.eval_options.EvalOptions`
              field this ``eval_*`` option passes on to the evaluation suites
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any

from .errors import ConfigError

__all__ = ["add_arguments", "check_fields", "cli_fields", "flag_of", "values_from"]

_RANGE = re.compile(r"^\s*(?:(?P<op>>=|>|<=|<)\s*(?P<bound>\S+)|(?P<lo_br>[\[(])\s*(?P<lo>[^,]+),\s*(?P<hi>[^\])]+)"
                    r"(?P<hi_br>[\])]))\s*$")


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag that sets field ``f`` (named in every message about it)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _kinds(hint: Any) -> set[Any]:
    """The non-None member types of a hint (``int | None`` -> {int}); generics by their origin."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return {k for arg in typing.get_args(hint) if arg is not type(None) for k in _kinds(arg)}
    return {origin or hint}


def cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _int_or_float(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _cli_type(kinds: set[Any]):
    if kinds <= {int, float} and len(kinds) == 2:
        return _int_or_float
    if kinds == {int}:
        return int
    if kinds == {float}:
        return float
    return str


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, defaults: bool = True,
                  exclude: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """Add one flag per command-line field of dataclass ``cls``; ``dest`` is the field name.

    ``defaults=False`` leaves every default None, so a flag that was not given can be told apart
    (``loku unlearn`` lays the given flags over a YAML config); the field default is then applied
    when the dataclass is built. A bool field is ``--name`` (on when given); one that defaults to
    True is ``--no-name``; ``flag="--no-..."`` makes a False-by-default field on at the command line.
    """
    hints = _hints(cls)
    for f in cli_fields(cls):
        if f.name in exclude:
            continue
        meta = f.metadata
        flag, default = flag_of(f), _default(f)
        text = meta.get("help", "")
        kinds = _kinds(hints[f.name])
        if kinds == {bool}:
            if flag.startswith("--no-") or default:
                if not flag.startswith("--no-"):
                    flag = "--no-" + flag[2:]
                parser.add_argument(flag, dest=f.name, action="store_false", default=True if defaults else None,
                                    help=text)
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", default=False if defaults else None,
                                    help=text)
            continue
        if "default" not in text and not meta.get("required") and default is not None:
            text = f"{text} [default: {default}]".strip()
        # Choices are checked by check_fields (one line naming the flag), not by argparse; shown as the metavar.
        choices = meta.get("choices")
        metavar = meta.get("metavar") or ("{" + ",".join(map(str, choices)) + "}" if choices
                                          else flag[2:].upper().replace("-", "_"))
        kwargs: dict[str, Any] = {"dest": f.name, "type": _cli_type(kinds), "help": text, "metavar": metavar}
        if meta.get("action") == "append":
            kwargs.update(action="append", default=None)
        else:
            kwargs["default"] = default if defaults else None
        if meta.get("required"):
            kwargs["required"] = True
        parser.add_argument(flag, **kwargs)
    return parser


def values_from(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The command-line fields of ``cls`` found in ``namespace`` that are not None."""
    return {f.name: getattr(namespace, f.name) for f in cli_fields(cls)
            if getattr(namespace, f.name, None) is not None}


def _bound(text: str) -> float:
    return float(text)


def _in_range(value: float, spec: str) -> bool:
    m = _RANGE.match(spec)
    if m is None:
        raise ValueError(f"bad range {spec!r}")
    if m["op"]:
        bound = _bound(m["bound"])
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[m["op"]]
    lo, hi = _bound(m["lo"]), _bound(m["hi"])
    return ((value >= lo) if m["lo_br"] == "[" else (value > lo)) and ((value <= hi) if m["hi_br"] == "]"
                                                                      else (value < hi))


def _describe(spec: str) -> str:
    return f"lie in {spec.strip()}" if spec.strip()[0] in "[(" else f"be {spec.strip()}"


def check_fields(obj: Any) -> None:
    """Type, range and choices of every field of dataclass instance ``obj`` that declares them.

    Numbers must be finite and of the declared kind (an integer where the field is an ``int``);
    None passes where the field allows it. Raises :class:`ConfigError` naming the flag and the
    valid values.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kinds = _kinds(hints[f.name])
        flag = flag_of(f)
        if value is None:
            if f.metadata.get("required"):
                raise ConfigError(f"{flag} is required; pass {flag} {f.metadata.get('metavar') or 'VALUE'}")
            continue
        if kinds == {bool}:
            if not isinstance(value, bool):
                raise ConfigError(f"{flag} must be true or false, got {value!r}")
            continue
        numeric = kinds & {int, float}
        if numeric and kinds <= {int, float}:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                kind = "an integer" if numeric == {int} else "a number"
                raise ConfigError(f"{flag} must be {kind}, got {value!r}")
            if numeric == {int} and not isinstance(value, int):
                raise ConfigError(f"{flag} must be an integer, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{flag} must be a finite number, got {value!r}")
            spec = f.metadata.get("range")
            if spec and not _in_range(value, spec):
                raise ConfigError(f"{flag} must {_describe(spec)}, got {value!r}")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")


def coerce_numbers(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """YAML reads ``1e-5`` (no dot) as a string: turn such strings into the number a float field wants."""
    hints = _hints(cls)
    out = dict(values)
    for name, value in values.items():
        if name in hints and isinstance(value, str) and float in _kinds(hints[name]):
            try:
                out[name] = float(value)
            except ValueError:
                pass  # check_fields names the flag and what it must be
    return out
