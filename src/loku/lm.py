"""Running a causal LM over token sequences: the pieces the losses, the training loop and every metric share.

* Token arithmetic: :data:`IGNORE_INDEX`, :func:`shift`, :func:`token_nll`, :func:`token_logprobs`
  (float32 whatever the model computes in).
* Tokenizer and model facts: :func:`ensure_pad_token` (the one pad-token policy), :func:`start_token`,
  :func:`eos_token_ids`, :func:`encode`, :func:`context_length` (the one reading of the config).
* Batches: :func:`pad_sequences` (the one padder, right or left), :func:`eval_mode`,
  :func:`progress_bar`, :func:`forward_rows` (right-padded, one row of logits at a time),
  :func:`per_sequence` / :func:`mean_over_batches` (a per-sequence metric such as MA or EL over
  padded batches).
* Scoring and generation: :func:`score_continuations` (teacher-forced log-likelihood and greedy
  match of continuations, left padding) and :func:`greedy_generate` (``model.generate``, left padding).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, DataError, ModelError
from .provenance import model_device

__all__ = [
    "ContinuationScores",
    "IGNORE_INDEX",
    "context_length",
    "encode",
    "ensure_pad_token",
    "eos_token_ids",
    "eval_mode",
    "forward_rows",
    "greedy_generate",
    "mean_over_batches",
    "pad_sequences",
    "per_sequence",
    "progress_bar",
    "score_continuations",
    "shift",
    "start_token",
    "token_logprobs",
    "token_nll",
]

IGNORE_INDEX = -100  # label value the losses and scores skip (padding, prompts, context-only tokens)
DEFAULT_CONTEXT = 2048
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


# ----------------------------------------------------------------------------- token arithmetic

def shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align position t's logits with token t+1, as Hugging Face causal LMs do."""
    return logits[:, :-1], labels[:, 1:]


def token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token NLL [B, T-1] in float32 of unshifted ``logits`` [B, T, V]; 0 where the label is masked."""
    logits, labels = shift(logits, labels)
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
    return nll * (labels != IGNORE_INDEX)


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """``log p(target)`` per position in float32, as ``logit - logsumexp(logits)``.

    ``logits`` is ``[..., V]`` (any dtype, already aligned with ``targets``), ``targets`` the
    matching ``[...]`` token ids (all valid). Computing in float32 keeps bf16/fp16 models' scores
    comparable to float32 ones, and is more accurate than log_softmax over a big vocabulary.
    """
    scores = logits.float()
    picked = scores.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scores, dim=-1)


# ----------------------------------------------------------------------------- tokenizer and model facts

def ensure_pad_token(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS token.

    A tokenizer without a pad token (GPT-2, GPT-Neo) gets its EOS token as pad token, so every
    later batch and a saved tokenizer agree. Padding never reaches a loss or a score (attention 0,
    label :data:`IGNORE_INDEX`, rows cut back to their length), so which real token pads does not
    matter. Raises :class:`ModelError` when the tokenizer has neither.
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        if getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return eos
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise ModelError(f"{name}: tokenizer has neither a pad token nor an EOS token to pad with; add a "
                     "\"pad_token\" (e.g. \"<pad>\") to its tokenizer_config.json, or set "
                     "tokenizer.pad_token in Python")


def start_token(tokenizer: Any) -> int:
    """A token to condition on when a context is empty (BOS, else EOS, else the pad token)."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return ensure_pad_token(tokenizer)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a generation: the model's generation config, its config and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    """Token ids of ``text``, with the tokenizer's special tokens (BOS...) when ``special``."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def context_length(model: Any, default: int = DEFAULT_CONTEXT) -> int:
    """The longest sequence the model's positions allow: the first positive integer among its config's
    ``max_position_embeddings``, ``n_positions``, ``n_ctx``, ``seq_length`` (names differ by family),
    else ``default``."""
    cfg = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


# ----------------------------------------------------------------------------- batches

def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right") -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, long CPU tensors [len(seqs), longest]: each sequence padded with
    ``pad_id``, mask 1 on its tokens and 0 on padding.

    ``side="right"`` puts the tokens first (training batches, MA/EL, :func:`forward_rows`);
    ``side="left"`` puts them last, so the final positions of every row line up (generation and
    scoring the last tokens).
    """
    if side not in ("right", "left"):
        raise ConfigError(f"side must be 'right' or 'left', got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        n = len(seq)
        if n:
            cols = slice(0, n) if side == "right" else slice(width - n, width)
            ids[i, cols] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Switch to eval mode and no-grad for the block; restore the training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def progress_bar(iterable, *, total: int | None = None, desc: str = "", enabled: bool = False):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


def _model_logits(model: Any, ids: Tensor, mask: Tensor) -> Tensor:
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out[0]


def forward_rows(
    model: Any,
    seqs: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(index, logits)`` for each non-empty sequence, logits ``[len, V]`` in model dtype.

    Sequences are sorted by length (less padding), batched with right padding and an attention
    mask, and run under eval mode / no-grad on the model's device. Each row is cut back to its
    own length, so padding can never reach a score; callers do the float32 math one row at a
    time, which keeps memory at one row of float32 logits. Grad mode and the training flag are
    the caller's again at every yield.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted((i for i, s in enumerate(seqs) if len(s)), key=lambda i: -len(seqs[i]))
    device = model_device(model)
    starts = range(0, len(order), batch_size)
    for start in progress_bar(starts, total=len(starts), desc=desc, enabled=progress):
        idx = order[start:start + batch_size]
        ids, mask = pad_sequences([seqs[i] for i in idx], pad_id)
        # The context closes before each yield: a generator left half-consumed must not leave
        # no-grad (a global mode) or eval mode on in its caller.
        with eval_mode(model):
            logits = _model_logits(model, ids.to(device), mask.to(device))
        for row, i in enumerate(idx):
            yield i, logits[row, :len(seqs[i])]


def per_sequence(metric: Callable[..., Tensor], model: Any, batches: Sequence[dict], *, bar: str | None = None,
                 **kwargs: Any) -> Tensor:
    """``metric(model, input_ids, attention_mask=..., **kwargs)`` of every sequence of right-padded
    ``batches`` (dicts with ``input_ids`` and ``attention_mask``), as one float32 CPU tensor.

    Runs under :func:`eval_mode` on the model's device; ``bar`` labels a progress bar over the
    batches (None: no bar). MA and EL_n over the forget or held-out batches are
    ``per_sequence(memorization_accuracy, ...)`` and ``per_sequence(extraction_likelihood, ..., n=n)``.
    """
    device = model_device(model)
    values = []
    with eval_mode(model):
        for b in progress_bar(batches, total=len(batches), desc=bar or "", enabled=bar is not None):
            values.append(metric(model, b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                                 **kwargs).float().cpu())
    return torch.cat(values) if values else torch.zeros(0)


def mean_over_batches(metric: Callable[..., Tensor], model: Any, batches: Sequence[dict], *,
                      bar: str | None = None, **kwargs: Any) -> float:
    """The mean over sequences of :func:`per_sequence` (NaN when there are none)."""
    values = per_sequence(metric, model, batches, bar=bar, **kwargs)
    return float(values.mean()) if values.numel() else float("nan")


# ----------------------------------------------------------------------------- scoring and generation

def _forward_last_logits(model: Any, ids: Tensor, mask: Tensor, keep: int) -> Tensor:
    """Logits of the last ``keep`` positions of a left-padded batch, [B, keep, V] (any dtype).

    Position ids are derived from the mask so left padding does not shift positions; models
    without ``position_ids`` / ``logits_to_keep`` fall back to the plain call.
    """
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    attempts = (
        {"position_ids": position_ids, "logits_to_keep": keep},
        {"position_ids": position_ids},
        {},
    )
    last_error: TypeError | None = None
    for extra in attempts:
        try:
            out = model(input_ids=ids, attention_mask=mask, **extra)
        except TypeError as err:  # the model does not take one of the optional arguments
            last_error = err
            continue
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -keep:]
    raise last_error  # type: ignore[misc]


@dataclass
class ContinuationScores:
    """Per pair: summed NLL of the continuation tokens, their count, and greedy exact match."""

    nll_sum: Tensor  # [N] float32
    n_tokens: Tensor  # [N] long
    greedy: Tensor  # [N] bool: argmax == token at every continuation position

    @property
    def mean_nll(self) -> Tensor:
        return self.nll_sum / self.n_tokens.clamp(min=1).to(self.nll_sum.dtype)


def _fit_pair(ctx: list[int], cont: list[int], max_length: int, bos: int) -> tuple[list[int], list[int]]:
    if not ctx:
        ctx = [bos]
    if not cont:
        raise DataError("a continuation to score encodes to no tokens; give non-empty answers/choices")
    if len(cont) > max_length - 1:
        cont = cont[: max_length - 1]
    room = max_length - len(cont)
    return ctx[-room:], cont


def score_continuations(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> ContinuationScores:
    """Score token continuations given token contexts, batched with left padding.

    Each pair is ``(context_ids, continuation_ids)``; only continuation tokens are scored
    (teacher forcing, log-probabilities in float32). Contexts are truncated on the left to fit
    ``max_length`` (default: the model's context length); an empty context is replaced by BOS
    (else EOS). Continuations longer than ``max_length - 1`` are cut on the right.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    limit = max_length or context_length(model)
    bos, pad = start_token(tokenizer), ensure_pad_token(tokenizer)
    fitted = [_fit_pair(list(c), list(x), limit, bos) for c, x in pairs]
    n = len(fitted)
    nll = torch.zeros(n, dtype=torch.float32)
    count = torch.zeros(n, dtype=torch.long)
    greedy = torch.zeros(n, dtype=torch.bool)
    order = sorted(range(n), key=lambda i: -(len(fitted[i][0]) + len(fitted[i][1])))
    device = model_device(model)
    starts = range(0, n, batch_size)
    with eval_mode(model):
        for start in progress_bar(starts, total=len(starts), desc=desc, enabled=progress):
            idx = order[start : start + batch_size]
            seqs = [fitted[i][0] + fitted[i][1] for i in idx]
            conts = torch.tensor([len(fitted[i][1]) for i in idx])
            ids, mask = (t.to(device) for t in pad_sequences(seqs, pad, side="left"))
            keep = int(conts.max()) + 1
            logits = _forward_last_logits(model, ids, mask, keep)
            scores = logits[:, :-1].float()  # predicts the last keep-1 tokens
            targets = ids[:, -(keep - 1):]
            token_lp = token_logprobs(scores, targets).cpu()
            hit = (scores.argmax(-1) == targets).cpu()
            pos = torch.arange(keep - 1).unsqueeze(0)
            scored = pos >= (keep - 1 - conts).unsqueeze(1)  # the continuation's positions
            nll[idx] = -(token_lp * scored).sum(-1)
            count[idx] = conts
            greedy[idx] = (hit | ~scored).all(-1)
    return ContinuationScores(nll_sum=nll, n_tokens=count, greedy=greedy)


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    batch_size: int = 8,
    max_prompt_tokens: int | None = None,
    stop_at_eos: bool = True,
    progress: bool = False,
    desc: str = "generating",
) -> list[list[int]]:
    """Greedy continuations of token prompts (left padding, ``model.generate``), new tokens only.

    ``max_new_tokens`` may be one number or one per prompt (each row is cut to its own budget,
    so a row's output never depends on its batch mates). Prompts are truncated on the left to
    ``max_prompt_tokens`` (default: the model's context length minus the budget). Output stops
    before the first EOS token when ``stop_at_eos``.
    """
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ConfigError(f"{len(budgets)} token budgets for {len(prompts)} prompts")
    if any(b < 1 for b in budgets):
        raise ConfigError("max_new_tokens must be >= 1")
    ctx = context_length(model)
    bos, pad = start_token(tokenizer), ensure_pad_token(tokenizer)
    eos = eos_token_ids(model, tokenizer)
    fitted = []
    for p, b in zip(prompts, budgets):
        room = max(1, min(max_prompt_tokens or ctx, ctx - b))
        p = list(p)[-room:] or [bos]
        fitted.append(p)
    order = sorted(range(len(fitted)), key=lambda i: -len(fitted[i]))
    outputs: list[list[int]] = [[] for _ in fitted]
    device = model_device(model)
    starts = range(0, len(fitted), batch_size)
    with eval_mode(model):
        for start in progress_bar(starts, total=len(starts), desc=desc, enabled=progress):
            idx = order[start : start + batch_size]
            ids, mask = (t.to(device) for t in pad_sequences([fitted[i] for i in idx], pad, side="left"))
            budget = max(budgets[i] for i in idx)
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=budget,
                min_new_tokens=0,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
            )
            new = gen[:, ids.shape[1]:].tolist()
            for row, i in zip(new, idx):
                row = row[: budgets[i]]
                if stop_at_eos:
                    cut = next((k for k, t in enumerate(row) if t in eos), len(row))
                    row = row[:cut]
                outputs[i] = row
    return outputs


def is_conv1d(module: torch.nn.Module) -> bool:
    """GPT-2's Conv1D, which stores its weight [in, out] (every other linear layer: [out, in])."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)
