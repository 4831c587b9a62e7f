"""Several processes, one result: how a run's micro-batches become optimizer steps on each process,
and how numbers computed once reach every process. With one process these are the identity."""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch

from .errors import ConfigError


def make_accelerator(device: str | None = "auto"):
    """accelerate's Accelerator on ``--device`` (loku.devices.resolve_device); a multi-process launch without
    CUDA runs on CPU processes (gloo). Under a launcher each process takes the GPU accelerate gives it
    (LOCAL_RANK), so only auto or cpu can be asked for there."""
    from accelerate import Accelerator

    from .devices import check_distributed, resolve_device

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    wanted = resolve_device(device)
    if launched and (device or "auto") not in ("auto", "cpu"):
        raise ConfigError(f"--device {device}: under accelerate launch / torchrun each process uses the GPU of its "
                          "LOCAL_RANK; leave --device auto (or cpu)")
    if wanted.type == "cuda" and wanted.index is not None:
        torch.cuda.set_device(wanted)  # accelerate's one-process device is "cuda": the current one
    accelerator = Accelerator(cpu=wanted.type == "cpu" or (launched and not torch.cuda.is_available()))
    if not launched and accelerator.device.type != wanted.type:  # accelerate's state is one per process
        raise ConfigError(f"--device {device}: accelerate already runs this process on {accelerator.device}; "
                          "run each device in its own process")
    check_distributed(accelerator)
    return accelerator


def step_group_size(one_step_per_epoch: bool, grad_accum: int, n_micro_batches: int, world: int) -> int:
    """Micro-batches per optimizer step of the whole job: the whole epoch (Jang et al.), or accumulation x processes."""
    return n_micro_batches if one_step_per_epoch else grad_accum * world


def plan_steps(pairs: list, group_size: int, world: int, rank: int) -> list[list[tuple[Any, float]]]:
    """One epoch's micro-batches as optimizer steps, and this process's share of each step.

    Every ``group_size`` consecutive micro-batches make one optimizer step of the whole job (the
    last group may be shorter). They are dealt round-robin to the ``world`` processes with weight
    ``world / len(group)``: DDP averages gradients over processes, so the step's gradient is the
    mean over the group's micro-batches, exactly the single-process gradient, short last group
    included. A process left without a micro-batch takes a copy of the group's first with weight
    0: every process makes the same number of backward passes, so DDP's all-reduce never waits
    for a process that has run out of batches.
    """
    steps = []
    for start in range(0, len(pairs), group_size):
        group = pairs[start : start + group_size]
        mine = group[rank::world]
        padding = math.ceil(len(group) / world) - len(mine)
        steps.append([(pair, world / len(group)) for pair in mine] + [(group[0], 0.0)] * padding)
    return steps


def shard(items: list, accelerator) -> list:
    """This process's share of a list of batches (passes whose sums are all-reduced afterwards, e.g. Fisher)."""
    return items[accelerator.process_index :: accelerator.num_processes]


def main_then_broadcast(accelerator, fn: Callable[[], Any]) -> Any:
    """Compute on the main process only and hand the result to every process (metrics, thresholds)."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box = [fn() if accelerator.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def mean_over_processes(accelerator, sums: dict[str, float], count: int) -> dict[str, float]:
    """``sums[k] / count`` with sums and counts added over every process."""
    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, "sum")
    return {k: float(totals[i] / max(float(totals[-1]), 1.0)) for i, k in enumerate(keys)}


def sum_over_processes(accelerator, value: int) -> int:
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), "sum"))
