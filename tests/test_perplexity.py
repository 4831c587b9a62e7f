"""Perplexity of the ``ppl`` suite (docs/algorithms.md §6: "perplexity on Pile validation text").

Every number is checked against an independent hand loop over ``model(...).logits`` with
``torch.nn.functional.cross_entropy``, one text (or one window) at a time, no padding.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loku.errors import ConfigError, DataError
from loku.lm import token_nll
from loku.metrics.perplexity import perplexity, sliding_windows
from tiny_models import VOCAB, make_tiny_model, texts_of, word_tokenizer


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", n_ctx=64)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def _texts(lengths, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [texts_of(torch.randint(3, VOCAB, (1, n), generator=g))[0] for n in lengths]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _sum_nll(model, ids, n_context=1):
    """Summed NLL of ids[n_context:] given everything before, one unpadded forward pass."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float()
    return float(F.cross_entropy(logits[n_context - 1:-1], x[0, n_context:], reduction="sum"))


def test_token_nll_matches_cross_entropy_and_masks():
    """docs/algorithms.md §6 perplexity: per-token NLL with HF's shift, -100 labels give 0."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 2] = -100
    labels[1, 4] = -100
    nll = token_nll(logits, labels)
    assert nll.shape == (2, 4) and nll.dtype == torch.float32
    for b in range(2):
        for t in range(4):
            want = 0.0 if labels[b, t + 1] == -100 else float(F.cross_entropy(logits[b, t], labels[b, t + 1]))
            assert float(nll[b, t]) == pytest.approx(want, abs=1e-5)
    # bf16 logits are scored in float32
    assert token_nll(logits.bfloat16(), labels).dtype == torch.float32


def test_sliding_windows_by_hand():
    """docs/algorithms.md §6 perplexity: windows of max_length, overlap is context only."""
    ids = list(range(10))
    got = [(w.ids, w.context) for w in sliding_windows(ids, 4, 2)]
    assert got == [([0, 1, 2, 3], 1), ([2, 3, 4, 5], 2), ([4, 5, 6, 7], 2), ([6, 7, 8, 9], 2)]
    # default stride = max_length: consecutive windows share one token, so none is lost
    got = [(w.ids, w.context) for w in sliding_windows(ids, 4)]
    assert got == [([0, 1, 2, 3], 1), ([3, 4, 5, 6], 1), ([6, 7, 8, 9], 1)]
    # a short tail re-uses earlier tokens as context: the window stays max_length long
    got = [(w.ids, w.context) for w in sliding_windows(list(range(5)), 4, 2)]
    assert got == [([0, 1, 2, 3], 1), ([1, 2, 3, 4], 3)]
    assert sliding_windows([7], 4) == [] and sliding_windows([], 4) == []
    with pytest.raises(ConfigError):
        sliding_windows(ids, 1)
    with pytest.raises(ConfigError):
        sliding_windows(ids, 4, 0)


@pytest.mark.parametrize("n,max_length,stride", [(10, 4, 1), (10, 4, 3), (10, 4, 4), (10, 4, 9), (37, 8, 5),
                                                 (3, 8, None), (8, 8, None), (9, 8, None)])
def test_every_token_but_the_first_scored_exactly_once(n, max_length, stride):
    """docs/algorithms.md §6 perplexity: each of tokens 1..T-1 is a target in exactly one window."""
    ids = list(range(n))
    scored = []
    for w in sliding_windows(ids, max_length, stride):
        assert 1 <= w.context < len(w.ids) <= max_length
        scored += w.ids[w.context:]
    assert scored == ids[1:]


def test_perplexity_equals_a_per_text_loop(model, tok):
    """docs/algorithms.md §6 perplexity: token-weighted exp(mean NLL) over texts shorter than max_length."""
    texts = _texts([12, 5, 30, 2, 17])
    total = sum(_sum_nll(model, _ids(tok, t)) for t in texts)
    count = sum(len(_ids(tok, t)) - 1 for t in texts)
    res = perplexity(model, tok, texts, batch_size=3, max_length=64)
    assert res["tokens"] == count == 61
    assert res["nll"] == pytest.approx(total / count, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert set(res) == {"ppl", "nll", "tokens"}


def test_sliding_window_equals_a_hand_window_loop(model, tok):
    """docs/algorithms.md §6 perplexity: HF's fixed-length recipe, stride < max_length.

    Windows end at max_length, max_length + stride, ... and at the text's end; each holds the
    max_length tokens up to its end and scores the tokens past the previous window's end. (The
    last window keeps full context where HF's loop would start it on the stride grid.)
    """
    text = _texts([50], seed=9)[0]
    ids = _ids(tok, text)
    max_length, stride = 16, 6
    ends = list(range(max_length, len(ids), stride)) + [len(ids)]
    assert ends == [16, 22, 28, 34, 40, 46, 50]
    total, count, prev_end = 0.0, 0, 1  # token 0 is never a target
    for end in ends:
        begin = max(0, end - max_length)
        total += _sum_nll(model, ids[begin:end], n_context=prev_end - begin)
        count += end - prev_end
        prev_end = end
    assert count == len(ids) - 1
    res = perplexity(model, tok, [text], max_length=max_length, stride=stride)
    assert res["tokens"] == count
    assert res["nll"] == pytest.approx(total / count, rel=1e-5)
    # a window of the whole text gives a different (more context) number: the windows are real
    assert perplexity(model, tok, [text], max_length=64)["nll"] != pytest.approx(res["nll"], rel=1e-6)


def test_batch_size_and_padding_do_not_change_the_number(model, tok):
    """docs/algorithms.md §6 perplexity: right padding is masked; batching is invisible."""
    texts = _texts([3, 40, 7, 22, 9, 31])
    one = perplexity(model, tok, texts, batch_size=1, max_length=20, stride=7)
    four = perplexity(model, tok, texts, batch_size=4, max_length=20, stride=7)
    assert one["tokens"] == four["tokens"]
    assert four["nll"] == pytest.approx(one["nll"], rel=1e-5)
    # a short text padded next to a long one scores as it does alone
    short, long = _texts([4, 60], seed=11)
    alone = [perplexity(model, tok, [t], max_length=64) for t in (short, long)]
    together = perplexity(model, tok, [short, long], batch_size=2, max_length=64)
    total = sum(r["nll"] * r["tokens"] for r in alone)
    assert together["tokens"] == 3 + 59
    assert together["nll"] == pytest.approx(total / together["tokens"], rel=1e-5)


def test_single_token_texts_count_nothing_and_no_token_is_an_error(model, tok):
    """docs/algorithms.md §6 perplexity: the first token of a text has no context."""
    texts = _texts([1, 6, 1])
    res = perplexity(model, tok, texts + [""])
    assert res["tokens"] == 5
    assert res["nll"] == pytest.approx(_sum_nll(model, _ids(tok, texts[1])) / 5, rel=1e-5)
    with pytest.raises(DataError, match="no token to score"):
        perplexity(model, tok, _texts([1, 1]))
    with pytest.raises(DataError, match="no token to score"):
        perplexity(model, tok, [])


def test_training_flag_restored_and_progress_bar(model, tok):
    """docs/algorithms.md §6 perplexity: evaluation leaves the model as it found it."""
    texts = _texts([8, 9])
    model.train()
    try:
        res = perplexity(model, tok, texts, progress=True)
        assert model.training
    finally:
        model.eval()
    assert res == perplexity(model, tok, texts)
    assert not model.training


def test_bf16_model_scored_in_float32(tok):
    """docs/algorithms.md §6 perplexity: a bf16 model's number is close to its float32 twin's."""
    texts = _texts([30, 12])
    fp32 = perplexity(make_tiny_model("llama", n_ctx=64), tok, texts)
    bf16 = perplexity(make_tiny_model("llama", n_ctx=64).bfloat16(), tok, texts)
    assert bf16["tokens"] == fp32["tokens"]
    assert bf16["nll"] == pytest.approx(fp32["nll"], rel=2e-2)
