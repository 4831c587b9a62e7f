"""Planting a forget set mixed into general text (loku.bench.planting): it memorizes the forget
set, leaves the input model alone, and its cache is keyed by model, data and recipe and refuses a
folder made from anything else. The TDEC slices (loku.bench.data) are disjoint."""
from __future__ import annotations

import json

import pytest
import torch

from loku.bench.data import Sizes, bench_texts, clip_texts
from loku.bench.planting import (META, PlantedCacheMismatch, PlantingRecipe, cache_folder, load_planted,
                                 measure_planting, plant, planted_model, planting_meta)
from loku.errors import ConfigError
from loku.metrics.relearn import memorization_of_texts
from loku.provenance import model_fingerprint
from tiny_models import make_tiny_model, random_sequences, texts_of, word_tokenizer

RECIPE = PlantingRecipe(epochs=30, lr=1e-2, forget_per_step=2, general_per_forget=2, seed=0)


@pytest.fixture(scope="module")
def texts():
    seqs = random_sequences(40, 16, seed=11)
    return {"forget": texts_of(seqs[:2]), "heldout": texts_of(seqs[2:4]), "general": texts_of(seqs[4:])}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_recipe_is_checked():
    with pytest.raises(ConfigError, match="unknown planting option"):
        PlantingRecipe.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="lr"):
        PlantingRecipe(lr=0).validate()
    with pytest.raises(ConfigError, match="decay"):
        PlantingRecipe(decay="cosine").validate()
    # 8 forget texts, 2 a step, 10 epochs, 3 general per forget: 40 steps x 6 general texts
    assert PlantingRecipe(epochs=10, forget_per_step=2, general_per_forget=3).general_needed(8) == 240


def test_planting_memorizes_the_forget_set_mixed_with_general_text(texts):
    tok, model = word_tokenizer(), make_tiny_model("llama", seed=0)
    before = _state(model)
    planted, log = plant(model, tok, texts["forget"], texts["general"], RECIPE,
                         on_epoch=lambda e, m: {"forget_ma": memorization_of_texts(m, tok, texts["forget"],
                                                                                   with_el=False)["ma"]})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model must not change"
    assert log["steps"] == 30 and log["general_used"] == 30 * 2 * 2
    assert log["epochs"][-1]["forget_ma"] > 0.9 and "loss_general" in log["epochs"][0]
    numbers = measure_planting(model, planted, tok, texts["forget"], texts["heldout"], texts["heldout"])
    assert numbers["planted"]["forget"]["ma"] > numbers["planted"]["heldout"]["ma"] + 0.5
    assert numbers["planted"]["forget"]["el_10"] > numbers["original"]["forget"]["el_10"]
    assert numbers["checks"]["ppl_ratio"] == pytest.approx(numbers["planted"]["ppl"] / numbers["original"]["ppl"])
    assert not planted.training and not any(p.requires_grad for p in planted.parameters())


def test_cache_is_used_again_and_refuses_another_planting(tmp_path, texts):
    tok, model = word_tokenizer(), make_tiny_model("llama", seed=0)
    recipe = PlantingRecipe(epochs=2, lr=1e-3, general_per_forget=1)
    kwargs = dict(base_name="tiny", forget=texts["forget"], general=texts["general"], cache_root=tmp_path,
                  log=lambda message: None)
    planted, meta, folder, cached = planted_model(model, tok, recipe=recipe,
                                                  measure=lambda o, p: {"marker": 1}, **kwargs)
    assert not cached and (folder / META).is_file() and meta["measurements"] == {"marker": 1}
    again, meta2, folder2, cached2 = planted_model(model, tok, recipe=recipe, **kwargs)
    assert cached2 and folder2 == folder and meta2["measurements"] == {"marker": 1}
    assert model_fingerprint(again) == model_fingerprint(planted)
    # another recipe or other texts: another key, so another folder (planted afresh)
    _, _, other_folder, other_cached = planted_model(model, tok, recipe=PlantingRecipe(epochs=1, lr=1e-3), **kwargs)
    assert other_folder != folder and not other_cached
    # a folder under this key that was made from another model is refused, naming why
    record = json.loads((folder / META).read_text())
    record["base_fingerprint"], record["base_model"] = "loku-fp2:float32:bf16=0:fp16=0", "another-model"
    (folder / META).write_text(json.dumps(record))
    with pytest.raises(PlantedCacheMismatch, match="another model.*delete the folder"):
        planted_model(model, tok, recipe=recipe, **kwargs)


def test_cache_with_other_weights_or_recipe_is_refused(tmp_path, texts):
    tok, model = word_tokenizer(), make_tiny_model("llama", seed=0)
    recipe = PlantingRecipe(epochs=1, lr=1e-3, general_per_forget=1)
    _, meta, folder, _ = planted_model(model, tok, base_name="tiny", forget=texts["forget"], general=texts["general"],
                                       recipe=recipe, cache_root=tmp_path, log=lambda message: None)
    expected = {k: meta[k] for k in ("cache_version", "base_model", "base_fingerprint", "data_sha256", "recipe")}
    assert load_planted(folder, expected) is not None
    with pytest.raises(PlantedCacheMismatch, match="recipe .*differs in epochs"):
        load_planted(folder, {**expected, "recipe": PlantingRecipe(epochs=2, lr=1e-3, general_per_forget=1).to_dict()})
    with pytest.raises(PlantedCacheMismatch, match="other texts"):
        load_planted(folder, {**expected, "data_sha256": "0" * 64})
    # weights replaced behind the cache's back
    make_tiny_model("llama", seed=9).save_pretrained(folder, safe_serialization=True)
    with pytest.raises(PlantedCacheMismatch, match="fingerprint differs"):
        load_planted(folder, expected)
    assert load_planted(tmp_path / "nothing-here", expected) is None
    assert cache_folder(tmp_path, "a/b c", "f" * 64).name == "a_b_c-ffffffffffffffff"
    assert planting_meta("x", "fp", "sha", recipe)["key"] == planting_meta("y", "fp", "sha", recipe)["key"] != \
        planting_meta("x", "fp2", "sha", recipe)["key"]  # the key is the model's weights, not its name


def test_bench_slices_are_disjoint_and_cut_to_length(shared_data):
    from transformers import GPT2Tokenizer

    vocab = shared_data / "tokenizers" / "gpt2"
    tok = GPT2Tokenizer.from_pretrained(vocab)
    assert len(tok) == 50257
    sizes = Sizes(n_forget=4, forget_tokens=24, n_heldout=4, n_retain=4, n_ppl=4, n_general=8, general_tokens=16)
    data = bench_texts(tok, shared_data, "1", sizes)
    assert [len(data.texts[r]) for r in ("forget", "heldout", "retain", "ppl_pile", "ppl_wiki", "general")] == \
        [4, 4, 4, 4, 4, 8]
    everything = [t for role in data.texts.values() for t in role]
    assert len(set(everything)) == len(everything), "no text in two roles"
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 24 for t in data.texts["heldout"])
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) <= 24 for t in data.texts["forget"])
    assert any("pile.csv" in f for f in data.sources) and len(data.sha256()) == 64
    with pytest.raises(ConfigError, match="n_forget"):
        Sizes(n_forget=0).validate()
    # held-out of the forget set's kind (§6): the split file's rows after the forget rows, never planted
    from loku.bench.data import forget_file
    from loku.data import read_texts

    tdec = bench_texts(tok, shared_data, "1", sizes, heldout="tdec")
    rows = read_texts(forget_file(shared_data, "1"), role="forget")
    assert tdec.texts["heldout"] == clip_texts(tok, rows[4:8], 24)
    assert tdec.texts["forget"] == data.texts["forget"] and not set(tdec.texts["heldout"]) & set(tdec.texts["forget"])
    assert tdec.sources[str(forget_file(shared_data, "1"))]["rows"] == {"forget": [0, 4], "heldout": [4, 8]}


def test_clip_texts_round_trips():
    tok = word_tokenizer()
    text = texts_of(random_sequences(1, 10, seed=2))[0]
    clipped = clip_texts(tok, [text, "w5 w6"], 4, min_tokens=4)
    assert clipped == [" ".join(text.split()[:4])]
