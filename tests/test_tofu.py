"""TOFU: loaders, templates, and each metric against hand-computed values."""
from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from loku.errors import ConfigError, DataError
from loku.metrics import tofu as T
from test_reasoning import StubLM, fixed_distribution, gpt2_tok  # noqa: F401  (fixture re-used)
from tiny_models import make_tiny_model


# ----------------------------------------------------------------------------- loading

def test_loader_row_counts_and_fields(shared_data):
    assert len(T.load_tofu("forget01", data_dir=shared_data)) == 40
    assert len(T.load_tofu("full", data_dir=shared_data)) == 4000
    assert len(T.load_tofu("full", data_dir=shared_data, limit=7)) == 7
    for name, n in (("forget01_perturbed", 40), ("forget10_perturbed", 400), ("retain_perturbed", 400)):
        rows = T.load_tofu(name, data_dir=shared_data)
        assert len(rows) == n
        assert all(isinstance(r["paraphrased_answer"], str) and len(r["perturbed_answer"]) == 5 for r in rows)
    for name, n in (("real_authors_perturbed", 100), ("world_facts_perturbed", 117)):
        rows = T.load_tofu(name, data_dir=shared_data)
        assert len(rows) == n and all(len(r["perturbed_answer"]) == 3 for r in rows)
    direct = T.load_tofu(shared_data / "tofu" / "holdout01.jsonl")
    assert len(direct) == 40 and set(direct[0]) >= {"question", "answer"}


def test_malformed_tofu_files(tmp_path, shared_data):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", \n')
    with pytest.raises(DataError, match=r"bad\.jsonl"):
        T.load_tofu(bad)
    missing = tmp_path / "missing_answer.jsonl"
    missing.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"missing_answer\.jsonl.*answer"):
        T.load_tofu(missing)
    pert = tmp_path / "pert.jsonl"
    pert.write_text(json.dumps({"question": "q", "answer": "a", "perturbed_answer": "not a list"}) + "\n")
    with pytest.raises(DataError, match=r"pert\.jsonl: row 1: 'perturbed_answer' must be a non-empty list"):
        T.load_tofu(pert)
    para = tmp_path / "para.jsonl"
    para.write_text(json.dumps({"question": "q", "answer": "a", "paraphrased_answer": "p", "perturbed_answer": ["x"]})
                    + "\n" + json.dumps({"question": "q", "answer": "a", "perturbed_answer": ["x"]}) + "\n")
    with pytest.raises(DataError, match=r"para\.jsonl: row 2: 'paraphrased_answer' missing"):
        T.load_tofu(para)
    with pytest.raises(DataError, match="split 'nope' not found"):
        T.load_tofu("nope", data_dir=shared_data)


def test_hub_loading_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        T.load_tofu("forget01")
    with pytest.raises(ConfigError, match="unknown TOFU split"):
        T.load_tofu("forget02")


def test_hub_loading_goes_through_datasets(monkeypatch):
    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return [{"question": "q", "answer": "a"}]

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert T.load_tofu("forget01") == [{"question": "q", "answer": "a"}]
    assert calls == [("locuslab/TOFU", "forget01", "train")]


# ----------------------------------------------------------------------------- templates

# locuslab/tofu config/model_config.yaml: (question_start_tag, question_end_tag, answer_tag)
TOFU_TAGS = {"llama2": ("[INST] ", " [/INST]", ""), "phi": ("Question: ", "\n", "Answer: ")}


def tofu_convert(tokenizer, question, answer, tags, max_length=10_000):
    """locuslab/tofu data_module.convert_raw_data_to_model_format, unpadded: (input_ids, labels)."""
    start, end, answer_tag = tags
    new_question = start + question + end
    new_answer = answer_tag + answer
    full_text = new_question + new_answer
    num_question_tokens = len(tokenizer.tokenize(new_question, add_special_tokens=True))
    encoded = tokenizer(full_text, add_special_tokens=True, max_length=max_length, truncation=True)
    label = list(encoded["input_ids"]) + [tokenizer.eos_token_id]  # the label after the text is EOS
    for i in range(num_question_tokens):
        label[i] = -100
    return list(encoded["input_ids"]) + [tokenizer.eos_token_id], label


@pytest.fixture(scope="module")
def bos_tok(shared_data):
    """GPT-2's BPE with a post-processor that adds a BOS "<s>" (id 50257), as Llama's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    p = shared_data / "tokenizers" / "gpt2"
    t = Tokenizer(models.BPE.from_file(str(p / "vocab.json"), str(p / "merges.txt")))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<s>"])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="<|endoftext|>")
    assert tok("a")["input_ids"][0] == tok.bos_token_id == 50257
    return tok


def test_template_choice(gpt2_tok):
    assert T.choose_template(make_tiny_model("gpt2"), gpt2_tok).name == "generic"
    assert T.choose_template(make_tiny_model("phi"), gpt2_tok).name == "phi"
    assert T.choose_template(make_tiny_model("llama"), gpt2_tok).name == "llama2"
    chatml = types.SimpleNamespace(chat_template="{% for m in messages %}<|im_start|>{{m}}{% endfor %}",
                                   get_vocab=lambda: {})
    assert T.choose_template(make_tiny_model("llama"), chatml, "tofu").name == "chatml"
    inst = types.SimpleNamespace(chat_template="[INST] {{ x }} [/INST]", get_vocab=lambda: {})
    assert T.choose_template(make_tiny_model("gpt2"), inst, "tofu").name == "llama2"
    # by default a tokenizer's own chat template is used (loku.chat); TOFU's strings are --template tofu
    assert T.choose_template(make_tiny_model("llama"), chatml).name == "chat"
    assert T.choose_template(make_tiny_model("gpt2"), gpt2_tok, "none").format_full("Q?", " A") == "Q? A"
    with pytest.raises(ConfigError):
        T.choose_template(None, gpt2_tok, "vicuna")


def test_template_strings_are_tofus():
    """The exact prompt / full texts of locuslab/tofu's model_config.yaml tags."""
    llama, phi = T.TEMPLATES["llama2"], T.TEMPLATES["phi"]
    assert llama.format_prompt("Q?") == "[INST] Q? [/INST]"
    assert llama.format_full("Q?", "A b.") == "[INST] Q? [/INST]A b."  # no space before the answer
    assert phi.format_prompt("Q?") == "Question: Q?\n"
    assert phi.format_full("Q?", "A b.") == "Question: Q?\nAnswer: A b."  # "Answer: " is in the answer part
    assert T.TEMPLATES["generic"].format_full("Q?", "A b.") == "Question: Q?\nAnswer: A b."
    # loku's own (TOFU had no ChatML model)
    assert (T.TEMPLATES["chatml"].format_full("Q?", "A b.")
            == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nA b.")
    for name, tags in TOFU_TAGS.items():
        t = T.TEMPLATES[name]
        assert (t.question_start, t.question_end, t.answer_tag) == tags


@pytest.mark.parametrize("name", ["llama2", "phi"])
@pytest.mark.parametrize("which", ["gpt2", "bos"])
def test_token_split_and_masked_count_match_tofu(name, which, gpt2_tok, bos_tok, shared_data):
    tok = gpt2_tok if which == "gpt2" else bos_tok
    rows = T.load_tofu("forget01", data_dir=shared_data, limit=5) + [{"question": "Who?", "answer": "Paris."}]
    for row in rows:
        ids, labels = tofu_convert(tok, row["question"], row["answer"], TOFU_TAGS[name])
        prompt, answer = T.qa_token_pair(tok, T.TEMPLATES[name], row["question"], row["answer"])
        assert prompt + answer == ids  # the same token sequence, EOS after the answer
        masked = sum(1 for v in labels if v == -100)
        assert len(prompt) == masked  # the question tokens TOFU masks (BOS included where added)
        assert answer == [v for v in labels if v != -100]
    if which == "bos":
        prompt, _ = T.qa_token_pair(tok, T.TEMPLATES["llama2"], "Who?", "Paris.")
        assert prompt[0] == tok.bos_token_id
        assert len(prompt) == len(tok.tokenize("[INST] Who? [/INST]", add_special_tokens=True))


def test_answer_tokens_are_split_after_the_prompt(gpt2_tok):
    prompt, answer = T.qa_token_pair(gpt2_tok, T.TEMPLATES["generic"], "Where?", "Paris")
    assert gpt2_tok.decode(prompt) == "Question: Where?\n"
    assert gpt2_tok.decode(answer) == "Answer: Paris<|endoftext|>"
    prompt, answer = T.qa_token_pair(gpt2_tok, T.TEMPLATES["llama2"], "Where?", "Paris")
    assert gpt2_tok.decode(prompt) == "[INST] Where? [/INST]"
    assert gpt2_tok.decode(answer) == "Paris<|endoftext|>"


# ----------------------------------------------------------------------------- pure metrics

def test_rouge_l_recall_by_hand():
    assert T.rouge_l_recall("the cat sat", "the cat sat on the mat") == pytest.approx(3 / 6)
    assert T.rouge_l_recall("cats running", "cat run") == pytest.approx(1.0)  # stemmer on
    assert T.rouge_l_recall("mat the on", "the cat sat on the mat") == pytest.approx(2 / 6)
    assert T.rouge_l_recall("", "anything") == 0.0


def test_ks_forget_quality_by_hand():
    # fully separated samples of 3 and 3: exact two-sided p = 2 / C(6, 3) = 0.1
    assert T.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    assert T.forget_quality(torch.tensor([1.0, 2.0, 3.0]), [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        T.forget_quality([], [1.0])


def test_forget_quality_is_scipys_two_sided_ks_p_value():
    """Against scipy.stats.ks_2samp called here on known samples, not against loku itself."""
    from scipy.stats import ks_2samp

    g = torch.Generator().manual_seed(11)
    same_a = torch.randn(40, generator=g).exp()  # log-normal truth ratios
    same_b = torch.randn(55, generator=g).exp()
    shifted = (torch.randn(40, generator=g) + 2.0).exp()  # a different distribution
    for a, b in ((same_a, same_b), (same_a, shifted), (same_b, shifted)):
        want = ks_2samp(a.tolist(), b.tolist(), alternative="two-sided").pvalue
        assert T.forget_quality(a, b.tolist()) == pytest.approx(want, rel=1e-12)
    assert T.forget_quality(same_a, same_b) > 0.05  # same distribution: not rejected
    assert T.forget_quality(same_a, shifted) < 0.05  # shifted by 2 sd: rejected
    # fully separated samples of 20 and 20: D = 1, exact p = 2 / C(40, 20)
    assert T.forget_quality(list(range(20)), list(range(20, 40))) == pytest.approx(2 / math.comb(40, 20), rel=1e-6)


def test_model_utility_harmonic_mean():
    assert T.model_utility([1.0, 2.0, 4.0]) == pytest.approx(3 / (1 + 0.5 + 0.25))
    assert T.model_utility({"a": 0.5, "b": 0.5}) == pytest.approx(0.5)
    assert T.model_utility([0.3, 0.0, 0.9]) == 0.0
    with pytest.raises(ConfigError):
        T.model_utility([0.5, float("nan")])


def test_truth_ratio_statistics_by_hand():
    para = torch.tensor([-math.log(0.5)])
    pert = torch.tensor([[-math.log(0.25), -math.log(0.125)]])
    r = T.truth_ratio(para, pert)
    assert r.item() == pytest.approx(0.5 / math.sqrt(0.25 * 0.125), rel=1e-5)  # P_para / geo-mean P_pert
    ragged = torch.tensor([[-math.log(0.25), float("nan")]])
    assert T.truth_ratio(para, ragged).item() == pytest.approx(2.0, rel=1e-5)
    ratios = torch.tensor([2.0, 0.5])
    assert T.truth_ratio_forget_stat(ratios) == pytest.approx(0.5)
    assert T.truth_ratio_utility(ratios) == pytest.approx((0.5 + 0.0) / 2)
    assert T.normalized_prob(para, pert).item() == pytest.approx(0.5 / (0.5 + 0.25 + 0.125), rel=1e-5)
    assert T.prob_from_nll(para).item() == pytest.approx(0.5)


# ----------------------------------------------------------------------------- model scoring

EOS_P = 1 / 32  # the stub's probability of EOS (50256), which TOFU scores after every answer


@pytest.fixture()
def city_model(gpt2_tok):
    ids = {w: gpt2_tok(" " + w)["input_ids"] for w in ("Paris", "London", "Rome", "Berlin")}
    assert all(len(v) == 1 for v in ids.values())
    probs = {ids["Paris"][0]: 0.5, ids["London"][0]: 0.25, ids["Rome"][0]: 0.125, ids["Berlin"][0]: 0.0625,
             gpt2_tok.eos_token_id: EOS_P}
    return StubLM(50257, fixed_distribution(50257, probs))


def city_template():
    """"Question: ...\\nAnswer:" as prompt and " Paris" as answer: every answer is its word's one token + EOS."""
    return T.QATemplate("city", "Question: ", "\nAnswer:", " ")


def geo(*probs):
    """exp(-mean token NLL) of tokens with these probabilities."""
    return math.exp(sum(math.log(p) for p in probs) / len(probs))


def test_prob_and_truth_ratio_with_known_probabilities(city_model, gpt2_tok):
    tmpl = city_template()
    nll = T.answer_nll(city_model, gpt2_tok, ["Capital?", "Capital?"], ["Paris", "London Rome"], template=tmpl)
    assert nll[0].item() == pytest.approx(-(math.log(0.5) + math.log(EOS_P)) / 2, rel=1e-5)
    assert nll[1].item() == pytest.approx(-(math.log(0.25) + math.log(0.125) + math.log(EOS_P)) / 3, rel=1e-5)

    rows = [{"question": "Capital of France?", "answer": "Paris", "paraphrased_answer": "Paris",
             "perturbed_answer": ["London", "Rome"]},
            {"question": "Capital of Italy?", "answer": "Rome", "paraphrased_answer": "London",
             "perturbed_answer": ["Paris", "Berlin"]}]
    res = T.evaluate_tofu_split(city_model, gpt2_tok, rows, role="retain", template=tmpl, max_new_tokens=3)
    assert res["per_item"]["prob"] == pytest.approx([geo(0.5, EOS_P), geo(0.125, EOS_P)], rel=1e-5)
    # R = P_para / geo-mean_k P_pert, each P = exp(-mean NLL) over the word and EOS
    r = [geo(0.5, EOS_P) / math.sqrt(geo(0.25, EOS_P) * geo(0.125, EOS_P)),
         geo(0.25, EOS_P) / math.sqrt(geo(0.5, EOS_P) * geo(0.0625, EOS_P))]
    assert res["per_item"]["truth_ratio"] == pytest.approx(r, rel=1e-5)
    assert res["truth_ratio"] == pytest.approx(sum(max(0.0, 1 - 1 / x) for x in r) / 2, rel=1e-5)
    # greedy answer " Paris Paris Paris": recall 1 against "Paris", 0 against "Rome"
    assert res["generations"] == ["Paris Paris Paris"] * 2
    assert res["per_item"]["rouge_l_recall"] == [1.0, 0.0] and res["rouge_l_recall"] == 0.5

    forget = T.evaluate_tofu_split(city_model, gpt2_tok, rows, role="forget", template=tmpl, max_new_tokens=2)
    assert forget["truth_ratio"] == pytest.approx(sum(min(x, 1 / x) for x in r) / 2, rel=1e-5)

    facts = [{"question": "Capital of France?", "answer": "Paris", "perturbed_answer": ["London", "Rome", "Berlin"]}]
    res = T.evaluate_tofu_split(city_model, gpt2_tok, facts, role="world_facts", template=tmpl, max_new_tokens=1)
    options = [geo(p, EOS_P) for p in (0.5, 0.25, 0.125, 0.0625)]
    assert res["prob"] == pytest.approx(options[0] / sum(options), rel=1e-5)
    # no paraphrase in the file: the true answer takes its place
    assert res["per_item"]["truth_ratio"][0] == pytest.approx(
        options[0] / (options[1] * options[2] * options[3]) ** (1 / 3), rel=1e-5)


# ----------------------------------------------------------------------------- reference logs

def test_reference_log_round_trip_and_errors(tmp_path):
    path = tmp_path / "ref" / "reference.json"
    T.save_reference_log(path, [1.5, 0.7, 2.0], forget_split="forget01", template="llama2", model="retain-model")
    ref = T.load_reference_log(path)
    assert ref["truth_ratios"] == [1.5, 0.7, 2.0] and ref["forget_split"] == "forget01"
    assert ref["template"] == "llama2" and ref["legacy_300"] is False and ref["n"] == 3
    assert ref["scoring_version"] == T.SCORING_VERSION
    assert not list(path.parent.glob(".*.tmp"))
    with pytest.raises(ConfigError):
        T.save_reference_log(path, [1.0, -1.0], forget_split="forget01", template="llama2")
    with pytest.raises(ConfigError, match="unknown TOFU template"):
        T.save_reference_log(path, [1.0], forget_split="forget01", template="vicuna")
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "loku-tofu-reference", "truth_ratios": [1.0,')
    with pytest.raises(DataError, match=r"broken\.json: line 1: invalid JSON"):
        T.load_reference_log(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "loku-tofu-reference", "truth_ratios": ["x"]}))
    with pytest.raises(DataError, match="truth_ratios"):
        T.load_reference_log(wrong)
    with pytest.raises(DataError, match="not found"):
        T.load_reference_log(tmp_path / "none.json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(DataError, match="not a TOFU reference log"):
        T.load_reference_log(other)


def test_a_tofu_original_eval_log_is_refused_with_the_reason(tmp_path):
    """Its truth ratios come from TOFU's own pipeline; loku cannot show they were scored the same way."""
    log = tmp_path / "eval_log_forget.json"
    log.write_text(json.dumps({"avg_paraphrased_loss": {"0": 1.0, "1": 2.0},
                               "average_perturb_loss": {"0": [2.0, 3.0], "1": [1.0, 2.0]}}))
    with pytest.raises(DataError) as info:
        T.load_reference_log(log)
    msg = str(info.value)
    assert msg.startswith(str(log)) and "original TOFU code" in msg
    assert "would compare different things" in msg and "loku eval --suite tofu" in msg and "retain-only" in msg


@pytest.fixture()
def no_scoring(monkeypatch):
    """evaluate_tofu with the per-split scoring replaced by a recorder (reference checks need no model)."""
    seen = []

    def fake_split(model, tokenizer, rows, *, role, **kwargs):
        seen.append(role)
        return {"n": len(rows), "prob": 0.5, "rouge_l_recall": 0.5, "truth_ratio": 0.5,
                "per_item": {"truth_ratio": [1.0 + i for i in range(len(rows))]}}

    monkeypatch.setattr(T, "evaluate_tofu_split", fake_split)
    return seen


def test_reference_scored_differently_is_refused_before_any_scoring(tmp_path, shared_data, gpt2_tok, no_scoring):
    def run(ref, **kw):
        args = dict(data_dir=shared_data, forget_split="forget10", template="llama2", limit=4)
        args.update(kw)
        return T.evaluate_tofu(None, gpt2_tok, reference_log=ref, **args)

    good = tmp_path / "good.json"
    T.save_reference_log(good, [1.0, 2.0, 3.0, 4.0], forget_split="forget10", template="llama2")
    assert run(good)["forget_quality"] == pytest.approx(1.0)
    cases = {
        "template 'llama2' (this evaluation: 'phi')": dict(template="phi"),
        "forget split 'forget10' (this evaluation: 'forget05')": dict(forget_split="forget05"),
        "legacy_300 False (this evaluation: True)": dict(legacy_300=True),
        "4 forget items (this evaluation: 3)": dict(limit=3),
    }
    for expected, kw in cases.items():
        no_scoring.clear()
        with pytest.raises(ConfigError, match="would compare different things") as info:
            run(good, **kw)
        assert expected in str(info.value) and "loku eval --suite tofu" in str(info.value)
        assert no_scoring == []  # refused before scoring anything
    # legacy_300 changes forget10 from 400 to 300 items: a full-split reference is refused
    full = tmp_path / "full.json"
    T.save_reference_log(full, [1.0] * 400, forget_split="forget10", template="llama2")
    with pytest.raises(ConfigError, match="legacy_300 False .*400 forget items \\(this evaluation: 300\\)"):
        run(full, legacy_300=True, limit=None)
    # a reference scored by an older loku (other prompt formats, no EOS) does not record the version
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "loku-tofu-reference", "version": 1, "forget_split": "forget10",
                               "template": "llama2", "n": 4, "truth_ratios": [1.0, 2.0, 3.0, 4.0]}))
    with pytest.raises(ConfigError, match="conventions version None"):
        run(old)
    # a loku eval.json works the same way
    evaljson = tmp_path / "eval.json"
    evaljson.write_text(json.dumps({"meta": {"model": "m"}, "suites": {"tofu": {
        "template": "llama2", "scoring_version": T.SCORING_VERSION, "forget_split": "forget10", "legacy_300": False,
        "forget_truth_ratios": [1.0, 2.0, 3.0, 4.0]}}}))
    assert run(evaljson)["reference"]["source"] == "loku eval.json"
    with pytest.raises(ConfigError, match="template 'llama2'"):
        run(evaljson, template="generic")


def test_forget_quality_in_evaluate_tofu_is_the_ks_p_value(tmp_path, shared_data, gpt2_tok, no_scoring):
    from scipy.stats import ks_2samp

    ref_ratios = [0.05 * (i + 1) for i in range(10)]  # all below the fake model's 1..10
    ref = tmp_path / "ref.json"
    T.save_reference_log(ref, ref_ratios, forget_split="forget01", template="generic")
    out = T.evaluate_tofu(None, gpt2_tok, data_dir=shared_data, forget_split="forget01", template="generic",
                          limit=10, reference_log=ref)
    want = ks_2samp(out["forget_truth_ratios"], ref_ratios).pvalue
    assert out["forget_quality"] == pytest.approx(want, rel=1e-12) and out["forget_quality"] < 0.05


def test_evaluate_tofu_end_to_end_on_a_tiny_model(shared_data, gpt2_tok, tmp_path):
    model = make_tiny_model("gpt_neo", vocab=50257, n_ctx=256)
    out = T.evaluate_tofu(model, gpt2_tok, data_dir=shared_data, forget_split="forget01", limit=3, batch_size=4,
                          max_new_tokens=4)
    assert out["template"] == "generic" and set(out["splits"]) == {"forget", "retain", "real_authors", "world_facts"}
    assert out["scoring_version"] == T.SCORING_VERSION
    assert all(s["n"] == 3 for s in out["splits"].values())
    assert len(out["utility_values"]) == 9 and 0 <= out["model_utility"] <= 1
    assert out["forget_quality"] is None and len(out["forget_truth_ratios"]) == 3
    ref = tmp_path / "reference.json"
    T.save_reference_log(ref, out["forget_truth_ratios"], forget_split="forget01", template=out["template"])
    again = T.evaluate_tofu(model, gpt2_tok, data_dir=shared_data, forget_split="forget01", limit=3,
                            max_new_tokens=2, reference_log=ref)
    assert again["forget_truth_ratios"] == pytest.approx(out["forget_truth_ratios"])
    assert again["forget_quality"] == pytest.approx(1.0)  # same model, same items
    with pytest.raises(ConfigError, match="forget split 'forget01'"):
        T.evaluate_tofu(model, gpt2_tok, data_dir=shared_data, forget_split="forget05", limit=3,
                        max_new_tokens=1, reference_log=ref)


def test_legacy_300_truncation(shared_data, gpt2_tok, monkeypatch):
    seen = {}

    def fake_split(model, tokenizer, rows, *, role, **kwargs):
        seen[role] = len(rows)
        return {"n": len(rows), "prob": 0.5, "rouge_l_recall": 0.5, "truth_ratio": 0.5,
                "per_item": {"truth_ratio": [1.0] * len(rows)}}

    monkeypatch.setattr(T, "evaluate_tofu_split", fake_split)
    out = T.evaluate_tofu(None, gpt2_tok, data_dir=shared_data, forget_split="forget10", legacy_300=True,
                          template="generic")
    assert seen == {"forget": 300, "retain": 300, "real_authors": 100, "world_facts": 117}
    assert out["model_utility"] == pytest.approx(0.5)
    T.evaluate_tofu(None, gpt2_tok, data_dir=shared_data, forget_split="forget10", template="generic")
    assert seen == {"forget": 400, "retain": 400, "real_authors": 100, "world_facts": 117}
