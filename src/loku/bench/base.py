"""What every `loku bench` shares: its configuration files (named or YAML, ``--smoke``, flags laid
over, one unknown-key check per section), the bench folder (claimed for one configuration, the record of
every invocation, results computed once in a :class:`Store`), the machine record, and the command's
common flags and exit code. The benches (tdec, tofu, continual, reveal) are built on it; the process
pool is :mod:`loku.bench.jobs`."""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, ClassVar

import yaml

from ..errors import ConfigError, DataError

__all__ = ["BENCH_RECORD", "Store", "add_common_arguments", "check_known", "claim_folder", "command_line",
           "config_values", "existing_folder", "finish_command", "free_memory", "machine", "open_bench", "printer",
           "read_json", "run_bench_command", "section", "slug"]

NAMED_CONFIGS = ("cpu", "paper")
BENCH_RECORD = "bench.json"
FORMAT = 1


# --------------------------------------------------------------------------- configuration files


def check_known(cls, values: dict, what: str) -> None:
    """Every key of ``values`` is a field of the dataclass ``cls``, else one error naming the closest ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        hint = "; ".join(f"did you mean {g[0]}?" for u in unknown if (g := difflib.get_close_matches(u, known, 1)))
        raise ConfigError(f"{what} {', '.join(unknown)}{f' ({hint})' if hint else ''}; known: "
                          f"{', '.join(sorted(known))}")


def section(cls, values: Any, name: str):
    """The dataclass ``cls`` from a configuration's section ``name`` (None: its defaults)."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of option: value, got {values!r}")
    check_known(cls, values, f"{name}: unknown option(s)")
    return cls(**values)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def existing_folder(root: Path) -> Path:
    """The shared data folder, or one line saying how to point at it."""
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; pass --data-dir pointing at the shared data folder "
                        "(or set LOKU_DATA_DIR)")
    return root


def config_path(name_or_path: str, bench: str = "tdec") -> Path:
    """``cpu`` / ``paper`` -> configs/bench-BENCH-NAME.yaml (in the working directory or loku's source
    checkout); anything else is a YAML path."""
    if name_or_path in NAMED_CONFIGS:
        file = f"bench-{bench}-{name_or_path}.yaml"
        candidates = [Path.cwd() / "configs" / file, Path(__file__).resolve().parents[3] / "configs" / file]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise ConfigError(f"configuration {name_or_path!r} not found ({' or '.join(map(str, candidates))}); run from "
                          "the loku checkout or pass --config PATH_TO_YAML")
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"{path}: bench configuration not found; pass --config cpu, paper or a YAML file")
    return path


def config_values(name_or_path: str | None, bench: str, overrides: dict[str, Any] | None,
                  smoke: dict[str, Any] | None) -> dict[str, Any]:
    """The options of a named or YAML bench configuration, the ``--smoke`` sizes and the flags laid over them."""
    values: dict[str, Any] = {}
    if name_or_path is not None:
        path = config_path(name_or_path, bench)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({' '.join(str(err).split())}); fix the syntax there") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a bench configuration must be a mapping of option: value")
        values.setdefault("name", name_or_path if name_or_path in NAMED_CONFIGS else path.stem)
    if smoke is not None:
        values = _merge(values, smoke)
        values["name"] = f"{values.get('name', 'custom')}-smoke"
    return _merge(values, {k: v for k, v in (overrides or {}).items() if v is not None})


# --------------------------------------------------------------------------- the bench folder


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


class BenchSettings:
    """What every bench configuration (a dataclass with ``name``, ``data_dir`` and ``cache_dir``) shares: where
    its data is, its record as JSON and its identity: the record without the name, the folders and the
    fields a bench folder may grow by (``GROWS``: more methods, splits, variants), which every result in one
    folder must share."""

    GROWS: ClassVar[tuple[str, ...]] = ()

    def data_root(self) -> Path:
        from ..provenance import default_data_dir

        return Path(self.data_dir) if self.data_dir else default_data_dir()

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def identity(self) -> dict[str, Any]:
        values = self.to_dict()
        for name in ("name", "data_dir", "cache_dir", *self.GROWS):
            values.pop(name)
        return values


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable bench record ({err}); delete it (or the bench folder) and run again"
                          ) from None


def _differing(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differing(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def claim_folder(out: Path, cfg, data: dict[str, str]) -> dict[str, Any]:
    """Create the bench folder, or check an existing one was made with this configuration."""
    from ..save import atomic_write_json

    identity = {"format": FORMAT, "config": cfg.identity(), "data": data}
    record_path = out / BENCH_RECORD
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; choose another --out")
    if record_path.is_file():
        record = read_json(record_path)
        if record.get("identity") != identity:
            diff = _differing(record.get("identity"), identity)
            raise ConfigError(f"{out}: this bench folder was made with another configuration (differs in: "
                              f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}); choose another --out, or "
                              "delete the folder to start afresh")
        return record
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{out}: folder exists, is not empty and is not a bench folder (no {BENCH_RECORD}); choose "
                          "another --out")
    record = {"identity": identity, "identity_sha256": _hash(identity), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "name": cfg.name}
    atomic_write_json(record_path, record)
    return record


def slug(name: str) -> str:
    """A folder name for a model: a local folder's own name, a hub id with / as _."""
    if Path(name).expanduser().is_dir():
        name = Path(name).expanduser().resolve().name
    text = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name).strip("/"))
    return text[-80:] or "model"


class Store:
    """A JSON file of named results, each computed once and written atomically when it is.

    Safe for several bench processes on one folder (``--jobs``): a missing key is looked up on disk
    again before it is computed, and written under a lock on the folder with whatever other
    processes stored meanwhile (the first value stored for a key wins)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = read_json(path) if path.is_file() else {}

    def reload(self) -> dict[str, Any]:
        if self.path.is_file():
            self.data = read_json(self.path)
        return self.data

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.data and key not in self.reload():
            from ..provenance import jsonable
            from ..save import atomic_write_json

            value = jsonable(compute())
            with _folder_lock(self.path.parent):
                self.reload().setdefault(key, value)
                atomic_write_json(self.path, self.data)
        return self.data[key]


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock on ``folder`` between processes (a no-op where there is no ``fcntl``)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: one bench process per folder
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def machine() -> dict[str, Any]:
    """What a bench ran on: platform, cores, thread settings and the GPU, if any (recorded with its results)."""
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    return info


def printer(progress: bool) -> Callable[[str], None]:
    """A bench's progress messages, on stderr (nothing with ``progress`` off)."""
    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    return say


def free_memory() -> None:
    """Give back the memory of models dropped by the caller."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


# --------------------------------------------------------------------------- the command


def add_common_arguments(parser, bench: str, cached: str, configs: str) -> None:
    """The flags every `loku bench` shares (--config, --data-dir, --cache-dir, --jobs, --smoke, --report-only,
    ...); ``configs``: the named configurations, for --config's help."""
    parser.add_argument("--config", default="cpu", help=f"{configs} or a YAML file [default: cpu]")
    parser.add_argument("--out", default=None, help=f"bench folder (resumable) [default: runs/bench-{bench}-NAME]")
    parser.add_argument("--model", default=None, help="model instead of the config's")
    parser.add_argument("--seed", type=int, default=None, help="seed of unlearning (and fine-tuning)")
    parser.add_argument("--data-dir", default=None, help="shared data folder [default: $LOKU_DATA_DIR or ../shared/data]")
    parser.add_argument("--cache-dir", default=None, help=f"where {cached} are cached [default: $LOKU_CACHE]")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes side by side, the cores shared out")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and epochs (seconds on a tiny model; CI)")
    parser.add_argument("--report-only", action="store_true", help="only write the results of the finished runs")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress messages")
    from ..devices import add_device_arguments

    add_device_arguments(parser)  # every model the bench loads, plants, unlearns and measures


def finish_command(bench: str, summary: dict, out: str, report_only: bool) -> int:
    """The exit code of a bench command: 0 when nothing is missing (1, or 3 with --report-only, else)."""
    if summary["missing"]:
        print(f"loku bench {bench}: {len(summary['missing'])} result(s) missing in {out}; run again without "
              "--report-only to compute them", file=sys.stderr)
        return 3 if report_only else 1
    print(f"loku bench {bench}: wrote {Path(out) / 'results.md'}")
    return 0


def open_bench(cfg, out, *, progress: bool, command: list[str] | None, jobs: int, report_only: bool,
               **recorded) -> tuple[Path, dict, Callable[[str], None]]:
    """Validate ``cfg``, check its data, claim the folder ``out`` and (unless ``report_only``) add this
    invocation to OUT/invocations.json. Returns (the folder, its bench record, the progress printer)."""
    from ..save import atomic_write_json

    cfg.validate()
    data = cfg.check_data()
    out = Path(out)
    if report_only and not (out / BENCH_RECORD).is_file():
        raise ConfigError(f"{out}: no bench here ({BENCH_RECORD} missing); run the bench first, without --report-only")
    record = claim_folder(out, cfg, data)
    if not report_only:
        history_file = out / "invocations.json"
        history = read_json(history_file) if history_file.is_file() else []
        history.append({"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
                        "jobs": jobs, **recorded})
        atomic_write_json(history_file, history)
    return out, record, printer(progress)


def run_bench_command(args, bench: str, load_config: Callable, run_bench: Callable, **overrides) -> int:
    """A `loku bench BENCH` command: its config (named or YAML, ``--smoke``, the common flags and
    ``overrides`` laid over), run in ``--out`` (default runs/bench-BENCH-NAME), the exit code."""
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    from ..devices import use_device

    use_device(args.device)
    cfg = load_config(args.config, {"model": args.model, "seed": args.seed, "data_dir": args.data_dir,
                                    "cache_dir": args.cache_dir, **overrides}, smoke=args.smoke)
    out = args.out or f"runs/bench-{bench}-{cfg.name}"
    summary = run_bench(cfg, out, progress=args.progress, jobs=args.jobs, command=command_line(),
                        report_only=args.report_only)
    return finish_command(bench, summary, out, args.report_only)


def write_results(out: Path, bench: str, cfg, record: dict[str, Any], *, command: list[str] | None,
                  seconds: float | None, seeds: dict[str, Any], fields: dict[str, Any],
                  plot: Callable[[dict[str, Any]], list[Path]], render: Callable[[dict[str, Any]], str]) -> dict:
    """A bench folder's results.json and results.md: what every bench records (command, machine, library
    versions, config, identity and data hashes, seeds, times, every invocation), the bench's own ``fields``,
    the paths ``plot(summary)`` drew (none where matplotlib is missing) and the verdicts against the §12
    targets; ``render(summary)`` is results.md."""
    from ..provenance import jsonable, library_versions
    from ..save import atomic_write_json, atomic_write_text
    from .verdicts import verdicts

    history = out / "invocations.json"
    summary = {"command": command, "machine": machine(), "versions": library_versions(), "config": cfg.to_dict(),
               "identity_sha256": record.get("identity_sha256"), "data_sha256": record["identity"]["data"],
               "seeds": seeds, "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds, **fields,
               "invocations": read_json(history) if history.is_file() else []}
    try:
        paths = plot(summary)
    except ImportError:  # matplotlib missing: the numbers are all in results.json
        paths = []
    summary["plots"] = [str(Path(p).relative_to(out)) for p in paths]
    summary["verdicts"] = verdicts(bench, summary)
    atomic_write_json(out / "results.json", jsonable(summary))
    atomic_write_text(out / "results.md", render(summary))
    return summary


def header_lines(summary: dict[str, Any], bench: str) -> list[str]:
    """The title, command and machine lines of a bench's results.md."""
    return [f"# loku bench {bench}: {summary['config']['name']}", "",
            f"Command: `{' '.join(summary['command'] or [])}`  ",
            f"Machine: {summary['machine'].get('processor')}, {summary['machine'].get('cpu_count')} CPU(s); "
            + ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if k in ("torch", "transformers", "peft"))]


def command_line() -> list[str]:
    return ["loku", *sys.argv[1:]] if sys.argv and sys.argv[0].endswith("loku") else list(sys.argv)
