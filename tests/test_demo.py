"""`loku demo`: its data (planted forget set, held-out, retain, general planting pool, perplexity set, from
TDEC + WikiText + Pile or generated records) and, end to end on a tiny model, that it plants the way the
bench does (forget set mixed with general text) and reports perplexity against the never-planted model."""
from __future__ import annotations

import json
import math
import random

import pytest

import loku.demo as demo
from loku.bench.data import general_texts, role_texts
from loku.demo import RETAIN_TEXTS, demo_recipe, demo_sets, demo_texts, fictitious_records
from loku.metrics.perplexity import perplexity
from tiny_models import WORDS, make_tiny_model, word_tokenizer, write_csv


def test_demo_uses_tdec_and_a_large_retain_set(shared_data):
    texts, source = demo_texts(shared_data, 8, seed=0)
    assert "TDEC" in source and len(texts["forget"]) == len(texts["validation"]) == 8
    assert not set(texts["forget"]) & set(texts["validation"]), "held-out texts are never planted or unlearned"
    # A few retain texts cycled every epoch get memorized and the model drifts: the retain set must be large.
    assert len(texts["retain"]) == RETAIN_TEXTS >= 100


def test_demo_without_shared_data_generates_records(tmp_path):
    texts, source = demo_texts(tmp_path, 4, seed=1, n_general=32)
    assert "fictitious" in source and len(texts["forget"]) == 4 and len(texts["retain"]) == RETAIN_TEXTS
    assert texts["forget"][0].startswith("Patient record:") and fictitious_records(3, 1) == fictitious_records(3, 1)
    assert len(set(texts["forget"] + texts["validation"])) == 8
    # the general texts planted among are generated too, and none of them is a record of another role
    everything = [t for role in texts.values() for t in role]
    assert len(texts["general"]) == 32 and len(set(everything)) == len(everything)
    # asking for general texts does not change the other roles
    plain, _ = demo_texts(tmp_path, 4, seed=1)
    assert "general" not in plain and all(plain[r] == texts[r] for r in plain)


def _gpt2(shared_data):
    from transformers import GPT2Tokenizer

    vocab = shared_data / "tokenizers" / "gpt2"
    return GPT2Tokenizer.from_pretrained(vocab)


def test_demo_plants_among_pile_excerpts_and_measures_pile_perplexity(shared_data):
    tok = _gpt2(shared_data)
    n_general = demo_recipe(0).general_needed(8)
    assert n_general == 64  # one 64-token Pile excerpt per planted sequence per epoch
    texts, source, ppl_name = demo_sets(tok, shared_data, 8, 64, 0, n_general)
    assert "TDEC" in source and ppl_name == "Pile perplexity"
    assert texts["general"] == general_texts(tok, shared_data, 64, 64)
    assert texts["ppl"] == role_texts(tok, shared_data, "ppl_pile", 16, 128)
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 64 for t in texts["general"])
    everything = [t for role in texts.values() for t in role]
    assert len(set(everything)) == len(everything), "no text in two roles"


def test_demo_without_shared_data_measures_the_held_out_records(tmp_path):
    records = fictitious_records(2 * 4 + RETAIN_TEXTS + 64, seed=0)
    words = sorted({w for r in records for w in r.split()})
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    texts, source, ppl_name = demo_sets(tok, tmp_path, 4, 12, 0, 16)
    assert "fictitious" in source and ppl_name == "held-out perplexity" and texts["ppl"] == texts["validation"]
    assert len(texts["general"]) == 16 and not set(texts["general"]) & set(texts["forget"] + texts["retain"])


@pytest.fixture
def tiny_demo(tmp_path, monkeypatch):
    """A data folder shaped like ../shared/data/tdec (random words), a tiny Llama as the 'built-in' model,
    a private cache, and a spy on the planting."""
    rng = random.Random(0)

    def words(n):
        return " ".join(rng.choice(WORDS[3:]) for _ in range(n))

    data = tmp_path / "data"
    write_csv(data / "tdec" / "forget" / "lm_extraction_32_0.csv", ["doc_id", "corpus", "text"],
         [[i, "pile", words(20)] for i in range(10)])
    write_csv(data / "tdec" / "eval" / "wikitext.csv", ["text"], [[words(64)] for _ in range(40)])
    write_csv(data / "tdec" / "eval" / "pile.csv", ["doc_id", "corpus", "text"], [[i, "pile", words(130)]
                                                                              for i in range(560)])

    def load_model(name, **_):
        return make_tiny_model("llama", seed=0, n_ctx=256), word_tokenizer()

    calls = []
    real = demo.planted_model

    def spy(original, tokenizer, **kwargs):
        planted, meta, folder, from_cache = real(original, tokenizer, **kwargs)
        calls.append({**kwargs, "planted": planted})
        return planted, meta, folder, from_cache

    monkeypatch.setattr(demo, "load_model", load_model)
    monkeypatch.setattr(demo, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(demo, "planted_model", spy)
    return {"data": data, "out": tmp_path / "run", "cache": tmp_path / "cache", "calls": calls}


def test_demo_plants_with_general_text_and_reports_perplexity_against_the_original(tiny_demo, capsys):
    env = tiny_demo
    code = demo.run_demo(data_dir=str(env["data"]), out=str(env["out"]), n_sequences=4, n_tokens=16, seed=0,
                         max_epochs=1)
    assert code in (0, 3)
    [call] = env["calls"]
    # planted as the bench plants: the forget set mixed with Pile excerpts (never a forget text), cached
    assert call["recipe"] == demo_recipe(0) and call["recipe"].general_per_forget >= 1
    assert call["general"] and not set(call["general"]) & set(call["forget"])
    assert len(call["general"]) == call["recipe"].general_needed(4) == 32
    tok = word_tokenizer()
    assert call["general"] == general_texts(tok, env["data"], 32, 16)
    assert call["cache_root"] == env["cache"] and any((env["cache"] / "planted").iterdir())

    # perplexity on the Pile perplexity set, of the never-planted model, the planted one and the unlearned one
    report = json.loads((env["out"] / "report.json").read_text())
    ppl = report["demo"]["ppl"]
    ppl_texts = role_texts(tok, env["data"], "ppl_pile", 16, 128)
    original = make_tiny_model("llama", seed=0, n_ctx=256)
    assert ppl["texts"] == "Pile perplexity" and ppl["n_texts"] == 16
    assert ppl["original"] == pytest.approx(perplexity(original, tok, ppl_texts)["ppl"], rel=1e-5)
    assert ppl["planted"] == pytest.approx(perplexity(call["planted"], tok, ppl_texts)["ppl"], rel=1e-5)
    # lr 1e-4 for 16 steps barely moves a random tiny model, but it moves: the planted number is not the original's
    assert ppl["planted"] != ppl["original"]
    assert math.isfinite(ppl["unlearned"])
    for name in ("planted", "unlearned"):
        assert ppl[f"{name}_ratio"] == pytest.approx(ppl[name] / ppl["original"])
    assert report["demo"]["planting"]["recipe"] == demo_recipe(0).to_dict()
    out = capsys.readouterr().out
    assert (f"Pile perplexity: original {ppl['original']:.2f}, planted {ppl['planted']:.2f} "
            f"(x{ppl['planted_ratio']:.2f}), unlearned {ppl['unlearned']:.2f} (x{ppl['unlearned_ratio']:.2f})") in out
    assert "outcome:" in out and "planted (leaks):" in out

    # a second demo reuses the cached planting
    env["calls"].clear()
    demo.run_demo(data_dir=str(env["data"]), out=str(env["out"]), n_sequences=4, n_tokens=16, seed=0, max_epochs=1)
    assert "using the cached planted model" in capsys.readouterr().out
    assert json.loads((env["out"] / "report.json").read_text())["demo"]["planting"]["from_cache"] is True
