"""Reasoning scorers (LAMBADA, PubMedQA), the shared scoring primitives, and the lm-eval backend."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from loku import lm as L
from loku.errors import ConfigError, DataError
from loku.metrics import reasoning as R
from tiny_models import make_tiny_model


# ----------------------------------------------------------------------------- test doubles

class StubLM(nn.Module):
    """A causal LM whose next-token logits depend only on the previous token.

    ``table`` is a [V] tensor (the same logits everywhere), a [V, V] tensor (row = previous
    token) or a callable ``prev_id -> [V]``. Honours ``logits_to_keep`` and has a naive greedy
    ``generate``, so metric values can be computed by hand from the table.
    """

    def __init__(self, vocab: int, table):
        super().__init__()
        self.vocab = vocab
        self.table = table
        self.anchor = nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(max_position_embeddings=1024, model_type="stub", eos_token_id=None)
        self.calls: list[dict] = []

    def _logits(self, input_ids):
        if torch.is_tensor(self.table) and self.table.dim() == 1:
            return self.table.expand(*input_ids.shape, self.vocab)
        if torch.is_tensor(self.table):
            return self.table[input_ids]
        return torch.stack([torch.stack([self.table(int(t)) for t in row]) for row in input_ids])

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, logits_to_keep=0):
        self.calls.append({"logits_to_keep": logits_to_keep, "shape": tuple(input_ids.shape)})
        logits = self._logits(input_ids)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return types.SimpleNamespace(logits=logits)

    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=1, **_):
        ids = input_ids
        for _ in range(max_new_tokens):
            nxt = self._logits(ids[:, -1:])[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        return ids


class PlainStubLM(StubLM):
    """Same, but its forward takes neither position_ids nor logits_to_keep (the fallback path)."""

    def forward(self, input_ids=None, attention_mask=None):  # type: ignore[override]
        return types.SimpleNamespace(logits=self._logits(input_ids))


def fixed_distribution(vocab: int, probs: dict[int, float]):
    """Logits (as log-probabilities) of one context-independent distribution over ``vocab`` tokens."""
    rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
    p = torch.full((vocab,), rest)
    for t, v in probs.items():
        p[t] = v
    return torch.log(p)


class CharTokenizer:
    """Ids 3.. for letters; 0 pad, 1 bos, 2 eos. Enough for the primitives' needs."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + (ord(c) % 20) for c in text]}


@pytest.fixture(scope="module")
def gpt2_tok(shared_data):
    from transformers import GPT2Tokenizer

    p = shared_data / "tokenizers" / "gpt2"
    tok = GPT2Tokenizer.from_pretrained(p)
    assert len(tok) == 50257
    tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------- primitives

@pytest.mark.parametrize("stub_cls", [StubLM, PlainStubLM])
def test_score_continuations_matches_hand_computed_bigram_probabilities(stub_cls):
    vocab = 6
    probs = torch.tensor([  # row = previous token, column = next token
        [0.1, 0.5, 0.1, 0.1, 0.1, 0.1],
        [0.1, 0.1, 0.26, 0.24, 0.2, 0.1],
        [0.05, 0.05, 0.1, 0.1, 0.1, 0.6],
        [0.2, 0.2, 0.2, 0.2, 0.1, 0.1],
        [1 / 6] * 6,
        [0.35, 0.25, 0.1, 0.1, 0.1, 0.1],
    ])
    model = stub_cls(vocab, torch.log(probs))
    tok = CharTokenizer()
    pairs = [([0], [1, 2]), ([4, 0, 1], [3]), ([5], [0, 1, 2, 5])]
    scores = L.score_continuations(model, tok, pairs, batch_size=3)
    expected = [
        -math.log(0.5) - math.log(0.26),
        -math.log(0.24),
        -math.log(0.35) - math.log(0.5) - math.log(0.26) - math.log(0.6),
    ]
    assert scores.nll_sum.tolist() == pytest.approx(expected, rel=1e-5)
    assert scores.n_tokens.tolist() == [2, 1, 4]
    assert scores.mean_nll.tolist() == pytest.approx([expected[0] / 2, expected[1], expected[2] / 4], rel=1e-5)
    # argmax after 0 -> 1, after 1 -> 2, after 2 -> 5, after 5 -> 0: pairs 0 and 2 are greedy, pair 1 not
    assert scores.greedy.tolist() == [True, False, True]
    if stub_cls is StubLM:  # only the last (longest continuation + 1) positions are materialised
        assert model.calls[-1]["logits_to_keep"] == 5


def test_score_continuations_empty_context_uses_bos_and_truncates_left():
    probs = torch.full((6, 6), 1 / 6)
    probs[1] = torch.tensor([0.05, 0.05, 0.7, 0.1, 0.05, 0.05])
    model = StubLM(6, torch.log(probs))
    scores = L.score_continuations(model, CharTokenizer(), [([], [2])], batch_size=1)
    assert scores.nll_sum.item() == pytest.approx(-math.log(0.7), rel=1e-5)
    s2 = L.score_continuations(model, CharTokenizer(), [([3, 4, 5, 1], [2])], batch_size=1, max_length=2)
    assert s2.nll_sum.item() == pytest.approx(-math.log(0.7), rel=1e-5)  # context cut to its last token (1)


@pytest.mark.parametrize("arch", ["llama", "gpt_neo"])
def test_batched_scoring_and_generation_equal_one_by_one(arch, gpt2_tok):
    model = make_tiny_model(arch, vocab=50257, n_ctx=128)
    texts = [("The capital of France is", " Paris, of course"), ("A", " b"), ("One two three four five six", " seven")]
    pairs = [(gpt2_tok(c)["input_ids"], gpt2_tok(x)["input_ids"]) for c, x in texts]
    batched = L.score_continuations(model, gpt2_tok, pairs, batch_size=3)
    for i, (c, x) in enumerate(pairs):
        with torch.no_grad():
            logp = model(torch.tensor([c + x])).logits.float().log_softmax(-1)[0]
        want = -sum(logp[len(c) - 1 + j, t].item() for j, t in enumerate(x))
        assert batched.nll_sum[i].item() == pytest.approx(want, rel=1e-4, abs=1e-4)
    prompts = [c for c, _ in pairs]
    together = L.greedy_generate(model, gpt2_tok, prompts, max_new_tokens=[4, 2, 3], batch_size=3)
    alone = [L.greedy_generate(model, gpt2_tok, [p], max_new_tokens=k)[0] for p, k in zip(prompts, [4, 2, 3])]
    assert together == alone
    assert [len(t) for t in together] == [4, 2, 3]


def test_greedy_generate_rejects_bad_budgets(gpt2_tok):
    model = make_tiny_model("gpt2", vocab=50257)
    with pytest.raises(ConfigError):
        L.greedy_generate(model, gpt2_tok, [[1, 2]], max_new_tokens=[1, 2])
    with pytest.raises(ConfigError):
        L.greedy_generate(model, gpt2_tok, [[1, 2]], max_new_tokens=0)


# ----------------------------------------------------------------------------- LAMBADA

def test_lambada_text_helpers():
    assert R.split_last_word("he walked into the glen") == ("he walked into the", "glen")
    assert R.split_last_word("trailing space  ") == ("trailing", "space")
    assert R.first_word("  Gillian, said") == "Gillian"
    assert R.first_word("\u201cEnoch\u201d was") == "Enoch"
    assert R.first_word("") == ""
    assert R.strip_punctuation(" glen. ") == "glen"


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_lambada_accuracy_with_a_model_that_always_says_paris(tmp_path, gpt2_tok):
    paris = gpt2_tok(" Paris")["input_ids"]
    assert len(paris) == 1
    model = StubLM(50257, fixed_distribution(50257, {paris[0]: 0.9}))
    path = _write_csv(tmp_path / "lambada.csv", ["id", "text"],
                      [["0", "The city of light is Paris"], ["1", "The capital of England is London"],
                       ["2", "She said it was Paris."]])
    # generate: " Paris Paris Paris ..." -> first word "Paris": hits on rows 0 and 2 (punctuation stripped).
    res = R.evaluate_lambada(model, gpt2_tok, path, batch_size=2, method="generate")
    assert res == {"accuracy": pytest.approx(2 / 3), "n": 3, "method": "generate"}
    # argmax (teacher-forced, the default): " Paris" == argmax only on row 0 (" Paris." is 2 tokens).
    res = R.evaluate_lambada(model, gpt2_tok, path, batch_size=2)
    assert res == {"accuracy": pytest.approx(1 / 3), "n": 3, "method": "argmax"}
    assert R.evaluate_lambada(model, gpt2_tok, path, limit=1)["n"] == 1
    with pytest.raises(ConfigError):
        R.evaluate_lambada(model, gpt2_tok, path, method="beam")


def test_lambada_default_is_teacher_forced_argmax_where_generation_differs(tmp_path, gpt2_tok):
    """After " London" the stub says "er": the argmax of the word's token is right (a hit for Jang /
    lm-eval), but greedy generation writes " Londoner" (a miss for the generate method)."""
    london, er = gpt2_tok(" London")["input_ids"], gpt2_tok("er")["input_ids"]
    assert len(london) == len(er) == 1

    def table(prev: int):
        return fixed_distribution(50257, {er[0] if prev == london[0] else london[0]: 0.9})

    model = StubLM(50257, table)
    path = _write_csv(tmp_path / "lambada.csv", ["id", "text"],
                      [["0", "The capital of England is London"],  # argmax hit, generate miss (" Londoner")
                       ["1", "The capital of England is Londoner"],  # " London" + "er": argmax hit on both tokens
                       ["2", "The capital of Italy is Rome"]])  # miss either way
    default = R.evaluate_lambada(model, gpt2_tok, path, batch_size=2)
    assert default == {"accuracy": pytest.approx(2 / 3), "n": 3, "method": "argmax"}
    generated = R.evaluate_lambada(model, gpt2_tok, path, batch_size=2, method="generate")
    assert generated == {"accuracy": pytest.approx(1 / 3), "n": 3, "method": "generate"}  # only "Londoner"


def test_lambada_argmax_against_an_independent_forward_pass(memorized, tmp_path):
    """A tiny model that memorized some texts: hits computed here from one plain forward pass each."""
    from transformers import AutoModelForCausalLM

    from tiny_models import word_tokenizer

    tok = word_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(memorized / "base").float().eval()
    texts = [t for name in ("forget", "validation") for t in (memorized / f"{name}.txt").read_text().split("\n") if t]
    path = _write_csv(tmp_path / "lambada.csv", ["id", "text"], [[str(i), t] for i, t in enumerate(texts)])
    hits = []
    for text in texts:
        context, target = text.rsplit(" ", 1)
        ctx = tok(context)["input_ids"]
        word = tok(context + " " + target)["input_ids"][len(ctx):]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + word])).logits[0]
        hits.append(all(int(logits[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(word)))
    assert 0 < sum(hits) < len(hits)  # memorized texts hit, held-out ones (mostly) miss
    res = R.evaluate_lambada(model, tok, path, batch_size=3)
    assert res["method"] == "argmax" and res["accuracy"] == pytest.approx(sum(hits) / len(hits))


def test_lambada_on_the_shared_file_runs_with_a_tiny_model(shared_data, gpt2_tok):
    path = shared_data / "tdec" / "eval" / "lambada.csv"
    items = R.lambada_items(path, limit=5)
    assert len(items) == 5 and all(c and t and " " not in t for c, t in items)
    model = make_tiny_model("gpt_neo", vocab=50257, n_ctx=256)
    res = R.evaluate_lambada(model, gpt2_tok, path, limit=3, batch_size=3)
    assert res["n"] == 3 and 0.0 <= res["accuracy"] <= 1.0


def test_malformed_reasoning_files_give_clear_errors(tmp_path, gpt2_tok):
    model = StubLM(50257, fixed_distribution(50257, {}))
    bad = _write_csv(tmp_path / "lambada.csv", ["id", "sentence"], [["0", "a b"]])
    with pytest.raises(DataError, match=r"lambada\.csv.*lacks column\(s\) text"):
        R.evaluate_lambada(model, gpt2_tok, bad)
    one_word = _write_csv(tmp_path / "one.csv", ["text"], [["word"]])
    with pytest.raises(DataError, match=r"one\.csv: line 2"):
        R.lambada_items(one_word)
    with pytest.raises(DataError, match="not found"):
        R.lambada_items(tmp_path / "missing.csv")
    label = _write_csv(tmp_path / "pq.csv", ["question", "abstract", "final_decision"], [["q?", "ctx", "perhaps"]])
    with pytest.raises(DataError, match=r"pq\.csv: line 2: final_decision 'perhaps'"):
        R.evaluate_pubmedqa(model, gpt2_tok, label)
    good = _write_csv(tmp_path / "good.csv", ["text"], [["a b"]])
    with pytest.raises(ConfigError, match="limit"):
        R.evaluate_lambada(model, gpt2_tok, good, limit=0)


# ----------------------------------------------------------------------------- PubMedQA

def test_pubmedqa_picks_the_likeliest_choice(tmp_path, gpt2_tok):
    ids = {c: gpt2_tok(" " + c)["input_ids"] for c in R.PUBMEDQA_CHOICES}
    assert all(len(v) == 1 for v in ids.values())
    model = StubLM(50257, fixed_distribution(50257, {ids["no"][0]: 0.3, ids["yes"][0]: 0.2,
                                                         ids["maybe"][0]: 0.1}))
    path = _write_csv(tmp_path / "pq.csv", ["question", "abstract", "final_decision"],
                      [["Q1?", "A1.", "no"], ["Q2?", "A2.", "yes"], ["Q3?", "A3.", "no"], ["Q4?", "A4.", "maybe"]])
    res = R.evaluate_pubmedqa(model, gpt2_tok, path, batch_size=5)
    assert res["accuracy"] == pytest.approx(0.5) and res["n"] == 4


def test_pubmedqa_on_the_shared_file(shared_data, gpt2_tok):
    path = shared_data / "tdec" / "eval" / "pubmed_qa.csv"
    rows = R.read_csv_rows(path, ["question", "abstract", "final_decision", "context"], role="PubMedQA")
    sections = R.parse_pubmed_contexts(rows[0]["context"])
    assert len(sections) >= 2 and sections[0] == rows[0]["abstract"]
    items = R.pubmedqa_items(path, limit=4, context="full")
    assert items[0][0].startswith("Context: " + sections[0]) and items[0][0].endswith("\nAnswer:")
    gold = [r["final_decision"] for r in rows[:6]]
    ids = gpt2_tok(" yes")["input_ids"]
    always_yes = StubLM(50257, fixed_distribution(50257, {ids[0]: 0.5}))
    res = R.evaluate_pubmedqa(always_yes, gpt2_tok, path, limit=6)
    assert res["accuracy"] == pytest.approx(gold.count("yes") / 6)
    model = make_tiny_model("llama", vocab=50257, n_ctx=512)
    res = R.evaluate_pubmedqa(model, gpt2_tok, path, limit=2)
    assert res["n"] == 2 and 0 <= res["accuracy"] <= 1


def test_dm_mathematics_is_a_plain_text_set(shared_data):
    rows = R.read_csv_rows(shared_data / "tdec" / "eval" / "valid_dm_mathematics.csv", ["text"], role="DM")
    assert len(rows) == 100 and {"doc_id", "corpus", "text"} <= set(rows[0])


# ----------------------------------------------------------------------------- lm-eval backend

def test_lm_eval_missing_gives_install_hint(monkeypatch):
    from loku.metrics import lm_eval_backend as B

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ConfigError, match=r"pip install 'loku\[lm-eval\]'"):
        B.run_lm_eval(make_tiny_model("gpt2"), None, ["copa"])


def test_lm_eval_wiring_with_a_fake_harness(monkeypatch):
    """The in-memory model (PEFT unwrapped), tasks and options reach HFLM / simple_evaluate."""
    from loku.metrics import lm_eval_backend as B

    seen: dict = {}

    class FakeHFLM:
        def __init__(self, **kwargs):
            seen["hflm"] = kwargs

    class FakeTaskManager:
        def __init__(self, include_path=None):
            seen["include_path"] = include_path
            self.all_tasks = list(B.PAPER_TASKS) + ["my_task"]

    def simple_evaluate(**kwargs):
        seen["evaluate"] = kwargs
        return {"results": {"copa": {"alias": "copa", "acc,none": 0.75, "acc_stderr,none": 0.1},
                            "my_task": {"acc,none": 0.5, "exact_match,strict": 0.25}},
                "n-samples": {"copa": {"original": 100, "effective": 4}},
                "n-shot": {"copa": 0, "my_task": 0}, "versions": {"copa": 1.0, "my_task": 1.0}}

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    fake.__version__ = "0.fake"
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = FakeHFLM
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.TaskManager = FakeTaskManager
    for name, mod in {"lm_eval": fake, "lm_eval.models": models, "lm_eval.models.huggingface": hf,
                      "lm_eval.tasks": tasks}.items():
        monkeypatch.setitem(sys.modules, name, mod)

    base = make_tiny_model("gpt2")

    class Wrapped(nn.Module):  # looks like a PeftModel
        def __init__(self):
            super().__init__()
            self.inner = base

        def get_base_model(self):
            return base

    out = B.run_lm_eval(Wrapped(), "TOK", ["copa", "my_task"], batch_size=3, limit=4, include_path="/x")
    assert seen["hflm"]["pretrained"] is base and seen["hflm"]["tokenizer"] == "TOK"
    assert seen["hflm"]["batch_size"] == 3
    assert seen["evaluate"]["tasks"] == ["copa", "my_task"] and seen["evaluate"]["limit"] == 4
    assert seen["include_path"] == ["/x"]
    assert out["tasks"]["copa"] == {"acc": 0.75, "acc_stderr": 0.1, "n": 4}
    assert out["tasks"]["my_task"] == {"acc": 0.5, "exact_match[strict]": 0.25}
    assert out["lm_eval_version"] == "0.fake"
    json.dumps(out)
    with pytest.raises(ConfigError, match="unknown lm-eval task"):
        B.run_lm_eval(base, "TOK", ["no_such_task"])
    assert B.PAPER_TASKS == ("lambada_openai", "hellaswag", "winogrande", "copa", "arc_easy", "arc_challenge",
                             "piqa", "mathqa", "pubmedqa")


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_lm_eval_runs_a_local_json_task_on_the_in_memory_model(tmp_path, gpt2_tok, monkeypatch):
    """A real harness run: a multiple-choice task over a local JSONL file; its accuracy must equal
    the one computed here from summed continuation log-likelihoods."""
    from loku.metrics.lm_eval_backend import run_lm_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = [{"question": "The sky is", "choices": ["blue", "green"], "label": 0},
            {"question": "Two plus two is", "choices": ["four", "five"], "label": 0},
            {"question": "Fire is", "choices": ["cold", "hot"], "label": 1},
            {"question": "Ice is", "choices": ["cold", "warm"], "label": 0}]
    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "loku_toy.yaml").write_text(
        "task: loku_toy_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        "doc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{label}}\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n")
    model = make_tiny_model("gpt_neo", vocab=50257, n_ctx=128, seed=3)
    out = run_lm_eval(model, gpt2_tok, ["loku_toy_mc"], include_path=tmp_path / "tasks", batch_size=2)
    pairs = [(gpt2_tok(d["question"])["input_ids"], gpt2_tok(" " + c)["input_ids"]) for d in docs for c in d["choices"]]
    nll = L.score_continuations(model, gpt2_tok, pairs).nll_sum.view(len(docs), 2)
    want = sum(int(nll[i].argmin()) == d["label"] for i, d in enumerate(docs)) / len(docs)
    assert out["tasks"]["loku_toy_mc"]["acc"] == pytest.approx(want)
    assert out["tasks"]["loku_toy_mc"]["n"] == 4
