"""Attacks an unlearned model should survive (docs/algorithms.md §13): quantization and prefix probing.

**Quantization** (Zhang et al., ICLR 2025: 4-bit quantization brought back 83% of the knowledge a
utility-constrained unlearning had removed, since small updates fall inside one quantization
step). A copy of the model (adapters merged; the input model is never modified) has every Linear
weight rounded the way bitsandbytes stores it, then dequantized back to its dtype:

* ``int8``: absmax per output row (LLM.int8's vector-wise quantization): ``q = round(w * 127 /
  absmax(row))``, ``w' = q * absmax(row) / 127``; round half to even, as ``rint`` in its kernel.
* ``nf4``: the flattened weight (row-major) in blocks of 64 consecutive values, each divided by
  its block's absmax and rounded to the NEAREST of the 16 NF4 code values of QLoRA / bitsandbytes
  (:data:`NF4_CODE`; a value halfway between two codes goes to the lower one, as the kernel's
  strict ``>`` comparisons do), ``w' = code * absmax(block)``; a last block shorter than 64 is
  its own block. No double quantization of the absmax (``bnb_4bit_use_double_quant`` off, the
  transformers default).

As ``from_pretrained(..., load_in_8bit/4bit)`` does, the output embedding (``lm_head``) stays in
full precision; the quantized Linear layers are ``torch.nn.Linear`` and GPT-2's ``Conv1D`` (its
weight is [in, out]: rows are taken of the transpose). Then MA and EL_n of the forget texts, next
to the same numbers of the unquantized model and, when given, of the reference model quantized the
same way. Where ``bitsandbytes`` is installed, ``bitsandbytes=True`` adds its own quantize /
dequantize round trip (``bnb-int8``, ``bnb-nf4``) for comparison.

**Prefix probing**: the forget text cut into a prompt of ``prompt_tokens`` tokens and its target
(the rest); three probes, each scored by teacher-forced MA over the target tokens (argmax given
everything before) and by the greedy continuation of the prompt, as long as the target: ``match``
(share of continuation tokens equal to the target token at the same place) and ``el_<n>``
(OVERLAP_n of the continuation with the target, §6):

* ``plain``      prompt = the text's first ``prompt_tokens`` tokens;
* ``after_text`` the same prompt after ``context_tokens`` tokens of unrelated text (a held-out
  Pile excerpt): a gate or suppression that reacts to the whole input is diluted;
* ``shifted``    prompt = tokens ``shift .. shift + prompt_tokens`` (a different start), target
  the rest.

The relearning check (§11) is :mod:`loku.metrics.relearn`; ``loku eval --suite attacks`` runs it
with the two attacks here (:func:`attack_suite`).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from loku.errors import ConfigError, DataError
from loku.registry import Registry

__all__ = ["AttackSettings", "NF4_CODE", "QUANTIZERS", "attack_suite", "bitsandbytes_available", "prefix_probes",
           "quantization_attack", "quantize_int8_rows", "quantize_nf4_blocks", "quantized_copy"]

# The 16 NF4 code values of bitsandbytes (functional.get_4bit_type("nf4"), QLoRA Appendix E).
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NF4_BLOCK = 64

QUANTIZERS: Registry = Registry("quantization scheme")


# ----------------------------------------------------------------------------- pure quantizers


def _absmax_or_one(absmax: Tensor) -> Tensor:
    # An all-zero row/block quantizes to zeros whatever the scale: 1 avoids 0/0.
    return torch.where(absmax > 0, absmax, torch.ones_like(absmax))


@QUANTIZERS.register("int8", bits=8)
def quantize_int8_rows(weight: Tensor) -> Tensor:
    """``weight`` [out, in] rounded to 8 bits with one absmax scale per row, dequantized, same dtype."""
    if weight.dim() != 2:
        raise ConfigError(f"int8 row quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    absmax = _absmax_or_one(w.abs().amax(dim=1, keepdim=True))
    codes = torch.round(w * (127.0 / absmax)).clamp(-127, 127)  # round half to even, as rint
    return (codes * (absmax / 127.0)).to(weight.dtype)


def nf4_indices(normalized: Tensor) -> Tensor:
    """Index of the nearest NF4 code value of each entry of ``normalized`` (in [-1, 1]); a tie goes to
    the lower code (bitsandbytes' dQuantizeNF4 compares with ``>`` against the midpoints)."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=normalized.device)
    midpoints = (code[1:] + code[:-1]) / 2
    # count of midpoints strictly below x = index of the nearest code, ties to the lower one
    return torch.bucketize(normalized.float().contiguous(), midpoints, right=False)


@QUANTIZERS.register("nf4", bits=4)
def quantize_nf4_blocks(weight: Tensor, block_size: int = NF4_BLOCK) -> Tensor:
    """``weight`` (any shape) rounded to NF4 in absmax blocks of ``block_size`` consecutive values of the
    row-major flattened tensor (the last block may be shorter), dequantized, same shape and dtype."""
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    flat = weight.detach().float().reshape(-1)
    pad = (-flat.numel()) % block_size
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block_size)  # zeros never raise an absmax
    absmax = _absmax_or_one(blocks.abs().amax(dim=1, keepdim=True))
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=flat.device)
    dequantized = code[nf4_indices(blocks / absmax)] * absmax
    return dequantized.reshape(-1)[: flat.numel()].reshape(weight.shape).to(weight.dtype)


# ----------------------------------------------------------------------------- bitsandbytes (optional)


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _bnb_int8(weight: Tensor) -> Tensor:  # pragma: no cover - bitsandbytes is not installed in CI
    import bitsandbytes.functional as bnbf

    codes, row_stats, _ = bnbf.int8_vectorwise_quant(weight.detach().to(torch.float16))
    return (codes.float() * row_stats.float()[:, None] / 127.0).to(weight.dtype)


def _bnb_nf4(weight: Tensor) -> Tensor:  # pragma: no cover - bitsandbytes is not installed in CI
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.detach().float().contiguous(), blocksize=NF4_BLOCK, quant_type="nf4",
                                       compress_statistics=False)
    return bnbf.dequantize_4bit(packed, state).reshape(weight.shape).to(weight.dtype)


BNB_QUANTIZERS: dict[str, Callable[[Tensor], Tensor]] = {"bnb-int8": _bnb_int8, "bnb-nf4": _bnb_nf4}


# ----------------------------------------------------------------------------- models


def _quantizable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, bool]]:
    """(name, module, transposed) of every Linear / Conv1D except the output embedding."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()  # noqa: N806
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    for name, module in model.named_modules():
        if module is output:
            continue
        if isinstance(module, torch.nn.Linear):
            out.append((name, module, False))
        elif Conv1D and isinstance(module, Conv1D):
            out.append((name, module, True))
    return out


def quantized_copy(model: Any, scheme: str | Callable[[Tensor], Tensor]) -> tuple[torch.nn.Module, list[str]]:
    """A copy of ``model`` (adapters merged in) whose Linear weights went through ``scheme`` (a name of
    :data:`QUANTIZERS` or of the bitsandbytes round trips, or a weight -> weight function). Returns the
    copy (eval mode) and the names of the layers quantized. ``model`` itself is never modified."""
    from peft import PeftModel

    if isinstance(scheme, str):
        if scheme in QUANTIZERS:
            fn = QUANTIZERS.get(scheme)
        elif scheme in BNB_QUANTIZERS:
            if not bitsandbytes_available():
                raise ConfigError(f"{scheme}: bitsandbytes is not installed (pip install bitsandbytes)")
            fn = BNB_QUANTIZERS[scheme]
        else:
            raise ConfigError(f"unknown quantization scheme {scheme!r}; choose from: "
                              f"{', '.join([*QUANTIZERS.names(), *BNB_QUANTIZERS])}")
    else:
        fn = scheme
    clone = copy.deepcopy(model)
    if isinstance(clone, PeftModel):
        clone = clone.merge_and_unload()
    names = []
    with torch.no_grad():
        for name, module, transposed in _quantizable(clone):
            weight = module.weight
            new = fn(weight.t()).t() if transposed else fn(weight)
            weight.copy_(new)
            names.append(name)
    return clone.eval(), names


# ----------------------------------------------------------------------------- settings


@dataclass
class AttackSettings:
    """What the attacks measure; recorded with their results."""

    schemes: tuple[str, ...] = ("int8", "nf4")  # quantization schemes (QUANTIZERS)
    bitsandbytes: bool = True  # also bitsandbytes' own round trip where it is installed
    prompt_tokens: int = 32  # prefix probing: prompt length
    shift: int = 16  # the shifted probe's prompt starts this many tokens into the text
    context_tokens: int = 96  # tokens of unrelated text before the prompt (after_text probe)
    el_n: int = 10
    batch_size: int = 8

    def validate(self) -> "AttackSettings":
        unknown = [s for s in self.schemes if s not in QUANTIZERS]
        if unknown or not self.schemes:
            raise ConfigError(f"attack schemes: unknown {', '.join(unknown) or '(none given)'}; choose from: "
                              f"{', '.join(QUANTIZERS.names())}")
        for name in ("prompt_tokens", "shift", "context_tokens", "el_n", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"attacks.{name} must be a positive integer, got {value!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["schemes"] = list(self.schemes)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "AttackSettings":
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"attacks: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "schemes" in values:
            values["schemes"] = tuple(values["schemes"])
        return cls(**values).validate()


# ----------------------------------------------------------------------------- quantization attack


def _memorization(model: Any, tokenizer: Any, texts: Sequence[str], settings: AttackSettings) -> dict[str, float]:
    from loku.metrics.relearn import memorization_of_texts

    return memorization_of_texts(model, tokenizer, texts, el_n=settings.el_n, batch_size=settings.batch_size)


def _quantized_numbers(model: Any, tokenizer: Any, texts: Sequence[str], settings: AttackSettings,
                       schemes: Sequence[str]) -> tuple[dict[str, dict[str, float]], int]:
    out = {"none": _memorization(model, tokenizer, texts, settings)}
    layers = 0
    for scheme in schemes:
        clone, names = quantized_copy(model, scheme)
        out[scheme] = _memorization(clone, tokenizer, texts, settings)
        layers = len(names)
        del clone
    return out, layers


def quantization_attack(model: Any, tokenizer: Any, texts: Sequence[str], *,
                        settings: AttackSettings | None = None, reference: Any = None,
                        reference_numbers: dict[str, Any] | None = None) -> dict[str, Any]:
    """MA and EL_n of ``texts`` for ``model`` unquantized (``"none"``) and after each scheme; the same for
    ``reference`` (or its stored ``reference_numbers``) when given. ``{"model": {scheme: {"ma", "el_n"}},
    "reference": ... or None, "layers": quantized layer count, "settings"}``."""
    settings = (settings or AttackSettings()).validate()
    schemes = list(settings.schemes)
    if settings.bitsandbytes and bitsandbytes_available():  # pragma: no cover - not installed in CI
        schemes += list(BNB_QUANTIZERS)
    numbers, layers = _quantized_numbers(model, tokenizer, texts, settings, schemes)
    if reference_numbers is None and reference is not None:
        reference_numbers, _ = _quantized_numbers(reference, tokenizer, texts, settings, schemes)
    return {"model": numbers, "reference": reference_numbers, "layers": layers, "n": len(texts),
            "bitsandbytes": bitsandbytes_available(), "settings": settings.to_dict()}


# ----------------------------------------------------------------------------- prefix probing


def _probe_rows(ids: list[int], context: list[int], settings: AttackSettings) -> dict[str, tuple[list[int], int]]:
    """Per probe: (the whole scored sequence, where its target starts)."""
    p, s = settings.prompt_tokens, settings.shift
    return {"plain": (ids, p),
            "after_text": (context + ids, len(context) + p),
            "shifted": (ids[s:], p)}


def _teacher_forced_hits(model: Any, tokenizer: Any, rows: list[tuple[list[int], int]], batch_size: int
                         ) -> list[float]:
    """Per row (sequence, start): the share of target tokens sequence[start:] that are the argmax given
    everything before them."""
    from loku.lm import ensure_pad_token, forward_rows

    out = [0.0] * len(rows)
    for i, logits in forward_rows(model, [r[0] for r in rows], pad_id=ensure_pad_token(tokenizer),
                                  batch_size=batch_size):
        seq, start = rows[i]
        predicted = logits[start - 1:-1].float().argmax(-1).tolist()
        target = seq[start:]
        out[i] = sum(a == b for a, b in zip(predicted, target)) / len(target)
    return out


def prefix_probes(model: Any, tokenizer: Any, texts: Sequence[str], context_texts: Sequence[str], *,
                  settings: AttackSettings | None = None) -> dict[str, Any]:
    """The three probes of the module docstring on ``texts``; ``context_texts`` (cycled, each cut to
    ``context_tokens`` tokens) are the unrelated text before the prompt. Per probe the mean ``ma``,
    ``match`` and ``el_<n>`` over the texts."""
    from loku.lm import greedy_generate
    from loku.metrics.memorization import ngram_overlap
    from loku.metrics.reference import token_ids

    settings = (settings or AttackSettings()).validate()
    ids = token_ids(tokenizer, texts)
    shortest = settings.shift + settings.prompt_tokens + 1
    short = [i + 1 for i, s in enumerate(ids) if len(s) < shortest]
    if short:
        raise DataError(f"prefix probing: forget text(s) {', '.join(map(str, short[:5]))} have fewer than {shortest} "
                        f"tokens (shift {settings.shift} + prompt {settings.prompt_tokens} + 1 to predict); lower "
                        "the probe's prompt tokens or shift")
    contexts = [c for c in token_ids(tokenizer, context_texts, settings.context_tokens) if c]
    if not contexts:
        raise DataError("prefix probing: no unrelated text to put before the prompt")
    rows = [_probe_rows(s, contexts[i % len(contexts)], settings) for i, s in enumerate(ids)]
    key = f"el_{settings.el_n}"
    out: dict[str, Any] = {}
    for probe in ("plain", "after_text", "shifted"):
        probe_rows = [r[probe] for r in rows]
        ma = _teacher_forced_hits(model, tokenizer, probe_rows, settings.batch_size)
        prompts = [seq[:start] for seq, start in probe_rows]
        targets = [seq[start:] for seq, start in probe_rows]
        continuations = greedy_generate(model, tokenizer, prompts, max_new_tokens=[len(t) for t in targets],
                                        batch_size=settings.batch_size, stop_at_eos=False)
        match = [sum(a == b for a, b in zip(c, t)) / len(t) for c, t in zip(continuations, targets)]
        el = [ngram_overlap(c, t, settings.el_n) for c, t in zip(continuations, targets)]
        n = len(texts)
        out[probe] = {"ma": sum(ma) / n, "match": sum(match) / n, key: sum(el) / n,
                      "per_item": {"ma": ma, "match": match, key: el}}
    out["settings"] = settings.to_dict()
    out["n"] = len(texts)
    return out


# ----------------------------------------------------------------------------- loku eval --suite attacks


def attack_suite(model: Any, tokenizer: Any, opts: Any, *, max_tokens: int = 200) -> dict[str, Any]:
    """``loku eval --suite attacks``: the relearning check (:func:`loku.metrics.relearn.relearn_suite`),
    the quantization attack and the prefix probes on the tdec suite's forget texts (``--forget``, its
    first ``--limit`` rows, cut to ``max_tokens`` tokens); the unrelated text is Pile held-out excerpts
    (``pile.csv``) after the ones tdec uses. With ``--reference`` (``opts.load_reference``) the reference
    is quantized the same way and is the relearning control. ``opts``: :class:`loku.eval_options.EvalOptions`."""
    import gc
    from pathlib import Path

    from loku.bench.data import clip_texts
    from loku.data import read_texts
    from loku.eval_options import DEFAULT_FORGET
    from loku.metrics.relearn import relearn_suite
    from loku.provenance import jsonable

    settings = AttackSettings(prompt_tokens=opts.attack_prompt_tokens, shift=opts.attack_shift,
                              context_tokens=opts.attack_context_tokens, el_n=opts.el_n,
                              batch_size=opts.batch_size).validate()
    forget_path = Path(opts.forget_path or opts.data_dir / DEFAULT_FORGET)
    pile = opts.eval_file("pile.csv")
    for path, role in ((forget_path, "forget"), (pile, "held-out")):
        opts.use(path, role)
    forget = clip_texts(tokenizer, opts.take(read_texts(forget_path, role="forget")), max_tokens)
    heldout = read_texts(pile, role="held-out")
    context = heldout[len(forget): 2 * len(forget)] or heldout  # after tdec's held-out excerpts
    reference = None
    if opts.load_reference is not None:
        reference, reference_tokenizer = opts.load_reference()
        from loku.metrics.reference import check_same_vocabulary

        check_same_vocabulary(tokenizer, reference_tokenizer)
    out = {"forget_file": str(forget_path),
           "quantization": quantization_attack(model, tokenizer, forget, settings=settings, reference=reference),
           "probing": prefix_probes(model, tokenizer, forget, context, settings=settings)}
    if reference is not None:
        out["probing_reference"] = prefix_probes(reference, tokenizer, forget, context, settings=settings)
    out["relearn"] = relearn_suite(model, tokenizer, opts, original=reference, max_tokens=max_tokens)
    del reference
    gc.collect()
    return jsonable(out)
