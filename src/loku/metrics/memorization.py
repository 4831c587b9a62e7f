"""Memorization accuracy MA and extraction likelihood EL_n (docs/algorithms.md §6), plain and fast.

Batches are right-padded (``attention_mask`` 1 then 0); each sequence counts only its own tokens.
Indexing (0-based): for a sequence of T tokens, EL_n averages over the T-n prefixes x[:L],
L = 1..T-n, the n-gram overlap between the greedy continuation of x[:L] up to length T and the
true suffix x[L:]; it is the (1/(T-n)) sum of Jang et al. (the empty prefix cannot be continued).
A greedy continuation here is T-L argmax steps with no early stop at EOS.

Both metrics measure in float32 whatever the model's dtype (:func:`float32_weights`, and any
autocast switched off): in bf16/fp16 the rounding of a whole-sequence forward differs from a
prefix's, near-ties of the argmax flip and whole continuations change (up to 25% relative EL
difference between fast and plain EL on SmolLM2 in bf16), and these numbers decide when unlearning
stops, so they must not depend on how they were computed. The cost: during a measurement the
weights are float32 (twice the memory of bf16/fp16 weights, cast in place, no second copy of the
model) and the forward passes run at float32 speed; afterwards each parameter and buffer gets its
own dtype back, bit for bit (bf16/fp16 -> float32 -> bf16/fp16 is exact), and the same Parameter
objects, so optimizer state stays attached. The numbers are those of the float32 model with the
same (rounded) weights.

The KV cache is passed as ``cache`` where the model's ``forward`` names it so (transformers 5.x;
``past_key_values`` is deprecated there and goes away in 5.40), else as ``past_key_values``. The fast
path reads the cache's ``layers`` and needs transformers >= 4.56.

``extraction_likelihood`` (fast, exact) needs no generation where the model already follows the
text: if the teacher-forced argmax at position L-1 equals x[L], the continuation of x[:L] is
x[L] followed by the continuation of x[:L+1]. Only prefixes where the argmax misses are
generated, batched, from the keys/values of ONE forward pass of the whole sequence (causal
attention: the cache of x[:m] is the first m positions of the cache of x).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["extraction_likelihood", "extraction_likelihood_plain", "extraction_strength", "float32_weights",
           "memorization_accuracy", "ngram_overlap", "strength_from_hits"]


_HALF = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def float32_weights(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with every bf16/fp16 parameter and buffer of ``model`` in float32, in place (no
    second copy of the model; Parameter objects, hence optimizer state, stay attached), and give each
    tensor back its own dtype afterwards, also on an error. bf16/fp16 -> float32 -> back is exact.

    Dtypes are restored tensor by tensor (PEFT keeps LoRA weights in float32 beside a bf16 base; some
    models keep norms or buffers in float32). Only 16-bit floats are raised: float64 would lose bits
    on the way down, and float32 needs nothing. Nested use is free: the inner one finds float32."""
    lowered = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.dtype in _HALF]
    dtypes = [t.dtype for t in lowered]
    try:
        for t in lowered:
            t.data = t.data.float()
        yield
    finally:
        for t, dtype in zip(lowered, dtypes):
            t.data = t.data.to(dtype)


def _in_float32(metric):
    @functools.wraps(metric)
    def measured(model, *args, **kwargs):
        # Autocast (the bf16 compute of full fine-tuning, for one) would round the forward passes again.
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        with float32_weights(model), torch.autocast(device.type, enabled=False):
            return metric(model, *args, **kwargs)

    return measured


def cache_keyword(model) -> str:
    """The name of the KV cache argument: ``cache`` in transformers 5.x (``past_key_values`` is deprecated
    there, removed in 5.40), ``past_key_values`` before. Asked of the model's own ``forward`` (of the base
    model under PEFT); where that names neither, of the installed transformers' output classes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    if "cache" in params or "past_key_values" in params:
        return "cache" if "cache" in params else "past_key_values"
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned, under its new name ``cache`` or its old one (no deprecation warning)."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def _lengths(input_ids: Tensor, attention_mask: Tensor | None) -> list[int]:
    if attention_mask is None:
        return [input_ids.shape[1]] * input_ids.shape[0]
    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]):
        raise ValueError("memorization metrics expect right-padded batches (attention mask 1...1 0...0)")
    return [int(n) for n in lengths.tolist()]


def _forward(model, input_ids: Tensor, attention_mask: Tensor | None, **kwargs):
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    return model(input_ids=input_ids, attention_mask=mask, **kwargs)


def _memorization_from_logits(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    lengths = _lengths(input_ids, attention_mask)
    predicted = logits[:, :-1].argmax(dim=-1)
    hits = (predicted == input_ids[:, 1:]).float()
    valid = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)[None, :] < (
        torch.tensor(lengths, device=input_ids.device)[:, None] - 1)
    return (hits * valid).sum(1) / valid.sum(1).clamp(min=1)


@_in_float32
@torch.no_grad()
def memorization_accuracy(model, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """MA per sequence [B]: the share of positions t = 1..T-1 where argmax p(.|x_<t) == x_t."""
    return _memorization_from_logits(_forward(model, input_ids, attention_mask).logits, input_ids, attention_mask)


def strength_from_hits(hits: Tensor, lengths: Tensor) -> Tensor:
    """Extraction strength per row (docs/algorithms.md §14): ``1 - k/n``, ``k`` the smallest index from
    which every position of the row's ``n = lengths[b]`` valid ones is a hit (``hits`` [B, T] bool, the
    teacher-forced argmax equal to the label; positions at or past ``n`` are ignored).

    When even the last token misses, only the empty suffix matches: ``k = n``, strength 0 (OpenUnlearning's
    loop stops at ``k = n - 1`` there and reports ``1/n``). A row with no valid position scores 0, as there."""
    positions = torch.arange(hits.shape[1], device=hits.device)[None, :]
    valid = positions < lengths[:, None]
    misses = valid & ~hits.bool()
    # k = 1 + the last miss (0 with no miss): the suffix from k on is all hits.
    k = torch.where(misses, positions + 1, torch.zeros_like(positions)).amax(dim=1)
    n = lengths.to(torch.float32)
    return torch.where(lengths > 0, 1 - k.float() / n.clamp(min=1), torch.zeros_like(n))


@_in_float32
@torch.no_grad()
def extraction_strength(model, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Extraction strength per sequence [B] on positions t = 1..T-1 (the tokens MA scores), one forward pass."""
    logits = _forward(model, input_ids, attention_mask).logits
    lengths = torch.tensor(_lengths(input_ids, attention_mask), device=input_ids.device) - 1
    hits = logits[:, :-1].argmax(dim=-1) == input_ids[:, 1:]
    return strength_from_hits(hits, lengths.clamp(min=0))


@_in_float32
@torch.no_grad()
def memorization_and_nll(model, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor
                         ) -> tuple[Tensor, Tensor, int]:
    """(MA per sequence [B], summed float64 token NLL of ``labels``, labelled token count) from ONE
    forward pass: the held-out MA and perplexity the stop rule logs every epoch."""
    from loku.lm import IGNORE_INDEX, token_nll

    logits = _forward(model, input_ids, attention_mask).logits
    nll = token_nll(logits, labels).double().sum()
    return (_memorization_from_logits(logits, input_ids, attention_mask), nll,
            int((labels[:, 1:] != IGNORE_INDEX).sum()))


@_in_float32
@torch.no_grad()
def memorization_and_sequence_nll(model, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor
                                  ) -> tuple[Tensor, Tensor]:
    """(MA, mean token NLL of ``labels``) per sequence [B] from ONE forward pass: what the two-sided
    stop rule checks every few optimizer steps (docs/algorithms.md §12); NLL summed in float64."""
    from loku.lm import IGNORE_INDEX, token_nll

    logits = _forward(model, input_ids, attention_mask).logits
    tokens = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    nll = token_nll(logits, labels).double().sum(dim=1) / tokens
    return _memorization_from_logits(logits, input_ids, attention_mask), nll


def ngram_overlap(prediction: list[int], reference: list[int], n: int) -> float:
    """OVERLAP_n(a, b): the share of a's n-grams (counted with repetition) that occur in b."""
    grams = [tuple(prediction[i : i + n]) for i in range(len(prediction) - n + 1)]
    if not grams:
        return 0.0
    present = {tuple(reference[i : i + n]) for i in range(len(reference) - n + 1)}
    return sum(g in present for g in grams) / len(grams)


def _el_from_continuations(sequence: list[int], continuation_of, n: int) -> float:
    """Mean overlap over prefixes L = 1..T-n; a sequence of n tokens or fewer has no n-gram: 0."""
    total = len(sequence)
    if total <= n:
        return 0.0
    score = 0.0
    for prefix in range(1, total - n + 1):
        continuation = continuation_of(prefix)
        score += 1.0 if continuation is None else ngram_overlap(continuation, sequence[prefix:], n)
    return score / (total - n)


# --------------------------------------------------------------------------- plain reference


@torch.no_grad()
def _greedy(model, prefix: Tensor, steps: int) -> list[int]:
    """``steps`` argmax tokens after ``prefix`` [1, L], decoding with the model's KV cache."""
    keyword = cache_keyword(model)
    out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True)
    generated = [int(out.logits[0, -1].argmax())]
    cache, length = returned_cache(out), prefix.shape[1]
    for _ in range(steps - 1):
        token = torch.tensor([[generated[-1]]], device=prefix.device)
        out = model(input_ids=token, attention_mask=torch.ones(1, length + 1, dtype=torch.long, device=prefix.device),
                    use_cache=True, **{keyword: cache})
        cache, length = returned_cache(out), length + 1
        generated.append(int(out.logits[0, -1].argmax()))
    return generated


@_in_float32
@torch.no_grad()
def extraction_likelihood_plain(model, input_ids: Tensor, n: int = 10, attention_mask: Tensor | None = None) -> Tensor:
    """EL_n per sequence [B] by the definition: one greedy generation per prefix (the reference)."""
    scores = []
    for row, length in zip(input_ids, _lengths(input_ids, attention_mask)):
        sequence = row[:length]
        tokens = sequence.tolist()
        scores.append(_el_from_continuations(
            tokens, lambda p: _greedy(model, sequence[None, :p], length - p), n))
    return torch.tensor(scores, dtype=torch.float32)


# --------------------------------------------------------------------------- fast, exact


@torch.no_grad()
def _generate_from_cache(model, cache_layers, rows: list[tuple[int, int]], first_tokens: list[int],
                         steps: list[int], device) -> list[list[int]]:
    """Greedy continuations for rows (sequence b, prefix length m), batched, from sliced caches.

    Each row's prefix keys/values are right-aligned in one left-padded cache; positions are
    passed explicitly so padding shifts nothing (relative distances, hence sliding windows, too).
    """
    from transformers import DynamicCache

    width = max(m for _, m in rows)
    count = len(rows)
    layers = []
    for keys, values in cache_layers:
        k = keys.new_zeros((count, keys.shape[1], width, keys.shape[3]))
        v = values.new_zeros((count, values.shape[1], width, values.shape[3]))
        for r, (b, m) in enumerate(rows):
            k[r, :, width - m:] = keys[b, :, :m]
            v[r, :, width - m:] = values[b, :, :m]
        layers.append((k, v))
    cache = DynamicCache(ddp_cache_data=layers)  # plain layers: sliding windows come from the attention mask
    mask = torch.zeros((count, width), dtype=torch.long, device=device)
    for r, (_, m) in enumerate(rows):
        mask[r, width - m:] = 1
    positions = torch.tensor([m for _, m in rows], device=device)
    tokens = torch.tensor(first_tokens, device=device)
    generated, keyword = [tokens], cache_keyword(model)
    for step in range(max(steps) - 1):
        mask = torch.cat([mask, mask.new_ones((count, 1))], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=(positions + step)[:, None],
                    use_cache=True, **{keyword: cache})
        cache = returned_cache(out)
        tokens = out.logits[:, -1].argmax(dim=-1)
        generated.append(tokens)
    table = torch.stack(generated, dim=1).tolist()
    return [table[r][: steps[r]] for r in range(count)]


@_in_float32
@torch.no_grad()
def extraction_likelihood(model, input_ids: Tensor, n: int = 10, attention_mask: Tensor | None = None, *,
                          rows_per_batch: int = 64, progress: bool = False) -> Tensor:
    """EL_n per sequence [B], exactly as :func:`extraction_likelihood_plain`, generating only where needed.

    ``rows_per_batch`` bounds how many continuations decode at once (memory: one KV cache each);
    ``progress`` shows a bar over those decoding batches (the slow part on text the model does not know).
    """
    from tqdm.auto import tqdm

    from transformers import DynamicCache

    lengths = _lengths(input_ids, attention_mask)
    # A cache built without the model's config keeps every position, also in sliding-window layers
    # (which would otherwise keep only the last window and lose the prefixes' keys).
    out = _forward(model, input_ids, attention_mask, use_cache=True, **{cache_keyword(model): DynamicCache()})
    argmax = out.logits.argmax(dim=-1).tolist()  # argmax[b][j] predicts position j+1
    cache_layers = [(layer.keys, layer.values) for layer in returned_cache(out).layers]
    sequences = [row[:length].tolist() for row, length in zip(input_ids, lengths)]

    # Prefix lengths m whose greedy step misses the text: the only continuations to generate.
    misses = [(b, m) for b, seq in enumerate(sequences) for m in range(1, len(seq))
              if argmax[b][m - 1] != seq[m]]
    misses.sort(key=lambda bm: lengths[bm[0]] - bm[1], reverse=True)  # similar lengths decode together
    generated: dict[tuple[int, int], list[int]] = {}
    starts = range(0, len(misses), rows_per_batch)
    for start in tqdm(starts, desc=f"EL_{n}: generating {len(misses)} continuations", unit="batch",
                      disable=not progress or not misses, leave=False):
        chunk = misses[start : start + rows_per_batch]
        conts = _generate_from_cache(model, cache_layers, chunk, [argmax[b][m - 1] for b, m in chunk],
                                     [lengths[b] - m for b, m in chunk], input_ids.device)
        generated.update(zip(chunk, conts))

    scores = []
    for b, seq in enumerate(sequences):
        next_miss, upcoming = {}, None  # for each prefix, the first miss at or after it
        for m in range(len(seq) - 1, 0, -1):
            if (b, m) in generated:
                upcoming = m
            next_miss[m] = upcoming

        def continuation(prefix: int, seq=seq, next_miss=next_miss, b=b):
            m = next_miss[prefix]
            return None if m is None else seq[prefix:m] + generated[(b, m)]  # None: the text itself, overlap 1

        scores.append(_el_from_continuations(seq, continuation, n))
    return torch.tensor(scores, dtype=torch.float32)
