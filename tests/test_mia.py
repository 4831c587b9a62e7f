"""Membership-inference scores and AUCs (beyond the LoKU paper; not in docs/algorithms.md).

The pure pieces (AUC, Min-K%, Min-K%++) are checked on fixed numbers computed by hand; the
model-level scores against a plain per-text loop; and a tiny model trained to memorize a few
sequences must be caught by the LOSS attack.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from loku.errors import ConfigError, DataError
from loku.metrics.mia import ATTACKS, auc, mia_auc, mia_scores, min_k_plus_plus_score, min_k_score, token_zscores
from tiny_models import VOCAB, make_tiny_model, memorize, random_sequences, texts_of, word_tokenizer


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


# ----------------------------------------------------------------------------- AUC

def _pairwise_auc(members, nonmembers):
    wins = [1.0 if m > n else 0.5 if m == n else 0.0 for m, n in itertools.product(members, nonmembers)]
    return sum(wins) / len(wins)


def _mann_whitney_auc(members, nonmembers):
    """AUC from scipy's Mann-Whitney U of the members (ties count 1/2): U / (n1 * n0)."""
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(members, nonmembers, alternative="two-sided", method="asymptotic").statistic
    return float(u) / (len(members) * len(nonmembers))


def test_auc_against_scipy_mann_whitney_with_ties():
    cases = [
        ([3, 1, 2], [2, 0]),  # one tie
        ([1, 1], [1, 1, 1]),  # all tied: 0.5
        ([0.5, 0.5, 0.9, 0.1, 0.5], [0.5, 0.2, 0.2, 0.9]),  # ties inside and across the groups
        ([-3.2, -1.0, -1.0, -0.4], [-2.0, -1.0, -5.5, -1.0, -0.4, -7.0]),
    ]
    g = torch.Generator().manual_seed(5)
    cases.append((torch.randint(0, 6, (31,), generator=g).tolist(), torch.randint(0, 6, (17,), generator=g).tolist()))
    cases.append(((torch.randn(40, generator=g) + 0.7).tolist(), torch.randn(25, generator=g).tolist()))
    for members, nonmembers in cases:
        assert auc(members, nonmembers) == pytest.approx(_mann_whitney_auc(members, nonmembers), abs=1e-12)
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        return
    for members, nonmembers in cases:
        want = roc_auc_score([1] * len(members) + [0] * len(nonmembers), list(members) + list(nonmembers))
        assert auc(members, nonmembers) == pytest.approx(want, abs=1e-12)


def test_auc_by_hand():
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert auc([1, 1], [1, 1, 1]) == 0.5
    # pairs: 3>2, 3>0, 1<2, 1>0, 2=2 (1/2), 2>0  ->  4.5 / 6
    assert auc([3, 1, 2], [2, 0]) == pytest.approx(0.75)
    g = torch.Generator().manual_seed(0)
    m, n = torch.randint(0, 5, (13,), generator=g).tolist(), torch.randint(0, 5, (9,), generator=g).tolist()
    assert auc(m, n) == pytest.approx(_pairwise_auc(m, n))
    with pytest.raises(DataError):
        auc([], [1.0])
    with pytest.raises(DataError, match="NaN"):
        auc([float("nan")], [1.0])


# ----------------------------------------------------------------------------- Min-K% and Min-K%++

def test_min_k_on_a_fixed_tensor():
    lp = torch.tensor([-1.0, -5.0, -2.0, -8.0, -0.5, -3.0, -4.0, -6.0, -7.0, -9.0])
    assert min_k_score(lp, 0.2) == pytest.approx((-9 - 8) / 2)
    assert min_k_score(lp, 0.25) == pytest.approx((-9 - 8) / 2)  # floor(2.5) = 2 tokens
    assert min_k_score(lp, 0.3) == pytest.approx((-9 - 8 - 7) / 3)
    hundred = -torch.arange(100.0)  # 0.29 * 100 = 28.999999999999996 in floats: still 29 tokens
    assert min_k_score(hundred, 0.29) == pytest.approx(float(-torch.arange(71.0, 100.0).mean()))
    assert min_k_score(lp, 0.01) == pytest.approx(-9.0)  # at least one token
    assert min_k_score(lp, 1.0) == pytest.approx(float(lp.mean()))
    with pytest.raises(ConfigError):
        min_k_score(lp, 0.0)
    with pytest.raises(ConfigError):
        min_k_score(lp, 1.5)
    with pytest.raises(DataError):
        min_k_score(torch.tensor([]), 0.2)


def _z_by_hand(row, target):
    norm = math.log(sum(math.exp(v) for v in row))
    logp = [v - norm for v in row]
    p = [math.exp(v) for v in logp]
    mu = sum(pi * li for pi, li in zip(p, logp))
    sigma = math.sqrt(sum(pi * li * li for pi, li in zip(p, logp)) - mu * mu)
    return (logp[target] - mu) / sigma


def test_min_k_plus_plus_on_fixed_logits():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5],
                           [0.0, 0.0, 0.0, 3.0],
                           [1.0, -2.0, 0.3, 0.3],
                           [-1.0, 4.0, 0.0, 1.0],
                           [0.0, 0.1, 0.2, 0.3]])
    targets = torch.tensor([0, 1, 3, 2, 3])
    want = [_z_by_hand(r, t) for r, t in zip(logits.tolist(), targets.tolist())]
    assert token_zscores(logits, targets).tolist() == pytest.approx(want, rel=1e-5)
    lowest2 = sorted(want)[:2]
    assert min_k_plus_plus_score(logits, targets, 0.4) == pytest.approx(sum(lowest2) / 2, rel=1e-5)
    assert min_k_plus_plus_score(logits, targets, 0.2) == pytest.approx(min(want), rel=1e-5)
    # bf16 logits are handled in float32; a -inf logit (probability 0) adds nothing instead of NaN
    assert token_zscores(logits.bfloat16(), targets).dtype == torch.float32
    masked = logits.clone()
    masked[:, 2] = -math.inf
    z = token_zscores(masked, torch.tensor([0, 1, 3, 1, 3]))
    assert torch.isfinite(z).all()
    assert float(z[0]) == pytest.approx(_z_by_hand([2.0, 0.0, 0.5], 0), rel=1e-5)


# ----------------------------------------------------------------------------- with a model

def test_scores_match_a_per_text_loop(tok):
    model = make_tiny_model("llama", n_ctx=64)
    g = torch.Generator().manual_seed(4)
    texts = [texts_of(torch.randint(3, VOCAB, (1, n), generator=g))[0] for n in (20, 7, 33, 1)]
    got = mia_scores(model, tok, texts, k=0.2, batch_size=3)
    assert set(got) == set(ATTACKS)
    for i, text in enumerate(texts[:3]):
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0, :-1].float()
        lp = -F.cross_entropy(logits, ids[1:], reduction="none")
        assert got["loss"][i] == pytest.approx(float(lp.mean()), rel=1e-5)
        assert got["zlib"][i] == pytest.approx(float(lp.mean()) / len(zlib.compress(text.encode())), rel=1e-5)
        lowest = lp.sort().values[: max(1, int(0.2 * len(lp)))]
        assert got["min_k"][i] == pytest.approx(float(lowest.mean()), rel=1e-5)
        z = [_z_by_hand(r, t) for r, t in zip(logits.tolist(), ids[1:].tolist())]
        assert got["min_k_pp"][i] == pytest.approx(sum(sorted(z)[: len(lowest)]) / len(lowest), rel=1e-4)
    assert all(math.isnan(got[a][3]) for a in ATTACKS)  # one token: nothing to score
    # truncation to max_length = scoring the cut text; batch size does not matter
    cut = mia_scores(model, tok, texts, max_length=5, batch_size=1)
    alone = mia_scores(model, tok, [" ".join(t.split()[:5]) for t in texts[:3]])
    for a in ATTACKS:
        assert cut[a][:3] == pytest.approx(alone[a], rel=1e-5)
    with pytest.raises(ConfigError):
        mia_scores(model, tok, texts, k=0)


def test_memorized_sequences_are_detected(tok):
    seqs = random_sequences(12, 24, seed=7)
    members, nonmembers = seqs[:4], seqs[4:]
    model = memorize(make_tiny_model("llama"), members, steps=200)
    res = mia_auc(model, tok, texts_of(members), texts_of(nonmembers))
    assert res["auc"]["loss"] > 0.9
    assert res["auc"]["min_k"] > 0.9
    assert res["k"] == 0.2 and res["n_scored"] == {"members": 4, "nonmembers": 8}
    for a in ATTACKS:  # the reported AUC is the Mann-Whitney AUC of the reported scores (computed by scipy)
        want = _mann_whitney_auc(res["scores"]["members"][a], res["scores"]["nonmembers"][a])
        assert res["auc"][a] == pytest.approx(want, abs=1e-12)
    json.dumps(res, allow_nan=False)


def test_mia_auc_leaves_out_unscorable_texts_and_fails_when_a_side_is_empty(tok):
    model = make_tiny_model("llama")
    res = mia_auc(model, tok, ["w3 w4 w5", "w9"], ["w6 w7", "w8 w9 w10 w11"])
    assert res["n_scored"] == {"members": 1, "nonmembers": 2}
    assert math.isnan(res["scores"]["members"]["loss"][1])
    with pytest.raises(DataError, match="members texts"):
        mia_auc(model, tok, ["w3"], ["w6 w7"])


def test_mia_suite_runs_through_evaluate(tok, tmp_path):
    """loku.evaluate's ``mia`` suite calls mia_auc(model, tokenizer, members, nonmembers) and merges it."""
    from loku import evaluate as E

    seqs = random_sequences(10, 12, seed=2)
    (tmp_path / "tdec" / "eval").mkdir(parents=True)
    for path, ids in ((tmp_path / "forget.csv", seqs[:3]), (tmp_path / "tdec" / "eval" / "pile.csv", seqs[3:])):
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["doc_id", "text"])
            writer.writerows(enumerate(texts_of(ids)))
    model = make_tiny_model("llama")
    out = E.run_suites(model, tok, ["mia"], data_dir=tmp_path, forget_path=tmp_path / "forget.csv")
    mia = out["suites"]["mia"]
    assert mia["n_members"] == 3 and mia["n_nonmembers"] == 3
    assert set(mia["auc"]) == set(ATTACKS) and all(0 <= v <= 1 for v in mia["auc"].values())
    json.dumps(out, allow_nan=False)
    assert "| auc.loss |" in E.render_eval_markdown(out)
