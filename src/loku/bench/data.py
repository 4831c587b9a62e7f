"""The TDEC texts a benchmark uses, cut into disjoint slices of the shared data files.

Every role reads its own rows, so no text is both trained on and measured:

===========  ======================================================  ==========================
role         rows                                                    used for
===========  ======================================================  ==========================
forget       ``tdec/forget/lm_extraction_{pool}_{split}.csv`` [0, n)  planted, then unlearned
heldout      the same file's next rows [n, n + n_heldout) (``tdec``)  stop thresholds (MA/EL), MIA
             or ``tdec/eval/pile.csv`` [0, 200) (``pile``)            non-members, KL to the original
ppl_pile     ``pile.csv`` [200, 500)                                  Pile perplexity
general      ``pile.csv`` [500, 1500)                                 mixed into the planting
retain       ``wikitext.csv`` [0, 250)                                unlearning's retain set
ppl_wiki     ``wikitext.csv`` [250, 350)                              WikiText perplexity
===========  ======================================================  ==========================

The held-out set must be of the forget set's kind (docs/algorithms.md §6): TDEC sequences were picked
for being extractable (licences, code, boilerplate), and a model that never saw them predicts them
better than random Pile text (SmolLM2: MA 0.375 on split 0's forget rows, 0.26 on Pile excerpts).
Thresholds from Pile text then demand a forget MA below the never-trained model's own, an
overshoot that costs utility and marks the forgotten texts. A planted model never saw the split's
other rows, so ``tdec`` (the bench's default when it plants) gives thresholds of the right kind;
``pile`` is for models that memorized every TDEC row in pre-training (GPT-Neo).

Texts are cut to their first N tokens of the model's tokenizer (:func:`clip_texts`); a Pile or
WikiText excerpt shorter than N tokens is skipped so held-out sequences have the forget
sequences' length (MA and EL depend on it). Forget texts are never skipped: the forget set is
the file's first ``n_forget`` rows.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..provenance import file_sha256

__all__ = ["HELDOUT_SOURCES", "ROWS", "BenchTexts", "Sizes", "bench_texts", "clip_texts", "forget_file", "general_texts", "role_texts",
           "write_jsonl"]

# (file under tdec/eval, first row, end row) per role; see the module docstring.
ROWS: dict[str, tuple[str, int, int]] = {
    "heldout": ("pile.csv", 0, 200),
    "ppl_pile": ("pile.csv", 200, 500),
    # Pile only: WikiText in the planting pool taught SmolLM2 WikiText's format (its WikiText perplexity fell
    # to 0.81x the original's; Pile-only: 0.90x), which would flatter every method's WikiText perplexity.
    "general": ("pile.csv", 500, 1500),
    "retain": ("wikitext.csv", 0, 250),
    "ppl_wiki": ("wikitext.csv", 250, 350),
}


@dataclass(frozen=True)
class Sizes:
    """How many texts of each role, and how many tokens each keeps."""

    n_forget: int = 8
    forget_tokens: int = 32
    n_heldout: int = 8  # held-out sequences (same length as the forget ones)
    n_retain: int = 64
    retain_tokens: int = 64
    n_ppl: int = 16  # per perplexity set (Pile and WikiText)
    ppl_tokens: int = 128
    n_general: int = 256  # planting pool
    general_tokens: int = 32

    def validate(self) -> "Sizes":
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"sizes.{name} must be a positive integer, got {value!r}")
        for name in ("forget_tokens", "retain_tokens", "ppl_tokens", "general_tokens"):
            if getattr(self, name) < 12:
                raise ConfigError(f"sizes.{name} must be at least 12 tokens (EL_10 needs more than 10), "
                                  f"got {getattr(self, name)}")
        limits = {"n_heldout": 200, "n_retain": 250, "n_ppl": 100, "n_general": 1000}
        for name, limit in limits.items():
            if getattr(self, name) > limit:
                raise ConfigError(f"sizes.{name} is at most {limit} (the rows reserved for it), "
                                  f"got {getattr(self, name)}")
        return self


@dataclass
class BenchTexts:
    """The texts of one split, per role, and where they came from."""

    split: str
    texts: dict[str, list[str]]
    sources: dict[str, Any] = field(default_factory=dict)  # file -> {"sha256", "rows": {role: [start, end]}}

    def sha256(self) -> str:
        """One hash of every text of every role, in order: the data a cached planting depends on."""
        import hashlib

        return hashlib.sha256(json.dumps(self.texts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def forget_file(data_dir: str | Path, split: str, pool: int = 32) -> Path:
    return Path(data_dir) / "tdec" / "forget" / f"lm_extraction_{pool}_{split}.csv"


def clip_texts(tokenizer: Any, texts: list[str], n_tokens: int, *, min_tokens: int | None = None) -> list[str]:
    """Each text cut to its first ``n_tokens`` tokens, as text that re-tokenizes to the same ids.

    BPE merges across the cut can change the last ids; the cut is moved left until the decoded
    text tokenizes back to exactly the kept ids. With ``min_tokens``, texts that end up shorter
    are dropped (else kept as they are).
    """
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
        candidate = tokenizer.decode(ids)
        while tokenizer(candidate, add_special_tokens=False)["input_ids"] != ids and len(ids) > 8:
            ids = ids[:-1]
            candidate = tokenizer.decode(ids)
        if min_tokens is None or len(ids) >= min_tokens:
            out.append(candidate)
    return out


def _read(data_dir: Path, name: str, role: str) -> list[str]:
    from ..data import read_texts

    path = data_dir / "tdec" / "eval" / name
    if not path.is_file():
        raise DataError(f"{path}: {role} file not found; pass --data-dir pointing at the shared data folder "
                        "(or set LOKU_DATA_DIR)")
    return read_texts(path, role=role)


HELDOUT_SOURCES = ("tdec", "pile")


def bench_texts(tokenizer: Any, data_dir: str | Path, split: str, sizes: Sizes, *, pool: int = 32,
                heldout: str = "pile") -> BenchTexts:
    """The forget, held-out, retain, planting and perplexity texts of one TDEC split (module docstring);
    ``heldout``: ``tdec`` (the split file's rows after the forget set) or ``pile``."""
    from ..data import read_texts

    sizes.validate()
    if heldout not in HELDOUT_SOURCES:
        raise ConfigError(f"heldout must be one of {', '.join(HELDOUT_SOURCES)}, got {heldout!r}")
    data_dir = Path(data_dir)
    path = forget_file(data_dir, split, pool)
    if not path.is_file():
        raise DataError(f"{path}: TDEC forget file of split {split!r} not found; choose a split that exists under "
                        f"{path.parent} or pass --data-dir")
    forget_rows = read_texts(path, role="forget")
    if len(forget_rows) < sizes.n_forget:
        raise DataError(f"{path}: {len(forget_rows)} sequences, fewer than sizes.n_forget = {sizes.n_forget}")
    texts = {"forget": clip_texts(tokenizer, forget_rows[: sizes.n_forget], sizes.forget_tokens)}
    sources: dict[str, Any] = {str(path): {"sha256": file_sha256(path), "rows": {"forget": [0, sizes.n_forget]}}}
    want = {"heldout": (sizes.n_heldout, sizes.forget_tokens), "ppl_pile": (sizes.n_ppl, sizes.ppl_tokens),
            "general": (sizes.n_general, sizes.general_tokens), "retain": (sizes.n_retain, sizes.retain_tokens),
            "ppl_wiki": (sizes.n_ppl, sizes.ppl_tokens)}
    if heldout == "tdec":
        want.pop("heldout")
        # The first n_heldout rows after the forget rows that keep forget_tokens tokens (a cut that does
        # not re-tokenize stably comes out shorter: that row is skipped, as role_texts skips short ones).
        kept, end = [], sizes.n_forget
        while len(kept) < sizes.n_heldout and end < len(forget_rows):
            kept += clip_texts(tokenizer, [forget_rows[end]], sizes.forget_tokens, min_tokens=sizes.forget_tokens)
            end += 1
        if len(kept) < sizes.n_heldout:
            raise DataError(f"{path}: {len(kept)} rows after the {sizes.n_forget} forget rows have "
                            f"{sizes.forget_tokens} tokens, {sizes.n_heldout} held-out sequences asked; lower "
                            "sizes.n_heldout or use heldout: pile")
        texts["heldout"] = kept
        sources[str(path)]["rows"]["heldout"] = [sizes.n_forget, end]
    files: dict[str, list[str]] = {}
    for role, (count, n_tokens) in want.items():
        texts[role] = role_texts(tokenizer, data_dir, role, count, n_tokens, files=files, sources=sources)
    return BenchTexts(split=str(split), texts=texts, sources=sources)


def role_texts(tokenizer: Any, data_dir: str | Path, role: str, count: int, n_tokens: int, *,
               files: dict[str, list[str]] | None = None, sources: dict[str, Any] | None = None) -> list[str]:
    """The first ``count`` texts of ``role``'s rows (:data:`ROWS`) that have ``n_tokens`` tokens, cut to that.

    ``files`` caches the files read (name -> texts); ``sources`` collects {path: {"sha256", "rows"}}.
    """
    name, start, end = ROWS[role]
    files = {} if files is None else files
    if name not in files:
        files[name] = _read(Path(data_dir), name, role)
    rows = files[name][start:end]
    kept: list[str] = []
    for i in range(0, len(rows), 64):  # tokenize in chunks until enough long-enough texts are found
        kept += clip_texts(tokenizer, rows[i:i + 64], n_tokens, min_tokens=n_tokens)
        if len(kept) >= count:
            break
    if len(kept) < count:
        raise DataError(f"only {len(kept)} texts of at least {n_tokens} tokens for the {role} set ({name} rows "
                        f"{start}-{end}), {count} asked; lower the size or the token count")
    if sources is not None:
        path = str(Path(data_dir) / "tdec" / "eval" / name)
        entry = sources.setdefault(path, {"sha256": file_sha256(path), "rows": {}})
        entry["rows"][role] = [start, end]
    return kept[:count]


def general_texts(tokenizer: Any, data_dir: str | Path, count: int, n_tokens: int) -> list[str]:
    """Pile excerpts of the planting pool (``pile.csv`` rows 500-1500), ``n_tokens`` tokens each: the general
    text a forget set is planted among (``loku demo`` uses them too)."""
    return role_texts(tokenizer, data_dir, "general", count, n_tokens)


def write_jsonl(path: str | Path, texts: list[str]) -> Path:
    """One ``{"text": ...}`` a line, atomically (the trainer reads the sets from files)."""
    from ..save import atomic_write_text

    atomic_write_text(path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    return Path(path)
