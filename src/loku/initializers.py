"""LoRA initialisers (registry ``INITIALIZERS``): plain ``gaussian``, ``fila`` (§3) and ``vila`` (§4).

FILA starts the adapter on the part of each weight that matters for the forget set: a weighted
low-rank approximation of W, weighted row-wise by the relative Fisher. The base layer keeps the
residual W_res = W - s*B@A, so the model computes exactly what it did before (up to rounding).
"""
from __future__ import annotations

import functools
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .fisher import fisher_chunks, gradient_moments, relative_fisher, relative_fisher_rows, variance_fisher
from .registry import Registry

ADAPTER = "default"  # PEFT's adapter name


# --------------------------------------------------------------------------- the math (pure)


def row_weights(fisher_rel: Tensor) -> Tensor:
    """d_i = sqrt(sum_j F_rel[i, j]): one weight per output row (§3)."""
    return fisher_rel.float().sum(dim=1).clamp(min=0).sqrt()


SVD_METHODS = ("exact", "exact64", "lowrank")
OVERSAMPLE = 8  # extra eigenvectors the float32 Gram step keeps, so the top r are well inside its subspace


def truncated_svd(matrix: Tensor, rank: int, method: str = "exact") -> tuple[Tensor, Tensor, Tensor]:
    """U [m, r], S [r], V^T [r, n] of the best rank-r approximation, float32.

    ``exact`` (default): the top r + 8 eigenvectors of the smaller Gram matrix in float32 (only those
    are computed, by LAPACK's syevr on CPU), then one float64 subspace-iteration step with a
    Rayleigh-Ritz solve on that subspace (``_refine``). The float32 Gram alone loses the singular
    vectors where singular values sit close together (its rounding is eps32 * s_1^2); the float64
    step puts them back, so the result agrees with ``exact64`` to float32 rounding (tested) at under
    half its cost on CPU. ``exact64``: the whole eigendecomposition of the Gram matrix in
    float64 (the reference, the previous default). ``lowrank``: randomized (``torch.svd_lowrank``),
    approximate.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"svd method must be one of {SVD_METHODS}, got {method!r}")
    if method == "lowrank":
        u, s, v = torch.svd_lowrank(matrix, q=min(rank + 8, *matrix.shape), niter=4)
        return u[:, :rank], s[:rank], v[:, :rank].T
    if method == "exact64":
        return _gram_svd64(matrix, rank)
    # Work on the tall orientation (m >= n): the Gram matrix M^T M is then the smaller one.
    wide = matrix.shape[0] < matrix.shape[1]
    m = matrix.T if wide else matrix
    basis = _top_gram_eigenvectors(m.float(), min(rank + OVERSAMPLE, m.shape[1]))
    u, s, vh = (t.float() for t in _refine(m.double(), basis.double(), rank))
    return (vh.T, s, u.T) if wide else (u, s, vh)


def _gram_svd64(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The reference: all eigenvectors of the smaller Gram matrix (M M^T or M^T M) in float64, whose
    top r are the top-r singular vectors; the other side follows as M^T U / S."""
    m = matrix.double()
    wide = m.shape[0] <= m.shape[1]
    values, vectors = torch.linalg.eigh(m @ m.T if wide else m.T @ m)  # ascending
    top = vectors[:, -rank:].flip(1)
    s = values[-rank:].flip(0).clamp(min=0).sqrt()
    other = (m.T @ top if wide else m @ top) / s.clamp(min=torch.finfo(torch.float64).tiny)
    other[:, s == 0] = 0  # no direction to speak of: contributes nothing either way
    u, v = (top, other) if wide else (other, top)
    return u.float(), s.float(), v.T.float()


def _top_gram_eigenvectors(m: Tensor, k: int) -> Tensor:
    """The eigenvectors [n, k] of the k largest eigenvalues of m^T m (float32, tall ``m``).

    On CPU only those k are computed (scipy's syevr with an index range: the back-transformation of
    k vectors instead of all n); elsewhere the batched-friendly full ``torch.linalg.eigh``.
    """
    gram = m.T @ m
    n = gram.shape[0]
    if gram.device.type == "cpu" and k < n:
        import scipy.linalg

        # scipy's OpenBLAS keeps its own thread pool beside torch's OpenMP one: one thread, so that the
        # two do not fight over the cores (spinning OpenBLAS workers slow torch's next products).
        with _blas_controller().limit(limits=1, user_api="blas"):
            _, vectors = scipy.linalg.eigh(gram.numpy(), subset_by_index=[n - k, n - 1], driver="evr",
                                           overwrite_a=True, check_finite=False)
        return torch.from_numpy(vectors)
    return torch.linalg.eigh(gram)[1][:, -k:]


@functools.cache
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries (built once: it scans them)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _refine(m: Tensor, basis: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-r SVD of a tall float64 ``m`` from an approximate top subspace ``basis`` [n, k], k >= r.

    One step of subspace iteration (Q = orth(m^T m basis)) followed by Rayleigh-Ritz (the exact SVD
    of m Q [m, k], float64). The subspace error of the float32 eigenvectors shrinks by the factor
    s_{k+1}^2 / s_r^2 and the split inside the subspace is float64-exact, so the top r come out as
    the exact ones up to float32 rounding.
    """
    q = torch.linalg.qr(m.T @ (m @ basis)).Q
    u, s, wh = torch.linalg.svd(m @ q, full_matrices=False)
    u, vh = u[:, :rank], (q @ wh.T[:, :rank]).T
    # LAPACK's signs are arbitrary, and these (syevr's, then QR's and the SVD's) flipped with rounding-level
    # changes of the input, e.g. a Fisher summed in another order across processes: the same start up to
    # the sign of a component, but not the same tensors. Fix them: each right vector's largest entry > 0.
    signs = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))
    signs[signs == 0] = 1
    return u * signs.T, s[:rank], vh * signs


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
    return a, b, torch.addmm(w, b, a, alpha=-scaling)  # W - s*B@A in one pass, no weight-sized temporaries


def _row_weighted_norm(matrix: Tensor, fisher_rel: Tensor) -> Tensor:
    """||D M||_F from the row norms of M (no weighted copy): ||D (W - sBA)|| is ||D W_res||."""
    return torch.linalg.vector_norm(row_weights(fisher_rel) * torch.linalg.vector_norm(matrix.float(), dim=1))


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
        errors[name] = float(_row_weighted_norm(w_res, rel) / _row_weighted_norm(w, rel).clamp(min=1e-30))
        _install(layer, a, b, w_res)
    overall = sum(shares[n] * sizes[n] for n in shares) / max(sum(sizes.values()), 1)
    return {"eps_dominated_share": overall, "eps_dominated_share_per_layer": shares,
            "relative_weighted_error": errors}


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The Fisher pass of the base weights without running the LoRA branch (PEFT's ``disable_adapter``).

    FILA's Fisher is that of the model before unlearning. A fresh adapter has B = 0, so its branch
    adds exactly zero: skipping it changes no number, and saves its rank-r products, scaling and
    additions on every target (a tenth of the pass on SmolLM2). An adapter with some B != 0 does
    change the function, so it is left running.
    """
    disable = getattr(model, "disable_adapter", None)
    fresh = all(not bool(layer.lora_B[ADAPTER].weight.any()) for layer in lora_layers(model).values())
    with disable() if callable(disable) and fresh else nullcontext():
        yield


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
    with adapters_off(model):
        for i, chunk in enumerate(chunks):
            part = f" {i + 1}/{len(chunks)}" if len(chunks) > 1 else ""
            f_forget, _, n_forget = gradient_moments(model, ctx.forget_batches, chunk, mode=ctx.fisher_mode,
                                                     progress=ctx.progress, desc=f"Fisher (forget){part}")
            f_retain, _, n_retain = gradient_moments(model, ctx.retain_batches, chunk, mode=ctx.fisher_mode,
                                                     progress=ctx.progress, desc=f"Fisher (retain){part}")
            for name in chunk:
                layer = layers[name]
                # FILA uses F_rel only through d_i = sqrt(sum_j F_rel[i, j]): keep the row sums, free the rest.
                row_sums[name], shares[name] = relative_fisher_rows(
                    _as_out_in(layer, f_forget.pop(name)), n_forget, _as_out_in(layer, f_retain.pop(name)),
                    n_retain, ctx.eps, name=name)
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
