"""Built-in reasoning scorers for the offline TDEC evaluation sets (LAMBADA, PubMedQA).

Also home of the two batched scoring primitives the other generation/likelihood metrics share
(:func:`score_continuations`, :func:`greedy_generate`).

LAMBADA (``tdec/eval/lambada.csv``, columns ``id, token_length, text, task``)
    Each ``text`` is a passage whose last whitespace-separated word is the target. The
    context is the text up to (not including) the space before that word. Two methods:

    * ``"argmax"`` (default): Jang et al.'s / lm-eval's teacher-forced criterion: a hit when,
      given the context and the true preceding tokens of the word, the argmax at every token
      of ``" " + target`` equals that token (one forward pass). The target tokens are split
      off the tokenization of ``context + " " + target`` after the context's own token count,
      as lm-eval does.
    * ``"generate"``: greedy-generate ``t + 3`` new tokens after the context, where ``t`` is
      the number of target tokens; decode them, take the first whitespace-separated word,
      strip punctuation (ASCII punctuation plus typographic quotes and dashes) from both ends
      of it and of the target, and count a hit on exact, case-sensitive equality. The token
      budget is per item, so the score of an item never depends on which other items share
      its batch.

PubMedQA (``tdec/eval/pubmed_qa.csv``, columns ``pubid, question, context, long_answer,
final_decision, abstract``)
    Prompt ``"Context: {abstract}\\nQuestion: {question}\\nAnswer:"`` (Jang et al.; the file's
    ``abstract`` column holds the first context section); ``context="full"`` instead joins all
    sections parsed from the ``context`` column (as lm-eval's ``pubmedqa``). The answer is the
    choice among ``" yes"``, ``" no"``, ``" maybe"`` with the largest summed log-likelihood of
    its tokens after the prompt; accuracy against ``final_decision``.

``valid_dm_mathematics.csv`` (``doc_id, corpus, text``; 100 DM-Mathematics excerpts of the Pile
validation split, ~512 GPT-2 tokens each) has no questions or labels: it is a perplexity set and
the ``ppl`` suite of :mod:`loku.evaluate` scores it with the Pile and WikiText sets.
"""
from __future__ import annotations

import ast
import contextlib
import csv
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from loku.errors import ConfigError, DataError

__all__ = [
    "ContinuationScores",
    "PUBMEDQA_CHOICES",
    "evaluate_lambada",
    "evaluate_pubmedqa",
    "first_word",
    "greedy_generate",
    "lambada_items",
    "lambada_target_ids",
    "pubmedqa_items",
    "score_continuations",
    "split_last_word",
    "strip_punctuation",
]

PUBMEDQA_CHOICES = ("yes", "no", "maybe")
_PUNCT = string.punctuation + "\u2018\u2019\u201c\u201d\u00ab\u00bb\u2013\u2014\u2026"


# ----------------------------------------------------------------------------- model helpers

def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def model_context_length(model: Any, default: int = 2048) -> int:
    """The longest sequence the model's position scheme allows (config field names differ)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def pad_token_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def start_token(tokenizer: Any) -> int:
    """A token to condition on when a context is empty (BOS, else EOS)."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return pad_token_id(tokenizer)


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


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


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


# ----------------------------------------------------------------------------- primitives

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
    (teacher forcing, log-softmax in float32). Contexts are truncated on the left to fit
    ``max_length`` (default: the model's context length); an empty context is replaced by BOS
    (else EOS). Continuations longer than ``max_length - 1`` are cut on the right.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    limit = max_length or model_context_length(model)
    bos, pad = start_token(tokenizer), pad_token_id(tokenizer)
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
            ids, mask = _left_pad(seqs, pad, device)
            keep = int(conts.max()) + 1
            logits = _forward_last_logits(model, ids, mask, keep)
            scores = logits[:, :-1].float()  # predicts the last keep-1 tokens
            targets = ids[:, -(keep - 1):]
            # log p = logit - logsumexp: more accurate in float32 than log_softmax over a big vocabulary
            token_lp = (scores.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scores, dim=-1)).cpu()
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
    ctx = model_context_length(model)
    bos, pad = start_token(tokenizer), pad_token_id(tokenizer)
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
            ids, mask = _left_pad([fitted[i] for i in idx], pad, device)
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


# ----------------------------------------------------------------------------- file reading

def read_csv_rows(path: str | Path, required: Sequence[str], *, role: str) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts; :class:`DataError` naming the file if it or a column is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {role} file not found; pass --data-dir pointing at the shared data folder")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            missing = [c for c in required if c not in columns]
            if missing:
                raise DataError(f"{path}: {role} file lacks column(s) {', '.join(missing)} "
                                f"(found: {', '.join(columns) or 'none'}); give a CSV with a header row "
                                f"containing {', '.join(required)}")
            rows = list(reader)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8") from None
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV ({err}); check quoting") from None
    if not rows:
        raise DataError(f"{path}: {role} file has no rows")
    return rows


def _take(items: list, limit: int | None) -> list:
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    return items if limit is None else items[:limit]


# ----------------------------------------------------------------------------- LAMBADA

def split_last_word(text: str) -> tuple[str, str]:
    """``"a b c"`` -> ``("a b", "c")``: the context (no trailing space) and the target word."""
    body = text.rstrip()
    context, _, target = body.rpartition(" ")
    return context, target


def strip_punctuation(word: str) -> str:
    return word.strip().strip(_PUNCT)


def first_word(text: str) -> str:
    """First whitespace-separated word of ``text`` (leading whitespace skipped), punctuation-stripped."""
    parts = text.split()
    return strip_punctuation(parts[0]) if parts else ""


def lambada_items(path: str | Path, *, limit: int | None = None) -> list[tuple[str, str]]:
    rows = read_csv_rows(path, ["text"], role="LAMBADA")
    items = []
    for line, row in enumerate(rows, start=2):
        context, target = split_last_word(row["text"] or "")
        if not context or not target:
            raise DataError(f"{path}: line {line}: LAMBADA text needs a context and a last word separated "
                            f"by a space; fix or remove that row")
        items.append((context, target))
    return _take(items, limit)


def lambada_target_ids(tokenizer: Any, context: str, context_ids: Sequence[int], target: str) -> list[int]:
    """Tokens of ``" " + target`` as they occur after the context: the tokenization of
    ``context + " " + target`` minus the context's own token count (lm-eval's split); falls back to
    encoding ``" " + target`` alone if that leaves nothing."""
    whole = encode(tokenizer, context + " " + target, special=True)
    cont = whole[len(context_ids):]
    return cont if cont else encode(tokenizer, " " + target, special=False)


def evaluate_lambada(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    method: str = "argmax",
    extra_tokens: int = 3,
    progress: bool = False,
) -> dict:
    """LAMBADA last-word accuracy; ``method`` ``"argmax"`` (teacher-forced, Jang et al. / lm-eval;
    the default) or ``"generate"`` (see the module docstring)."""
    if method not in ("generate", "argmax"):
        raise ConfigError(f"unknown LAMBADA method {method!r}; choose 'argmax' or 'generate'")
    items = lambada_items(path, limit=limit)
    contexts = [encode(tokenizer, c, special=True) for c, _ in items]
    targets = [lambada_target_ids(tokenizer, c, ctx, t) for (c, t), ctx in zip(items, contexts)]
    if method == "argmax":
        scores = score_continuations(model, tokenizer, list(zip(contexts, targets)), batch_size=batch_size,
                                     progress=progress, desc="lambada")
        hits = scores.greedy.tolist()
    else:
        budgets = [len(t) + extra_tokens for t in targets]
        outs = greedy_generate(model, tokenizer, contexts, max_new_tokens=budgets, batch_size=batch_size,
                               progress=progress, desc="lambada")
        hits = []
        for out, (_, target) in zip(outs, items):
            word = first_word(tokenizer.decode(out, skip_special_tokens=True))
            hits.append(word == strip_punctuation(target))
    n = len(hits)
    return {"accuracy": float(sum(hits)) / n, "n": n, "method": method}


# ----------------------------------------------------------------------------- PubMedQA

_ARRAY = re.compile(r"array\((\[.*?\])\s*,\s*dtype=\w+\)", re.S)


def parse_pubmed_contexts(raw: str) -> list[str]:
    """The context sections from the file's ``context`` column (a Python/numpy repr of a dict)."""
    try:
        value = ast.literal_eval(_ARRAY.sub(r"\1", raw))
        sections = value["contexts"]
    except (ValueError, SyntaxError, KeyError, TypeError):
        raise DataError("PubMedQA 'context' column is not a dict with 'contexts'; use context='abstract'") from None
    return [str(s) for s in sections]


def pubmedqa_prompt(context: str, question: str) -> str:
    return f"Context: {context}\nQuestion: {question}\nAnswer:"


def pubmedqa_items(path: str | Path, *, limit: int | None = None,
                   context: str = "abstract") -> list[tuple[str, str]]:
    """(prompt, gold label) pairs; ``context`` is ``"abstract"`` (Jang et al.) or ``"full"``."""
    if context not in ("abstract", "full"):
        raise ConfigError(f"unknown PubMedQA context {context!r}; choose 'abstract' or 'full'")
    rows = read_csv_rows(path, ["question", "final_decision", context if context == "abstract" else "context"],
                         role="PubMedQA")
    items = []
    for line, row in enumerate(_take(rows, limit), start=2):
        label = (row["final_decision"] or "").strip().lower()
        if label not in PUBMEDQA_CHOICES:
            raise DataError(f"{path}: line {line}: final_decision {row['final_decision']!r} is not yes/no/maybe")
        if context == "abstract":
            text = row["abstract"]
        else:
            try:
                text = " ".join(parse_pubmed_contexts(row["context"]))
            except DataError as err:
                raise DataError(f"{path}: line {line}: {err}") from None
        items.append((pubmedqa_prompt(text, row["question"]), label))
    return items


def evaluate_pubmedqa(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    context: str = "abstract",
    progress: bool = False,
) -> dict:
    """PubMedQA accuracy: the yes/no/maybe choice with the largest summed log-likelihood wins."""
    items = pubmedqa_items(path, limit=limit, context=context)
    choice_ids = [encode(tokenizer, " " + c, special=False) for c in PUBMEDQA_CHOICES]
    pairs = []
    for prompt, _ in items:
        ctx = encode(tokenizer, prompt, special=True)
        pairs.extend((ctx, c) for c in choice_ids)
    scores = score_continuations(model, tokenizer, pairs, batch_size=batch_size, progress=progress,
                                 desc="pubmedqa")
    nll = scores.nll_sum.view(len(items), len(PUBMEDQA_CHOICES))
    picks = nll.argmin(-1).tolist()  # min summed NLL == max summed log-likelihood; ties -> first choice
    hits = [PUBMEDQA_CHOICES[p] == gold for p, (_, gold) in zip(picks, items)]
    n = len(hits)
    return {"accuracy": float(sum(hits)) / n, "n": n, "context": context}
