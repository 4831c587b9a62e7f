"""Built-in reasoning scorers for the offline TDEC evaluation sets (LAMBADA, PubMedQA).

They score with the batched primitives every metric shares, :func:`loku.lm.score_continuations`
and :func:`loku.lm.greedy_generate`.

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
import csv
import re
import string
import sys
from pathlib import Path
from typing import Any, Sequence

from loku.errors import ConfigError, DataError
from loku.lm import encode, greedy_generate, score_continuations

__all__ = [
    "PUBMEDQA_CHOICES",
    "evaluate_lambada",
    "evaluate_pubmedqa",
    "first_word",
    "lambada_items",
    "lambada_target_ids",
    "pubmedqa_items",
    "split_last_word",
    "strip_punctuation",
]

PUBMEDQA_CHOICES = ("yes", "no", "maybe")
_PUNCT = string.punctuation + "\u2018\u2019\u201c\u201d\u00ab\u00bb\u2013\u2014\u2026"


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
