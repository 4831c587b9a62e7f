"""The gate (docs/algorithms.md §8; the simple start of O3's out-of-distribution detector).

An input gets a request's adapter only when it looks like that request's forget set: the
Mahalanobis distance of its mean last-layer hidden state (of the model with every adapter off, i.e.
the original model) to the request's mean, under one covariance shared by all requests and shrunk
towards a scaled identity (a forget set has fewer sequences than the hidden size has dimensions, so
the raw covariance is singular). Each request's threshold is calibrated on held-out text for a
chosen false-positive rate. Only the forget sets and held-out text are needed, no retain data.

:class:`GatedModel` is a HARD switch: each row of a batch runs with exactly the adapters whose
request scored it in-distribution (none: the original model), decided once per forward call from
the whole input. O3 also scales an adapter by its score (a soft gate); that is not done here.
With the gate off the wrapped model runs untouched, so outputs are bit-identical to the ungated
(all adapters on) model. Gated forward calls take ``input_ids`` and ``attention_mask`` only;
:meth:`GatedModel.generate` decides from each prompt and then generates with the wrapped model's own
``generate`` (KV cache included) under that prompt's adapters.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .errors import ConfigError

# --------------------------------------------------------------------------- the math (pure)


def fit_shared_gaussian(features: Sequence[Tensor], shrinkage: float) -> tuple[Tensor, Tensor]:
    """(means [K, H], precision [H, H]) of K classes of feature rows, float64.

    The covariance is the pooled within-class one (each class centred on its own mean), shrunk:
    (1 - rho) * Sigma + rho * (tr(Sigma) / H) * I, which keeps it invertible with fewer rows than H.
    """
    if not 0 <= shrinkage <= 1:
        raise ConfigError(f"shrinkage must lie in [0, 1], got {shrinkage!r}")
    rows = [f.double() for f in features]
    means = torch.stack([f.mean(dim=0) for f in rows])
    centred = torch.cat([f - m for f, m in zip(rows, means)])
    h = centred.shape[1]
    dof = max(centred.shape[0] - len(rows), 1)
    cov = centred.T @ centred / dof
    scale = float(torch.trace(cov)) / h
    target = torch.eye(h, dtype=torch.float64) * (scale if scale > 0 else 1.0)
    shrunk = (1 - shrinkage) * cov + shrinkage * target
    return means, torch.linalg.inv(shrunk)


def mahalanobis(features: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """sqrt((x - mu_k)^T P (x - mu_k)) for every row x of ``features`` [N, H] and mean mu_k: [N, K]."""
    diff = features.double()[:, None, :] - means.double()[None, :, :]
    return torch.einsum("nkh,hg,nkg->nk", diff, precision.double(), diff).clamp(min=0).sqrt()


def calibrate_threshold(heldout: Tensor, fpr: float) -> float:
    """The largest threshold t with at most floor(fpr * N) held-out distances <= t (in-distribution).

    Just below the (m+1)-th smallest distance, m = floor(fpr * N): ties at that distance are all
    left out, so the held-out false-positive rate never exceeds ``fpr``. fpr = 1 accepts everything.
    """
    if not 0 <= fpr <= 1:
        raise ConfigError(f"the gate's false-positive rate must lie in [0, 1], got {fpr!r}")
    ordered = heldout.double().flatten().sort().values
    m = int(fpr * len(ordered))
    if m >= len(ordered):
        return float("inf")
    return float(torch.nextafter(ordered[m], torch.tensor(float("-inf"), dtype=torch.float64)))


# --------------------------------------------------------------------------- features of a model


@contextlib.contextmanager
def _adapters_off(model) -> Iterator[None]:
    from peft import PeftModel

    with model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext():
        yield


@torch.no_grad()
def mean_hidden_state(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The mean over unpadded positions of the last layer's hidden state, adapters off: [N, H] float32."""
    with _adapters_off(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = out.hidden_states[-1].float()
    mask = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def features_of(model, batches: Sequence[dict]) -> Tensor:
    """:func:`mean_hidden_state` of every sequence of the batches (``make_batches`` dicts), in order."""
    from .provenance import model_device

    device = model_device(model)
    model.eval()
    return torch.cat([mean_hidden_state(model, b["input_ids"].to(device), b["attention_mask"].to(device)).cpu()
                      for b in batches])


# --------------------------------------------------------------------------- the gate


@dataclass
class Gate:
    """One Gaussian per request (shared precision) and each request's distance threshold."""

    names: list[str]
    means: Tensor  # [K, H]
    precision: Tensor  # [H, H]
    thresholds: Tensor  # [K]
    fpr: float
    shrinkage: float

    def distances(self, features: Tensor) -> Tensor:
        return mahalanobis(features, self.means, self.precision)

    def decide(self, features: Tensor) -> Tensor:
        """[N, K] bool: row n is in-distribution for request k (gets its adapter)."""
        return self.distances(features) <= self.thresholds.double()[None, :]


def fit_gate(forget: dict[str, Tensor], heldout: Tensor, *, fpr: float = 0.05, shrinkage: float = 0.2) -> Gate:
    """A gate from each request's forget features and held-out features (rows of :func:`features_of`).

    Calibrate on held-out text that is not used to report the false-positive rate, or the reported
    rate is at most ``fpr`` by construction.
    """
    names = list(forget)
    means, precision = fit_shared_gaussian([forget[n] for n in names], shrinkage)
    heldout_distances = mahalanobis(heldout, means, precision)
    thresholds = torch.tensor([calibrate_threshold(heldout_distances[:, k], fpr) for k in range(len(names))],
                              dtype=torch.float64)
    return Gate(names, means, precision, thresholds, fpr, shrinkage)


def gate_rates(gate: Gate, heldout: Tensor, forget: dict[str, Tensor]) -> dict[str, Any]:
    """False-positive rate on held-out features (per request and for "any adapter applied") and the
    true-positive rate on each request's forget features (its own adapter applied)."""
    on = gate.decide(heldout)
    return {"false_positive_rate": {**{n: float(on[:, k].double().mean()) for k, n in enumerate(gate.names)},
                                    "any": float(on.any(dim=1).double().mean())},
            "true_positive_rate": {n: float(gate.decide(forget[n])[:, k].double().mean())
                                   for k, n in enumerate(gate.names) if n in forget}}


class GatedModel(torch.nn.Module):
    """A stacked model (one PEFT adapter per request, loku.requests) that applies a request's adapter
    only to the rows its gate scores in-distribution. ``enabled=False``: the wrapped model, untouched."""

    def __init__(self, model, gate: Gate, enabled: bool = True) -> None:
        super().__init__()
        adapters = set(getattr(model, "peft_config", {}))
        missing = [n for n in gate.names if n not in adapters]
        if missing:
            raise ConfigError(f"the gate switches each request's own adapter, but the model has none named "
                              f"{', '.join(missing)}: gate a model of --strategy stack or orthogonal (merge folds "
                              "the requests into the weights)")
        self.model, self.gate, self.enabled = model, gate, enabled
        self.last_decisions: Tensor | None = None  # [N, K] of the last gated call, for inspection

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs):
        if not self.enabled:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if kwargs:
            raise TypeError(f"a gated call takes input_ids and attention_mask only, got {', '.join(kwargs)}")
        from transformers.modeling_outputs import CausalLMOutput

        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        on = self.gate.decide(mean_hidden_state(self.model, input_ids, mask).cpu())
        self.last_decisions = on
        logits = None
        for pattern in torch.unique(on, dim=0):
            rows = (on == pattern).all(dim=1).nonzero().flatten().to(input_ids.device)
            active = [n for n, flag in zip(self.gate.names, pattern.tolist()) if flag]
            with self.adapters_only(active):
                part = self.model(input_ids=input_ids[rows], attention_mask=mask[rows]).logits
            if logits is None:
                logits = part.new_zeros((input_ids.shape[0], *part.shape[1:]))
            logits[rows] = part
        return CausalLMOutput(logits=logits)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """``generate`` (KV cache and all) of the wrapped model, each prompt with the adapters its gate picks
        from the PROMPT (the decision is not revised as tokens are added). Rows are padded on the right with
        the pad token (``pad_token_id``, else the model's) to the longest group's output."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        if not self.enabled:
            return self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        on = self.gate.decide(mean_hidden_state(self.model, input_ids, mask).cpu())
        self.last_decisions = on
        parts = []
        for pattern in torch.unique(on, dim=0):
            rows = (on == pattern).all(dim=1).nonzero().flatten().to(input_ids.device)
            with self.adapters_only([n for n, flag in zip(self.gate.names, pattern.tolist()) if flag]):
                parts.append((rows, self.model.generate(input_ids=input_ids[rows], attention_mask=mask[rows],
                                                        **kwargs)))
        pad = kwargs.get("pad_token_id", getattr(self.model.config, "pad_token_id", None))
        width = max(out.shape[1] for _, out in parts)
        result = input_ids.new_full((input_ids.shape[0], width), 0 if pad is None else int(pad))
        for rows, out in parts:
            result[rows, : out.shape[1]] = out
        return result

    @contextlib.contextmanager
    def adapters_only(self, names: list[str]) -> Iterator[None]:
        """Exactly the named adapters on (none: the original model), restored afterwards."""
        if not names:
            with self.model.disable_adapter():
                yield
            return
        tuner = self.model.base_model
        before = list(tuner.active_adapters)
        tuner.set_adapter(names, inference_mode=True)
        try:
            yield
        finally:
            tuner.set_adapter(before, inference_mode=True)
