"""Reading forget / retain / validation sets and turning them into padded batches.

Supported sources (:data:`SOURCES`, first match wins):

* ``hf:NAME[:CONFIG]:SPLIT[:COLUMN]`` -- a hub dataset through ``datasets.load_dataset`` (three
  fields are NAME:CONFIG:SPLIT; ``hf:NAME::SPLIT:COLUMN`` names a column without a config).
* a folder written by ``Dataset.save_to_disk``, and ``.parquet`` files, through ``datasets``.
  Without a COLUMN a dataset's rows are read as JSONL objects are: ``text``, or ``question`` and
  ``answer``.
* ``.csv``   -- must have a ``text`` column (the TDEC files are used as they are).
* ``.jsonl`` -- one JSON object a line, with ``text``, with ``question`` and ``answer``, with ``prompt`` and
  ``completion``, or with ``messages`` (a chat: a list of ``{"role", "content"}``, the assistant reply last).
* ``.json``  -- a JSON list of strings or of such objects.
* anything else (``.txt``) -- one text per non-blank line.

Each set's digest (:attr:`TextSet.sha256`, :func:`source_sha256`) is the sha256 of a file's bytes,
or for a hub dataset / saved folder the sha256 over its arrow files' sha256s (its content, not a
cache path or a random fingerprint).

A ``question``/``answer`` (or ``prompt``/``completion``) item stays a pair, a ``messages`` item a
:class:`loku.chat.Conversation` (:attr:`TextSet.qa`): :func:`tokenize_set` formats it, once the tokenizer
(and model) are known, with ``--template`` (:func:`loku.chat.choose_template`: the chat template, TOFU's
strings or none) and the same token split :mod:`loku.metrics.tofu` scores, and records how
many leading tokens are prompt; :func:`make_batches` sets those tokens' labels to
:data:`IGNORE_INDEX`, so losses push only the answer (the assistant reply) down, as TOFU does. Plain
texts keep every token as a label. :attr:`TextSet.texts` holds a readable rendering of each
pair (:data:`QA_TEMPLATE`) or conversation for messages, overlap checks and text-level metrics.

Texts are kept verbatim (TDEC excerpts start with a space that matters to the tokenizer);
every problem a user can fix raises :class:`~loku.errors.DataError` with one line that starts
with the file path, names the set ("forget set", "retain set", ...) and says what to do.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import Tensor

from loku.chat import Conversation
from loku.errors import ConfigError, DataError, LokuError
from loku.lm import IGNORE_INDEX, pad_sequences
from loku.lm import ensure_pad_token  # noqa: F401  (lives in loku.lm; trainer.py still calls it from here)
from loku.provenance import file_sha256

__all__ = [
    "IGNORE_INDEX",
    "QA_TEMPLATE",
    "TextSet",
    "TokenizedSet",
    "check_forget_not_in_retain",
    "check_max_length",
    "check_validation_not_forget",
    "load_qa_jsonl",
    "load_text_set",
    "is_dataset_source",
    "make_batches",
    "pair_batches",
    "read_texts",
    "source_sha256",
    "tokenize_set",
    "tokenize_texts",
]

#: How a question/answer object reads as one text in :attr:`TextSet.texts` and :func:`read_texts`
#: (TOFU's phi / generic format). Training does not use it: :func:`tokenize_set` formats pairs
#: with the model's TOFU template.
QA_TEMPLATE = "Question: {question}\nAnswer: {answer}"

QAPair = tuple[str, str]  # (question, answer)
QAItem = Union[QAPair, Conversation]  # what TextSet.qa holds for a structured item

_FORMAT_HINTS = {
    ".csv": "a CSV file with a 'text' column",
    ".jsonl": "one JSON object per line with 'text' (or 'question' and 'answer', 'prompt' and 'completion', "
              "or 'messages')",
    ".json": "a JSON list of strings or of objects with 'text' (or 'question' and 'answer')",
}
_TXT_HINT = "a text file with one text per line"


# ----------------------------------------------------------------------------- file access

def _set_name(role: str) -> str:
    """'forget' -> 'forget set' so messages read naturally whatever role the caller passes."""
    return role if role.endswith("set") else f"{role} set"


def _fail(path: str | os.PathLike[str], role: str, problem: str, hint: str) -> DataError:
    return DataError(f"{path}: {_set_name(role)} {problem}; {hint}")


def _read_bytes(path: str | os.PathLike[str], role: str) -> bytes:
    """Read the whole file, turning OS errors into messages that say what to do."""
    p = Path(path)
    if not p.exists():
        raise _fail(path, role, "file not found", "check the path (relative paths are resolved "
                    f"from {os.getcwd()})")
    if p.is_dir():
        raise _fail(path, role, "is a directory, not a file", "pass the path of the data file inside it")
    try:
        return p.read_bytes()
    except PermissionError:
        raise _fail(path, role, "cannot be read (permission denied)",
                    "make it readable, e.g. chmod u+r") from None
    except OSError as exc:
        raise _fail(path, role, f"cannot be read ({exc.strerror or exc})",
                    "check the file and the disk") from None


def _decode_utf8(raw: bytes, path: str | os.PathLike[str], role: str) -> str:
    """Decode strictly: silently replacing bytes would change the text being unlearned."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        bad = raw[exc.start:exc.start + 1].hex()
        raise _fail(path, role, f"is not valid UTF-8 (byte 0x{bad} on line {line}, byte offset {exc.start})",
                    "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    # A UTF-8 byte-order mark would otherwise become part of the first header or text.
    return text[1:] if text.startswith("\ufeff") else text


def _read_text_file(path: str | os.PathLike[str], role: str) -> str:
    content = _decode_utf8(_read_bytes(path, role), path, role)
    if not content.strip():
        hint = _FORMAT_HINTS.get(Path(path).suffix.lower(), _TXT_HINT)
        raise _fail(path, role, "file is empty", f"give {hint}")
    return content


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value, for messages ('number', not 'int')."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "list",
             dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_text(text: Any, path: str | os.PathLike[str], role: str, where: str) -> str:
    if not isinstance(text, str):
        raise _fail(path, role, f"{where} has a JSON {_json_type(text)} where a text string is expected",
                    "make every text a JSON string")
    if not text.strip():
        raise _fail(path, role, f"{where} has an empty or whitespace-only text", "remove it")
    return text


def _item_from_object(obj: Any, path: str | os.PathLike[str], role: str,
                      where: str) -> tuple[str, QAItem | None]:
    """``(text, (question, answer) or None)``: a ``text`` field wins; otherwise ``question`` +
    ``answer`` (rendered with :data:`QA_TEMPLATE` as the text)."""
    if isinstance(obj, str):
        return _check_text(obj, path, role, where), None
    if not isinstance(obj, dict):
        raise _fail(path, role, f"{where} is a JSON {_json_type(obj)}, not a string or object",
                    "write each entry as {\"text\": ...} or {\"question\": ..., \"answer\": ...}")
    if "text" in obj:
        return _check_text(obj["text"], path, role, where), None
    if "question" in obj and "answer" in obj:
        q = _check_text(obj["question"], path, role, f"{where} ('question')")
        a = _check_text(obj["answer"], path, role, f"{where} ('answer')")
        return QA_TEMPLATE.format(question=q, answer=a), (q, a)
    chat = _chat_item(obj, path, role, where)
    if chat is not None:
        return chat
    keys = ", ".join(map(str, obj)) or "none"
    raise _fail(path, role, f"{where} has neither 'text' nor 'question'+'answer', 'prompt'+'completion' or "
                f"'messages' (keys found: {keys})", "add a 'text' field or both 'question' and 'answer'")


def _chat_item(obj: dict, path: str | os.PathLike[str], role: str,
               where: str) -> tuple[str, QAItem] | None:
    """A ``prompt``/``completion`` pair (TRL's format: the completion is trained) or a ``messages`` chat
    (OpenAI/HF format: the last, assistant, turn is trained); None when ``obj`` is neither."""
    if "prompt" in obj and "completion" in obj:
        p = _check_text(obj["prompt"], path, role, f"{where} ('prompt')")
        c = _check_text(obj["completion"], path, role, f"{where} ('completion')")
        return p + c, (p, c)
    if "messages" not in obj:
        return None
    messages = obj["messages"]
    fix = 'write it as [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]'
    if not isinstance(messages, list) or len(messages) < 2:
        raise _fail(path, role, f"{where} has 'messages' that is not a list of at least two turns", fix)
    turns = []
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise _fail(path, role, f"{where} has message {i} without a 'role' and 'content'", fix)
        turns.append((m["role"], _check_text(m["content"], path, role, f"{where} (message {i})")))
    if turns[-1][0] != "assistant":
        raise _fail(path, role, f"{where} ends with a {turns[-1][0]!r} message",
                    "end each conversation with the assistant reply to train on (the earlier turns are its context)")
    chat = Conversation(turns)
    return chat.text(), chat


# ----------------------------------------------------------------------------- formats

def _raise_csv_field_limit() -> None:
    """Allow very long cells (documents); sys.maxsize overflows a C long on some platforms."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


# Each reader returns (line number or None, text, (question, answer) or None) triples, so later
# checks can name the line.
_Located = tuple[Optional[int], str, Optional[QAItem]]


def _read_csv(content: str, path: str | os.PathLike[str], role: str) -> list[_Located]:
    _raise_csv_field_limit()
    # strict: an unclosed quote must be an error, not one field swallowing the rest of the file.
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    texts: list[_Located] = []
    column = -1
    row_no = 0
    start_line = 1  # first line of the record being parsed; a quoted text can span many lines
    try:
        for record in reader:
            if column < 0:
                column = _text_column(record, path, role)
            elif record:  # csv yields [] for a blank line; it is not a row
                row_no += 1
                value = record[column] if column < len(record) else ""
                texts.append((start_line, _check_text(value, path, role, f"row {row_no} (line {start_line})"), None))
            start_line = reader.line_num + 1
    except csv.Error as exc:
        raise _fail(path, role, f"is not a valid CSV in the record starting at line {start_line} ({exc})",
                    "check the quotes there (every \" must be closed, inner quotes doubled) "
                    "or re-export the file as CSV") from None
    if not texts:
        raise _fail(path, role, "has a header but no rows", "add one text per row under the 'text' column")
    return texts


def _text_column(header: list[str], path: str | os.PathLike[str], role: str) -> int:
    if "text" not in header:
        found = ", ".join(repr(c) for c in header) or "none"
        raise _fail(path, role, f"has no 'text' column (columns found: {found})",
                    "rename the column that holds the texts to 'text'")
    return header.index("text")


def _iter_lines(content: str):
    """(line number, line) for non-blank lines; numbers match what an editor shows."""
    for line_no, line in enumerate(content.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            yield line_no, line


def _parse_jsonl_objects(content: str, path: str | os.PathLike[str], role: str):
    """(line number, object) for each non-blank line; bad JSON names the line."""
    for line_no, line in _iter_lines(content):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(path, role, f"line {line_no} is not valid JSON ({exc.msg}, column {exc.colno})",
                        "write one complete JSON object per line") from None
        yield line_no, obj


def _read_jsonl(content: str, path: str | os.PathLike[str], role: str) -> list[_Located]:
    return [(n, *_item_from_object(obj, path, role, f"line {n}"))
            for n, obj in _parse_jsonl_objects(content, path, role)]


def _read_json(content: str, path: str | os.PathLike[str], role: str) -> list[_Located]:
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        raise _fail(path, role, f"is not valid JSON ({exc.msg}, line {exc.lineno}, column {exc.colno})",
                    "fix the JSON or use .jsonl with one object per line") from None
    if not isinstance(data, list):
        found = f"an object with keys {', '.join(repr(k) for k in data)}" if isinstance(data, dict) \
            else f"a {_json_type(data)}"
        raise _fail(path, role, f"must be a JSON list but holds {found}",
                    "write a list of strings or of {\"text\": ...} objects")
    return [(None, *_item_from_object(item, path, role, f"item {i}")) for i, item in enumerate(data, start=1)]


def _read_lines(content: str, path: str | os.PathLike[str], role: str) -> list[_Located]:
    # Blank lines are separators here, so whitespace-only lines are skipped rather than errors.
    return [(n, line, None) for n, line in _iter_lines(content)]


def read_texts(path: str | os.PathLike[str], *, role: str = "forget") -> list[str]:
    """Read the texts of one set from ``.csv``, ``.jsonl``, ``.json`` or a plain text file.

    ``role`` ("forget", "retain", "validation", ...) only appears in error messages.
    Raises :class:`DataError` for anything the user has to fix.
    """
    return [text for _, text, _ in _read_located(path, role)]


def _read_located(path: str | os.PathLike[str], role: str) -> list[_Located]:
    return _load_source(path, role)[0]


def _read_file(path: str | os.PathLike[str], role: str) -> tuple[list[_Located], str]:
    """A CSV / JSONL / JSON / text file (by suffix), and the sha256 of its bytes."""
    content = _read_text_file(path, role)
    suffix = Path(path).suffix.lower()
    reader = {".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_json}.get(suffix, _read_lines)
    texts = reader(content, path, role)
    if not texts:  # only reachable when every parsed entry vanished (e.g. an empty JSON list)
        raise _fail(path, role, "has no texts", f"give {_FORMAT_HINTS.get(suffix, _TXT_HINT)}")
    return texts, file_sha256(path)


# ----------------------------------------------------------------------------- datasets sources

HUB_PREFIX = "hf:"
HUB_SYNTAX = "hf:NAME[:CONFIG]:SPLIT[:COLUMN] (hf:NAME::SPLIT:COLUMN for a column without a config)"
_HUB_CACHE: dict[str, tuple[list[_Located], str]] = {}  # spec -> what it read: one hub load per process


@dataclass(frozen=True)
class HubSpec:
    """``hf:NAME[:CONFIG]:SPLIT[:COLUMN]``; three fields are NAME:CONFIG:SPLIT (a split may carry a
    slice such as ``train[:100]``, whose colon does not separate fields)."""

    name: str
    config: str | None
    split: str
    column: str | None

    @classmethod
    def parse(cls, spec: str) -> "HubSpec":
        fields, depth, current = [], 0, ""
        for char in spec[len(HUB_PREFIX):]:
            depth += {"[": 1, "]": -1}.get(char, 0)
            if char == ":" and depth == 0:
                fields.append(current)
                current = ""
            else:
                current += char
        fields.append(current)
        if not 2 <= len(fields) <= 4 or not fields[0] or not fields[-1 if len(fields) < 4 else 2]:
            raise DataError(f"{spec}: not a hub dataset; write {HUB_SYNTAX}, e.g. hf:locuslab/TOFU:forget10:train")
        name, rest = fields[0], fields[1:]
        if len(rest) == 1:
            return cls(name, None, rest[0], None)
        if len(rest) == 2:
            return cls(name, rest[0] or None, rest[1], None)
        return cls(name, rest[0] or None, rest[1], rest[2] or None)


def _datasets(spec: str, role: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise _fail(spec, role, "needs the 'datasets' package", "pip install datasets") from None
    return datasets


def _files_sha256(paths: Sequence[str | os.PathLike[str]]) -> str:
    """sha256 over the sha256 of each data file in order: a dataset's identity from its content."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _rows_located(ds: Any, spec: str, role: str, column: str | None, hint: str) -> list[_Located]:
    """Items of a ``datasets.Dataset``: ``column`` as texts, else each row as a JSONL object would be
    read ('text', 'question' + 'answer', 'prompt' + 'completion' or 'messages'). A missing column names
    the ones there are."""
    columns = list(ds.column_names)
    if column is not None and column not in columns:
        raise _fail(spec, role, f"has no column {column!r} (columns: {', '.join(columns) or 'none'})",
                    "name one of those as the last field")
    readable = ({"text"}, {"question", "answer"}, {"prompt", "completion"}, {"messages"})
    if column is None and not any(need <= set(columns) for need in readable):
        raise _fail(spec, role, f"has no 'text' column nor 'question' and 'answer', 'prompt' and 'completion' "
                    f"or 'messages' (columns: {', '.join(columns) or 'none'})", hint)
    if column is not None:
        items = [(None, _check_text(v, spec, role, f"row {i}"), None) for i, v in enumerate(ds[column], start=1)]
    else:
        items = [(None, *_item_from_object(dict(row), spec, role, f"row {i}")) for i, row in enumerate(ds, start=1)]
    if not items:
        raise _fail(spec, role, "has no rows", "choose a split with rows")
    return items


def _hub_error(spec: HubSpec, text: str, role: str, err: Exception) -> DataError:
    first = (str(err).splitlines() or [type(err).__name__])[0]
    if isinstance(err, ConnectionError) or "offline" in first.lower():
        config = f", {spec.config!r}" if spec.config else ""
        return _fail(text, role, f"cannot be loaded: the Hugging Face hub cannot be reached from here ({first})",
                     f"save a local copy where the hub is reachable (datasets.load_dataset({spec.name!r}{config}, "
                     f"split={spec.split!r}).save_to_disk(FOLDER) or .to_parquet(FILE.parquet)) and pass that path; "
                     "with HF_HUB_OFFLINE=1 a copy already in the datasets cache is used without waiting for the "
                     "network")
    return _fail(text, role, f"cannot be loaded from the hub ({first})",
                 f"check the name, config and split ({HUB_SYNTAX})")


def _read_hub(path: str | os.PathLike[str], role: str) -> tuple[list[_Located], str]:
    """``hf:NAME[:CONFIG]:SPLIT[:COLUMN]`` through ``datasets.load_dataset``; the digest hashes its cache files."""
    text = str(path)
    if text in _HUB_CACHE:
        return _HUB_CACHE[text]
    spec = HubSpec.parse(text)
    datasets = _datasets(text, role)
    try:
        ds = datasets.load_dataset(spec.name, spec.config, split=spec.split)
    except Exception as err:  # hub, network and builder errors come in many types
        raise _hub_error(spec, text, role, err) from None
    located = _rows_located(ds, text, role, spec.column, f"name the text column: {HUB_SYNTAX}")
    files = [f["filename"] for f in getattr(ds, "cache_files", None) or []]
    _HUB_CACHE[text] = located, (_files_sha256(files) if files else getattr(ds, "_fingerprint", ""))
    return _HUB_CACHE[text]


def _is_saved_dataset(path: str | os.PathLike[str]) -> bool:
    folder = Path(path)
    return folder.is_dir() and any((folder / f).is_file() for f in ("state.json", "dataset_dict.json"))


def _read_saved_dataset(path: str | os.PathLike[str], role: str) -> tuple[list[_Located], str]:
    """A folder written by ``Dataset.save_to_disk``; the digest hashes its arrow files."""
    datasets = _datasets(str(path), role)
    if (Path(path) / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in Path(path).iterdir() if _is_saved_dataset(p))
        raise _fail(path, role, f"holds several splits ({', '.join(splits)})",
                    f"pass one of them, e.g. {Path(path) / (splits[0] if splits else 'train')}")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # a damaged or foreign folder
        raise _fail(path, role, f"cannot be read as a saved dataset ({str(err).splitlines()[0]})",
                    "write it with Dataset.save_to_disk") from None
    located = _rows_located(ds, str(path), role, None, "rename the column that holds the texts to 'text' "
                            "(Dataset.rename_column) or load it as hf:NAME::SPLIT:COLUMN")
    return located, _files_sha256(sorted(Path(path).glob("*.arrow")))


def _read_parquet(path: str | os.PathLike[str], role: str) -> tuple[list[_Located], str]:
    """A parquet file through ``datasets`` (kept in memory, nothing written to its cache)."""
    _read_bytes(path, role)  # missing / unreadable file: the usual messages
    datasets = _datasets(str(path), role)
    try:
        ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as err:  # not parquet, truncated, ...
        raise _fail(path, role, f"cannot be read as parquet ({str(err).splitlines()[0]})",
                    "write it with Dataset.to_parquet or pandas.DataFrame.to_parquet") from None
    located = _rows_located(ds, str(path), role, None, "rename the column that holds the texts to 'text'")
    return located, file_sha256(path)


# Where a set comes from, first match wins: (name, matches(path), read(path, role) -> (items, digest)).
SOURCES: tuple[tuple[str, Any, Any], ...] = (
    ("hub", lambda p: str(p).startswith(HUB_PREFIX), _read_hub),
    ("saved dataset", _is_saved_dataset, _read_saved_dataset),
    ("parquet", lambda p: Path(p).suffix.lower() == ".parquet", _read_parquet),
    ("file", lambda p: True, _read_file),
)


def _load_source(path: str | os.PathLike[str], role: str) -> tuple[list[_Located], str]:
    return next(read for _, matches, read in SOURCES if matches(path))(path, role)


def source_sha256(path: str | os.PathLike[str], role: str = "input") -> str:
    """The digest a report records for an input: sha256 of a file's bytes (any file: read as bytes, not
    parsed), or of a hub dataset's / saved folder's data files."""
    return _load_source(path, role)[1] if is_dataset_source(path) else file_sha256(path)


def is_dataset_source(path: str | os.PathLike[str]) -> bool:
    """A hub dataset or a saved ``datasets`` folder: a set that is not one local file."""
    return str(path).startswith(HUB_PREFIX) or _is_saved_dataset(path)


def _row_where(source: str, row_no: int, text: str) -> str:
    """'row 4 (line 7)' when ``source`` is the file the texts came from, else 'row 4'.

    Only called on the error path: the file is read again to find the line of that text.
    """
    try:
        line, found, _ = _read_located(source, "input")[row_no - 1]
    except (LokuError, OSError, IndexError, TypeError):
        return f"row {row_no}"
    return f"row {row_no} (line {line})" if line is not None and found == text else f"row {row_no}"


def load_qa_jsonl(path: str | os.PathLike[str], *, role: str) -> list[dict]:
    """Read a TOFU-style JSON Lines file: every line an object with string ``question`` and ``answer``.

    Other fields (``paraphrased_answer``, ``perturbed_answer``, ...) are kept as they are.
    """
    content = _read_text_file(path, role)
    rows: list[dict] = []
    for line_no, obj in _parse_jsonl_objects(content, path, role):
        where = f"line {line_no}"
        if not isinstance(obj, dict):
            raise _fail(path, role, f"{where} is a JSON {_json_type(obj)}, not an object",
                        "write one {\"question\": ..., \"answer\": ...} object per line")
        missing = [k for k in ("question", "answer") if k not in obj]
        if missing:
            keys = ", ".join(map(str, obj)) or "none"
            raise _fail(path, role, f"{where} lacks {' and '.join(repr(k) for k in missing)} "
                        f"(keys found: {keys})", "give every line both 'question' and 'answer'")
        _check_text(obj["question"], path, role, f"{where} ('question')")
        _check_text(obj["answer"], path, role, f"{where} ('answer')")
        rows.append(obj)
    if not rows:
        raise _fail(path, role, "has no rows", "write one {\"question\": ..., \"answer\": ...} object per line")
    return rows


# ----------------------------------------------------------------------------- sets

@dataclass
class TextSet:
    """The items of one set plus where they came from.

    ``texts[i]`` is item i as text; ``qa[i]`` is ``(question, answer)`` when item i is a
    question/answer (prompt/completion) pair (its text is then only the :data:`QA_TEMPLATE` rendering),
    a :class:`loku.chat.Conversation` when it is a chat, else None. ``qa`` None means no item is either.
    """

    path: str
    role: str
    texts: list[str]
    sha256: str
    qa: list[QAItem | None] | None = None

    @property
    def has_qa(self) -> bool:
        return self.qa is not None and any(pair is not None for pair in self.qa)


def load_text_set(path: str | os.PathLike[str], role: str) -> TextSet:
    located, digest = _load_source(path, role)
    qa = [pair for _, _, pair in located]
    return TextSet(path=str(path), role=role, texts=[text for _, text, _ in located], sha256=digest,
                   qa=qa if any(pair is not None for pair in qa) else None)


# ----------------------------------------------------------------------------- tokenization

def _bos_prefix(tokenizer: Any, add_bos: bool | None, source: str) -> list[int]:
    if not add_bos:
        return []
    if tokenizer.bos_token_id is None:
        raise ConfigError(f"{source}: add_bos=True but the tokenizer has no BOS token; "
                          "leave add_bos off for this tokenizer")
    return [int(tokenizer.bos_token_id)]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fit_length(seq: list[int], max_length: int, *, where: str, source: str, on_overflow: str,
                model_context: bool) -> tuple[list[int], bool]:
    """``seq`` if it fits ``max_length``, else an error or the cut sequence; also whether it was cut."""
    if len(seq) <= max_length:
        return seq, False
    if on_overflow == "error" and model_context:
        raise DataError(f"{source}: {where} is {len(seq)} tokens long, more than the model's context of "
                        f"{max_length}; shorten or split it, or pass --truncate to cut such texts to {max_length} "
                        f"tokens")
    if on_overflow == "error":
        raise DataError(f"{source}: {where} is {len(seq)} tokens long, more than max length {max_length}; raise "
                        f"--max-length to at least {len(seq)} (up to the model's context) or pass --truncate")
    return seq[:max_length], True


def _check_tokenize_args(max_length: Any, on_overflow: str) -> None:
    if on_overflow not in ("error", "truncate"):
        raise ConfigError(f"on_overflow must be 'error' or 'truncate', got {on_overflow!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")


def _warn_truncated(source: str, n_truncated: int, n_texts: int, max_length: int) -> None:
    if n_truncated:
        warnings.warn(f"{source}: {n_truncated} of {_plural(n_texts, 'text')} were longer than "
                      f"{max_length} tokens and were truncated to {max_length}", UserWarning, stacklevel=3)


def tokenize_texts(tokenizer: Any, texts: Sequence[str], *, max_length: int, source: str,
                   on_overflow: str = "error", add_bos: bool | None = None,
                   model_context: bool = False) -> list[list[int]]:
    """Token ids of each text, without special tokens.

    ``add_bos``: ``None`` (default) or ``False`` adds nothing -- the TDEC/GPT-Neo setup of the
    paper trains on raw excerpts; ``True`` prepends ``tokenizer.bos_token_id``.
    ``max_length`` counts the BOS. Longer sequences raise :class:`DataError`
    (``on_overflow="error"``) or are cut to ``max_length`` with one warning
    (``on_overflow="truncate"``). ``source`` (usually the file path) starts every message;
    rows are numbered from 1 in the order of ``texts`` (plus the file's line when ``source`` is the
    file they were read from). ``model_context``: ``max_length`` is the model's own context, so the
    message for a too-long text does not suggest raising it.

    Question/answer items need the model's template and a prompt mask: use :func:`tokenize_set`.
    """
    _check_tokenize_args(max_length, on_overflow)
    if not texts:
        raise DataError(f"{source}: no texts to tokenize; give a file with at least one text")
    prefix = _bos_prefix(tokenizer, add_bos, source)
    # verbose=False: the texts are checked against max_length here, with a clearer message.
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    sequences: list[list[int]] = []
    n_truncated = 0
    for row_no, (text, ids) in enumerate(zip(texts, encoded), start=1):
        if len(ids) < 2:
            raise DataError(f"{source}: {_row_where(source, row_no, text)} ({text[:40]!r}) tokenizes to "
                            f"{_plural(len(ids), 'token')} "
                            "but at least 2 are needed to have a next token to predict; remove or lengthen it")
        seq, cut = _fit_length(prefix + list(ids), max_length, where=_LazyWhere(source, row_no, text), source=source,
                               on_overflow=on_overflow, model_context=model_context)
        n_truncated += cut
        sequences.append(seq)
    _warn_truncated(source, n_truncated, len(texts), max_length)
    return sequences


class _LazyWhere:
    """'row N (line L)' computed only when a message needs it (it may re-read the file)."""

    def __init__(self, source: str, row_no: int, text: str):
        self.source, self.row_no, self.text = source, row_no, text

    def __str__(self) -> str:
        return _row_where(self.source, self.row_no, self.text)


@dataclass
class TokenizedSet:
    """Token ids of a set's items and, per item, how many leading tokens are prompt.

    :func:`make_batches` takes it directly and sets the labels of the first ``prompt_lengths[i]``
    tokens of sequence ``i`` to :data:`IGNORE_INDEX` (0 for plain texts: every token is a label).
    ``template`` names the TOFU template the question/answer items were formatted with (None
    when the set has none).
    """

    ids: list[list[int]]
    prompt_lengths: list[int]
    template: str | None = None

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.prompt_lengths):
            raise ConfigError(f"{len(self.ids)} sequences but {len(self.prompt_lengths)} prompt lengths")

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_set(tokenizer: Any, text_set: TextSet, *, max_length: int, on_overflow: str = "error",
                 add_bos: bool | None = None, model_context: bool = False, model: Any = None,
                 template: str | None = None) -> TokenizedSet:
    """Tokenize a :class:`TextSet` for training: plain texts as :func:`tokenize_texts` does, question/
    answer pairs as TOFU evaluation scores them, with their prompt tokens to be masked.

    Each pair or conversation is formatted with :func:`loku.chat.choose_template` ``(model,
    tokenizer, template)`` -- the template :func:`loku.metrics.tofu.evaluate_tofu` picks for the same
    model, tokenizer and ``template`` name (``chat``, ``tofu``, ``none`` or a TOFU template name) -- and split
    by its ``token_pair``: the prompt tokens (TOFU's strings: with the tokenizer's special tokens, e.g. BOS;
    ``add_bos`` applies to plain texts only) are counted in ``prompt_lengths``; the answer tokens (TOFU's
    strings: and EOS; the chat template: the assistant turn as rendered) are labels. So a question/answer
    forget set trains on exactly the token sequences TOFU evaluation scores.
    A pair longer than ``max_length`` is an error, or (``on_overflow="truncate"``) cut on the
    right like TOFU does, which must leave at least one answer token.
    """
    if not text_set.has_qa:
        ids = tokenize_texts(tokenizer, text_set.texts, max_length=max_length, source=text_set.path,
                             on_overflow=on_overflow, add_bos=add_bos, model_context=model_context)
        return TokenizedSet(ids=ids, prompt_lengths=[0] * len(ids))
    from loku.chat import choose_template

    _check_tokenize_args(max_length, on_overflow)
    source = text_set.path
    tmpl = choose_template(model, tokenizer, template)
    qa = list(text_set.qa or [])
    plain_rows = [i for i, pair in enumerate(qa) if pair is None]
    plain = dict(zip(plain_rows, tokenize_texts(
        tokenizer, [text_set.texts[i] for i in plain_rows], max_length=max_length, source=source,
        on_overflow=on_overflow, add_bos=add_bos, model_context=model_context))) if plain_rows else {}
    ids: list[list[int]] = []
    prompt_lengths: list[int] = []
    n_truncated = 0
    for i, (text, pair) in enumerate(zip(text_set.texts, qa)):
        if pair is None:
            ids.append(plain[i])
            prompt_lengths.append(0)
            continue
        where = _LazyWhere(source, i + 1, text)
        try:
            prompt_ids, answer_ids = tmpl.token_pair(tokenizer, pair)
        except DataError as err:
            raise DataError(f"{source}: {where}: {err}") from None
        seq, cut = _fit_length(prompt_ids + answer_ids, max_length, where=where, source=source,
                               on_overflow=on_overflow, model_context=model_context)
        if len(seq) <= len(prompt_ids):
            raise DataError(f"{source}: {where}: its question alone is {len(prompt_ids)} tokens in the "
                            f"{tmpl.name!r} template, so cutting to {max_length} tokens leaves no answer token "
                            f"to train on; shorten the question or raise --max-length")
        n_truncated += cut
        ids.append(seq)
        prompt_lengths.append(len(prompt_ids))
    _warn_truncated(source, n_truncated, len(qa), max_length)
    return TokenizedSet(ids=ids, prompt_lengths=prompt_lengths, template=tmpl.name)


# ----------------------------------------------------------------------------- overlap check

def _normalise(text: str) -> str:
    return " ".join(text.split())


def check_forget_not_in_retain(forget_texts: Sequence[str], retain_texts: Sequence[str],
                               forget_path: str | os.PathLike[str],
                               retain_path: str | os.PathLike[str]) -> None:
    """Refuse a retain set that contains every forget text; warn when it contains some.

    Texts are compared with whitespace normalised. A forget text that is also retained is pushed
    up and down at once, so the two objectives cancel on it.
    """
    if not forget_texts:
        return
    retained = {_normalise(t) for t in retain_texts}
    overlap = sum(1 for t in forget_texts if _normalise(t) in retained)
    total = len(forget_texts)
    if overlap == total:
        raise DataError(f"{forget_path}: every forget text ({total} of {total}) also appears in the retain set "
                        f"{retain_path}, so unlearning would fight itself; use a retain set without them")
    if overlap:
        warnings.warn(f"{forget_path}: {overlap} of {total} forget texts also appear in the retain set "
                      f"{retain_path}; consider removing them from the retain set", UserWarning, stacklevel=2)


def check_requests_disjoint(forget_sets: Sequence[TextSet]) -> None:
    """Refuse a deletion request that shares texts with an earlier one (docs/algorithms.md §8).

    The paper's continual tasks are disjoint; a text in two requests would be unlearned twice and make
    the later request's numbers (and any relapse of the earlier one) meaningless. Texts are compared
    with whitespace normalised.
    """
    earlier: dict[str, int] = {}
    for number, text_set in enumerate(forget_sets, start=1):
        shared = [(i, earlier[_normalise(t)]) for i, t in enumerate(text_set.texts) if _normalise(t) in earlier]
        if shared:
            first, other = shared[0]
            raise DataError(
                f"{text_set.path}: {len(shared)} of {len(text_set.texts)} forget texts of request {number} are "
                f"already in request {other} ({forget_sets[other - 1].path}), the first is item {first + 1}; "
                f"deletion requests must be disjoint: remove them from {text_set.path} (request {other} "
                "unlearns them already)")
        for t in text_set.texts:
            earlier.setdefault(_normalise(t), number)


def check_validation_not_forget(forget_texts: Sequence[str], validation_texts: Sequence[str],
                                forget_path: str | os.PathLike[str],
                                validation_path: str | os.PathLike[str]) -> None:
    """Refuse a validation set made of forget texts; warn when some of its texts are forget texts.

    The validation set's MA/EL before unlearning are the stop thresholds: held-out texts the model
    never saw. Measured on forget texts they are the numbers unlearning must bring down, so the
    thresholds mean nothing. Texts are compared with whitespace normalised (the same file given
    twice is refused earlier, by :meth:`loku.config.UnlearnConfig.validate`).
    """
    if not validation_texts:
        return
    forget = {_normalise(t) for t in forget_texts}
    overlap = sum(1 for t in validation_texts if _normalise(t) in forget)
    total = len(validation_texts)
    if overlap == total:
        raise DataError(f"{validation_path}: every validation text ({total} of {total}) is also in the forget set "
                        f"{forget_path}, so the stop thresholds would be measured on the texts being unlearned; "
                        "use held-out texts the model was never trained on for --validation")
    if overlap:
        warnings.warn(f"{validation_path}: {overlap} of {total} validation texts are also in the forget set "
                      f"{forget_path}; they pull the stop thresholds up, remove them from the validation set",
                      UserWarning, stacklevel=2)


def check_max_length(max_length: int | None, context: int, model: str | None = None) -> None:
    """Refuse a ``--max-length`` above the model's context (``loku.lm.context_length(model)``):
    longer sequences index positions the model has no embedding for."""
    if max_length is not None and max_length > context:
        name = f"the model {model}" if model else "the model"
        raise ConfigError(f"--max-length {max_length} is more than the context of {name} ({context} tokens); "
                          f"use --max-length {context} or less, or leave it out to use the whole context")


# ----------------------------------------------------------------------------- batching

def _pad_batch(seqs: list[list[int]], pad_id: int, prompt_lengths: list[int]) -> dict[str, Tensor]:
    input_ids, attention = pad_sequences(seqs, pad_id)
    # Labels come from the mask, not from pad_id: pad is often EOS, which can be a real token.
    labels = input_ids.masked_fill(attention == 0, IGNORE_INDEX)
    for i, n_prompt in enumerate(prompt_lengths):
        labels[i, :n_prompt] = IGNORE_INDEX  # the prompt is context, not a target
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def make_batches(sequences: list[list[int]] | TokenizedSet, batch_size: int, pad_id: int, *,
                 shuffle: bool = False, seed: int = 0,
                 prompt_lengths: Sequence[int] | None = None) -> list[dict[str, Tensor]]:
    """Right-padded batches of ``input_ids``, ``attention_mask`` and ``labels`` (-100 at padding).

    ``sequences`` may be a :class:`TokenizedSet` (from :func:`tokenize_set`): its prompt
    lengths are used. ``prompt_lengths`` (one per sequence; default all 0) masks that many
    leading tokens of each sequence from the labels (``IGNORE_INDEX``), so a question/answer
    item is trained on its answer only. Each batch is as wide as its longest sequence; the last
    batch may be smaller. With ``shuffle`` the order depends only on ``seed`` (a private RNG,
    global state untouched); a sequence keeps its own prompt length whatever the order.
    """
    if isinstance(sequences, TokenizedSet):
        if prompt_lengths is not None:
            raise ConfigError("make_batches: pass prompt_lengths or a TokenizedSet, not both")
        sequences, prompt_lengths = sequences.ids, sequences.prompt_lengths
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    if any(len(s) == 0 for s in sequences):
        raise DataError("make_batches got an empty token sequence; tokenize with tokenize_texts, "
                        "which rejects texts shorter than 2 tokens")
    lengths = [0] * len(sequences) if prompt_lengths is None else [int(n) for n in prompt_lengths]
    if len(lengths) != len(sequences):
        raise ConfigError(f"make_batches: {len(lengths)} prompt lengths for {len(sequences)} sequences")
    if any(not 0 <= n < len(s) for n, s in zip(lengths, sequences)):
        raise DataError("make_batches: a prompt length is negative or covers its whole sequence, which would "
                        "leave no token to train on; tokenize question/answer items with tokenize_set")
    order = list(range(len(sequences)))
    if shuffle:
        random.Random(seed).shuffle(order)
    return [_pad_batch([sequences[i] for i in order[start:start + batch_size]], pad_id,
                       [lengths[i] for i in order[start:start + batch_size]])
            for start in range(0, len(order), batch_size)]


def pair_batches(forget_batches: Sequence[dict], retain_batches: Sequence[dict] | None
                 ) -> list[tuple[dict, dict | None]]:
    """One (forget, retain) pair per forget batch; retain batches cycle if fewer, None if absent."""
    if not retain_batches:
        return [(fb, None) for fb in forget_batches]
    return [(fb, retain_batches[i % len(retain_batches)]) for i, fb in enumerate(forget_batches)]
