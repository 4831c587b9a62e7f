"""Distance to the never-trained model (loku.metrics.reference): pure functions against hand
computations, the model functions against a direct forward pass, and the gaps of a model to itself."""
from __future__ import annotations

import math

import pytest
import torch

from loku.errors import ConfigError
from loku.metrics.reference import (agreement_f1, distinct_n, generation_quality, heldout_kl, kl_per_token,
                                    reference_distances, reference_stats, repetition_rate, sequence_nll)
from tiny_models import make_tiny_model, random_sequences, texts_of, word_tokenizer


# ----------------------------------------------------------------------------- pure functions


def test_kl_per_token_matches_hand_computation():
    p = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    q = torch.tensor([[0.0, 0.0]])  # q = (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_per_token(p, q).item() == pytest.approx(expected, abs=1e-6)
    # KL is not symmetric: KL(q || p) is another number
    assert kl_per_token(q, p).item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), abs=1e-6)


def test_kl_per_token_zero_for_equal_rows_and_handles_zero_probabilities():
    logits = torch.randn(3, 5, 11)
    assert torch.allclose(kl_per_token(logits, logits), torch.zeros(3, 5), atol=1e-6)
    p = torch.tensor([[0.0, -math.inf]])  # p = (1, 0): only the first term counts
    q = torch.tensor([[math.log(0.2), math.log(0.8)]])
    assert kl_per_token(p, q).item() == pytest.approx(math.log(1 / 0.2), abs=1e-6)


def test_kl_per_token_in_float32_for_half_inputs():
    p, q = torch.randn(2, 7), torch.randn(2, 7)
    out = kl_per_token(p.bfloat16(), q.bfloat16())
    assert out.dtype == torch.float32
    with pytest.raises(ConfigError, match="vocabulary"):
        kl_per_token(p, torch.randn(2, 8))


def test_repetition_distinct_and_agreement_by_hand():
    # bigrams of 1 2 1 2 1 2: (1,2) (2,1) (1,2) (2,1) (1,2) -> 2 unique of 5
    assert repetition_rate([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(1 - 2 / 5)
    assert repetition_rate([1, 2, 3, 4], n=2) == 0.0
    assert repetition_rate([1, 2], n=4) == 0.0  # no 4-gram
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    # bags {1, 2, 2, 3} and {2, 2, 4}: 2 tokens in common, precision 2/4, recall 2/3
    assert agreement_f1([1, 2, 2, 3], [2, 2, 4]) == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert agreement_f1([], []) == 1.0 and agreement_f1([1], [2]) == 0.0
    quality = generation_quality([[5, 5, 5, 5, 5], [1, 2, 3, 4, 5]], n=2)
    assert quality["repetition_rate"] == pytest.approx((1 - 1 / 4 + 0.0) / 2)
    assert quality["mean_length"] == 5.0


# ----------------------------------------------------------------------------- with models


@pytest.fixture(scope="module")
def setup():
    tok = word_tokenizer()
    original = make_tiny_model("llama", seed=0)
    other = make_tiny_model("llama", seed=5)
    forget = texts_of(random_sequences(4, 12, seed=7))
    heldout = texts_of(random_sequences(4, 12, seed=8))
    return tok, original, other, forget, heldout


def test_sequence_nll_matches_a_direct_forward(setup):
    tok, original, _, forget, _ = setup
    got = sequence_nll(original, tok, forget)
    ids = torch.tensor(tok(forget[0], add_special_tokens=False)["input_ids"])[None]
    with torch.no_grad():
        logits = original(input_ids=ids).logits.float()
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert got[0] == pytest.approx(expected, abs=1e-5)
    assert len(got) == 4


def test_heldout_kl_by_hand_and_zero_for_the_same_model(setup):
    tok, original, other, _, heldout = setup
    assert heldout_kl(original, original, tok, heldout)["kl"] == pytest.approx(0.0, abs=1e-6)
    got = heldout_kl(original, other, tok, heldout[:1])
    ids = torch.tensor(tok(heldout[0], add_special_tokens=False)["input_ids"])[None]
    with torch.no_grad():
        p = torch.log_softmax(original(input_ids=ids).logits.float(), -1)
        q = torch.log_softmax(other(input_ids=ids).logits.float(), -1)
    expected = (p.exp() * (p - q)).sum(-1).mean().item()
    assert got["kl"] == pytest.approx(expected, rel=1e-4)
    assert got["tokens"] == ids.shape[1]


def test_a_model_is_at_distance_zero_from_itself(setup):
    tok, original, _, forget, heldout = setup
    out = reference_distances(original, tok, forget, heldout, original=original, prompt_tokens=4, new_tokens=6)
    assert out["forget_nll"]["gap"] == pytest.approx(0.0, abs=1e-6)
    assert out["heldout_kl"]["model"] == pytest.approx(0.0, abs=1e-6)
    assert all(abs(v["gap"]) < 1e-9 for v in out["mia_auc"].values())
    assert out["generation"]["repetition_rate"]["gap"] == 0.0
    assert out["generation"]["agreement_f1"]["model"] == 1.0


def test_gaps_against_another_model_and_reused_original_stats(setup):
    tok, original, other, forget, heldout = setup
    stats = reference_stats(original, tok, forget, heldout, prompt_tokens=4, new_tokens=6)
    out = reference_distances(other, tok, forget, heldout, original=original, original_stats=stats,
                              prompt_tokens=4, new_tokens=6)
    mine = sum(sequence_nll(other, tok, forget)) / 4
    theirs = sum(sequence_nll(original, tok, forget)) / 4
    assert out["forget_nll"]["model"] == pytest.approx(mine, abs=1e-6)
    assert out["forget_nll"]["gap"] == pytest.approx(mine - theirs, abs=1e-6)
    assert out["heldout_kl"]["gap"] > 0
    for name, entry in out["mia_auc"].items():
        assert entry["gap"] == pytest.approx(entry["model"] - stats["mia_auc"][name])
    assert out["settings"]["new_tokens"] == 6
    with pytest.raises(ConfigError, match="same texts and settings"):
        reference_distances(other, tok, forget, heldout, original=original, original_stats=stats, prompt_tokens=5,
                            new_tokens=6)


def _tdec_folder(root, forget, heldout):
    import csv

    for path, texts in ((root / "tdec" / "forget" / "lm_extraction_32_0.csv", forget),
                        (root / "tdec" / "eval" / "pile.csv", heldout)):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["doc_id", "corpus", "text"])
            writer.writerows([i, "pile", t] for i, t in enumerate(texts))
    return root


def test_eval_reference_suite_reads_the_tdec_files(setup, tmp_path):
    from loku.eval_options import EvalOptions
    from loku.metrics.reference import check_same_vocabulary, reference_suite

    tok, original, other, forget, heldout = setup
    opts = EvalOptions(data_dir=_tdec_folder(tmp_path, forget, heldout), limit=3, batch_size=4)
    out = reference_suite(other, tok, opts, original, prompt_tokens=4, new_tokens=6)
    assert out["settings"]["n_forget"] == out["settings"]["n_heldout"] == 3
    assert out["forget_nll"]["gap"] == pytest.approx(
        sum(sequence_nll(other, tok, forget[:3])) / 3 - sum(sequence_nll(original, tok, forget[:3])) / 3, abs=1e-6)
    assert set(opts.files.values()) == {"forget", "held-out"}
    check_same_vocabulary(tok, word_tokenizer())
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    small = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "a": 1},
                                                                               unk_token="<pad>")))
    with pytest.raises(ConfigError, match="tokenizer is not the evaluated model's"):
        check_same_vocabulary(tok, small, "other-model")


def test_eval_hook_loads_the_reference_and_runs_both_checks(setup, tmp_path):
    from loku.eval_options import EvalOptions
    from loku.metrics.reference import reference_and_relearn
    from loku.metrics.relearn import RelearnSettings  # noqa: F401  (the hook uses the default settings)

    tok, original, other, forget, heldout = setup
    folder = tmp_path / "original"
    original.save_pretrained(folder)
    tok.save_pretrained(folder)
    opts = EvalOptions(data_dir=_tdec_folder(tmp_path / "data", forget, heldout), limit=2, batch_size=4)
    out = reference_and_relearn(other, tok, opts, reference=str(folder), relearn=True)
    assert out["reference"]["model"] == str(folder) and out["reference"]["heldout_kl"]["model"] > 0
    assert out["relearn"]["control"]["steps"] == [0, 5, 10, 20] and out["relearn"]["n_train"] == 1
    assert reference_and_relearn(other, tok, opts) == {}


def test_loku_eval_reference_and_relearn_flags_write_both_checks(setup, tmp_path):
    """`loku eval --reference ORIGINAL --relearn` (§10, §11) puts both checks into eval.json / eval.md."""
    import json

    from loku.cli import main

    tok, original, other, forget, heldout = setup
    for name, model in (("original", original), ("other", other)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    data = _tdec_folder(tmp_path / "data", forget, heldout)
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tmp_path / "other"), "--suite", "mia", "--data-dir", str(data),
                 "--limit", "2", "--batch-size", "4", "--reference", str(tmp_path / "original"), "--relearn",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    suites = report["suites"]
    assert set(suites) == {"mia", "reference", "relearn"} and report["meta"]["suites"] == ["mia", "reference", "relearn"]
    assert suites["reference"]["model"] == str(tmp_path / "original") and suites["reference"]["heldout_kl"]["model"] > 0
    assert suites["relearn"]["control"] is not None and suites["relearn"]["unlearned"]["steps"] == [0, 5, 10, 20]
    assert report["meta"]["reference"] == str(tmp_path / "original") and report["meta"]["data_files"]
    assert "## reference" in (out / "eval.md").read_text() and "## relearn" in (out / "eval.md").read_text()
    # without --reference the relearning check still runs, with no control
    code = main(["eval", "--model", str(tmp_path / "other"), "--suite", "mia", "--data-dir", str(data), "--limit", "2",
                 "--relearn", "--out", str(tmp_path / "eval2")])
    assert code == 0 and json.loads((tmp_path / "eval2" / "eval.json").read_text())["suites"]["relearn"]["control"] is None


def test_identical_models_have_exactly_zero_gaps(setup):
    """§10: a copy of the original is the original: every gap is exactly 0 (not approximately)."""
    import copy

    tok, original, _, forget, heldout = setup
    twin = copy.deepcopy(original)
    out = reference_distances(twin, tok, forget, heldout, original=original, prompt_tokens=4, new_tokens=6)
    assert out["forget_nll"]["gap"] == 0.0
    assert all(v["gap"] == 0.0 for v in out["mia_auc"].values())
    assert out["heldout_kl"]["model"] == 0.0
    assert out["generation"]["agreement_f1"]["gap"] == 0.0
    assert all(out["generation"][k]["gap"] == 0.0 for k in ("repetition_rate", "distinct_1", "distinct_2"))


def test_a_known_nonzero_gap_computed_independently(setup):
    """A model whose output layer is zeroed predicts the uniform distribution over the 97 tokens:
    its NLL is ln 97 on every token and KL(p_original || uniform) = ln 97 - H(p_original); both
    gaps are computed here from the original's own forward pass, not by the code under test."""
    import copy

    tok, original, _, forget, heldout = setup
    uniform = copy.deepcopy(original)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    out = reference_distances(uniform, tok, forget, heldout, original=original, prompt_tokens=4, new_tokens=6)
    nll, entropy, tokens = [], 0.0, 0
    for text in forget:
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])[None]
        with torch.no_grad():
            logp = torch.log_softmax(original(input_ids=ids).logits.float()[0], -1)
        nll.append(-logp[:-1].gather(1, ids[0, 1:, None]).mean().item())
    for text in heldout:
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])[None]
        with torch.no_grad():
            logp = torch.log_softmax(original(input_ids=ids).logits.float()[0], -1)
        entropy += -(logp.exp() * logp).sum().item()
        tokens += ids.shape[1]
    expected_gap = math.log(97) - sum(nll) / len(nll)
    assert out["forget_nll"]["model"] == pytest.approx(math.log(97), abs=1e-5)
    assert out["forget_nll"]["gap"] == pytest.approx(expected_gap, abs=1e-5) and abs(expected_gap) > 0.01
    assert out["heldout_kl"]["gap"] == pytest.approx(math.log(97) - entropy / tokens, abs=1e-5)
