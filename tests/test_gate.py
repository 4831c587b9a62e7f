"""The gate (docs/algorithms.md §8): Mahalanobis distance of the mean last-layer hidden state to each
request's forget set, thresholds calibrated on held-out text, and a hard switch of each request's adapter."""
from __future__ import annotations

import pytest
import torch

from loku.errors import ConfigError
from loku.gate import (GatedModel, calibrate_threshold, features_of, fit_gate, fit_shared_gaussian, gate_rates,
                       mahalanobis, mean_hidden_state)
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
    # Fewer rows than dimensions: the raw covariance is singular, the shrunk one is not.
    few = [torch.randn(3, 16, generator=g), torch.randn(2, 16, generator=g)]
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
    # With the identity it is the Euclidean distance.
    torch.testing.assert_close(mahalanobis(x, mu, torch.eye(4)), torch.cdist(x.double(), mu.double()))


def test_calibrated_threshold_keeps_the_heldout_false_positive_rate_at_most_the_target_and_is_the_largest():
    g = torch.Generator().manual_seed(2)
    heldout = torch.rand(200, generator=g, dtype=torch.float64)
    for fpr in (0.0, 0.01, 0.05, 0.2, 0.5):
        t = calibrate_threshold(heldout, fpr)
        accepted = int((heldout <= t).sum())
        assert accepted <= fpr * len(heldout)
        # The next distance up would accept one more than allowed: t is the largest such threshold.
        assert int((heldout <= heldout[heldout > t].min()).sum()) > fpr * len(heldout)
    assert calibrate_threshold(heldout, 1.0) == float("inf")
    ties = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    assert int((ties <= calibrate_threshold(ties, 0.5)).sum()) == 0, "ties at the cut are all left out"
    with pytest.raises(ConfigError, match="false-positive rate"):
        calibrate_threshold(heldout, 1.2)


def test_gate_on_separated_clusters_rates():
    g = torch.Generator().manual_seed(3)
    forget = {"r1": torch.randn(50, 8, generator=g) + 6, "r2": torch.randn(50, 8, generator=g) - 6}
    calibration, heldout = torch.randn(400, 8, generator=g), torch.randn(4000, 8, generator=g)
    gate = fit_gate(forget, calibration, fpr=0.05, shrinkage=0.1)
    rates = gate_rates(gate, heldout, forget)
    assert rates["true_positive_rate"] == {"r1": 1.0, "r2": 1.0}
    for name in ("r1", "r2"):  # fresh held-out text: close to the target rate, not above it by much
        assert rates["false_positive_rate"][name] <= 0.08
    assert gate_rates(gate, calibration, forget)["false_positive_rate"]["r1"] <= 0.05


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


@pytest.fixture(scope="module")
def gated_setup():
    torch.manual_seed(0)
    base = make_tiny_model("llama")
    deltas = random_deltas(base, ["request-01", "request-02"])
    stacked = stacked_model(base, deltas)
    g = torch.Generator().manual_seed(4)
    # Each request's texts use a narrow vocabulary of their own (like a document's topic), held-out text
    # the whole vocabulary (general text): the requests' inputs are separable from it and from each other.
    texts = {"request-01": torch.randint(3, 13, (12, 12), generator=g),
             "request-02": torch.randint(85, 97, (12, 12), generator=g)}
    heldout = torch.randint(3, 97, (24, 12), generator=g)
    batches = {n: [{"input_ids": t, "attention_mask": torch.ones_like(t)}] for n, t in texts.items()}
    forget = {n: features_of(stacked, b) for n, b in batches.items()}
    calibrate = features_of(stacked, [{"input_ids": heldout[:12], "attention_mask": torch.ones_like(heldout[:12])}])
    gate = fit_gate(forget, calibrate, fpr=0.1, shrinkage=0.3)
    return base, deltas, stacked, gate, texts, heldout


def test_gate_features_come_from_the_model_with_adapters_off(gated_setup):
    base, _, stacked, _, texts, _ = gated_setup
    ids = texts["request-01"][:3]
    mask = torch.ones_like(ids)
    torch.testing.assert_close(mean_hidden_state(stacked, ids, mask), mean_hidden_state(base, ids, mask),
                               atol=0, rtol=0)
    # Padded positions do not count.
    padded = torch.cat([ids, torch.zeros(3, 4, dtype=ids.dtype)], dim=1)
    pmask = torch.cat([mask, torch.zeros(3, 4, dtype=mask.dtype)], dim=1)
    torch.testing.assert_close(mean_hidden_state(base, padded, pmask), mean_hidden_state(base, ids, mask),
                               atol=1e-5, rtol=1e-5)


def test_gate_off_is_bit_identical_and_all_or_nothing_gates_are_the_stacked_or_original_model(gated_setup):
    base, deltas, stacked, gate, texts, heldout = gated_setup
    ids = torch.cat([texts["request-01"][:2], heldout[12:14], texts["request-02"][:2]])
    with torch.no_grad():
        ungated = stacked(input_ids=ids).logits
        off = GatedModel(stacked, gate, enabled=False)(input_ids=ids).logits
        assert torch.equal(off, ungated), "gate off: the ungated model, bit for bit"
        everything = dataclass_replace(gate, thresholds=torch.full((2,), float("inf"), dtype=torch.float64))
        assert torch.equal(GatedModel(stacked, everything)(input_ids=ids).logits, ungated)
        nothing = dataclass_replace(gate, thresholds=torch.full((2,), float("-inf"), dtype=torch.float64))
        assert torch.equal(GatedModel(stacked, nothing)(input_ids=ids).logits, base(input_ids=ids).logits)
        assert stacked.base_model.active_adapters == ["request-01", "request-02"], "restored after the call"


def test_gate_applies_each_request_adapter_only_to_its_own_inputs(gated_setup):
    base, deltas, stacked, gate, texts, heldout = gated_setup
    fresh = heldout[12:]  # not used in calibration
    rates = gate_rates(gate, features_of(stacked, [{"input_ids": fresh, "attention_mask": torch.ones_like(fresh)}]),
                       {n: features_of(stacked, [{"input_ids": t, "attention_mask": torch.ones_like(t)}])
                        for n, t in texts.items()})
    assert rates["true_positive_rate"] == {"request-01": 1.0, "request-02": 1.0}
    assert rates["false_positive_rate"]["any"] <= 0.25
    ids = torch.cat([texts["request-01"][:2], texts["request-02"][:2]])
    gated = GatedModel(stacked, gate)
    with torch.no_grad():
        out = gated(input_ids=ids).logits
        only_first = apply_deltas(base, deltas[:1])(input_ids=ids[:2]).logits
        only_second = apply_deltas(base, deltas[1:])(input_ids=ids[2:]).logits
    assert gated.last_decisions.tolist() == [[True, False], [True, False], [False, True], [False, True]]
    torch.testing.assert_close(out[:2], only_first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:], only_second, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[:2], stacked(input_ids=ids[:2]).logits, atol=1e-4), "request 2's adapter is off"


def test_a_merged_model_cannot_be_gated(gated_setup):
    base, deltas, _, gate, _, _ = gated_setup
    with pytest.raises(ConfigError, match="stack or orthogonal"):
        GatedModel(apply_deltas(base, deltas), gate)


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_gated_generation_uses_each_prompts_adapters_and_is_untouched_with_the_gate_off(gated_setup):
    base, deltas, stacked, gate, texts, heldout = gated_setup
    prompts = torch.cat([texts["request-01"][:2, :6], texts["request-02"][:2, :6]])
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    gated = GatedModel(stacked, gate)
    out = gated.generate(prompts, **options)
    assert gated.last_decisions.tolist() == [[True, False], [True, False], [False, True], [False, True]]
    assert torch.equal(out[:2], apply_deltas(base, deltas[:1]).generate(prompts[:2], **options))
    assert torch.equal(out[2:], apply_deltas(base, deltas[1:]).generate(prompts[2:], **options))
    off = GatedModel(stacked, gate, enabled=False).generate(prompts, **options)
    assert torch.equal(off, stacked.generate(input_ids=prompts, **options))
