"""`loku bench tdec --jobs N`: the bench's runs in N worker processes, the CPU cores shared out.

On a CPU one process with every thread uses the cores badly for a 135M model (small matrices);
N single-minded processes keep them busy. Tasks wait only for what they need, so no two processes
ever compute the same thing:

1. each model's own downstream scores (one task per model), then
2. each split's planting and once-per-split measurements (one task per (model, split)), then
3. as soon as a split's measurements are there, its (model, split, method) runs not finished yet,
   in the order of ``cfg.methods`` (slow methods first there keep the end short).

Every result is the file the serial bench would write (``split.json`` entries are stored under a
lock, first writer wins), so a bench may be continued with any number of jobs. A failed task does
not stop the others; the failures are raised together at the end. Workers are started with
``spawn`` (no fork of a process holding models and threads).
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, LokuError

__all__ = ["BenchTasksFailed", "add_common_arguments", "command_line", "finish_command", "open_bench", "per_worker",
           "run_in_processes", "run_tasks", "threads_per_job", "worker_say"]


class BenchTasksFailed(LokuError):
    """Some bench tasks raised; the others finished (rerun the bench to retry the failed ones)."""


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    return max(1, (cores or os.cpu_count() or 1) // jobs)


def run_in_processes(cfg, out: Path, jobs: int, *, say: Callable[[str], None], progress: bool) -> None:
    """Run the bench's tasks in ``jobs`` worker processes (see the module docstring)."""
    threads = threads_per_job(jobs)
    say(f"loku bench: {jobs} worker processes, {threads} thread(s) each")
    failures: list[str] = []
    with _pool(jobs) as pool:
        def submit(task):
            return pool.submit(_task, cfg, str(out), *task, progress)

        pending = {submit((m, None, None)): (m, None, None) for m in cfg.models}
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                model, split, method = pending.pop(future)
                name = "/".join(str(part) for part in (model, split, method) if part is not None)
                if not _succeeded(future, name, failures):  # what needed this task is not run
                    say(f"loku bench: {failures[-1]}")
                    continue
                if split is None:  # the model's scores are there: plant and measure its splits
                    pending.update({submit((model, s, None)): (model, s, None) for s in cfg.splits})
                elif method is None:  # the split is measured: its runs
                    pending.update({submit((model, split, m)): (model, split, m) for m in cfg.methods})
    if failures:
        raise BenchTasksFailed(f"{len(failures)} bench task(s) failed (finished results are kept; rerun to retry): "
                               + "; ".join(failures))


def _pool(jobs: int) -> concurrent.futures.ProcessPoolExecutor:
    """``jobs`` spawned workers (no fork of a process holding models and threads), one share of the cores each."""
    return concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_start_worker, initargs=(threads_per_job(jobs),
                                                                                       _device_name()))


def _succeeded(future: concurrent.futures.Future, name: str, failures: list[str]) -> bool:
    """Whether the task finished; a task's exception is added to ``failures``, a dead worker stops everything."""
    try:
        future.result()
    except concurrent.futures.BrokenExecutor:  # a worker died (killed, out of memory): stop
        raise
    except Exception as err:  # noqa: BLE001 - reported with the others at the end
        failures.append(f"{name}: {type(err).__name__}: {err}")
        return False
    return True


def run_tasks(function: Callable, tasks: dict[str, tuple], jobs: int, what: str = "task") -> None:
    """``function(*arguments)`` for every ``{name: arguments}`` of ``tasks``, in ``jobs`` spawned worker
    processes. A failed task does not stop the others; the failures are raised together at the end."""
    failures: list[str] = []
    with _pool(jobs) as pool:
        futures = {pool.submit(function, *arguments): name for name, arguments in tasks.items()}
        for future in concurrent.futures.as_completed(futures):
            _succeeded(future, futures[future], failures)
    if failures:
        raise BenchTasksFailed(f"{len(failures)} {what}(s) failed (finished ones are kept; rerun to retry): "
                               + "; ".join(failures))


def add_common_arguments(parser, bench: str, cached: str) -> None:
    """The flags every `loku bench` shares (--data-dir, --cache-dir, --jobs, --smoke, --report-only, ...)."""
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
    from .tdec import BENCH_RECORD, _read_json, _say, claim_folder, machine

    cfg.validate()
    data = cfg.check_data()
    out = Path(out)
    if report_only and not (out / BENCH_RECORD).is_file():
        raise ConfigError(f"{out}: no bench here ({BENCH_RECORD} missing); run the bench first, without --report-only")
    record = claim_folder(out, cfg, data)
    if not report_only:
        history_file = out / "invocations.json"
        history = _read_json(history_file) if history_file.is_file() else []
        history.append({"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
                        "jobs": jobs, **recorded})
        atomic_write_json(history_file, history)
    return out, record, _say(progress)


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


def command_line() -> list[str]:
    return ["loku", *sys.argv[1:]] if sys.argv and sys.argv[0].endswith("loku") else list(sys.argv)


# --------------------------------------------------------------------------- in the worker

_loaded: dict[str, Any] = {}  # this worker's models and its last split's context


def worker_say(progress: bool = True) -> Callable[[str], None]:
    """Progress messages of a worker process, prefixed with its process id."""
    def say(message: str) -> None:
        if progress:
            print(f"[{os.getpid()}] {message}", file=sys.stderr, flush=True)

    return say


_shared: dict[str, Any] = {}  # per_worker's value and its key


def per_worker(key: Any, make: Callable[[], Any]) -> Any:
    """``make()`` once per worker process and ``key`` (the models and measurements its tasks share)."""
    if _shared.get("key") != key:
        _shared.clear()
        _shared.update(key=key, value=make())
    return _shared["value"]


def _device_name() -> str:
    """The bench's --device, handed to the spawned workers (they start without it)."""
    from ..devices import default_placement

    return str(default_placement()[0] or "auto")


def _start_worker(threads: int, device: str = "auto") -> None:
    import torch

    from ..devices import use_device

    torch.set_num_threads(threads)
    use_device(device)


def _task(cfg, out: str, model_name: str, split: str | None, method: str | None, progress: bool) -> None:
    from ..models import load_model
    from . import tdec

    say = worker_say(progress)
    if _loaded.get("model_name") != model_name:
        _loaded.clear()
        original, tokenizer = load_model(model_name, progress=False)
        _loaded.update(model_name=model_name, original=original.eval(), tokenizer=tokenizer)
    original, tokenizer = _loaded["original"], _loaded["tokenizer"]
    folder = Path(out) / tdec.slug(model_name)
    scores = tdec.measure_original(cfg, folder, model_name, original, tokenizer, say)
    if split is None:
        return
    ctx = _loaded.get("split")
    if ctx is None or ctx.split != split:
        _loaded.pop("split", None)
        tdec._free()
        ctx = tdec.prepare_split(cfg, model_name, original, tokenizer, split, folder, scores, say, progress=False)
        _loaded["split"] = ctx
    if method is not None:
        tdec.run_method(ctx, method, say, progress=False)
