"""How a sequence's next request relates to the earlier ones (docs/algorithms.md §8), a registry with the
trait ``keeps_adapters``: ``merge`` folds every request into the weights, ``stack`` keeps one adapter per
request, ``orthogonal`` keeps them and adds the O-LoRA penalty between the new adapter's A and the earlier
ones'. A strategy returns the new request's extra loss term (or None). No feature module is imported here,
so the options can be checked against it (:meth:`loku.config.UnlearnConfig.validate`) without the sequence
machinery (:mod:`loku.requests`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from .errors import ConfigError
from .registry import Registry

if TYPE_CHECKING:
    from .config import UnlearnConfig
    from .requests import Delta

__all__ = ["STRATEGIES", "Strategy", "orthogonal_penalty"]


def orthogonal_penalty(earlier: Tensor, current: Tensor) -> Tensor:
    """sum_i ||A_i A_k^T||_F^2 with the earlier A_i stacked as rows of ``earlier`` [sum r_i, in] (§8, O-LoRA).

    Stacking the A_i is exact: ||[A_1; A_2] A_k^T||_F^2 = ||A_1 A_k^T||_F^2 + ||A_2 A_k^T||_F^2.
    Gradient with respect to A_k: 2 A_k E^T E (E = ``earlier``, a constant).
    """
    return (earlier.to(current.dtype) @ current.T).pow(2).sum()


# strategy(earlier deltas, the new request's LoRA layers by name, its config) -> the extra loss term or None
Strategy = Callable[[list["Delta"], dict[str, Any], "UnlearnConfig"], Callable[[Any], Tensor] | None]
STRATEGIES: Registry[Strategy] = Registry("strategy")


def check_strategy_options(cfg: "UnlearnConfig") -> None:
    """--strategy is registered, and a gate (--gate-fpr) has adapters of its own to switch."""
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES.names())}, got {cfg.strategy!r}")
    if cfg.gate_fpr is not None and not STRATEGIES.trait(cfg.strategy, "keeps_adapters"):
        raise ConfigError(f"--gate-fpr switches each request's own adapter, which --strategy {cfg.strategy} "
                          "folds into the weights: use --strategy stack or orthogonal")


@STRATEGIES.register("merge", keeps_adapters=False)
def _merge(earlier: list["Delta"], layers: dict[str, Any], cfg: "UnlearnConfig") -> None:
    return None


@STRATEGIES.register("stack", keeps_adapters=True)
def _stack(earlier: list["Delta"], layers: dict[str, Any], cfg: "UnlearnConfig") -> None:
    return None


@STRATEGIES.register("orthogonal", keeps_adapters=True)
def _orthogonal(earlier: list["Delta"], layers: dict[str, Any], cfg: "UnlearnConfig") -> Callable[[Any], Tensor] | None:
    from .initializers import ADAPTER

    pairs = []
    for name, layer in layers.items():
        reads = [d.reads[name] for d in earlier if name in d.reads]
        if reads:
            weight = layer.lora_A[ADAPTER].weight
            pairs.append((torch.cat(reads).to(weight.device, torch.float32), weight))
    if not pairs or cfg.orthogonal_lambda == 0:
        return None
    lam = cfg.orthogonal_lambda

    def penalty(model) -> Tensor:  # the layers' A's are the model's own parameters: the model is not needed
        return lam * sum(orthogonal_penalty(e, a.float()) for e, a in pairs)

    return penalty
