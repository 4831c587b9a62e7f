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
from pathlib import Path
from typing import Any, Callable

from ..errors import LokuError

__all__ = ["BenchTasksFailed", "run_in_processes", "threads_per_job"]


class BenchTasksFailed(LokuError):
    """Some bench tasks raised; the others finished (rerun the bench to retry the failed ones)."""


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    return max(1, (cores or os.cpu_count() or 1) // jobs)


def run_in_processes(cfg, out: Path, jobs: int, *, say: Callable[[str], None], progress: bool) -> None:
    """Run the bench's tasks in ``jobs`` worker processes (see the module docstring)."""
    threads = threads_per_job(jobs)
    say(f"loku bench: {jobs} worker processes, {threads} thread(s) each")
    failures: list[str] = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker,
                                                initargs=(threads,)) as pool:
        def submit(task):
            return pool.submit(_task, cfg, str(out), *task, progress)

        pending = {submit((m, None, None)): (m, None, None) for m in cfg.models}
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                model, split, method = pending.pop(future)
                try:
                    future.result()
                except concurrent.futures.BrokenExecutor:  # a worker died (killed, out of memory): stop
                    raise
                except Exception as err:  # noqa: BLE001 - reported below; what needed this task is not run
                    name = "/".join(str(part) for part in (model, split, method) if part is not None)
                    failures.append(f"{name}: {type(err).__name__}: {err}")
                    say(f"loku bench: {name} failed: {err}")
                    continue
                if split is None:  # the model's scores are there: plant and measure its splits
                    pending.update({submit((model, s, None)): (model, s, None) for s in cfg.splits})
                elif method is None:  # the split is measured: its runs
                    pending.update({submit((model, split, m)): (model, split, m) for m in cfg.methods})
    if failures:
        raise BenchTasksFailed(f"{len(failures)} bench task(s) failed (finished results are kept; rerun to retry): "
                               + "; ".join(failures))


# --------------------------------------------------------------------------- in the worker

_loaded: dict[str, Any] = {}  # this worker's models and its last split's context


def _start_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _task(cfg, out: str, model_name: str, split: str | None, method: str | None, progress: bool) -> None:
    from ..models import load_model
    from . import tdec

    def say(message: str) -> None:
        if progress:
            print(f"[{os.getpid()}] {message}", file=sys.stderr, flush=True)

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
