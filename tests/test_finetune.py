"""`loku finetune` (docs/algorithms.md §7: TOFU's target and reference models): answer-only loss, --exclude,
the warm-up/decay schedule, resume after a kill to the same weights, the output folder."""
from __future__ import annotations

import json
import random

import pytest
import torch

import loku.finetune as finetune_mod
from loku.data import load_text_set, make_batches, tokenize_set
from loku.errors import ConfigError
from loku.finetune import FinetuneConfig, finetune, lr_factor, training_set, write_finetuned
from loku.lm import IGNORE_INDEX, token_nll
from loku.models import load_model
from tiny_models import WORDS, make_tiny_model, word_tokenizer


def _qa(rng, n):
    words = WORDS[3:]
    return [{"question": " ".join(rng.choice(words) for _ in range(4)),
             "answer": " ".join(rng.choice(words) for _ in range(6))} for _ in range(n)]


@pytest.fixture(scope="module")
def qa_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    rng = random.Random(0)
    rows = _qa(rng, 12)
    (root / "full.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (root / "other.jsonl").write_text(json.dumps(_qa(rng, 1)[0]) + "\n")
    model_dir = root / "tiny"
    make_tiny_model("llama", seed=0).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    return root


def _cfg(root, out, **kw):
    values = dict(model=str(root / "tiny"), data=[str(root / "full.jsonl")], out=str(out), epochs=3, lr=3e-3,
                  batch_size=4, template="generic", progress=False, seed=0)
    values.update(kw)
    return FinetuneConfig(**values)


def _answer_nll(model, tokenizer, path):
    tokenized = tokenize_set(tokenizer, load_text_set(path, "x"), max_length=64, model=model, template="generic")
    total = count = 0.0
    with torch.no_grad():
        for b in make_batches(tokenized, 4, 0):
            total += float(token_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                     b["labels"]).sum())
            count += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / count


def test_lr_schedule_is_linear_warmup_then_linear_decay():
    assert [lr_factor(s, 2, 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert lr_factor(0, 0, 4) == 1.0 and lr_factor(3, 0, 4) == 0.25


def test_finetuning_learns_the_answers_and_leaves_the_input_model_alone(qa_env, tmp_path):
    model, tokenizer = load_model(str(qa_env / "tiny"), progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nll_before = _answer_nll(model, tokenizer, qa_env / "full.jsonl")
    cfg = _cfg(qa_env, tmp_path / "out", epochs=30, lr=1e-2)
    result = finetune(cfg, model=model, tokenizer=tokenizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model modified"
    nll_after = _answer_nll(result.model, tokenizer, qa_env / "full.jsonl")
    assert nll_after < 0.5 * nll_before
    losses = [e["loss"] for e in result.report["epochs"]]
    assert losses[-1] < losses[0] and result.report["template"] == "generic" and result.report["items"] == 12
    out = write_finetuned(result, cfg)
    loaded, _ = load_model(str(out), progress=False)
    assert _answer_nll(loaded, tokenizer, qa_env / "full.jsonl") == pytest.approx(nll_after, rel=1e-5)
    record = json.loads((out / "finetune.json").read_text())
    assert record["config"]["lr"] == 1e-2 and record["data"][0]["sha256"] and record["versions"]["torch"]
    assert not (tmp_path / "out.ckpt").exists()


def test_exclude_leaves_out_the_forget_items(qa_env, tmp_path):
    text_set, record = training_set(_cfg(qa_env, tmp_path / "o", exclude=[str(qa_env / "forget.jsonl")]))
    assert len(text_set.texts) == 9 and record["left_out"] == 3
    forget = set(load_text_set(qa_env / "forget.jsonl", "x").texts)
    assert not forget & set(text_set.texts)
    with pytest.raises(ConfigError, match="none of its items is in --data"):
        training_set(_cfg(qa_env, tmp_path / "o", exclude=[str(qa_env / "other.jsonl")]))
    with pytest.raises(ConfigError, match="no training data"):
        finetune(FinetuneConfig(data=[], out=str(tmp_path / "o")))


def test_a_killed_finetune_resumes_to_the_same_weights(qa_env, tmp_path, monkeypatch):
    whole = finetune(_cfg(qa_env, tmp_path / "whole"))
    calls = []

    def kill(name):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune_mod, "_failpoint", kill)
    cfg = _cfg(qa_env, tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg)
    monkeypatch.setattr(finetune_mod, "_failpoint", lambda name: None)
    resumed = finetune(cfg, resume=True)
    assert [e["epoch"] for e in resumed.report["epochs"]] == [1, 2, 3] and resumed.report["resumed"]
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ConfigError, match="other settings"):
        finetune(_cfg(qa_env, tmp_path / "killed", lr=1e-3), resume=True)
