"""The one loop of optimizer steps that fine-tuning, planting and the relearning check share (nanoGPT's
single loop in spirit): for each item, the step's learning rate, the loss, backward, optional gradient
clipping, the update. What a caller builds, logs or checks lives in its ``loss_fn`` and ``on_step``.
Unlearning keeps its own loop (loku.trainer): its steps are planned across processes, accumulate
micro-batches and ask the stop rule between them."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

__all__ = ["train_steps"]


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, items: Iterable[Any],
                loss_fn: Callable[[Any], tuple[Tensor, Any]], *, lr_at: Callable[[int], float] | None = None,
                first_step: int = 0, max_grad_norm: float | None = None,
                on_step: Callable[[int, Tensor, Any], None] | None = None) -> int:
    """One optimizer step per item of ``items``; returns the number of steps taken so far.

    ``loss_fn(item) -> (loss, aux)`` runs the model (gradients on even under a caller's ``no_grad``);
    ``lr_at(step)``: the learning rate of step ``step`` (0-based, counted from ``first_step``), else the
    optimizer's own; ``max_grad_norm``: clip the gradients' total norm; ``on_step(steps done, loss, aux)``
    after each update (the gradients are still there: trackers read their norm).
    """
    step = first_step
    for item in items:
        if lr_at is not None:
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss, aux = loss_fn(item)
            loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        step += 1
        if on_step is not None:
            on_step(step, loss, aux)
    return step
