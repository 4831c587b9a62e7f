"""Relearning check (loku.metrics.relearn): curves at the checkpoint steps, the input models
untouched, the control reused, settings checked."""
from __future__ import annotations

import pytest
import torch

from loku.errors import ConfigError, DataError
from loku.metrics.relearn import (RelearnSettings, memorization_of_texts, relearn_curve, relearning_check,
                                  split_halves)
from tiny_models import make_tiny_model, random_sequences, texts_of, word_tokenizer


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_split_halves():
    assert split_halves(["a", "b", "c", "d", "e"]) == (["a", "b"], ["c", "d", "e"])
    with pytest.raises(DataError, match="at least 2"):
        split_halves(["a"])


def test_settings_are_checked_and_recorded():
    with pytest.raises(ConfigError, match="increasing"):
        RelearnSettings(steps=(5, 3)).validate()
    with pytest.raises(ConfigError, match="unknown relearn option"):
        RelearnSettings.from_dict({"stepz": [1]})
    settings = RelearnSettings.from_dict({"steps": [1, 2], "lr": 1e-3})
    assert settings.to_dict()["steps"] == [1, 2] and settings.to_dict()["optimizer"] == "adamw"


def test_curve_starts_at_the_model_and_training_on_the_texts_raises_ma():
    tok = word_tokenizer()
    model = make_tiny_model("llama", seed=0)
    texts = texts_of(random_sequences(2, 12, seed=4))
    before = _state(model)
    curve = relearn_curve(model, tok, texts, texts, RelearnSettings(steps=(3, 30), lr=1e-2, batch_size=2))
    assert _same(before, _state(model)), "the input model must not change"
    assert curve["steps"] == [0, 3, 30] and len(curve["ma"]) == len(curve["el_10"]) == 3
    assert curve["ma"][0] == pytest.approx(memorization_of_texts(model, tok, texts)["ma"])
    assert curve["ma"][-1] > curve["ma"][0] + 0.3  # fine-tuning on the measured texts memorizes them
    assert curve["train_loss"][0] is None and curve["train_loss"][-1] < curve["train_loss"][1]


def test_check_returns_both_curves_and_reuses_the_control():
    from peft import LoraConfig, get_peft_model

    tok = word_tokenizer()
    original = make_tiny_model("llama", seed=0)
    unlearned = get_peft_model(make_tiny_model("llama", seed=1),
                               LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    forget = texts_of(random_sequences(4, 12, seed=6))
    settings = RelearnSettings(steps=(1, 2), lr=1e-3, batch_size=2)
    states = _state(original), _state(unlearned)
    out = relearning_check(unlearned, tok, forget, original=original, settings=settings)
    assert _same(states[0], _state(original)) and _same(states[1], _state(unlearned))
    assert out["n_train"] == 2 and out["n_test"] == 2
    assert out["unlearned"]["steps"] == out["control"]["steps"] == [0, 1, 2]
    assert out["gap"]["ma"] == pytest.approx([a - b for a, b in zip(out["unlearned"]["ma"], out["control"]["ma"])])
    assert out["settings"]["lr"] == 1e-3
    again = relearning_check(unlearned, tok, forget, control=out["control"], settings=settings)
    assert again["control"] == out["control"] and again["unlearned"]["ma"] == pytest.approx(out["unlearned"]["ma"])
    with pytest.raises(ConfigError, match="other relearning settings"):
        relearning_check(unlearned, tok, forget, control=out["control"], settings=RelearnSettings(steps=(1, 3)))
    with pytest.raises(ConfigError, match="original model"):
        relearning_check(unlearned, tok, forget, settings=settings)


def test_eval_relearn_suite_with_and_without_control(tmp_path):
    import csv

    from loku.eval_options import EvalOptions
    from loku.metrics.relearn import relearn_suite

    tok = word_tokenizer()
    path = tmp_path / "tdec" / "forget" / "lm_extraction_32_0.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([["text"]] + [[t] for t in texts_of(random_sequences(6, 12, seed=3))])
    opts = EvalOptions(data_dir=tmp_path, limit=4, batch_size=4)
    settings = RelearnSettings(steps=(1,), batch_size=2)
    alone = relearn_suite(make_tiny_model("llama", seed=1), tok, opts, settings=settings)
    assert alone["control"] is None and "--reference" in alone["note"] and alone["n_test"] == 2
    both = relearn_suite(make_tiny_model("llama", seed=1), tok, opts, original=make_tiny_model("llama", seed=0),
                         settings=settings)
    assert both["control"]["steps"] == [0, 1] and both["unlearned"]["ma"] == pytest.approx(alone["unlearned"]["ma"])
    assert opts.files[str(path)] == "forget"


def test_el_only_at_the_ends_when_asked():
    tok = word_tokenizer()
    texts = texts_of(random_sequences(2, 12, seed=4))
    curve = relearn_curve(make_tiny_model("llama", seed=0), tok, texts, texts,
                          RelearnSettings(steps=(1, 2, 3), batch_size=2, el_every_step=False))
    assert curve["el_10"][1:3] == [None, None] and curve["el_10"][0] is not None and curve["el_10"][3] is not None
    assert None not in curve["ma"]


def test_identical_models_have_exactly_zero_gap():
    """§11: the control is the unlearned model's twin: the same fine-tune gives the same curve, gap 0 exactly."""
    import copy

    tok = word_tokenizer()
    model = make_tiny_model("llama", seed=1)
    forget = texts_of(random_sequences(4, 12, seed=6))
    out = relearning_check(model, tok, forget, original=copy.deepcopy(model),
                           settings=RelearnSettings(steps=(1, 2), lr=1e-2, batch_size=2))
    assert out["gap"]["ma"] == [0.0, 0.0, 0.0] and out["gap"]["el_10"] == [0.0, 0.0, 0.0]


def test_a_known_nonzero_gap_computed_independently():
    """A model that memorized the measured half against a random control: at step 0 the gap is
    MA(memorizer) - MA(random), both counted here from a direct forward pass."""
    from tiny_models import memorize

    tok = word_tokenizer()
    seqs = random_sequences(4, 12, seed=6)
    memorizer = memorize(make_tiny_model("llama", seed=1), seqs, steps=200)
    control = make_tiny_model("llama", seed=0)
    out = relearning_check(memorizer, tok, texts_of(seqs), original=control,
                           settings=RelearnSettings(steps=(1,), lr=1e-5, batch_size=2))

    def ma_by_hand(model):
        with torch.no_grad():
            predicted = model(input_ids=seqs[2:]).logits.argmax(-1)  # the measured half: texts 3 and 4
        return (predicted[:, :-1] == seqs[2:, 1:]).float().mean().item()

    expected = ma_by_hand(memorizer) - ma_by_hand(control)
    assert expected > 0.5
    assert out["gap"]["ma"][0] == pytest.approx(expected, abs=1e-6)
