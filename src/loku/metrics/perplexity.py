"""Token-weighted perplexity of a causal LM on a list of texts (the ``ppl`` suite, docs/algorithms.md §6).

Definition
    ``ppl = exp(sum of token NLLs / number of scored tokens)`` over the whole set, so long
    texts weigh by their length (the usual corpus perplexity, not a mean of per-text
    perplexities). Each text is tokenized on its own with ``add_special_tokens=False``; every
    token except the first of a text is scored exactly once, conditioned on the tokens before it
    in the same text (the first token has no context, so a 1-token text contributes nothing).

Long texts (HF's "perplexity of fixed-length models")
    A text longer than ``max_length`` tokens is cut into windows of ``max_length`` tokens. The
    first window scores its tokens 2..L; each next window ends ``stride`` tokens further on and
    scores only the tokens past the previous window's end; its other tokens are context only.
    The step is capped at ``max_length - 1`` so the first new token of a window always has at
    least one token of context: with the default ``stride = max_length`` consecutive windows
    share exactly one token, and no token is skipped or scored twice (HF's recipe with
    ``stride = max_length`` silently drops the first token of every window).

Numerics
    Log-probabilities are ``logit - logsumexp(logits)`` in float32 whatever the model dtype
    (bf16 log-softmax loses ~2 digits), and sums are accumulated in float64 so a corpus of
    millions of tokens does not drift.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from loku.errors import ConfigError, DataError
from loku.lm import IGNORE_INDEX, ensure_pad_token, forward_rows, token_nll

__all__ = ["Window", "perplexity", "sliding_windows"]


# ----------------------------------------------------------------------------- pure pieces

@dataclass(frozen=True)
class Window:
    """One forward pass over ``ids``; its first ``context`` tokens are not scored.

    ``context`` is at least 1: position 0 of a window is never a target (nothing precedes it).
    """

    ids: list[int]
    context: int

    @property
    def n_scored(self) -> int:
        return len(self.ids) - self.context

    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.context + self.ids[self.context:]


def sliding_windows(ids: Sequence[int], max_length: int, stride: int | None = None) -> list[Window]:
    """Cut one text's tokens into windows that together score tokens 1..T-1 exactly once.

    Windows are ``max_length`` long (the last may be shorter only if the text is), each ending
    ``min(stride, max_length - 1)`` tokens after the previous one; see the module docstring.
    A text of fewer than 2 tokens gives no window.
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2 to score any token, got {max_length}")
    stride = max_length if stride is None else stride
    if stride < 1:
        raise ConfigError(f"stride must be >= 1, got {stride}")
    ids = list(ids)
    n = len(ids)
    if n < 2:
        return []
    step = min(stride, max_length - 1)
    end = min(max_length, n)
    windows = [Window(ids[:end], 1)]
    while end < n:
        prev_end, end = end, min(end + step, n)
        begin = end - max_length
        windows.append(Window(ids[begin:end], prev_end - begin))
    return windows


# ----------------------------------------------------------------------------- with a model

def perplexity(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    stride: int | None = None,
    progress: bool = False,
) -> dict:
    """Token-weighted perplexity of ``model`` on ``texts``: ``{"ppl", "nll", "tokens"}``.

    ``nll`` is the mean NLL per scored token (nats), ``ppl = exp(nll)``, ``tokens`` the number
    of scored tokens. Texts longer than ``max_length`` tokens are scored with sliding windows
    moving by ``stride`` (default ``max_length``); see the module docstring for exactly which
    tokens count. Raises :class:`DataError` when no token can be scored (no text has 2 tokens).
    """
    texts = list(texts)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    windows = [w for ids in encoded for w in sliding_windows(ids, max_length, stride)]
    if not windows:
        raise DataError(f"perplexity: no token to score in {len(texts)} text(s): every text is empty or a "
                        f"single token, and the first token of a text has no context; give longer texts")
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for i, logits in forward_rows(model, [w.ids for w in windows], pad_id=ensure_pad_token(tokenizer),
                                  batch_size=batch_size, progress=progress, desc="perplexity"):
        labels = torch.tensor(windows[i].labels(), device=logits.device)
        total += token_nll(logits.unsqueeze(0), labels.unsqueeze(0)).double().sum().cpu()
        count += windows[i].n_scored
    nll = float(total) / count
    return {"ppl": math.exp(nll) if nll < 709.0 else math.inf, "nll": nll, "tokens": count}
