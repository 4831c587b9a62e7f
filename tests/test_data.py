"""Tests for loku.data: real shared files, a matrix of malformed inputs, tokenization, batching."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from loku.data import (
    QA_TEMPLATE,
    TextSet,
    check_forget_not_in_retain,
    load_qa_jsonl,
    load_text_set,
    make_batches,
    pair_batches,
    read_texts,
    tokenize_texts,
)
from loku.errors import DataError, LokuError
from loku.lm import ensure_pad_token
from loku.provenance import file_sha256


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def gpt2_tokenizer(shared_data: Path):
    from transformers import GPT2Tokenizer

    folder = shared_data / "tokenizers" / "gpt2"
    if not (folder / "vocab.json").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found in {folder}")
    # from the folder: vocab=/merges= (transformers 5) and vocab_file=/merges_file= (4.x) each break in the other
    tok = GPT2Tokenizer.from_pretrained(folder)
    assert len(tok) == 50257
    return tok


@pytest.fixture
def tok(gpt2_tokenizer):
    """A fresh copy per test, since some tests change pad/eos tokens."""
    import copy

    return copy.deepcopy(gpt2_tokenizer)


# ----------------------------------------------------------------------------- real shared files

def test_tdec_forget_csv(shared_data: Path):
    texts = read_texts(shared_data / "tdec" / "forget" / "lm_extraction_32_0.csv", role="forget")
    assert len(texts) == 32
    assert all(isinstance(t, str) and t.strip() for t in texts)


@pytest.mark.parametrize("name, rows", [("pile.csv", 1500), ("wikitext.csv", 500)])
def test_tdec_eval_csv(shared_data: Path, name: str, rows: int):
    texts = read_texts(shared_data / "tdec" / "eval" / name, role="retain")
    assert len(texts) == rows


def test_tofu_jsonl_as_texts_and_qa(shared_data: Path):
    path = shared_data / "tofu" / "forget01.jsonl"
    texts = read_texts(path)
    rows = load_qa_jsonl(path, role="forget")
    assert len(texts) == len(rows) == 40
    assert texts[0] == QA_TEMPLATE.format(question=rows[0]["question"], answer=rows[0]["answer"])
    assert texts[0].startswith("Question: ") and "\nAnswer: " in texts[0]


def test_tofu_perturbed_keeps_extra_fields(shared_data: Path):
    path = shared_data / "tofu" / "forget01_perturbed.jsonl"
    if not path.is_file():
        pytest.skip("forget01_perturbed.jsonl not in shared data")
    rows = load_qa_jsonl(path, role="forget")
    assert "perturbed_answer" in rows[0]


def test_load_text_set_and_sha(shared_data: Path):
    path = shared_data / "tdec" / "forget" / "lm_extraction_4_0.csv"
    ts = load_text_set(path, "forget")
    assert isinstance(ts, TextSet)
    assert ts.path == str(path) and ts.role == "forget" and len(ts.texts) == 4
    assert ts.sha256 == file_sha256(path) and len(ts.sha256) == 64


def test_tdec_tokenizes_within_200ish(shared_data: Path, tok):
    texts = read_texts(shared_data / "tdec" / "forget" / "lm_extraction_32_0.csv")
    seqs = tokenize_texts(tok, texts, max_length=256, source="lm_extraction_32_0.csv")
    assert len(seqs) == 32 and all(150 <= len(s) <= 256 for s in seqs)


# ----------------------------------------------------------------------------- well-formed small files

def test_formats_roundtrip(tmp_path: Path):
    (tmp_path / "a.txt").write_text("first line\n\n  \nsecond line\r\n", encoding="utf-8")
    assert read_texts(tmp_path / "a.txt") == ["first line", "second line"]
    (tmp_path / "b.json").write_text(json.dumps(["x y", {"text": "z w"}, {"question": "q", "answer": "a"}]))
    assert read_texts(tmp_path / "b.json") == ["x y", "z w", "Question: q\nAnswer: a"]
    (tmp_path / "c.jsonl").write_text('{"text": " lead space"}\n\n{"question": "q", "answer": "a"}\n')
    assert read_texts(tmp_path / "c.jsonl") == [" lead space", "Question: q\nAnswer: a"]
    (tmp_path / "d.csv").write_bytes('\ufeffid,text\n1," multi\nline"\n'.encode("utf-8"))
    assert read_texts(tmp_path / "d.csv") == [" multi\nline"]


# ----------------------------------------------------------------------------- malformed file matrix

# (test id, file name, bytes, substrings the message must contain: the problem and the hint)
BAD_FILES = [
    ("empty-csv", "forget.csv", b"", ["file is empty", "'text' column"]),
    ("whitespace-only-file", "forget.txt", b"  \n\n", ["file is empty", "one text per line"]),
    ("header-only-csv", "forget.csv", b"doc_id,text\n", ["header but no rows", "add one text per row"]),
    ("csv-no-text-column", "forget.csv", b"doc_id,body\n1,hello\n",
     ["no 'text' column", "'doc_id', 'body'", "rename the column"]),
    ("csv-empty-text", "forget.csv", b'doc_id,text\n1,"hello\nthere"\n\n2,   \n',
     ["row 2 (line 5)", "whitespace-only", "remove it"]),
    ("csv-short-row", "forget.csv", b"doc_id,text\n1,hello there\n2\n", ["row 2", "empty", "remove it"]),
    ("csv-unclosed-quote", "forget.csv", b'doc_id,text\n1,"abc\n2,def\n',
     ["record starting at line 2", "unexpected end of data", "check the quotes"]),
    ("csv-stray-quote", "forget.csv", b'doc_id,text\n1,"ab"c"\n', ["not a valid CSV in the record starting at line 2", "re-export"]),
    ("jsonl-bad-line", "forget.jsonl", b'{"text": "ok one"}\n\n{"text": "broken\n',
     ["line 3 is not valid JSON (Unterminated string", "one complete JSON object per line"]),
    ("jsonl-no-text", "forget.jsonl", b'{"text": "fine"}\n{"body": "x", "id": 1}\n',
     ["line 2 has neither 'text' nor 'question'+'answer'", "keys found: body, id", "add a 'text' field"]),
    ("jsonl-question-only", "forget.jsonl", b'{"question": "who?"}\n', ["line 1 has neither", "keys found: question"]),
    ("jsonl-not-object", "forget.jsonl", b'[1, 2]\n', ["line 1 is a JSON list, not a string or object"]),
    ("jsonl-number-text", "forget.jsonl", b'{"text": 5}\n', ["line 1 has a JSON number where a text string is expected", "JSON string"]),
    ("jsonl-blank-answer", "forget.jsonl", b'{"question": "q", "answer": " "}\n',
     ["line 1 ('answer') has an empty", "remove it"]),
    ("non-utf8", "forget.txt", b"good line\nbad \xff byte\n",
     ["not valid UTF-8", "0xff on line 2", "byte offset 14", "re-encode the file as UTF-8"]),
    ("json-not-list", "forget.json", b'{"text": {"0": "a"}}',
     ["must be a JSON list", "object with keys 'text'", "list of strings"]),
    ("json-invalid", "forget.json", b'["a",\n "b"', ["not valid JSON", "line 2", "fix the JSON"]),
    ("json-empty-list", "forget.json", b"[]", ["has no texts", "JSON list"]),
    ("json-empty-item", "forget.json", b'["a b", ""]', ["item 2 has an empty", "remove it"]),
    ("json-bad-item", "forget.json", b'["a b", 3]', ["item 2 is a JSON number, not a string or object"]),
]


@pytest.mark.parametrize("name, content, expected", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_file(tmp_path: Path, name: str, content: bytes, expected: list[str]):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_texts(path, role="forget")
    msg = str(info.value)
    assert msg.startswith(str(path)) and "forget set" in msg and "\n" not in msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=r"nope\.csv: retain set file not found; check the path"):
        read_texts(path, role="retain")


def test_directory(tmp_path: Path):
    with pytest.raises(DataError, match=r"validation set is a directory.*pass the path of the data file"):
        read_texts(tmp_path, role="validation")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_unreadable(tmp_path: Path):
    path = tmp_path / "locked.txt"
    path.write_text("some text\n")
    path.chmod(0)
    try:
        with pytest.raises(DataError, match=r"locked\.txt: forget set cannot be read \(permission denied\); make it"):
            read_texts(path)
    finally:
        path.chmod(0o644)


def test_qa_loader_requires_question_and_answer(tmp_path: Path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q", "answer": "a", "extra": 1}\n{"text": "only text"}\n')
    with pytest.raises(DataError, match=r"qa\.jsonl: forget set line 2 lacks 'question' and 'answer' "
                                        r"\(keys found: text\); give every line"):
        load_qa_jsonl(path, role="forget")
    path.write_text('{"question": "q", "answer": "a", "extra": 1}\n')
    assert load_qa_jsonl(path, role="forget") == [{"question": "q", "answer": "a", "extra": 1}]


# ----------------------------------------------------------------------------- tokenization

def test_too_long_errors(tok):
    with pytest.raises(DataError) as info:
        tokenize_texts(tok, ["a b", "one two three four five six"], max_length=4, source="f.csv")
    msg = str(info.value)
    assert msg.startswith("f.csv: row 2 is 6 tokens long, more than max length 4")
    assert "--max-length" in msg and "--truncate" in msg


def test_too_long_truncates_with_one_warning(tok):
    texts = ["one two three four five six", "a b", "seven eight nine ten eleven"]
    with pytest.warns(UserWarning, match=r"f\.csv: 2 of 3 texts were longer than 4 tokens") as record:
        seqs = tokenize_texts(tok, texts, max_length=4, source="f.csv", on_overflow="truncate")
    assert len([w for w in record if "truncated" in str(w.message)]) == 1
    assert [len(s) for s in seqs] == [4, 2, 4]
    assert seqs[0] == tok("one two three four five six", add_special_tokens=False)["input_ids"][:4]


def test_too_few_tokens(tok):
    with pytest.raises(DataError, match=r"f\.jsonl: row 2 \('x'\) tokenizes to 1 token but at least 2.*remove or"):
        tokenize_texts(tok, ["hello world", "x"], max_length=16, source="f.jsonl")


def test_bos_optional(tok):
    plain = tokenize_texts(tok, ["hello world"], max_length=8, source="s")
    assert plain == [[31373, 995]]  # no special tokens by default
    with_bos = tokenize_texts(tok, ["hello world"], max_length=8, source="s", add_bos=True)
    assert with_bos == [[tok.bos_token_id, 31373, 995]]


def test_bad_overflow_option(tok):
    with pytest.raises(LokuError, match="on_overflow"):
        tokenize_texts(tok, ["hello world"], max_length=8, source="s", on_overflow="drop")


def test_ensure_pad_token_uses_eos(tok):
    assert tok.pad_token_id is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ensure_pad_token(tok)
    assert tok.pad_token_id == tok.eos_token_id == 50256
    assert ensure_pad_token(tok) == 50256  # idempotent; the id to pad with
    assert tok.pad_token_id == 50256


def test_ensure_pad_token_without_pad_or_eos(tok):
    tok.eos_token = None
    tok.bos_token = None
    with pytest.raises(LokuError, match=r"neither a pad token nor an EOS token.*set tokenizer\.pad_token"):
        ensure_pad_token(tok)


# ----------------------------------------------------------------------------- forget/retain overlap

def test_forget_entirely_in_retain_errors():
    forget = ["the cat sat", "on the\nmat"]
    retain = ["on  the mat ", "something else", "the cat sat"]
    with pytest.raises(DataError, match=r"f\.csv: every forget text \(2 of 2\) also appears in the retain set r\.csv.*"
                                        r"use a retain set without them"):
        check_forget_not_in_retain(forget, retain, "f.csv", "r.csv")


def test_forget_partly_in_retain_warns():
    with pytest.warns(UserWarning, match=r"f\.csv: 1 of 2 forget texts also appear in the retain set r\.csv"):
        check_forget_not_in_retain(["a b", "c d"], ["a  b", "x"], "f.csv", "r.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_forget_not_in_retain(["a b"], ["x"], "f.csv", "r.csv")


# ----------------------------------------------------------------------------- batching

def test_make_batches_padding_and_labels():
    seqs = [[5, 6, 7], [8, 9], [1, 2, 3, 4, 5], [4, 4]]
    batches = make_batches(seqs, batch_size=2, pad_id=0)
    assert len(batches) == 2
    b0 = batches[0]
    assert b0["input_ids"].dtype == torch.long and b0["input_ids"].shape == (2, 3)
    assert b0["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b0["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b0["labels"].tolist() == [[5, 6, 7], [8, 9, -100]]
    assert batches[1]["input_ids"].shape == (2, 5)  # width = longest in that batch only


def test_make_batches_pad_equal_to_real_token_keeps_label():
    # pad = EOS is common; a real EOS inside the text must still be a label.
    b = make_batches([[3, 50256], [3]], batch_size=2, pad_id=50256)[0]
    assert b["labels"].tolist() == [[3, 50256], [3, -100]]


def test_make_batches_last_batch_smaller_and_shuffle_deterministic():
    seqs = [[i, i + 1] for i in range(10)]
    assert [b["input_ids"].shape[0] for b in make_batches(seqs, 4, 0)] == [4, 4, 2]
    a = make_batches(seqs, 3, 0, shuffle=True, seed=7)
    b = make_batches(seqs, 3, 0, shuffle=True, seed=7)
    c = make_batches(seqs, 3, 0, shuffle=True, seed=8)
    flat = lambda bs: [row for x in bs for row in x["input_ids"].tolist()]  # noqa: E731
    assert flat(a) == flat(b)
    assert flat(a) != flat(c)
    assert sorted(flat(a)) == sorted(seqs)


def test_make_batches_bad_size():
    with pytest.raises(LokuError, match="batch size"):
        make_batches([[1, 2]], 0, 0)


def test_pair_batches_cycles_retain():
    forget = [{"f": i} for i in range(5)]
    retain = [{"r": 0}, {"r": 1}]
    pairs = pair_batches(forget, retain)
    assert [p[0]["f"] for p in pairs] == [0, 1, 2, 3, 4]
    assert [p[1]["r"] for p in pairs] == [0, 1, 0, 1, 0]
    assert pair_batches(forget[:2], [{"r": i} for i in range(4)]) == [({"f": 0}, {"r": 0}), ({"f": 1}, {"r": 1})]
    assert pair_batches(forget[:2], None) == [({"f": 0}, None), ({"f": 1}, None)]
    assert pair_batches(forget[:2], []) == [({"f": 0}, None), ({"f": 1}, None)]


# ----------------------------------------------------------------------------- question/answer items

IGNORE = -100  # loku.losses.IGNORE_INDEX, written out

def _qa_file(tmp_path: Path) -> Path:
    path = tmp_path / "forget.jsonl"
    rows = [{"question": "Who wrote The Silent Harbor?", "answer": "Elena Marsh wrote it in 1999."},
            {"text": "a plain text line"},
            {"question": "Where was she born?", "answer": "In Lisbon."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_qa_items_stay_pairs(tmp_path: Path):
    import loku.data as D

    ts = D.load_text_set(_qa_file(tmp_path), "forget")
    assert ts.qa == [("Who wrote The Silent Harbor?", "Elena Marsh wrote it in 1999."), None,
                     ("Where was she born?", "In Lisbon.")]
    assert ts.texts[1] == "a plain text line" and ts.texts[2] == "Question: Where was she born?\nAnswer: In Lisbon."
    plain = tmp_path / "plain.txt"
    plain.write_text("one two\nthree four\n")
    assert D.load_text_set(plain, "retain").qa is None


def test_qa_prompt_tokens_are_masked_from_the_labels(tmp_path: Path, tok):
    """TOFU masks the question: labels are -100 on the prompt tokens, the answer (and EOS) are labels."""
    import loku.data as D

    ts = D.load_text_set(_qa_file(tmp_path), "forget")
    tset = D.tokenize_set(tok, ts, max_length=64)  # no model, GPT-2 tokenizer: TOFU's generic/phi tags
    assert tset.template == "generic" and len(tset) == 3
    # the count TOFU masks: len(tokenizer.tokenize(question_start + question + question_end, add_special_tokens=True))
    want = [len(tok.tokenize(f"Question: {q}\n", add_special_tokens=True)) for q in
            ("Who wrote The Silent Harbor?", None, "Where was she born?") if q]
    assert [tset.prompt_lengths[0], tset.prompt_lengths[2]] == want and tset.prompt_lengths[1] == 0
    assert tset.ids[2] == tok("Question: Where was she born?\nAnswer: In Lisbon.")["input_ids"] + [tok.eos_token_id]
    batch = D.make_batches(tset, batch_size=3, pad_id=0)[0]
    for i, seq in enumerate(tset.ids):
        n = tset.prompt_lengths[i]
        labels = batch["labels"][i, :len(seq)].tolist()
        assert labels[:n] == [IGNORE] * n and labels[n:] == seq[n:]
        assert batch["input_ids"][i, :len(seq)].tolist() == seq  # the question is still the model's input
    assert tok.decode([t for t in batch["labels"][2].tolist() if t != IGNORE]) == "Answer: In Lisbon.<|endoftext|>"
    assert batch["labels"][1, :len(tset.ids[1])].tolist() == tset.ids[1]  # plain text: every token a label


def test_qa_training_tokens_are_the_ones_tofu_scores(tmp_path: Path, tok):
    """Template chosen from the model at tokenization time; the same sequence and the same answer tokens
    as TOFU evaluation, so the training NLL of an item equals TOFU's answer NLL for it."""
    import loku.data as D
    from loku.losses import mean_nll
    from loku.metrics import tofu as T
    from tiny_models import make_tiny_model

    ts = D.load_text_set(_qa_file(tmp_path), "forget")
    for arch, name in (("llama", "llama2"), ("phi", "phi"), ("gpt_neo", "generic")):
        model = make_tiny_model(arch, vocab=50257, n_ctx=128)
        tset = D.tokenize_set(tok, ts, max_length=128, model=model)
        assert tset.template == name
        tmpl = T.choose_template(model, tok)
        for i in (0, 2):
            prompt, answer = T.qa_token_pair(tok, tmpl, *ts.qa[i])
            assert tset.ids[i] == prompt + answer and tset.prompt_lengths[i] == len(prompt)
        batches = D.make_batches(tset, batch_size=1, pad_id=0)
        with torch.no_grad():
            train_nll = [float(mean_nll(model(input_ids=b["input_ids"]).logits, b["labels"])) for b in batches]
        tofu_nll = T.answer_nll(model, tok, [ts.qa[0][0], ts.qa[2][0]], [ts.qa[0][1], ts.qa[2][1]], template=tmpl)
        assert [train_nll[0], train_nll[2]] == pytest.approx(tofu_nll.tolist(), rel=1e-5)
    forced = D.tokenize_set(tok, ts, max_length=128, model=make_tiny_model("gpt_neo", vocab=50257), template="llama2")
    assert forced.template == "llama2"


def test_plain_sets_tokenize_as_before(tmp_path: Path, tok):
    import loku.data as D

    path = tmp_path / "plain.txt"
    path.write_text("hello world\nsome more words\n")
    tset = D.tokenize_set(tok, D.load_text_set(path, "forget"), max_length=8, add_bos=True)
    assert tset.ids == tokenize_texts(tok, ["hello world", "some more words"], max_length=8, source="s", add_bos=True)
    assert tset.prompt_lengths == [0, 0] and tset.template is None
    assert make_batches(tset, 2, 0)[0]["labels"].tolist() == make_batches(tset.ids, 2, 0)[0]["labels"].tolist()


def test_prompt_lengths_follow_their_sequence_when_shuffled():
    import loku.data as D

    seqs = [[10 + i] * (3 + i) for i in range(6)]
    lengths = [i % 3 for i in range(6)]
    batches = make_batches(seqs, 4, 0, shuffle=True, seed=3, prompt_lengths=lengths)
    seen = 0
    for b in batches:
        for ids, labels in zip(b["input_ids"].tolist(), b["labels"].tolist()):
            i = ids[0] - 10
            n = lengths[i]
            assert labels[:n] == [IGNORE] * n and labels[n:len(seqs[i])] == seqs[i][n:]
            seen += 1
    assert seen == 6
    with pytest.raises(LokuError, match="not both"):
        make_batches(D.TokenizedSet([[1, 2]], [1]), 1, 0, prompt_lengths=[1])
    with pytest.raises(LokuError, match="1 prompt lengths for 2 sequences"):
        make_batches([[1, 2], [3, 4]], 1, 0, prompt_lengths=[1])
    with pytest.raises(DataError, match="no token to train on"):
        make_batches([[1, 2]], 1, 0, prompt_lengths=[2])


def test_qa_items_too_long(tmp_path: Path, tok):
    import loku.data as D

    ts = D.load_text_set(_qa_file(tmp_path), "forget")
    with pytest.raises(DataError, match=r"forget\.jsonl: row 1 \(line 1\) is \d+ tokens long, more than max length 12"):
        D.tokenize_set(tok, ts, max_length=12)
    with pytest.warns(UserWarning, match="2 of 3 texts were longer than 13 tokens"):
        cut = D.tokenize_set(tok, ts, max_length=13, on_overflow="truncate")  # 19 and 14 tokens with EOS
    assert [len(s) for s in cut.ids] == [13, 4, 13] and cut.prompt_lengths == [9, 0, 8]
    with pytest.raises(DataError, match=r"row 1 \(line 1\): its question alone is \d+ tokens .* no answer token"):
        D.tokenize_set(tok, ts, max_length=8, on_overflow="truncate")
