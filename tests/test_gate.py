"""The gate (docs/algorithms.md §8 and ../shared/docs/ALGORITHMS.md §8, O3 and its pitfalls): Mahalanobis
distance of the most in-distribution window of an input to each request's forget set, thresholds calibrated
on held-out text, honest rates, a hard or soft switch of each request's adapter, saved with the output."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from loku.errors import ConfigError
from loku.gate import (GATE_DIR, GatedModel, adapter_fingerprints, calibrate_threshold, fit_gate, fit_shared_gaussian,
                       gate_rates, honest_gate, mahalanobis, mean_hidden_state, save_gate, soft_weight,
                       window_features, window_starts)
from loku.requests import Delta, apply_deltas, stacked_model
from tiny_models import make_tiny_model

# --------------------------------------------------------------------------- the math


def test_shared_gaussian_recovers_the_covariance_and_shrinkage_makes_it_invertible():
    g = torch.Generator().manual_seed(0)
    cov = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=torch.float64)
    root = torch.linalg.cholesky(cov)
    classes = [torch.randn(20_000, 3, generator=g, dtype=torch.float64) @ root.T + shift
               for shift in (torch.zeros(3), torch.tensor([5.0, -2.0, 1.0]))]
    means, precision = fit_shared_gaussian(classes, shrinkage=0.0)
    torch.testing.assert_close(means[1], torch.tensor([5.0, -2.0, 1.0], dtype=torch.float64), atol=0.05, rtol=0)
    torch.testing.assert_close(torch.linalg.inv(precision), cov, atol=0.05, rtol=0)
    few = [torch.randn(3, 16, generator=g), torch.randn(2, 16, generator=g)]  # fewer rows than dimensions
    _, shrunk = fit_shared_gaussian(few, shrinkage=0.2)
    assert torch.isfinite(shrunk).all() and torch.linalg.eigvalsh(shrunk).min() > 0
    with pytest.raises(ConfigError, match="shrinkage"):
        fit_shared_gaussian(few, shrinkage=1.5)


def test_mahalanobis_is_the_quadratic_form():
    g = torch.Generator().manual_seed(1)
    x, mu = torch.randn(5, 4, generator=g), torch.randn(2, 4, generator=g)
    m = torch.randn(4, 4, generator=g)
    precision = (m @ m.T + torch.eye(4)).double()
    d = mahalanobis(x, mu, precision)
    for n in range(5):
        for k in range(2):
            diff = (x[n] - mu[k]).double()
            assert float(d[n, k]) == pytest.approx(float(diff @ precision @ diff) ** 0.5)
    torch.testing.assert_close(mahalanobis(x, mu, torch.eye(4)), torch.cdist(x.double(), mu.double()))


def test_calibrated_threshold_keeps_the_heldout_false_positive_rate_at_most_the_target_and_is_the_largest():
    g = torch.Generator().manual_seed(2)
    heldout = torch.rand(200, generator=g, dtype=torch.float64)
    for fpr in (0.0, 0.01, 0.05, 0.2, 0.5):
        t = calibrate_threshold(heldout, fpr)
        assert int((heldout <= t).sum()) <= fpr * len(heldout)
        assert int((heldout <= heldout[heldout > t].min()).sum()) > fpr * len(heldout)
    assert calibrate_threshold(heldout, 1.0) == float("inf")
    ties = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    assert int((ties <= calibrate_threshold(ties, 0.5)).sum()) == 0, "ties at the cut are all left out"
    with pytest.raises(ConfigError, match="false-positive rate"):
        calibrate_threshold(heldout, 1.2)


def test_soft_weight_is_o3s_snapped_sigmoid_of_the_calibrated_score():
    """w = sigmoid(10c - 2), c = (z - d) / (z - t): 1 within the threshold t, 0 from the zero point z on."""
    t, z = torch.tensor([2.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)
    d = torch.tensor([[1.0], [2.0], [2.5], [3.0], [3.9], [4.0], [9.0]], dtype=torch.float64)
    w = soft_weight(d, t, z)[:, 0].tolist()
    assert w[:2] == [1.0, 1.0] and w[5:] == [0.0, 0.0]
    for distance, weight in zip([2.5, 3.0, 3.9], w[2:5]):
        c = (4.0 - distance) / 2.0
        assert weight == pytest.approx(1 / (1 + torch.exp(torch.tensor(-(10 * c - 2))).item()))
    assert w == sorted(w, reverse=True)
    # No room between threshold and zero point (too few held-out texts): the hard decision.
    assert soft_weight(d, t, t)[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- honest rates (§8 pitfalls)


def no_signal(seed: int, dim: int = 64, per_request: int = 8, heldout: int = 80):
    """Forget sets and held-out texts drawn from ONE distribution: a gate can only memorize, not recognize."""
    g = torch.Generator().manual_seed(seed)
    forget = {f"r{k}": list(torch.randn(per_request, 1, dim, generator=g)) for k in (1, 2)}
    return forget, list(torch.randn(heldout, 1, dim, generator=g))


def test_true_positive_rate_is_measured_on_forget_texts_the_gate_was_not_fitted_on():
    """With no signal at all the gate fits each forget text (in high dimension a text is near its own mean),
    so a rate on the fitted texts is ~1; the reported rate is cross-fitted and stays near the target."""
    forget, heldout = no_signal(0)
    gate, rates = honest_gate(forget, heldout, fpr=0.1, shrinkage=0.2, window=8, stride=4)
    in_sample = gate_rates(gate, heldout[1::2], forget)["true_positive_rate"]
    assert min(in_sample.values()) >= 0.75, "the defect this guards against: fitted texts look in-distribution"
    assert max(rates["true_positive_rate"].values()) <= 0.375
    assert max(rates["true_positive_rate_prompts"].values()) <= 0.375
    assert "cross-fitted" in rates["true_positive_rate_note"]


def test_false_positive_rate_is_reported_on_heldout_texts_not_used_for_calibration():
    """Calibration texts (every other one) far from the forget set, the others in it: the reported rate must
    see the others (a rate on the calibration texts would be <= the target by construction)."""
    g = torch.Generator().manual_seed(1)
    forget = {"r1": list(torch.randn(8, 1, 4, generator=g) + 10)}
    far, near = torch.randn(20, 1, 4, generator=g), torch.randn(20, 1, 4, generator=g) + 10
    heldout = [t for pair in zip(far, near) for t in pair]
    _, rates = honest_gate(forget, heldout, fpr=0.1, shrinkage=0.2)
    assert (rates["calibrated_on"], rates["reported_on"]) == (20, 20)
    assert rates["false_positive_rate"]["r1"] >= 0.9


def test_a_target_rate_the_calibration_texts_cannot_resolve_is_warned_about_and_recorded():
    """With N calibration texts a rate below 1/N is the rate 0 (threshold below the smallest distance)."""
    forget, heldout = no_signal(2, heldout=16)  # 8 calibration texts, target 0.05 < 1/8
    with pytest.warns(UserWarning, match="cannot be resolved"):
        _, rates = honest_gate(forget, heldout, fpr=0.05, shrinkage=0.2)
    assert rates["warnings"] and "at least 40 held-out texts" in rates["warnings"][0]
    assert rates["fpr_resolution"] == 1 / 8
    forget, heldout = no_signal(2, heldout=40)  # 20 calibration texts resolve 0.05
    _, rates = honest_gate(forget, heldout, fpr=0.05, shrinkage=0.2)
    assert rates["warnings"] == []


# --------------------------------------------------------------------------- features of a model


def test_window_features_run_each_window_on_its_own_and_ignore_padding():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 97, (1, 13), generator=torch.Generator().manual_seed(0))
    assert window_starts(13, 8, 4) == [0, 4, 5] and window_starts(5, 8, 4) == [0]
    feats = window_features(model, ids, None, window=8, stride=4)[0]
    one = torch.ones(1, 8, dtype=torch.long)
    for row, start in zip(feats, window_starts(13, 8, 4)):
        torch.testing.assert_close(row, mean_hidden_state(model, ids[:, start:start + 8], one)[0])
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)  # left padding, as for generate
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    torch.testing.assert_close(window_features(model, left, mask, window=8, stride=4)[0], feats, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- the gated model


def random_deltas(model, names, rank=2, seed=0) -> list[Delta]:
    """Random request changes of the q/v projections (what loku.requests keeps per request)."""
    g = torch.Generator().manual_seed(seed)
    layers = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    return [Delta(name, f"{name}.txt",
                  a={n: torch.randn(rank, m.in_features, generator=g) for n, m in layers.items()},
                  b={n: 0.5 * torch.randn(m.out_features, rank, generator=g) for n, m in layers.items()},
                  reads={n: torch.randn(rank, m.in_features, generator=g) for n, m in layers.items()})
            for name in names]


FPR = 0.1


def scalings_untouched(model) -> bool:
    """Every LoRA layer's scale is its float again (the gate's per-row scales were put back)."""
    from peft.tuners.lora import LoraLayer

    return all(isinstance(s, float) for m in model.modules() if isinstance(m, LoraLayer) for s in m.scaling.values())


@pytest.fixture(scope="module")
def gated_setup():
    torch.manual_seed(0)
    base = make_tiny_model("llama")
    deltas = random_deltas(base, ["request-01", "request-02"])
    stacked = stacked_model(base, deltas)
    g = torch.Generator().manual_seed(4)
    # Each request's texts use a narrow vocabulary of their own (like a document's topic), ordinary text the
    # whole vocabulary: the requests' windows are separable from it and from each other.
    texts = {"request-01": torch.randint(3, 13, (12, 24), generator=g),
             "request-02": torch.randint(85, 97, (12, 24), generator=g)}
    benign = torch.randint(3, 97, (300, 24), generator=g)  # 100 calibration, 100 reporting, 100 fresh

    def feats(ids):
        return window_features(stacked, ids, None, window=8, stride=4)

    gate, rates = honest_gate({n: feats(t) for n, t in texts.items()}, feats(benign[:200]), fpr=FPR, shrinkage=0.3)
    return base, deltas, stacked, gate, rates, texts, benign[200:]


def test_gate_off_is_bit_identical_and_all_or_nothing_gates_are_the_stacked_or_original_model(gated_setup):
    base, _, stacked, gate, _, texts, benign = gated_setup
    ids = torch.cat([texts["request-01"][:2], benign[:2], texts["request-02"][:2]])
    with torch.no_grad():
        ungated = stacked(input_ids=ids).logits
        assert torch.equal(GatedModel(stacked, gate, enabled=False)(input_ids=ids).logits, ungated)
        everything = dataclasses.replace(gate, thresholds=torch.full((2,), float("inf"), dtype=torch.float64))
        assert torch.equal(GatedModel(stacked, everything)(input_ids=ids).logits, ungated)
        nothing = dataclasses.replace(gate, thresholds=torch.full((2,), float("-inf"), dtype=torch.float64))
        assert torch.equal(GatedModel(stacked, nothing)(input_ids=ids).logits, base(input_ids=ids).logits)
    assert stacked.base_model.active_adapters == ["request-01", "request-02"], "restored after the call"
    assert scalings_untouched(stacked)


def test_gate_applies_each_request_adapter_only_to_its_own_inputs(gated_setup):
    base, deltas, stacked, gate, rates, texts, benign = gated_setup
    assert rates["true_positive_rate"] == {"request-01": 1.0, "request-02": 1.0}
    ids = torch.cat([texts["request-01"][:2], texts["request-02"][:2]])
    gated = GatedModel(stacked, gate)
    with torch.no_grad():
        out = gated(input_ids=ids).logits
        only_first = apply_deltas(base, deltas[:1])(input_ids=ids[:2]).logits
        only_second = apply_deltas(base, deltas[1:])(input_ids=ids[2:]).logits
    assert gated.last_decisions.tolist() == [[True, False], [True, False], [False, True], [False, True]]
    torch.testing.assert_close(out[:2], only_first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:], only_second, atol=1e-5, rtol=1e-5)


def test_ordinary_text_around_a_forget_prompt_does_not_switch_the_adapter_off(gated_setup):
    """§8 pitfall: a mean over the whole input is diluted by a benign preamble (the adapter switched on for
    0 of 8 prompts); the most in-distribution window is not. Prompts alone, preamble + prompt and prompt +
    suffix all get their request's adapter; fresh ordinary text at about the calibrated rate."""
    base, deltas, stacked, gate, rates, texts, benign = gated_setup
    gated = GatedModel(stacked, gate)
    prompts, padding = texts["request-01"][:, :8], benign[:12]  # 8-token prompts, 24 tokens of ordinary text
    for name, ids in (("prompt", prompts), ("preamble", torch.cat([padding, prompts], 1)),
                      ("suffix", torch.cat([prompts, padding], 1)), ("long preamble", torch.cat([padding] * 3 + [
                          prompts], 1)[:, -64:])):
        assert gated.route(ids)[:, 0].tolist() == [1.0] * 12, name
    fresh = gated.route(benign).gt(0).double().mean(dim=0)  # per request: each calibrated for FPR on its own
    reported = torch.tensor([rates["false_positive_rate"][n] for n in gate.names])
    assert float(fresh.max()) <= 2 * FPR and float(reported.max()) <= 2 * FPR, (fresh, reported)
    # Generation decided from a diluted prompt runs request 1's adapter (the text's own) and not request 2's.
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    diluted = torch.cat([padding[:3], prompts[:3]], 1)
    assert torch.equal(gated.generate(diluted, **options), apply_deltas(base, deltas[:1]).generate(diluted, **options))


def test_a_continued_sequence_keeps_the_decision_of_its_prompt(gated_setup):
    """Decode steps see one new token (which alone may look ordinary): the decision of the call that started
    the KV cache stands, as GatedModel.generate decides once from the prompt."""
    base, deltas, stacked, gate, _, texts, benign = gated_setup
    gated, own = GatedModel(stacked, gate), apply_deltas(base, deltas[:1])
    prompt, step = texts["request-01"][:1, :8], benign[:1, :1]
    with torch.no_grad():
        first = gated(input_ids=prompt, use_cache=True)
        assert gated.last_decisions.tolist() == [[True, False]]
        cached = first.past_key_values
        nxt = gated(input_ids=step, past_key_values=cached, use_cache=True).logits
        expected = own(input_ids=torch.cat([prompt, step], 1)).logits[:, -1:]
    torch.testing.assert_close(nxt, expected, atol=1e-5, rtol=1e-5)


def test_soft_gate_scales_each_adapter_by_its_weight(gated_setup):
    """O3's soft gate: row n runs with request k's change scaled by w[n, k]."""
    base, deltas, stacked, gate, _, texts, _ = gated_setup
    gated = GatedModel(stacked, dataclasses.replace(gate, mode="soft"))
    ids = texts["request-01"][:2]
    weights = torch.tensor([[0.3, 0.0], [1.0, 0.6]], dtype=torch.float64)
    with torch.no_grad(), gated.weighted(weights):
        out = stacked(input_ids=ids).logits
    for row, (w1, w2) in enumerate(weights.tolist()):
        scaled = [dataclasses.replace(d, b={n: w * b for n, b in d.b.items()}) for d, w in zip(deltas, (w1, w2))]
        torch.testing.assert_close(out[row], apply_deltas(base, scaled)(input_ids=ids[row:row + 1]).logits[0],
                                   atol=1e-5, rtol=1e-5)
    assert scalings_untouched(stacked)
    # The soft gate never applies an adapter where the hard one would not calibrate for twice the rate, and gives
    # the full weight exactly where the hard gate switches the adapter on.
    soft = gated.gate.weights(window_features(stacked, torch.cat([ids, texts["request-02"][:2]]), None,
                                              window=8, stride=4))
    assert soft.tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]


def test_a_merged_model_cannot_be_gated(gated_setup):
    base, deltas, _, gate, *_ = gated_setup
    with pytest.raises(ConfigError, match="stack or orthogonal"):
        GatedModel(apply_deltas(base, deltas), gate)


# --------------------------------------------------------------------------- saved with the output


def saved_output(tmp_path, gated_setup):
    """An output folder as loku.requests.write_requests lays it out: adapters/, their record, gate/."""
    from loku.models import model_fingerprint

    base, _, stacked, gate, rates, _, _ = gated_setup
    out = tmp_path / "out"
    stacked.save_pretrained(out / "adapters", safe_serialization=True)
    (out / "adapters" / "loku_requests.json").write_text(json.dumps(
        {"base_model": "tiny", "base_fingerprint": model_fingerprint(base), "adapters": gate.names}))
    save_gate(gate, out / GATE_DIR, adapter_fingerprints(stacked, gate.names), rates)
    return out


def test_saved_gate_loads_back_and_routes_as_the_fitted_one(gated_setup, tmp_path):
    base, _, stacked, gate, _, texts, benign = gated_setup
    out = saved_output(tmp_path, gated_setup)
    loaded = GatedModel.from_pretrained(out, model=make_tiny_model("llama"))
    for field in ("means", "precision", "thresholds", "soft_zeros"):
        assert torch.equal(getattr(loaded.gate, field), getattr(gate, field).double())
    assert (loaded.gate.names, loaded.gate.window, loaded.gate.mode) == (gate.names, gate.window, gate.mode)
    ids = torch.cat([texts["request-01"][:2, :8], benign[:2, :8], texts["request-02"][:2, :8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, GatedModel(stacked, gate)(input_ids=ids).logits,
                                   atol=1e-6, rtol=0)
    assert loaded.last_decisions.tolist() == GatedModel(stacked, gate).route(ids).gt(0).tolist()
    assert GatedModel.from_pretrained(out, model=make_tiny_model("llama"), mode="soft").gate.mode == "soft"


def test_a_gate_that_does_not_match_its_adapters_is_refused(gated_setup, tmp_path):
    base, deltas, _, gate, *_ = gated_setup
    out = saved_output(tmp_path, gated_setup)
    other = stacked_model(base, random_deltas(base, gate.names, seed=9))  # the same names, other adapters
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    shutil.rmtree(out / "adapters" / "request-02")
    shutil.copytree(tmp_path / "other" / "request-02", out / "adapters" / "request-02")
    with pytest.raises(ConfigError, match="fitted for other adapters .*request-02 differ"):
        GatedModel.from_pretrained(out, model=make_tiny_model("llama"))
    shutil.rmtree(out / "adapters")
    with pytest.raises(ConfigError, match="a gate without its adapters"):
        GatedModel.from_pretrained(out, model=make_tiny_model("llama"))
    with pytest.raises(ConfigError, match="no gate"):
        GatedModel.from_pretrained(tmp_path / "other", model=make_tiny_model("llama"))


# --------------------------------------------------------------------------- loku unlearn -> loku eval


def test_unlearn_saves_the_gate_and_eval_routes_through_it(memorized, tmp_path, capsys):
    """`loku unlearn --gate-fpr` writes OUT/gate; `loku eval --model OUT` evaluates each text through it (the
    same numbers as routing each text by hand), `--no-gate` the merged model; a gate that does not match
    the folder's adapters is one clear error, exit 2."""
    from loku.cli import main
    from loku.metrics import memorization_accuracy

    lines = (memorized / "forget.txt").read_text().splitlines()
    (tmp_path / "a.txt").write_text("\n".join(lines[:2]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(lines[2:]) + "\n")
    out, data = tmp_path / "out", tmp_path / "data"
    main(["unlearn", "--model", str(memorized / "base"), "--forget", str(tmp_path / "a.txt"), "--forget",
          str(tmp_path / "b.txt"), "--retain", str(memorized / "retain.txt"), "--validation",
          str(memorized / "validation.txt"), "--strategy", "stack", "--rank", "4", "--lora-alpha", "8", "--lr", "1e-2",
          "--batch-size", "2", "--max-epochs", "2", "--no-progress", "--ma-threshold", "0.5", "--el-threshold", "0.5",
          "--gate-fpr", "0.5", "--gate-window", "6", "--out", str(out)])
    spec = json.loads((out / GATE_DIR / "gate.json").read_text())
    assert spec["window"] == 6 and set(spec["adapters"]) == {"request-01", "request-02"}
    (data / "tdec" / "eval").mkdir(parents=True)
    (data / "tdec" / "eval" / "pile.csv").write_text("text\n" + (memorized / "retain.txt").read_text())

    def evaluate(*extra):
        folder = tmp_path / f"eval{len(extra)}"
        code = main(["eval", "--model", str(out), "--suite", "tdec", "--forget", str(tmp_path / "a.txt"), "--data-dir",
                     str(data), "--out", str(folder), "--no-progress", *extra])
        return code, folder

    code, folder = evaluate()
    gated_eval = json.loads((folder / "eval.json").read_text())
    assert code == 0 and gated_eval["meta"]["gate"]["routed"] is True
    from loku.models import load_model

    base, tokenizer = load_model(str(memorized / "base"), progress=False)
    gated = GatedModel.from_pretrained(out, model=base)
    by_hand = []
    for text in lines[:2]:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad(), gated.weighted(gated.route(ids)):
            by_hand.append(float(memorization_accuracy(gated.model, ids)[0]))
    assert gated_eval["suites"]["tdec"]["forget"]["per_item"]["ma"] == pytest.approx(by_hand, abs=1e-6)

    code, folder = evaluate("--no-gate")
    merged_eval = json.loads((folder / "eval.json").read_text())
    assert code == 0 and merged_eval["meta"]["gate"]["routed"] is False
    merged, _ = load_model(str(out / "model"), progress=False)
    ids = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"] for t in lines[:2]])
    assert merged_eval["suites"]["tdec"]["forget"]["per_item"]["ma"] == pytest.approx(
        memorization_accuracy(merged, ids).tolist(), abs=1e-6)

    spec["adapters"]["request-01"] = "0" * 64  # a gate fitted for other adapters
    (out / GATE_DIR / "gate.json").write_text(json.dumps(spec))
    capsys.readouterr()
    code, _ = evaluate()
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("loku: error:") and "fitted for other adapters" in err and "request-01" in err
