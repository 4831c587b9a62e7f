"""The shared LM pieces (loku.lm): the one padder, the one pad-token policy, the one context length,
and per-sequence metrics over padded batches (the MA/EL loop of the trainer and of `loku eval`)."""
from __future__ import annotations

import math
import types

import pytest
import torch

from loku import lm
from loku.data import make_batches
from loku.errors import ConfigError, ModelError
from loku.metrics import extraction_likelihood, memorization_accuracy
from tiny_models import make_tiny_model, random_sequences


def test_pad_sequences_right_and_left():
    ids, mask = lm.pad_sequences([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = lm.pad_sequences([[5, 6, 7], [8]], pad_id=9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ConfigError, match="side"):
        lm.pad_sequences([[1]], 0, side="middle")


def test_make_batches_pads_with_the_shared_padder():
    batch = make_batches([[5, 6, 7], [8, 9]], 2, pad_id=4, prompt_lengths=[1, 0])[0]
    ids, mask = lm.pad_sequences([[5, 6, 7], [8, 9]], 4)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert batch["labels"].tolist() == [[lm.IGNORE_INDEX, 6, 7], [8, 9, lm.IGNORE_INDEX]]


class _Tok:
    def __init__(self, **ids):
        for kind in ("pad", "eos", "bos"):
            super().__setattr__(f"{kind}_token_id", ids.get(kind))
            super().__setattr__(f"{kind}_token", None if ids.get(kind) is None else f"<{kind}>")

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "pad_token" and value is not None:  # as a Hugging Face tokenizer does
            super().__setattr__("pad_token_id", {"<eos>": self.eos_token_id, "<bos>": self.bos_token_id}[value])


def test_ensure_pad_token_pad_then_eos_else_refused():
    assert lm.ensure_pad_token(_Tok(pad=0, eos=2, bos=1)) == 0
    tok = _Tok(eos=2, bos=1)
    assert lm.ensure_pad_token(tok) == 2 and tok.pad_token == "<eos>" and tok.pad_token_id == 2
    assert lm.ensure_pad_token(tok) == 2  # idempotent
    for tok in (_Tok(bos=1), _Tok()):  # a BOS is not used: the training loop refuses such a tokenizer too
        with pytest.raises(ModelError, match="neither a pad token nor an EOS token"):
            lm.ensure_pad_token(tok)


def test_context_length_reads_every_family_the_same_way():
    def model(**cfg):
        return types.SimpleNamespace(config=types.SimpleNamespace(**cfg))

    assert lm.context_length(model(max_position_embeddings=512, n_positions=1024)) == 512
    assert lm.context_length(model(n_positions=1024)) == 1024  # GPT-2
    assert lm.context_length(model(n_ctx=300)) == 300
    assert lm.context_length(model(seq_length=4096)) == 4096
    assert lm.context_length(model(max_position_embeddings=None, n_positions=0)) == lm.DEFAULT_CONTEXT
    assert lm.context_length(object(), default=77) == 77


def test_per_sequence_equals_the_metric_on_each_batch_and_restores_the_mode():
    model = make_tiny_model("llama")
    seqs = [s.tolist() for s in random_sequences(5, 12, seed=4)]
    seqs[1] = seqs[1][:7]  # padding in the first batch
    batches = make_batches(seqs, 2, pad_id=0)
    expected = torch.cat([memorization_accuracy(model, b["input_ids"], b["attention_mask"]) for b in batches])
    model.train()
    got = lm.per_sequence(memorization_accuracy, model, batches)
    assert model.training
    assert got.dtype == torch.float32 and torch.allclose(got, expected)
    el = lm.per_sequence(extraction_likelihood, model, batches, bar="EL", n=3)
    assert el.shape == (5,)
    assert lm.mean_over_batches(memorization_accuracy, model, batches) == pytest.approx(float(expected.mean()))
    assert lm.per_sequence(memorization_accuracy, model, []).numel() == 0
    assert math.isnan(lm.mean_over_batches(memorization_accuracy, model, []))


def test_forward_rows_leaves_grad_mode_and_training_flag_alone_between_yields():
    from loku.lm import forward_rows
    from tiny_models import make_tiny_model

    model = make_tiny_model("llama").train()
    rows = forward_rows(model, [[3, 4, 5], [6, 7]], pad_id=0, batch_size=1)
    next(rows)  # a half-consumed generator
    assert torch.is_grad_enabled() and model.training
    rows.close()
