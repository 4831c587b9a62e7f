"""Dialogue unigram F1: normalisation, F1 by hand, prompts, cutting, files, end to end."""
from __future__ import annotations

import json

import pytest
import torch

from loku.errors import ConfigError, DataError
from loku.metrics import dialogue as D
from test_reasoning import StubLM, fixed_distribution, gpt2_tok  # noqa: F401  (fixture re-used)
from tiny_models import make_tiny_model


def test_squad_normalisation():
    assert D.normalize_answer("The Cat, sat!  on a   mat.") == "cat sat on mat"
    assert D.normalize_answer("An apple; THE end") == "apple end"
    assert D.normalize_answer("theory anthem") == "theory anthem"  # articles only as whole words


def test_unigram_f1_by_hand():
    # pred {cat, sat} vs ref {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8
    assert D.unigram_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # multiset overlap: pred [cat, cat, dog] vs ref [cat, bird]: common 1, P = 1/3, R = 1/2 -> F1 = 0.4
    assert D.unigram_f1("cat cat dog", "cat bird") == pytest.approx(0.4)
    assert D.unigram_f1("dog", "cat") == 0.0
    assert D.unigram_f1("", "cat") == 0.0
    assert D.unigram_f1("the", "a") == 1.0  # both normalise to nothing


def test_prompt_format_and_reply_cutting():
    prompt, ref = D.dialogue_prompt(["Hi", "Hello  there!", "How are you"])
    assert prompt == "User 1: Hi.\nUser 2: Hello there!\nUser 1:"
    assert ref == "How are you."
    prompt, ref = D.dialogue_prompt(["a?", "b"])
    assert prompt == "User 1: a?\nUser 2:" and ref == "b."
    with pytest.raises(DataError):
        D.dialogue_prompt(["only one"])
    assert D.cut_reply(" I am fine.\nUser 1: ok") == "I am fine."
    assert D.cut_reply("fine thanks User 2: and you") == "fine thanks"
    assert D.cut_reply("\nnothing") == ""


def test_shared_dialogue_files(shared_data):
    counts = {"blended_skill_talk": 1009, "empathetic_dialogues": 2758, "wizard_of_internet": 516,
              "wizard_of_wikipedia": 967}
    for name, n in counts.items():
        dialogues = D.load_dialogues(shared_data / "tdec" / "eval" / f"{name}.json")
        assert len(dialogues) == n
        assert all(isinstance(t, str) for t in dialogues[0]) and len(dialogues[0]) >= 2


def test_malformed_dialogue_files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"text": {"0": ["a", "b"],}')
    with pytest.raises(DataError, match=r"bad\.json: line 1: invalid JSON"):
        D.load_dialogues(bad_json)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"dialogues": []}))
    with pytest.raises(DataError, match=r"wrong\.json: expected"):
        D.load_dialogues(wrong)
    not_strings = tmp_path / "ns.json"
    not_strings.write_text(json.dumps({"text": {"0": ["a", 3]}}))
    with pytest.raises(DataError, match=r"ns\.json: dialogue 0 is not a list of strings"):
        D.load_dialogues(not_strings)
    with pytest.raises(DataError, match="not found"):
        D.load_dialogues(tmp_path / "missing.json")
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([["a", "b"], ["c", "d", "e"]]))
    assert D.load_dialogues(as_list) == [["a", "b"], ["c", "d", "e"]]


def test_f1_with_a_model_that_answers_cat_then_newline(tmp_path, gpt2_tok):
    cat = gpt2_tok(" cat")["input_ids"][0]
    newline = gpt2_tok("\n")["input_ids"][0]
    logits = torch.stack([fixed_distribution(50257, {cat: 0.9}), fixed_distribution(50257, {newline: 0.9})])

    def table(prev: int):  # " cat" after anything but " cat"; a newline after " cat"
        return logits[1] if prev == cat else logits[0]

    model = StubLM(50257, table)
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"text": {"0": ["Hello", "the cat sat"], "1": ["x", "y", "a dog ran"],
                                         "2": ["one"], "3": ["p", "cat"]}}))
    res = D.evaluate_dialogue(model, gpt2_tok, path, batch_size=2, return_samples=True)
    # reply "cat": vs "cat sat" F1 = 2/3, vs "dog ran" 0, vs "cat" 1; dialogue "2" has one turn (skipped)
    assert res["f1"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert res["n"] == 3 and res["skipped"] == 1
    assert [s["reply"] for s in res["samples"]] == ["cat"] * 3
    assert D.evaluate_dialogue(model, gpt2_tok, path, limit=1)["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ConfigError):
        D.evaluate_dialogue(model, gpt2_tok, path, limit=0)


def test_dialogue_and_reasoning_suites_take_a_limit_per_set(shared_data, gpt2_tok):
    """The benches' subsets: each named set its own number of items, 0 leaving a set out (one run_suites call)."""
    from loku.evaluate import run_suites

    model = make_tiny_model("gpt_neo", vocab=50257, n_ctx=256)
    res = run_suites(model, gpt2_tok, ["dialogue", "reasoning"], data_dir=shared_data, batch_size=2, limit=5,
                     set_limits={"dialogue": 2, "pubmedqa": 0})["suites"]
    assert set(res["dialogue"]) == set(D.DIALOGUE_SETS) | {"mean_f1"}
    assert all(res["dialogue"][n]["n"] == 2 and 0 <= res["dialogue"][n]["f1"] <= 1 for n in D.DIALOGUE_SETS)
    assert res["dialogue"]["mean_f1"] == pytest.approx(sum(res["dialogue"][n]["f1"] for n in D.DIALOGUE_SETS) / 4)
    assert res["reasoning"]["lambada"]["n"] == 5 and "pubmedqa" not in res["reasoning"]  # --limit where no own
