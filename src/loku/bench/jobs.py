"""The process pool every `loku bench` runs its tasks in (``--jobs N``): N spawned worker processes, the
CPU cores shared out (on a CPU one process with every thread uses the cores badly for a 135M model: small
matrices; N single-minded processes keep them busy). A failed task does not stop the others; the
failures are raised together at the end. Workers are started with ``spawn`` (no fork of a process holding
models and threads). Which tasks a bench runs, and in what order, is the bench's own
(:func:`loku.bench.tdec.run_in_processes`, the others' :func:`run_tasks`).
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
from typing import Any, Callable

from ..errors import LokuError

__all__ = ["BenchTasksFailed", "per_worker", "pool", "run_tasks", "succeeded", "threads_per_job", "worker_say"]


class BenchTasksFailed(LokuError):
    """Some bench tasks raised; the others finished (rerun the bench to retry the failed ones)."""


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    return max(1, (cores or os.cpu_count() or 1) // jobs)


def pool(jobs: int) -> concurrent.futures.ProcessPoolExecutor:
    """``jobs`` spawned workers (no fork of a process holding models and threads), one share of the cores each."""
    return concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_start_worker, initargs=(threads_per_job(jobs),
                                                                                       _device_name()))


def succeeded(future: concurrent.futures.Future, name: str, failures: list[str]) -> bool:
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
    with pool(jobs) as workers:
        futures = {workers.submit(function, *arguments): name for name, arguments in tasks.items()}
        for future in concurrent.futures.as_completed(futures):
            succeeded(future, futures[future], failures)
    if failures:
        raise BenchTasksFailed(f"{len(failures)} {what}(s) failed (finished ones are kept; rerun to retry): "
                               + "; ".join(failures))


# --------------------------------------------------------------------------- in the worker

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
