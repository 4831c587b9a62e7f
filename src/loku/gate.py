"""The gate (docs/algorithms.md §8; the simple start of O3's out-of-distribution detector).

An input gets a request's adapter only when some part of it looks like that request's forget set.
Features are taken from WINDOWS of ``window`` tokens (stride ``stride``), each run through the model
with every adapter off (the original model) on its own: the mean last-layer hidden state of the
window. A request is one Gaussian of the windows of its forget texts, under one covariance shared by
all requests and shrunk towards a scaled identity (a forget set has fewer windows than the hidden size
has dimensions, so the raw covariance is singular). An input's distance to request k is the SMALLEST
Mahalanobis distance of its windows (its most in-distribution window): a benign preamble or suffix adds
windows but cannot move the windows of a forget prompt, whereas a mean over the whole input is diluted
by it. Each request's threshold is calibrated on held-out texts (scored the same way) for a chosen
false-positive rate. Only the forget sets and held-out text are needed, no retain data.

Honest rates (:func:`honest_gate`): the true-positive rate is cross-fitted (each forget set in folds:
fit on the others, score the held-out fold), calibration and the reported false-positive rate use
different held-out texts, and a target rate below 1/N on N calibration texts is recorded as a warning
(it cannot be resolved: the threshold falls below the smallest held-out distance).

:class:`GatedModel` decides per row from the input of a call that starts a sequence (no KV cache yet,
e.g. a prompt given to ``generate``) and keeps that decision for the calls that continue it. Mode
``hard``: each request's adapter fully on or off; ``soft`` (O3): scaled by w = sigmoid(10 c - 2) of a
calibrated score c in [0, 1] (1 at or below the threshold, 0 at or beyond the distance calibrated for
twice the target rate), snapped to 1 at c = 1 and to 0 at c = 0. With the gate off the wrapped model
runs untouched, so outputs are bit-identical to the ungated (all adapters on) model.

Saved with the sequence's output (``OUT/gate/gate.safetensors`` + ``gate.json``, with a fingerprint of
each adapter it routes) and loaded by :meth:`GatedModel.from_pretrained`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .errors import ConfigError, ModelError

MODES = ("hard", "soft")
GATE_DIR, GATE_JSON, GATE_TENSORS = "gate", "gate.json", "gate.safetensors"
FORMAT = 1

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


def resolvable(n: int, fpr: float) -> bool:
    """Whether N calibration texts can resolve a target false-positive rate: 0, or at least 1/N."""
    return fpr == 0 or int(fpr * n) >= 1


def soft_weight(distances: Tensor, thresholds: Tensor, zeros: Tensor) -> Tensor:
    """O3's adapter scale w = sigmoid(10 c - 2) of the calibrated score c = (z - d) / (z - t) in [0, 1]
    (t: the threshold, z: where the weight reaches 0), snapped to 1 at c >= 1 and to 0 at c <= 0.
    Where z <= t (too few held-out texts to tell them apart) it is the hard decision."""
    d, t, z = distances.double(), thresholds.double()[None, :], zeros.double()[None, :]
    span = z - t
    c = torch.where(span > 0, (z - d) / span.clamp(min=1e-300), (d <= t).double()).clamp(0, 1)
    w = torch.sigmoid(10 * c - 2)
    return torch.where(c >= 1, torch.ones_like(w), torch.where(c <= 0, torch.zeros_like(w), w))


def as_texts(features: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """Texts as lists of window features [n_windows, H]; a plain [N, H] matrix is N one-window texts."""
    if isinstance(features, Tensor):
        return [row[None] for row in features]
    return [f if f.dim() == 2 else f[None] for f in features]


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


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Where the windows of a text of ``length`` tokens start: every ``stride`` tokens, the last one ending
    at the text's end (a text no longer than a window is one window)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    return starts if starts[-1] == length - window else [*starts, length - window]


@torch.no_grad()
def window_features(model, input_ids: Tensor, attention_mask: Tensor | None, *, window: int, stride: int,
                    chunk: int = 64) -> list[Tensor]:
    """Per row (padding on either side), the :func:`mean_hidden_state` of each of its windows, each window
    run on its own: a list of [n_windows, H] float32 (CPU)."""
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    pieces, owner = [], []
    for row, (ids, keep) in enumerate(zip(input_ids, mask)):
        tokens = ids[keep.bool()]
        for start in window_starts(len(tokens), window, stride):
            pieces.append(tokens[start:start + window])
            owner.append(row)
    features = []
    for first in range(0, len(pieces), chunk):
        part = pieces[first:first + chunk]
        width = max(len(p) for p in part)
        ids = input_ids.new_zeros((len(part), width))
        att = torch.zeros_like(ids)
        for i, p in enumerate(part):
            ids[i, : len(p)], att[i, : len(p)] = p, 1
        features.append(mean_hidden_state(model, ids, att).cpu())
    rows = torch.cat(features)
    counts = [owner.count(r) for r in range(input_ids.shape[0])]
    return list(rows.split(counts))


def text_features(model, batches: Sequence[dict], *, window: int, stride: int) -> list[Tensor]:
    """:func:`window_features` of every sequence of the batches (``make_batches`` dicts), in order."""
    from .provenance import model_device

    device = model_device(model)
    model.eval()
    out: list[Tensor] = []
    for b in batches:
        out += window_features(model, b["input_ids"].to(device), b["attention_mask"].to(device), window=window,
                               stride=stride)
    return out


# --------------------------------------------------------------------------- the gate


@dataclass
class Gate:
    """One Gaussian per request (shared precision), each request's distance threshold, and how inputs are
    cut into windows."""

    names: list[str]
    means: Tensor  # [K, H]
    precision: Tensor  # [H, H]
    thresholds: Tensor  # [K]
    fpr: float
    shrinkage: float
    window: int = 8
    stride: int = 4
    mode: str = "hard"
    soft_zeros: Tensor | None = None  # [K]: the distance where the soft weight reaches 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"the gate's mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.window < 1 or self.stride < 1:
            raise ConfigError(f"the gate's window and stride must be >= 1, got {self.window} and {self.stride}")

    def distances(self, features: Tensor) -> Tensor:
        return mahalanobis(features, self.means, self.precision)

    def scores(self, texts: Tensor | Sequence[Tensor]) -> Tensor:
        """[N, K]: each text's smallest window distance to each request (its most in-distribution window)."""
        texts = as_texts(texts)
        d = self.distances(torch.cat(texts))
        return torch.stack([part.amin(dim=0) for part in d.split([len(t) for t in texts])])

    def decide(self, texts: Tensor | Sequence[Tensor]) -> Tensor:
        """[N, K] bool: text n is in-distribution for request k (gets its adapter, fully in hard mode)."""
        return self.scores(texts) <= self.thresholds.double()[None, :]

    def weights(self, texts: Tensor | Sequence[Tensor]) -> Tensor:
        """[N, K] float64: the scale of request k's adapter for text n (0 or 1 in hard mode)."""
        if self.mode == "hard" or self.soft_zeros is None:
            return self.decide(texts).double()
        return soft_weight(self.scores(texts), self.thresholds, self.soft_zeros)


def fit_gate(forget: dict[str, Tensor | Sequence[Tensor]], calibration: Tensor | Sequence[Tensor], *,
             fpr: float = 0.05, shrinkage: float = 0.2, window: int = 8, stride: int = 4,
             mode: str = "hard") -> Gate:
    """A gate from each request's forget texts and held-out calibration texts (window features, or [N, H]
    matrices of one-window texts). Report its false-positive rate on OTHER held-out texts (on these it is
    at most ``fpr`` by construction) and its true-positive rate on forget texts it was not fitted on."""
    names = list(forget)
    means, precision = fit_shared_gaussian([torch.cat(as_texts(forget[n])) for n in names], shrinkage)
    gate = Gate(names, means, precision, torch.zeros(len(names), dtype=torch.float64), fpr, shrinkage, window,
                stride, mode)
    scores = gate.scores(calibration)
    gate.thresholds = torch.tensor([calibrate_threshold(scores[:, k], fpr) for k in range(len(names))],
                                   dtype=torch.float64)
    # The soft weight fades out up to the distance calibrated for twice the target rate (never below the threshold).
    zeros = torch.tensor([calibrate_threshold(scores[:, k], min(1.0, 2 * fpr)) for k in range(len(names))],
                         dtype=torch.float64)
    gate.soft_zeros = torch.maximum(zeros, gate.thresholds)
    return gate


def gate_rates(gate: Gate, heldout: Tensor | Sequence[Tensor],
               forget: dict[str, Tensor | Sequence[Tensor]] | None = None) -> dict[str, Any]:
    """False-positive rate on held-out texts (per request and for "any adapter applied"), the mean adapter
    weight there, and the true-positive rate on each given forget set (its own adapter applied)."""
    weights = gate.weights(heldout)
    on = weights > 0
    out = {"false_positive_rate": {**{n: float(on[:, k].double().mean()) for k, n in enumerate(gate.names)},
                                   "any": float(on.any(dim=1).double().mean())},
           "mean_weight_heldout": float(weights.mean())}
    if forget:
        out["true_positive_rate"] = {n: float((gate.weights(forget[n])[:, k] > 0).double().mean())
                                     for k, n in enumerate(gate.names) if n in forget}
    return out


def cross_fitted_rates(forget: dict[str, Sequence[Tensor]], calibration: Sequence[Tensor], *, folds: int = 5,
                       **fit: Any) -> dict[str, dict[str, float | None]]:
    """Each request's true-positive rate on texts the gate was NOT fitted on: its forget texts in ``folds``
    folds (at most one a text), a gate fitted without the fold (every other request whole), the fold's texts
    scored whole ("texts") and by their first window alone, a prompt of ``window`` tokens ("prompts").
    None where a request has a single text (nothing to hold out)."""
    texts = {n: as_texts(v) for n, v in forget.items()}
    out: dict[str, dict[str, float | None]] = {"texts": {}, "prompts": {}}
    for k, name in enumerate(texts):
        n = len(texts[name])
        if n < 2:
            out["texts"][name] = out["prompts"][name] = None
            continue
        hits = prompt_hits = 0
        parts = min(folds, n)
        for f in range(parts):
            held = [t for i, t in enumerate(texts[name]) if i % parts == f]
            gate = fit_gate({**texts, name: [t for i, t in enumerate(texts[name]) if i % parts != f]}, calibration,
                            **fit)
            hits += int((gate.weights(held)[:, k] > 0).sum())
            prompt_hits += int((gate.weights([t[:1] for t in held])[:, k] > 0).sum())
        out["texts"][name], out["prompts"][name] = hits / n, prompt_hits / n
    return out


def honest_gate(forget: dict[str, Sequence[Tensor]], heldout: Sequence[Tensor], *, fpr: float, shrinkage: float,
                window: int = 8, stride: int = 4, mode: str = "hard", folds: int = 5) -> tuple[Gate, dict[str, Any]]:
    """The gate and rates that mean something: calibrated on every other held-out text, its false-positive
    rate reported on the rest, its true-positive rate cross-fitted (:func:`cross_fitted_rates`), and a
    warning (also issued) when the calibration texts cannot resolve ``fpr``."""
    import warnings

    heldout = as_texts(heldout)
    calibrate, report_on = heldout[0::2], heldout[1::2]
    if not calibrate or not report_on:
        raise ConfigError(f"the gate needs at least 2 held-out texts (--validation): half calibrate it, half "
                          f"measure its false-positive rate; got {len(heldout)}")
    fit = {"fpr": fpr, "shrinkage": shrinkage, "window": window, "stride": stride, "mode": mode}
    gate = fit_gate(forget, calibrate, **fit)
    rates = gate_rates(gate, report_on)
    crossed = cross_fitted_rates(forget, calibrate, folds=folds, **fit)
    notes = []
    if not resolvable(len(calibrate), fpr):
        notes.append(f"with {len(calibrate)} calibration texts a false-positive rate of {fpr:g} cannot be resolved "
                     f"(below 1/{len(calibrate)}): each threshold sits just below the smallest held-out distance; "
                     f"give at least {2 * math.ceil(1 / fpr)} held-out texts (--validation) for this rate")
    for note in notes:
        warnings.warn(f"gate: {note}")
    return gate, {"fpr_target": fpr, "shrinkage": shrinkage, "mode": mode, "window": window, "stride": stride,
                  "calibrated_on": len(calibrate), "reported_on": len(report_on),
                  "fpr_resolution": 1 / len(report_on), **rates,
                  "true_positive_rate": crossed["texts"], "true_positive_rate_prompts": crossed["prompts"],
                  "true_positive_rate_note": f"cross-fitted over {folds} folds of each forget set: each text scored "
                                             "by a gate not fitted on it (whole text, and its first window alone)",
                  "thresholds": dict(zip(gate.names, gate.thresholds.tolist())), "warnings": notes}


# --------------------------------------------------------------------------- saving


def adapter_fingerprints(model, names: Sequence[str]) -> dict[str, str]:
    """sha256 of each named adapter's tensors (name and float32 bytes, sorted): what the gate was fitted for."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    for name in names:
        state = get_peft_model_state_dict(model, adapter_name=name)
        digest = hashlib.sha256()
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
        out[name] = digest.hexdigest()
    return out


def save_gate(gate: Gate, folder: str | Path, adapters: dict[str, str], rates: dict[str, Any] | None = None) -> Path:
    """``folder/gate.safetensors`` (means, precision, thresholds, soft zeros) and ``folder/gate.json`` (names,
    settings, the fingerprint of each adapter it routes, its rates), each written atomically."""
    from safetensors.torch import save_file

    from .save import atomic_file, atomic_write_json

    folder = Path(folder)
    tensors = {"means": gate.means.double().contiguous(), "precision": gate.precision.double().contiguous(),
               "thresholds": gate.thresholds.double().contiguous(),
               "soft_zeros": (gate.soft_zeros if gate.soft_zeros is not None else gate.thresholds).double().contiguous()}
    with atomic_file(folder / GATE_TENSORS) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(folder / GATE_JSON, {
        "format": FORMAT, "names": list(gate.names), "fpr": gate.fpr, "shrinkage": gate.shrinkage,
        "window": gate.window, "stride": gate.stride, "mode": gate.mode,
        "adapters": {n: adapters[n] for n in gate.names}, "rates": rates,
        "note": "loku.gate: load with loku.gate.GatedModel.from_pretrained(THE_OUTPUT_FOLDER)"})
    return folder


def load_gate(folder: str | Path, mode: str | None = None) -> tuple[Gate, dict[str, Any]]:
    """The gate saved by :func:`save_gate` and its JSON record; ``mode`` overrides the saved mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    spec_path, tensor_path = folder / GATE_JSON, folder / GATE_TENSORS
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        tensors = load_file(str(tensor_path))
        names = list(spec["names"])
        gate = Gate(names, tensors["means"], tensors["precision"], tensors["thresholds"], float(spec["fpr"]),
                    float(spec["shrinkage"]), int(spec["window"]), int(spec["stride"]), mode or spec["mode"],
                    tensors["soft_zeros"])
        dict(spec["adapters"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise ConfigError(f"{spec_path}: {err}") from None
        raise ConfigError(f"{folder}: cannot read the gate ({type(err).__name__}: {err}); the gate folder is "
                          f"incomplete or damaged: copy the output folder whole, or refit the gate") from None
    k = len(names)
    if gate.means.shape[0] != k or gate.thresholds.shape != (k,) or gate.precision.shape != (gate.means.shape[1],) * 2:
        raise ConfigError(f"{tensor_path}: its tensors do not fit {k} requests ({', '.join(names)}); the gate files "
                          "come from different runs: copy the output folder whole, or refit the gate")
    return gate, spec


# --------------------------------------------------------------------------- the gated model


def _cache_started(kwargs: dict[str, Any]) -> bool:
    """Whether a call continues a sequence (a KV cache holding earlier tokens), so the decision stands."""
    for key in ("past_key_values", "cache"):
        cache = kwargs.get(key)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            if int(cache.get_seq_length()) > 0:
                return True
        elif len(cache) and cache[0] is not None and cache[0][0].shape[-2] > 0:
            return True
    return False


class GatedModel(torch.nn.Module):
    """A stacked model (one PEFT adapter per request, loku.requests) that applies a request's adapter
    only to the rows its gate scores in-distribution (scaled, in soft mode). ``enabled=False``: the
    wrapped model, untouched. Attributes it lacks (``config``, ...) are the wrapped model's."""

    def __init__(self, model, gate: Gate, enabled: bool = True) -> None:
        super().__init__()
        adapters = set(getattr(model, "peft_config", {}))
        missing = [n for n in gate.names if n not in adapters]
        if missing:
            raise ConfigError(f"the gate switches each request's own adapter, but the model has none named "
                              f"{', '.join(missing)}: gate a model of --strategy stack or orthogonal (merge folds "
                              "the requests into the weights)")
        self.model, self.gate, self.enabled = model, gate, enabled
        self.last_weights: Tensor | None = None  # [N, K] of the last call that started a sequence

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    @property
    def last_decisions(self) -> Tensor | None:
        """[N, K] bool of the last decision: request k's adapter applied (with any weight) to row n."""
        return None if self.last_weights is None else self.last_weights > 0

    def get_base_model(self):
        return self.model.get_base_model()

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, model=None, dtype: str = "float32", mode: str | None = None,
                        enabled: bool = True, progress: bool = False) -> "GatedModel":
        """The gated model of a sequence's output folder: its base model (``model``, which the adapters are
        attached to in place, else loaded from the name the sequence recorded), every adapter of ``OUT/adapters`` and the gate of ``OUT/gate``. A gate without
        its adapters, or fitted for other adapters (fingerprints differ), is refused in one line."""
        from peft import PeftModel

        folder = Path(folder)
        gate_dir, adapters = folder / GATE_DIR, folder / "adapters"
        if not (gate_dir / GATE_JSON).is_file():
            raise ConfigError(f"{folder}: no gate ({GATE_DIR}/{GATE_JSON}); fit one with loku unlearn --strategy "
                              "stack|orthogonal --gate-fpr RATE, or evaluate without it (--no-gate)")
        gate, spec = load_gate(gate_dir, mode)
        missing = [n for n in gate.names if not (adapters / n / "adapter_config.json").is_file()]
        record_path = adapters / "loku_requests.json"
        if missing or not record_path.is_file():
            lacking = adapters / missing[0] if missing else record_path
            raise ConfigError(f"{gate_dir / GATE_JSON}: a gate without its adapters ({lacking} is missing); the gate "
                              "routes the adapters of the same output folder: copy that folder whole")
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if model is None:
            from .models import load_model

            model, _ = load_model(record["base_model"], dtype=dtype, progress=progress)
        from .models import model_fingerprint

        if record.get("base_fingerprint") and model_fingerprint(model) != record["base_fingerprint"]:
            raise ModelError(f"{record_path}: the adapters were made on another base model than "
                             f"{record['base_model']} is now (the weights' fingerprint differs); gate the base "
                             "they were made from")
        peft = PeftModel.from_pretrained(model, str(adapters / gate.names[0]), adapter_name=gate.names[0])
        for name in gate.names[1:]:
            peft.load_adapter(str(adapters / name), adapter_name=name)
        peft.base_model.set_adapter(list(gate.names), inference_mode=True)
        peft.requires_grad_(False)
        found = adapter_fingerprints(peft, gate.names)
        differ = [n for n in gate.names if found[n] != spec["adapters"].get(n)]
        if differ:
            raise ConfigError(f"{gate_dir / GATE_JSON}: the gate was fitted for other adapters than those in "
                              f"{adapters} ({', '.join(differ)} differ); the gate and the adapters come from "
                              "different runs: copy one output folder whole, or refit the gate")
        return cls(peft.eval(), gate, enabled)

    @torch.no_grad()
    def route(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """[N, K] adapter weights of each row, from the windows of that row (adapters off)."""
        texts = window_features(self.model, input_ids, attention_mask, window=self.gate.window,
                                stride=self.gate.stride)
        return self.gate.weights(texts)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs):
        """The wrapped model's forward (any keywords), each row under the adapters decided from its input when
        the call starts a sequence, or under the decision of the call that started it (a started KV cache)."""
        if not self.enabled:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if not _cache_started(kwargs) or self.last_weights is None:
            self.last_weights = self.route(input_ids, attention_mask)
        with self.weighted(self._rows(self.last_weights, input_ids.shape[0])):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """``generate`` (KV cache and all) of the wrapped model, each prompt under the adapters its gate picks
        from the PROMPT (kept while the tokens are generated)."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        if not self.enabled:
            return self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        self.last_weights = self.route(input_ids, mask)
        with self.weighted(self.last_weights):
            return self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)

    @staticmethod
    def _rows(weights: Tensor, batch: int) -> Tensor:
        if weights.shape[0] == batch:
            return weights
        if (weights == weights[:1]).all():
            return weights[:1].expand(batch, -1)
        raise ConfigError(f"a gated call continues {weights.shape[0]} sequences decided differently with a batch of "
                          f"{batch}: continue each sequence in its own batch (or one decision per batch)")

    @contextlib.contextmanager
    def weighted(self, weights: Tensor) -> Iterator[None]:
        """Row n runs with request k's adapter scaled by weights[n, k] (0: off, 1: as trained; no adapter on
        any row: the original model), restored afterwards."""
        from peft.tuners.lora import LoraLayer

        if not bool((weights > 0).any()):
            with self.adapters_only([]):
                yield
            return
        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        saved = [(layer, dict(layer.scaling)) for layer in layers]
        try:
            for k, name in enumerate(self.gate.names):
                column = weights[:, k]
                if bool((column == 1).all()):  # as trained: the float scale untouched (bit-identical)
                    continue
                for layer in layers:
                    if name in layer.scaling:
                        ref = layer.lora_B[name].weight
                        layer.scaling[name] = (layer.scaling[name] * column).to(ref.device, ref.dtype).view(-1, 1, 1)
            with self.adapters_only(list(self.gate.names)):
                yield
        finally:
            for layer, scaling in saved:
                layer.scaling.clear()
                layer.scaling.update(scaling)

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


def load_gated(folder: str | Path, *, dtype: str = "float32", mode: str | None = None, progress: bool = False):
    """(:class:`GatedModel`, tokenizer) of a sequence's output folder, the base model loaded by the name the
    sequence recorded."""
    from .models import load_model

    record_path = Path(folder) / "adapters" / "loku_requests.json"
    if not record_path.is_file():
        raise ConfigError(f"{Path(folder) / GATE_DIR / GATE_JSON}: a gate without its adapters ({record_path} is "
                          "missing); the gate routes the adapters of the same output folder: copy that folder whole")
    base, tokenizer = load_model(json.loads(record_path.read_text(encoding="utf-8"))["base_model"], dtype=dtype,
                                 progress=progress)
    return GatedModel.from_pretrained(folder, model=base, mode=mode), tokenizer


def has_gate(folder: str | Path) -> bool:
    """Whether ``folder`` is an output folder with a saved gate."""
    return (Path(folder) / GATE_DIR / GATE_JSON).is_file()


def with_mode(gate: Gate, mode: str) -> Gate:
    """The same gate deciding hard or soft."""
    return dataclasses.replace(gate, mode=mode)
