"""Dialogue unigram F1 (Jang et al. 2023) on the four offline dialogue sets.

Files ``tdec/eval/{blended_skill_talk,empathetic_dialogues,wizard_of_internet,
wizard_of_wikipedia}.json`` hold ``{"text": {"0": [turn, turn, ...], "1": [...], ...}}``: one
list of utterances per dialogue, speakers alternating. (A plain JSON list of such lists is
accepted too.)

Protocol, per dialogue with turns ``u_1..u_k`` (k >= 2; shorter dialogues are skipped and
counted in ``"skipped"``):

* prompt: ``"User 1: u_1\\nUser 2: u_2\\n...User j: u_{k-1}\\nUser j':"`` -- every turn but the
  last, speakers alternating from "User 1", then the label of the speaker of the last turn
  (Jang et al.'s format). Each turn is tidied with :func:`tidy_turn` (whitespace collapsed,
  a final period added when the turn has no terminal punctuation, like Jang's
  ``normalize_reply``; re-casing is not done since F1 is case-insensitive). Prompts longer
  than ``max_prompt_tokens`` keep their last tokens.
* reference: ``tidy_turn(u_k)``.
* generation: greedy, ``max_new_tokens=32``, left-padded batches, stopping at EOS; the decoded
  reply is cut at its first newline (so a following ``"\\nUser 1:"`` turn is dropped) and at
  any inline ``"User 1:"``/``"User 2:"`` label, then stripped.
* score: SQuAD unigram F1 after :func:`normalize_answer` (lowercase, drop ASCII punctuation,
  drop the articles a/an/the, collapse whitespace); 1.0 if both sides normalise to nothing,
  0.0 if only one does. The set's score is the mean over dialogues.
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from loku.errors import ConfigError, DataError

__all__ = [
    "DIALOGUE_SETS",
    "cut_reply",
    "dialogue_prompt",
    "evaluate_dialogue",
    "load_dialogues",
    "normalize_answer",
    "tidy_turn",
    "unigram_f1",
]

DIALOGUE_SETS = ("blended_skill_talk", "empathetic_dialogues", "wizard_of_internet", "wizard_of_wikipedia")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_SPEAKER = re.compile(r"User [12]:")


# ----------------------------------------------------------------------------- text functions

def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, remove punctuation, articles and extra whitespace."""
    text = text.lower().translate(_PUNCT_TABLE)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def unigram_f1(prediction: str, reference: str) -> float:
    """SQuAD-style unigram F1 between two strings (multiset overlap of normalised words)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def tidy_turn(turn: str) -> str:
    text = " ".join(turn.split())
    if text and text[-1] not in "!.?)\"'":
        text += "."
    return text


def dialogue_prompt(turns: Sequence[str]) -> tuple[str, str]:
    """``(prompt, reference)`` for a dialogue: all turns but the last as context, the last as target."""
    if len(turns) < 2:
        raise DataError("a dialogue needs at least two turns")
    lines = [f"User {1 + i % 2}: {tidy_turn(t)}" for i, t in enumerate(turns[:-1])]
    next_speaker = 1 + (len(turns) - 1) % 2
    return "\n".join(lines) + f"\nUser {next_speaker}:", tidy_turn(turns[-1])


def cut_reply(text: str) -> str:
    """The generated reply up to the first newline or speaker label, stripped."""
    text = text.split("\n", 1)[0]
    text = _SPEAKER.split(text, 1)[0]
    return text.strip()


# ----------------------------------------------------------------------------- files

def load_dialogues(path: str | Path) -> list[list[str]]:
    """The dialogues of one file as lists of turns; :class:`DataError` naming the file if malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dialogue file not found; pass --data-dir pointing at the shared data folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno}: invalid JSON ({err.msg}); repair the file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason}); re-save it as UTF-8") from None
    if isinstance(data, dict) and isinstance(data.get("text"), dict):
        keys = sorted(data["text"], key=lambda k: (not str(k).isdigit(), int(k) if str(k).isdigit() else 0, str(k)))
        dialogues = [data["text"][k] for k in keys]
    elif isinstance(data, list):
        dialogues = data
    else:
        raise DataError(f"{path}: expected {{\"text\": {{\"0\": [turns...], ...}}}} or a list of turn lists; "
                        f"got a JSON {type(data).__name__} with keys {list(data)[:5] if isinstance(data, dict) else ''}")
    out = []
    for i, turns in enumerate(dialogues):
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise DataError(f"{path}: dialogue {i} is not a list of strings; give each dialogue as [turn, turn, ...]")
        out.append(turns)
    if not out:
        raise DataError(f"{path}: no dialogues found")
    return out


# ----------------------------------------------------------------------------- evaluation

def evaluate_dialogue(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    max_prompt_tokens: int = 512,
    progress: bool = False,
    return_samples: bool = False,
) -> dict:
    """Mean unigram F1 of greedy replies on the first ``limit`` dialogues of one file."""
    from loku.lm import encode, greedy_generate

    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    dialogues = load_dialogues(path)
    usable = [d for d in dialogues if len(d) >= 2]
    skipped = len(dialogues) - len(usable)
    if limit is not None:
        usable = usable[:limit]
    if not usable:
        raise DataError(f"{path}: no dialogue has two or more turns")
    pairs = [dialogue_prompt(d) for d in usable]
    prompts = [encode(tokenizer, p, special=True) for p, _ in pairs]
    outs = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           max_prompt_tokens=max_prompt_tokens, progress=progress, desc=Path(path).stem)
    replies = [cut_reply(tokenizer.decode(o, skip_special_tokens=True)) for o in outs]
    scores = [unigram_f1(r, ref) for r, (_, ref) in zip(replies, pairs)]
    result: dict = {"f1": sum(scores) / len(scores), "n": len(scores), "skipped": skipped}
    if return_samples:
        result["samples"] = [{"reference": ref, "reply": r, "f1": s} for r, (_, ref), s in zip(replies, pairs, scores)]
    return result
