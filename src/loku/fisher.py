"""Empirical Fisher information of chosen weights (docs/algorithms.md §2) and the relative Fisher.

F_W(D) = (1/|D|) sum_x (dL(x)/dW)^2, where L(x) is the SUM of the sequence's unmasked token NLLs
(the paper's Eq. 2), accumulated in float32 whatever the model's dtype.

Modes:

* ``per_sample`` (the paper, default): one squared gradient per sequence. For a plain Linear or
  GPT-2 Conv1D weight (a LoRA layer's base layer included) it comes from ONE forward and backward
  per batch, as Opacus / BackPACK do: a forward hook keeps the layer's input X [B, T, in] and a
  tensor hook on its output gets G [B, T, out] = dL/d(output), with L the sum of the per-sequence
  losses; sequence b's weight gradient is G_b^T X_b ([out, in]; Conv1D stores [in, out]: X_b^T G_b).
  Any other parameter (tied, not a Linear weight, a layer called twice per forward) falls back to
  ``per_sample_loop``.
* ``per_sample_loop``: the reference: one ``autograd.grad`` per sequence, padding cut off. Same
  numbers up to rounding, many times slower.
* ``batch`` (the official code): the gradient of each mini-batch's MEAN token NLL, squared, times
  the batch's token count, summed, divided by the total token count.

The caller makes the batches; their size is the Fisher pass's own batch size. ``per_sample``
results do not depend on it (up to rounding): a bigger batch is faster and needs more activation
memory. ``batch`` results do depend on it (the official code used the training batch size).

Memory: one float32 buffer per parameter and data set (two with first moments); ``fisher_bytes``
estimates it and ``fisher_chunks`` splits the parameters into groups that fit a budget, so that a
caller (loku.initializers) can run the pass once per group when all targets do not fit at once.

Under ``torch.distributed`` each process passes its own share of the batches; the sums and counts
are all-reduced, so every process ends with the Fisher of the whole data set.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import TrainingDiverged
from .lm import is_conv1d
from .losses import IGNORE_INDEX, token_nll

FISHER_MODES = ("per_sample", "batch", "per_sample_loop")
TILE_ELEMENTS = 1 << 17  # per-sample gradient block of the hooked pass: 512 KB of float32, about half an L2


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """L(x) per sequence [B]: the sum of its unmasked token NLLs, float32 (§2, Eq. 2).

    Kept on ``token_nll`` although its transposed log-softmax copies the logits (about 5% of FILA's
    start on SmolLM2): a loss laid out as [B*T, V] rows rounds differently (1e-7), and FILA's solve
    turned that into a 0.1% mean change of the start's B@A; with this loss the Fisher is bit for bit
    the previous one.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_nll(logits, batch["labels"]).sum(dim=1)


def _token_count(batch: dict[str, Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _rows(batch: dict[str, Tensor]) -> Iterable[dict[str, Tensor]]:
    """Each sequence of a right-padded batch on its own, padding cut off."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    for i, length in enumerate(lengths):
        yield {k: v[i : i + 1, : int(length)] for k, v in batch.items()}


def _all_reduce(tensors: list[Tensor]) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in tensors:
            torch.distributed.all_reduce(t)


# --------------------------------------------------------------------------- the hooked per-sample pass


def hookable_layers(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, nn.Module]:
    """For each parameter that is the weight of exactly one Linear / Conv1D module of ``model``, that module.

    Such a weight's per-sample gradients can be had from the layer's inputs and output gradients.
    A parameter owned by several modules (tied embeddings) or by anything else is left out.
    """
    from transformers.pytorch_utils import Conv1D

    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    layers = {}
    for name, p in params.items():
        found = owners.get(id(p), [])
        if (len(found) == 1 and isinstance(found[0], (nn.Linear, Conv1D)) and found[0].weight is p
                and p.is_floating_point()):
            layers[name] = found[0]
    return layers


class _PerSampleHooks:
    """Per-sample squared gradients of Linear / Conv1D weights from one forward/backward per batch.

    The forward hook adds a zero scalar "probe" (requires grad) to the layer's output and hooks the
    sum: the backward is ``autograd.grad(loss, probes)``, which computes every hooked output's
    gradient G and nothing else (no weight gradients, nothing below the lowest hooked layer).
    """

    def __init__(self, layers: dict[str, nn.Module], second: dict[str, Tensor], first: dict[str, Tensor] | None):
        self.second, self.first = second, first
        self.handles = {name: layer.register_forward_hook(self._forward_hook(name, layer))
                        for name, layer in layers.items()}
        self.mask: Tensor | None = None
        self.padded = False
        self.calls: dict[str, int] = {}
        self.unsupported: set[str] = set()
        self.probes: list[Tensor] = []

    def run(self, model: nn.Module, batch: dict[str, Tensor]) -> list[str]:
        """Add one batch's per-sample moments; returns the layers the hooks could not handle on it."""
        self.mask, self.calls, self.unsupported, self.probes = batch["attention_mask"].bool(), {}, set(), []
        self.padded = not bool(self.mask.all())
        try:
            loss = _forward_loss(model, batch).sum()  # sequences do not interact: d(sum)/dY_b = dL(x_b)/dY_b
            if self.probes and loss.requires_grad:
                torch.autograd.grad(loss, self.probes, allow_unused=True)
        finally:
            self.probes, self.mask = [], None
        return sorted(self.unsupported)

    def drop(self, name: str) -> None:
        self.handles.pop(name).remove()

    def remove(self) -> None:
        for handle in self.handles.values():
            handle.remove()
        self.handles.clear()

    def _forward_hook(self, name: str, layer: nn.Module):
        def hook(module: nn.Module, inputs: tuple, output: Tensor):
            self.calls[name] = self.calls.get(name, 0) + 1
            x = inputs[0] if inputs else None
            # One call per forward on [B, T, in] activations aligned with the batch, or per-row autograd.
            if (self.calls[name] > 1 or not torch.is_grad_enabled() or not isinstance(x, Tensor) or x.dim() != 3
                    or tuple(x.shape[:2]) != tuple(self.mask.shape) or tuple(output.shape[:2]) != tuple(x.shape[:2])):
                self.unsupported.add(name)
                return None
            probe = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            self.probes.append(probe)
            output = output + probe
            output.register_hook(lambda g: self._accumulate(name, layer, x, g))
            return output

        return hook

    @torch.no_grad()
    def _accumulate(self, name: str, layer: nn.Module, x: Tensor, g: Tensor) -> None:
        if name in self.unsupported:  # called again later in the same forward: the loop path takes it
            return
        x, g = x.float(), g.float()
        if self.padded:
            # Padding positions carry no loss, so G is 0 there; masking both also keeps NaN/inf junk out.
            keep = self.mask[:, :, None]
            x, g = torch.where(keep, x, 0), torch.where(keep, g, 0)
        # dL(x_b)/dW = sum_t G_b[t]^T X_b[t]: [out, in] for Linear, [in, out] for Conv1D (its storage),
        # i.e. left[b] @ right[b] with left [B, rows, T] and right [B, T, cols] in the buffer's layout.
        left, right = (x.transpose(1, 2), g) if is_conv1d(layer) else (g.transpose(1, 2), x)
        second, first = self.second[name], None if self.first is None else self.first[name]
        # One GEMM per sequence and block of rows into a reused buffer and a fused square-add. Blocks of
        # TILE_ELEMENTS keep the buffer and the block of sums in cache across the batch's sequences (a
        # weight-sized buffer went to memory and back once per sequence: ~25% slower on SmolLM2's
        # layers); on CPU a batched bmm into [B, out, in] ran at half the GEMM speed. On an accelerator
        # one block (fewer, larger kernels).
        step = max(1, TILE_ELEMENTS // second.shape[1]) if second.device.type == "cpu" else second.shape[0]
        buffer = torch.empty((min(step, second.shape[0]), second.shape[1]), dtype=second.dtype, device=second.device)
        for start in range(0, second.shape[0], step):
            rows = slice(start, start + step)
            block = second[rows]
            grad = buffer[: block.shape[0]]
            for b in range(x.shape[0]):
                torch.mm(left[b, rows], right[b], out=grad)
                if first is not None:
                    first[rows].add_(grad)
                block.addcmul_(grad, grad)


# --------------------------------------------------------------------------- the autograd passes


def _autograd_moments(model: nn.Module, batch: dict[str, Tensor], params: Mapping[str, Tensor],
                      second: dict[str, Tensor], first: dict[str, Tensor] | None, mode: str) -> None:
    """Add one batch's moments of ``params`` with plain autograd: the gradient of each sequence's sum
    loss (``per_sample_loop``, weight 1) or of the batch's mean token NLL (``batch``, weight = tokens)."""
    names, tensors = list(params), list(params.values())
    if mode == "batch":
        tokens = _token_count(batch)
        units = [(batch, float(tokens), max(tokens, 1))]
    else:
        units = [(row, 1.0, 1) for row in _rows(batch)]
    for unit, weight, divisor in units:
        loss = _forward_loss(model, unit).sum() / divisor
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for name, g in zip(names, grads):
            if g is not None:
                second[name].add_(g.float().square(), alpha=weight)
                if first is not None:
                    first[name].add_(g.float(), alpha=weight)


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

    ``per_sample`` / ``per_sample_loop``: one gradient per sequence (of its summed token NLL), weight 1.
    ``batch``: one gradient of each batch's mean token NLL, weighted by its token count. Float32
    sums in the parameters' own shapes, all-reduced across processes. The parameters need not be
    trainable: gradients never touch ``.grad``, and ``requires_grad`` is restored afterwards.
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"fisher mode must be one of {FISHER_MODES}, got {mode!r}")
    second = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    first = {n: torch.zeros_like(s) for n, s in second.items()} if first_moment else None
    weight_sum = torch.zeros((), dtype=torch.float64, device=_device(model))
    layers = hookable_layers(model, params) if mode == "per_sample" else {}
    loop = {n: p for n, p in params.items() if n not in layers}
    loop_mode = "batch" if mode == "batch" else "per_sample_loop"
    flags = {n: p.requires_grad for n, p in params.items()}
    modes = {m: m.training for m in model.modules()}  # a PEFT wrapper's flag can differ from its model's
    model.eval()  # no dropout: the Fisher of the deterministic model
    hooks = _PerSampleHooks(layers, second, first) if layers else None
    try:
        # Hooked weights need no gradient of their own: the probes make their outputs require grad.
        for p in loop.values():
            p.requires_grad_(True)
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            batch = {k: v.to(_device(model)) for k, v in batch.items()}
            if hooks is not None:
                for name in hooks.run(model, batch):  # e.g. a layer called twice per forward
                    hooks.drop(name)
                    loop[name] = params[name]
                    params[name].requires_grad_(True)
            if loop:
                _autograd_moments(model, batch, loop, second, first, loop_mode)
            weight_sum += _token_count(batch) if mode == "batch" else batch["input_ids"].shape[0]
    finally:
        if hooks is not None:
            hooks.remove()
        for name, p in params.items():
            p.requires_grad_(flags[name])
        for module, training in modes.items():
            module.training = training
    _all_reduce([*second.values(), *(first or {}).values(), weight_sum])
    return second, first, weight_sum


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


# --------------------------------------------------------------------------- memory budget


def fisher_bytes(params: Mapping[str, Tensor], sets: int = 2, *, first_moment: bool = False) -> int:
    """Bytes of the float32 buffers a Fisher pass over ``params`` holds for ``sets`` data sets.

    FILA keeps the forget and the retain Fisher of every target (sets=2): about 43 GB for the QV+FFN
    targets of Llama-2-7B. Activations and one weight-sized temporary per layer come on top.
    """
    return sets * (2 if first_moment else 1) * 4 * sum(p.numel() for p in params.values())


def fisher_chunks(params: Mapping[str, Tensor], max_bytes: int | None, sets: int = 2, *,
                  first_moment: bool = False) -> list[dict[str, Tensor]]:
    """``params`` split, in order, into groups whose Fisher buffers (``fisher_bytes``) fit ``max_bytes``.

    One group when ``max_bytes`` is None or everything fits. A parameter bigger than the budget on
    its own makes a group of one (the pass cannot split a weight). Each group costs one more pass
    over the data, so the budget should be as large as memory allows.
    """
    if max_bytes is None:
        return [dict(params)] if params else []
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    chunks: list[dict[str, Tensor]] = []
    current: dict[str, Tensor] = {}
    used = 0
    for name, p in params.items():
        size = fisher_bytes({name: p}, sets, first_moment=first_moment)
        if current and used + size > max_bytes:
            chunks.append(current)
            current, used = {}, 0
        current[name] = p
        used += size
    if current:
        chunks.append(current)
    return chunks


def fisher_memory_budget(device: torch.device | str, share: float = 0.5) -> int | None:
    """A ``max_bytes`` for ``fisher_chunks``: ``share`` of a CUDA device's free memory (the rest is left
    for the pass's activations); None, no chunking, on other devices."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * share)


def relative_fisher_rows(forget: Tensor, forget_weight: Tensor, retain: Tensor, retain_weight: Tensor,
                         eps: float = 1e-5, *, name: str = "weight") -> tuple[Tensor, float]:
    """Row sums [out, 1] of F_rel = F_f / (F_r + eps) and the eps-dominated share, from the moment sums.

    ``forget`` / ``retain`` are ``gradient_moments``'s second-moment sums, laid out [out, in] (a
    transposed view is fine), and their weight sums; both are CONSUMED (divided in place). The same
    operations as ``empirical_fisher`` + ``relative_fisher`` + ``sum(dim=1)``, in three in-place
    passes instead of a dozen over weight-sized temporaries: FILA needs nothing of F_rel but its row
    sums (§3). Raises ``TrainingDiverged`` naming ``name`` when either Fisher is not finite; all
    entries are >= 0, so a float64 sum is finite exactly when every entry is.
    """
    f_forget = forget.div_(forget_weight.clamp(min=1).float())
    f_retain = retain.div_(retain_weight.clamp(min=1).float())
    for role, value in (("forget", f_forget), ("retain", f_retain)):
        if not bool(torch.isfinite(value.sum(dtype=torch.float64))):
            _checked({name: value}, f"Fisher ({role})")
    share = float(torch.count_nonzero(f_retain < eps)) / max(f_retain.numel(), 1)
    rows = f_forget.div_(f_retain.add_(eps)).sum(dim=1, keepdim=True)
    return rows, share


def relative_fisher(forget: Tensor, retain: Tensor, eps: float = 1e-5) -> tuple[Tensor, float]:
    """F_f / (F_r + eps), and the share of entries where eps dominates (F_r < eps).

    A large share means the ratio is mostly "F_f times 1/eps": with small models the retain
    Fisher can sit below eps almost everywhere (§2).
    """
    ratio = forget.float() / (retain.float() + eps)
    return ratio, float((retain < eps).float().mean())
