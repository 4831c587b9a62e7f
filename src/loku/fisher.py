"""Empirical Fisher information of chosen weights (ALGORITHMS.md §2) and the relative Fisher.

F_W(D) = (1/|D|) sum_x (dL(x)/dW)^2, accumulated in float32 whatever the model's dtype.

* ``per_sample`` (the paper, default): one gradient per sequence of its mean token NLL.
* ``batch`` (the official code): the gradient of each mini-batch's mean token NLL, squared,
  times the batch's token count, summed, divided by the total token count.

Under ``torch.distributed`` each process passes its own share of the batches; the sums and counts
are all-reduced, so every process ends with the Fisher of the whole data set.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import TrainingDiverged
from .losses import IGNORE_INDEX, mean_nll

FISHER_MODES = ("per_sample", "batch")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return mean_nll(logits, batch["labels"])


def _rows(batch: dict[str, Tensor]) -> Iterable[dict[str, Tensor]]:
    """Each sequence of a right-padded batch on its own, padding cut off."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    for i, length in enumerate(lengths):
        yield {k: v[i : i + 1, : int(length)] for k, v in batch.items()}


def _all_reduce(tensors: list[Tensor]) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in tensors:
            torch.distributed.all_reduce(t)


def gradient_moments(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    params: dict[str, nn.Parameter],
    *,
    mode: str = "per_sample",
    first_moment: bool = False,
    progress: bool = False,
    desc: str = "Fisher",
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, Tensor]:
    """Weighted sums of squared (and, if asked, plain) gradients, and the sum of weights.

    ``per_sample``: one gradient per sequence, weight 1. ``batch``: one gradient of each batch's
    mean token NLL, weighted by its token count. Float32 sums, all-reduced across processes.
    The parameters need not be trainable: they require gradients for the pass only, and
    gradients never touch ``.grad``.
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"fisher mode must be one of {FISHER_MODES}, got {mode!r}")
    names, tensors = list(params), list(params.values())
    second = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in tensors]
    first = [torch.zeros_like(s) for s in second] if first_moment else None
    weight_sum = torch.zeros((), dtype=torch.float64, device=_device(model))
    flags = [p.requires_grad for p in tensors]
    modes = {m: m.training for m in model.modules()}  # a PEFT wrapper's flag can differ from its model's
    model.eval()  # no dropout: the Fisher of the deterministic model
    try:
        for p in tensors:
            p.requires_grad_(True)
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            batch = {k: v.to(_device(model)) for k, v in batch.items()}
            if mode == "per_sample":
                units = [(row, 1.0) for row in _rows(batch)]
            else:
                units = [(batch, float((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))]
            for unit, weight in units:
                grads = torch.autograd.grad(_forward_loss(model, unit), tensors, allow_unused=True)
                for i, g in enumerate(grads):
                    if g is not None:
                        second[i].add_(g.float().square(), alpha=weight)
                        if first is not None:
                            first[i].add_(g.float(), alpha=weight)
                weight_sum += weight
    finally:
        for p, flag in zip(tensors, flags):
            p.requires_grad_(flag)
        for module, mode in modes.items():
            module.training = mode
    _all_reduce([*second, *(first or []), weight_sum])
    as_dict = lambda values: dict(zip(names, values))  # noqa: E731
    return as_dict(second), (as_dict(first) if first is not None else None), weight_sum


def empirical_fisher(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    params: dict[str, nn.Parameter],
    *,
    mode: str = "per_sample",
    progress: bool = False,
    desc: str = "Fisher",
) -> dict[str, Tensor]:
    """Float32 empirical Fisher E[g^2] of every parameter in ``params`` on ``batches`` (§2)."""
    second, _, weight = gradient_moments(model, batches, params, mode=mode, progress=progress, desc=desc)
    return _checked({n: s / weight.clamp(min=1).float() for n, s in second.items()}, desc)


def variance_fisher(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    params: dict[str, nn.Parameter],
    *,
    progress: bool = False,
    desc: str = "Fisher",
) -> dict[str, Tensor]:
    """VILA's variance-corrected Fisher max(E[g^2] - E[g]^2, 0) over token-weighted batches (§4)."""
    second, first, weight = gradient_moments(model, batches, params, mode="batch", first_moment=True,
                                             progress=progress, desc=desc)
    w = weight.clamp(min=1).float()
    return _checked({n: (second[n] / w - (first[n] / w).square()).clamp(min=0) for n in second}, desc)


def _checked(fisher: dict[str, Tensor], desc: str) -> dict[str, Tensor]:
    for name, value in fisher.items():
        if not torch.isfinite(value).all():
            raise TrainingDiverged(f"the Fisher of {name} ({desc}) is not finite: the data produced NaN/inf "
                                   f"gradients; check that set for extreme sequences, or load the model with "
                                   f"--dtype float32")
    return fisher


def relative_fisher(forget: Tensor, retain: Tensor, eps: float = 1e-5) -> tuple[Tensor, float]:
    """F_f / (F_r + eps), and the share of entries where eps dominates (F_r < eps).

    A large share means the ratio is mostly "F_f times 1/eps": with small models and mean
    losses the retain Fisher can sit below eps almost everywhere (§2).
    """
    ratio = forget.float() / (retain.float() + eps)
    return ratio, float((retain < eps).float().mean())
