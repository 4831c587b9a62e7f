"""`loku bench report FOLDER`: rewrite a bench folder's results.md, and the verdicts in its results.json,
from results.json alone (e.g. a committed results folder after the report gained a section). The numbers
are not recomputed: nothing but the summary is read."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from ..errors import ConfigError
from . import BENCHES
from .verdicts import TARGETS, verdicts

__all__ = ["bench_kind", "rewrite"]


def bench_kind(summary: dict) -> str | None:
    """Which bench wrote a results.json: its command (`loku bench KIND ...`)."""
    command = summary.get("command") or []
    kind = command[2] if len(command) > 2 and command[1] == "bench" else None
    return kind if kind in BENCHES and BENCHES[kind].report else None


def rewrite(folder: Path) -> str:
    """Recompute the verdicts and rewrite results.json / results.md of ``folder``; returns the bench's name."""
    from ..save import atomic_write_json, atomic_write_text

    path = Path(folder) / "results.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; give the folder a `loku bench ...` run wrote its results to")
    summary = json.loads(path.read_text(encoding="utf-8"))
    kind = bench_kind(summary)
    if kind is None:
        raise ConfigError(f"{path}: its command {summary.get('command')!r} is not `loku bench "
                          f"{'|'.join(TARGETS)} ...`; only a bench's results.json can be rewritten")
    summary["verdicts"] = verdicts(kind, summary)
    atomic_write_json(path, summary)
    atomic_write_text(path.with_suffix(".md"), importlib.import_module(BENCHES[kind].report).render_markdown(summary))
    return kind


def add_arguments(parser) -> None:
    parser.add_argument("folders", nargs="+", type=Path, metavar="FOLDER",
                        help="bench output folders (each with a results.json)")


def run(args) -> int:
    for folder in args.folders:
        kind = rewrite(folder)
        print(f"{folder}: results.md of bench {kind} rewritten")
    return 0
