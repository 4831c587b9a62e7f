"""LoRA initialisers (registry ``INITIALIZERS``): plain ``gaussian``, ``fila`` (§3) and ``vila`` (§4).

FILA starts the adapter on the part of each weight that matters for the forget set: a weighted
low-rank approximation of W, weighted row-wise by the relative Fisher. The base layer keeps the
residual W_res = W - s*B@A, so the model computes exactly what it did before (up to rounding).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .fisher import empirical_fisher, fisher_chunks, relative_fisher, variance_fisher
from .registry import Registry

ADAPTER = "default"  # PEFT's adapter name


# --------------------------------------------------------------------------- the math (pure)


def row_weights(fisher_rel: Tensor) -> Tensor:
    """d_i = sqrt(sum_j F_rel[i, j]): one weight per output row (§3)."""
    return fisher_rel.float().sum(dim=1).clamp(min=0).sqrt()


def truncated_svd(matrix: Tensor, rank: int, method: str = "exact") -> tuple[Tensor, Tensor, Tensor]:
    """U [m, r], S [r], V^T [r, n] of the best rank-r approximation, float32.

    ``exact``: the eigendecomposition of the smaller Gram matrix (M M^T or M^T M) in float64, whose
    top-r eigenvectors are the top-r singular vectors; the other side follows as M^T U / S. Exact up
    to rounding (float64 keeps the squared condition number harmless for the leading components) and
    about twice as fast on CPU as a full float32 SVD, most of whose work goes into the discarded
    components. ``lowrank``: randomized (``torch.svd_lowrank``), approximate.
    """
    if method == "lowrank":
        u, s, v = torch.svd_lowrank(matrix, q=min(rank + 8, *matrix.shape), niter=4)
        return u[:, :rank], s[:rank], v[:, :rank].T
    m = matrix.double()
    wide = m.shape[0] <= m.shape[1]
    values, vectors = torch.linalg.eigh(m @ m.T if wide else m.T @ m)  # ascending
    top = vectors[:, -rank:].flip(1)
    s = values[-rank:].flip(0).clamp(min=0).sqrt()
    other = (m.T @ top if wide else m @ top) / s.clamp(min=torch.finfo(torch.float64).tiny)
    other[:, s == 0] = 0  # no direction to speak of: contributes nothing either way
    u, v = (top, other) if wide else (other, top)
    return u.float(), s.float(), v.T.float()


def fila_factors(weight: Tensor, fisher_rel: Tensor, rank: int, scaling: float, *, svd: str = "exact",
                 eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """(A [r, in], B [out, r], W_res [out, in]) with ``scaling * B @ A + W_res == weight``.

    s*B@A = D^-1 [D W]_r minimises ||D (W - M)||_F over rank-r M for D = diag(row_weights).
    The inverse uses d_i + eps * max(d): SVD rounding in rows of tiny weight is not blown up, and
    rows the forget set does not reach (d_i = 0) get no adapter at all. A layer it does not reach
    anywhere gets the unweighted SVD, so its adapter does not start at exactly zero, where LoRA's
    gradients would vanish for good.
    """
    w = weight.float()
    d = row_weights(fisher_rel)
    if not bool(d.any()):
        d = torch.ones_like(d)
    u, s, vh = truncated_svd(d[:, None] * w, rank, svd)
    root = (s / scaling).sqrt()
    b = (u / (d + eps * d.max())[:, None]) * root
    b[d == 0] = 0
    a = root[:, None] * vh
    return a, b, w - scaling * (b @ a)


def weighted_error(weight: Tensor, fisher_rel: Tensor, approximation: Tensor) -> Tensor:
    """||D (W - M)||_F, the quantity FILA minimises."""
    return torch.linalg.norm(row_weights(fisher_rel)[:, None] * (weight.float() - approximation.float()))


# --------------------------------------------------------------------------- applying to a PEFT model


@dataclass
class InitContext:
    """What an initialiser needs besides the model.

    ``forget_batches`` / ``retain_batches`` are the Fisher pass's batches, made by the caller with
    the pass's own batch size (``--fisher-batch-size``, default ``--batch-size``). ``fisher_max_bytes``
    bounds FILA's float32 Fisher buffers (forget + retain, see ``loku.fisher.fisher_bytes``): when
    the targets do not fit, the pass runs once per group of layers that does (same result, more
    passes over the data). None: all targets in one pass.
    """

    forget_batches: list[dict[str, Tensor]]
    retain_batches: list[dict[str, Tensor]]
    fisher_mode: str = "per_sample"
    eps: float = 1e-5
    svd: str = "exact"
    progress: bool = False
    vila_sigma: float = 0.05
    fisher_max_bytes: int | None = None


Initializer = Callable[[nn.Module, InitContext], dict[str, Any]]
INITIALIZERS: Registry[Initializer] = Registry("initialiser")


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA-wrapped layer, by its module name in the plain (unwrapped) model."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def _dense_weight(layer: nn.Module) -> nn.Parameter:
    return layer.get_base_layer().weight


def _as_out_in(layer: nn.Module, tensor: Tensor) -> Tensor:
    """GPT-2's Conv1D stores [in, out]; the math is written for [out, in]."""
    return tensor.T if layer.fan_in_fan_out else tensor


@torch.no_grad()
def _install(layer: nn.Module, a: Tensor, b: Tensor, w_res: Tensor) -> None:
    base = _dense_weight(layer)
    layer.lora_A[ADAPTER].weight.copy_(a.to(layer.lora_A[ADAPTER].weight.dtype))
    layer.lora_B[ADAPTER].weight.copy_(b.to(layer.lora_B[ADAPTER].weight.dtype))
    base.copy_(_as_out_in(layer, w_res).to(base.dtype))


def _fila_per_layer(layers: dict[str, nn.Module], relative_of: Callable[[str], tuple[Tensor, float]],
                    ctx: InitContext) -> dict[str, Any]:
    """Replace every layer by W_res + FILA adapter, building one layer's relative Fisher at a time.

    ``relative_of(name)`` gives the layer's relative Fisher [out, in] (or its row sums [out, 1]:
    all that FILA uses of it) and its eps-dominated share. Returns the share of eps-dominated
    entries (overall and per layer) and each layer's relative weighted error ||D (W - sBA)|| / ||D W||.
    """
    shares, sizes, errors = {}, {}, {}
    for name, layer in layers.items():
        rel, shares[name] = relative_of(name)
        sizes[name] = _dense_weight(layer).numel()
        w = _as_out_in(layer, _dense_weight(layer).detach()).float()
        a, b, w_res = fila_factors(w, rel, layer.r[ADAPTER], layer.scaling[ADAPTER], svd=ctx.svd)
        scale = torch.linalg.norm(row_weights(rel)[:, None] * w).clamp(min=1e-30)
        errors[name] = float(weighted_error(w, rel, layer.scaling[ADAPTER] * (b @ a)) / scale)
        _install(layer, a, b, w_res)
    overall = sum(shares[n] * sizes[n] for n in shares) / max(sum(sizes.values()), 1)
    return {"eps_dominated_share": overall, "eps_dominated_share_per_layer": shares,
            "relative_weighted_error": errors}


@INITIALIZERS.register("gaussian")
def init_gaussian(model: nn.Module, ctx: InitContext) -> dict[str, Any]:
    """Plain LoRA: A ~ N(0, 1/r), B = 0, base weights untouched."""
    for layer in lora_layers(model).values():
        layer.reset_lora_parameters(ADAPTER, "gaussian")
    return {}


@INITIALIZERS.register("fila", replaces_base=True, uses_fisher=True)
def init_fila(model: nn.Module, ctx: InitContext) -> dict[str, Any]:
    """Relative Fisher of the full weights, then the row-weighted SVD per layer (§2-3).

    With ``ctx.fisher_max_bytes`` the Fisher pass runs once per group of layers whose forget and
    retain buffers fit the budget. Each group is reduced to the row sums of its relative Fisher
    before the next group runs, and no layer is replaced before every pass has run, so the result
    is the same as one pass over all layers.
    """
    layers = lora_layers(model)
    weights = {name: _dense_weight(layer) for name, layer in layers.items()}
    chunks = fisher_chunks(weights, ctx.fisher_max_bytes)
    t0 = time.time()
    row_sums: dict[str, Tensor] = {}
    shares: dict[str, float] = {}
    for i, chunk in enumerate(chunks):
        part = f" {i + 1}/{len(chunks)}" if len(chunks) > 1 else ""
        f_forget = empirical_fisher(model, ctx.forget_batches, chunk, mode=ctx.fisher_mode, progress=ctx.progress,
                                    desc=f"Fisher (forget){part}")
        f_retain = empirical_fisher(model, ctx.retain_batches, chunk, mode=ctx.fisher_mode, progress=ctx.progress,
                                    desc=f"Fisher (retain){part}")
        for name in chunk:
            layer = layers[name]
            rel, shares[name] = relative_fisher(_as_out_in(layer, f_forget.pop(name)),
                                                _as_out_in(layer, f_retain.pop(name)), ctx.eps)
            # FILA uses F_rel only through d_i = sqrt(sum_j F_rel[i, j]): keep the row sums, free the rest.
            row_sums[name] = rel.sum(dim=1, keepdim=True)
    t1 = time.time()
    stats = _fila_per_layer(layers, lambda name: (row_sums.pop(name), shares[name]), ctx)
    return {**stats, "fisher_passes": len(chunks), "seconds": {"fisher": t1 - t0, "svd": time.time() - t1}}


def lift_lora_fisher(fisher_b: Tensor, fisher_a: Tensor) -> Tensor:
    """VILA's full-weight Fisher estimate F_W ~= F_B @ F_A ([out, r] @ [r, in] -> [out, in], §4)."""
    return fisher_b.float() @ fisher_a.float()


@INITIALIZERS.register("vila", replaces_base=True, uses_fisher=True)
def init_vila(model: nn.Module, ctx: InitContext) -> dict[str, Any]:
    """Fisher measured in LoRA space (A, B random), lifted as F_B @ F_A, then FILA's solve (§4).

    The LoRA-space moments are token-weighted batch moments (``variance_fisher``, mode "batch").
    """
    layers = lora_layers(model)
    factors: dict[str, nn.Parameter] = {}
    with torch.no_grad():
        for name, layer in layers.items():
            for kind, module in (("A", layer.lora_A[ADAPTER]), ("B", layer.lora_B[ADAPTER])):
                module.weight.normal_(0.0, ctx.vila_sigma)
                factors[f"{name}/{kind}"] = module.weight
    t0 = time.time()
    f_forget = variance_fisher(model, ctx.forget_batches, factors, progress=ctx.progress, desc="LoRA Fisher (forget)")
    f_retain = variance_fisher(model, ctx.retain_batches, factors, progress=ctx.progress, desc="LoRA Fisher (retain)")
    t1 = time.time()

    def relative_of(name: str) -> tuple[Tensor, float]:
        # Lifted to [out, in] one layer at a time: no full-size Fisher exists for the whole model.
        lifted_forget = lift_lora_fisher(f_forget[f"{name}/B"], f_forget[f"{name}/A"])
        lifted_retain = lift_lora_fisher(f_retain[f"{name}/B"], f_retain[f"{name}/A"])
        return relative_fisher(lifted_forget, lifted_retain, ctx.eps)

    stats = _fila_per_layer(layers, relative_of, ctx)
    return {**stats, "seconds": {"fisher": t1 - t0, "svd": time.time() - t1}}


def moved_start(layers: dict[str, nn.Module], init: str | None) -> dict[str, tuple[Tensor, Tensor]] | None:
    """The adapters' start (A0, B0) per layer (``lora_layers``) when initialiser ``init`` moved it out of the
    base weights (trait ``replaces_base``: FILA, VILA), else None. Taken right after initialising: the saved
    adapter is s (B A - B0 A0) on the ORIGINAL base (loku.adapters)."""
    if init is None or not INITIALIZERS.trait(init, "replaces_base"):
        return None
    return {name: (layer.lora_A[ADAPTER].weight.detach().clone(), layer.lora_B[ADAPTER].weight.detach().clone())
            for name, layer in layers.items()}


def apply_initializer(model: nn.Module, name: str, ctx: InitContext) -> dict[str, Any]:
    """Run the named initialiser on a PEFT LoRA model in place; returns its statistics for the report."""
    stats = INITIALIZERS.get(name)(model, ctx)
    return {"initializer": name, "fisher_mode": ctx.fisher_mode if name == "fila" else None,
            "eps": ctx.eps if name != "gaussian" else None, "layers": len(lora_layers(model)), **stats}
