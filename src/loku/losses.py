"""Unlearning losses (docs/algorithms.md §1, §12). Every function returns a scalar to MINIMISE.

A method's loss is a forget term (registry ``FORGET_TERMS``) weighted by gamma plus a retain term
(registry ``RETAIN_TERMS``, or "none") weighted by alpha; which terms a method uses is its
:class:`loku.methods.MethodSpec`. A new term is one registered function. All math runs in float32,
whatever dtype the model computes in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError
from .lm import IGNORE_INDEX, shift, token_nll  # the token arithmetic every loss builds on
from .methods import NO_RETAIN
from .registry import Registry


def mean_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean token NLL over the unmasked tokens of the batch (the usual causal-LM loss)."""
    _, shifted = shift(logits, labels)
    return token_nll(logits, labels).sum() / (shifted != IGNORE_INDEX).sum().clamp(min=1)


def sequence_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """log pi(x) per sequence [B]: the sum of token log-probabilities over unmasked tokens."""
    return -token_nll(logits, labels).sum(dim=1)


def inverted_hinge_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """IHL = mean over unmasked tokens of max(0, 1 + p(x_t) - max_{v != x_t} p(v)) (§1).

    ``logits`` [B, T, V] unshifted, ``labels`` [B, T] with -100 masked. Only the top-2 of the
    probabilities is taken to find the runner-up, never an [N, V-1] copy.
    """
    p_true, p_runner_up, n = _label_and_runner_up(logits, labels)
    hinge = torch.clamp(1.0 + p_true - p_runner_up, min=0.0)  # always in [0, 2]; kept as the paper writes it
    return hinge.sum() / max(n, 1)


def _label_and_runner_up(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, int]:
    """(p(x_t), max_{v != x_t} p(v)) per unmasked token, float32, and the unmasked token count."""
    logits, labels = shift(logits, labels)
    keep = labels != IGNORE_INDEX
    probs = torch.softmax(logits[keep].float(), dim=-1)  # [N, V], N = unmasked tokens only
    target = labels[keep]
    p_true = probs.gather(1, target[:, None]).squeeze(1)
    top_p, top_i = probs.topk(2, dim=-1)
    return p_true, torch.where(top_i[:, 0] == target, top_p[:, 1], top_p[:, 0]), int(keep.sum())


def margin_hinge_loss(logits: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Bounded IHL: mean over unmasked tokens of max(0, p(x_t) - max_{v != x_t} p(v) + m) (§12).

    Zero, with zero gradient, once the memorized token trails the runner-up by ``margin``: unlike
    IHL (which is 0 only when the runner-up has probability 1) nothing pushes a forgotten token
    further down or rewards one confident replacement. On the tokens still within the margin its
    gradient is IHL's (the constant differs, not the slope)."""
    p_true, p_runner_up, n = _label_and_runner_up(logits, labels)
    return torch.clamp(p_true - p_runner_up + margin, min=0.0).sum() / max(n, 1)


def undial_loss(logits: Tensor, ref_logits: Tensor, labels: Tensor, beta: float) -> Tensor:
    """UNDIAL (Dong et al. 2025): mean over unmasked tokens of CE(q, p_theta) with the fixed target
    q = softmax(z_0 - beta * onehot(x_t)), z_0 the frozen logits of the model before unlearning (§12).

    The target is the model's own distribution with the memorized token's logit lowered by beta and
    every other token's odds kept, so the optimum (p_theta = q) is finite; gradient w.r.t. the
    logits: (p_theta - q) / N."""
    logits, labels = shift(logits, labels)
    ref_logits, _ = shift(ref_logits, labels)
    keep = labels != IGNORE_INDEX
    target = labels[keep]
    adjusted = ref_logits[keep].detach().float().scatter_add(
        1, target[:, None], torch.full((target.numel(), 1), -float(beta), device=target.device))
    q = torch.softmax(adjusted, dim=-1)
    log_p = torch.log_softmax(logits[keep].float(), dim=-1)
    return -(q * log_p).sum() / max(int(keep.sum()), 1)


def uniform_kl_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """ME (Yuan et al., ICLR 2025): mean over the forget text's unmasked tokens of KL(U || p_theta)
    = -log V - (1/V) sum_v log p(v) (§12). Its optimum is the uniform distribution at those positions
    (bounded below by 0, no single replacement token is rewarded); gradient w.r.t. the logits:
    (p_theta - 1/V) / N."""
    logits, labels = shift(logits, labels)
    keep = labels != IGNORE_INDEX
    log_p = torch.log_softmax(logits[keep].float(), dim=-1)
    vocab = log_p.shape[-1]
    kl = -math.log(vocab) - log_p.mean(dim=-1)
    return kl.sum() / max(int(keep.sum()), 1)


def kl_to_reference(logits: Tensor, ref_logits: Tensor, labels: Tensor) -> Tensor:
    """KL(p_ref || p_model) per unmasked token, averaged: keeps the retain distribution where it was."""
    logits, labels = shift(logits, labels)
    ref_logits, _ = shift(ref_logits, labels)
    keep = labels != IGNORE_INDEX
    log_p = torch.log_softmax(logits[keep].float(), dim=-1)
    log_ref = torch.log_softmax(ref_logits[keep].float(), dim=-1)
    kl = F.kl_div(log_p, log_ref, log_target=True, reduction="sum")
    return kl / max(int(keep.sum()), 1)


def npo_loss(logits: Tensor, ref_logits: Tensor, labels: Tensor, beta: float) -> Tensor:
    """NPO: (2/beta) * mean over sequences of log(1 + (pi/pi_ref)^beta), as a stable softplus."""
    log_ratio = sequence_logprob(logits, labels) - sequence_logprob(ref_logits, labels).detach()
    return (2.0 / beta) * F.softplus(beta * log_ratio).mean()


# --------------------------------------------------------------------------- registries


@dataclass
class LossInputs:
    """What a term may need; reference logits come from a frozen copy of the original model."""

    logits: Tensor
    labels: Tensor
    ref_logits: Tensor | None = None
    npo_beta: float = 0.1
    ihl_margin: float = 0.1
    undial_beta: float = 10.0


Term = Callable[[LossInputs], Tensor]
FORGET_TERMS: Registry[Term] = Registry("forget term")
RETAIN_TERMS: Registry[Term] = Registry("retain term")


@FORGET_TERMS.register("ga")
def _forget_ga(x: LossInputs) -> Tensor:
    return -mean_nll(x.logits, x.labels)


@FORGET_TERMS.register("ihl")
def _forget_ihl(x: LossInputs) -> Tensor:
    return inverted_hinge_loss(x.logits, x.labels)


@FORGET_TERMS.register("npo", needs_reference=True)
def _forget_npo(x: LossInputs) -> Tensor:
    return npo_loss(x.logits, x.ref_logits, x.labels, x.npo_beta)


@FORGET_TERMS.register("ihl_margin")
def _forget_ihl_margin(x: LossInputs) -> Tensor:
    return margin_hinge_loss(x.logits, x.labels, x.ihl_margin)


@FORGET_TERMS.register("undial", needs_reference=True)
def _forget_undial(x: LossInputs) -> Tensor:
    return undial_loss(x.logits, x.ref_logits, x.labels, x.undial_beta)


@FORGET_TERMS.register("me")
def _forget_me(x: LossInputs) -> Tensor:
    return uniform_kl_loss(x.logits, x.labels)


@RETAIN_TERMS.register("nll")
def _retain_nll(x: LossInputs) -> Tensor:
    return mean_nll(x.logits, x.labels)


@RETAIN_TERMS.register("kl", needs_reference=True)
def _retain_kl(x: LossInputs) -> Tensor:
    return kl_to_reference(x.logits, x.ref_logits, x.labels)


def check_term_options(cfg) -> None:
    """--forget-term / --retain-term name registered terms, and a retain term has its --retain set."""
    if cfg.retain_term not in (None, NO_RETAIN, *RETAIN_TERMS.names()):
        raise ConfigError(f"--retain-term must be one of {', '.join(RETAIN_TERMS.names())} or {NO_RETAIN}, "
                          f"got {cfg.retain_term!r}")
    if cfg.forget_term is not None and cfg.forget_term not in FORGET_TERMS:
        raise ConfigError(f"--forget-term must be one of {', '.join(FORGET_TERMS.names())}, got {cfg.forget_term!r}")
    if uses_retain(cfg.loss_terms()[1]) and not cfg.retain:
        raise ConfigError(f"method {cfg.method} has a retain term: pass --retain FILE (or --retain-term none)")


def uses_retain(retain_term: str) -> bool:
    """Whether there is a retain term (and so retain batches are needed)."""
    return retain_term != NO_RETAIN


def reference_sides(forget_term: str, retain_term: str) -> tuple[bool, bool]:
    """(forget term, retain term): which compare against the original model's logits (trait
    ``needs_reference``: NPO and UNDIAL on the forget side, KL on the retain side)."""
    return (bool(FORGET_TERMS.trait(forget_term, "needs_reference")),
            bool(uses_retain(retain_term) and RETAIN_TERMS.trait(retain_term, "needs_reference")))


def needs_reference(forget_term: str, retain_term: str) -> bool:
    """Whether a term compares against the original model's logits (NPO, UNDIAL, KL)."""
    return any(reference_sides(forget_term, retain_term))


def unlearning_loss(
    forget_term: str,
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor | None = None,
    retain_labels: Tensor | None = None,
    *,
    retain_term: str = NO_RETAIN,
    ref_forget_logits: Tensor | None = None,
    ref_retain_logits: Tensor | None = None,
    gamma: float = 1.0,
    alpha: float = 1.0,
    npo_beta: float = 0.1,
    ihl_margin: float = 0.1,
    undial_beta: float = 10.0,
) -> tuple[Tensor, dict[str, float]]:
    """gamma * forget term + alpha * retain term (the registered terms so named), and each part's value
    for the logs. Without retain logits the retain term is left out."""
    forget = FORGET_TERMS.get(forget_term)(LossInputs(forget_logits, forget_labels, ref_forget_logits, npo_beta,
                                                      ihl_margin, undial_beta))
    total, parts = gamma * forget, {"forget": float(forget.detach())}
    if uses_retain(retain_term) and retain_logits is not None:
        retain = RETAIN_TERMS.get(retain_term)(LossInputs(retain_logits, retain_labels, ref_retain_logits, npo_beta))
        total = total + alpha * retain
        parts["retain"] = float(retain.detach())
    return total, parts
