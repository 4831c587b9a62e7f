"""Initialisers (ALGORITHMS.md §3-5): the FILA solve is exact and optimal, and every initialiser
leaves a whole model computing what it computed before."""
from __future__ import annotations

import pytest
import torch

from loku.config import UnlearnConfig
from loku.data import make_batches
from loku.init import fila_factors, lora_layers, row_weights, truncated_svd, weighted_error
from loku.trainer import adapt_model
from tiny_models import make_tiny_model, random_sequences


def problem(out=24, inp=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=g)
    fisher_rel = torch.rand(out, inp, generator=g) ** 4 * 10  # very uneven row weights
    return weight, fisher_rel


@pytest.mark.parametrize("scaling", [0.5, 2.0])
def test_fila_reconstructs_the_weight_exactly(scaling):
    weight, fisher_rel = problem()
    a, b, w_res = fila_factors(weight, fisher_rel, rank=4, scaling=scaling)
    assert a.shape == (4, 16) and b.shape == (24, 4) and w_res.shape == weight.shape
    torch.testing.assert_close(scaling * b @ a + w_res, weight, atol=1e-5, rtol=1e-5)


def test_fila_is_the_weighted_optimum():
    weight, fisher_rel = problem()
    rank, s = 4, 2.0
    a, b, _ = fila_factors(weight, fisher_rel, rank, s)
    fila_error = weighted_error(weight, fisher_rel, s * b @ a)
    u, sv, vh = truncated_svd(weight, rank)  # the unweighted best rank-4 approximation
    assert fila_error < weighted_error(weight, fisher_rel, u @ torch.diag(sv) @ vh)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        random_factors = torch.randn(24, rank, generator=g) @ torch.randn(rank, 16, generator=g)
        assert fila_error <= weighted_error(weight, fisher_rel, random_factors)
    # Optimality: no small rank-preserving move of the factors lowers the weighted error.
    for _ in range(20):
        moved = s * (b + 1e-2 * torch.randn(b.shape, generator=g)) @ (a + 1e-2 * torch.randn(a.shape, generator=g))
        assert fila_error <= weighted_error(weight, fisher_rel, moved) + 1e-6


def test_uniform_weights_reduce_to_the_plain_svd_and_zero_rows_get_no_adapter():
    weight, _ = problem()
    a, b, _ = fila_factors(weight, torch.ones_like(weight), rank=3, scaling=1.0)
    u, sv, vh = truncated_svd(weight, 3)
    torch.testing.assert_close(b @ a, u @ torch.diag(sv) @ vh, atol=1e-5, rtol=1e-5)
    fisher_rel = torch.ones_like(weight)
    fisher_rel[:5] = 0  # the forget set does not reach these output rows
    _, b, _ = fila_factors(weight, fisher_rel, rank=3, scaling=1.0)
    assert torch.all(b[:5] == 0) and torch.all(row_weights(fisher_rel)[:5] == 0)


def test_randomized_svd_option_matches_exact_on_a_low_rank_weight():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)
    fisher_rel = torch.rand(40, 30, generator=g)
    exact = fila_factors(weight, fisher_rel, 3, 1.0)
    fast = fila_factors(weight, fisher_rel, 3, 1.0, svd="lowrank")
    torch.testing.assert_close(fast[1] @ fast[0], exact[1] @ exact[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt_neo", "gpt2", "phi", "gemma"])
@pytest.mark.parametrize("method", ["fila-ihl", "vila-ihl", "lora-ihl"])
def test_initialisers_preserve_the_models_function(arch, method):
    model = make_tiny_model(arch)
    ids = random_sequences(6, 16, seed=4)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    original = {k: v.clone() for k, v in model.state_dict().items()}
    forget = make_batches(ids[:3].tolist(), 2, 0)
    retain = make_batches(ids[3:].tolist(), 2, 0)
    cfg = UnlearnConfig(forget="f", out="o", method=method, rank=4, lora_alpha=8)
    adapted, targets, stats, residual = adapt_model(model, cfg, forget, retain)
    with torch.no_grad():
        after = adapted(input_ids=ids).logits
    scale = before.abs().max()
    assert (after - before).abs().max() <= 1e-4 * scale, "initialisation must not change the model's outputs"
    layers = lora_layers(adapted)
    assert sorted(layers) == sorted(targets)
    if method == "lora-ihl":
        assert not residual and all(torch.all(l.lora_B["default"].weight == 0) for l in layers.values())
        return
    # FILA/VILA: a real adapter, the residual base replaces W, and the report states the eps share.
    assert set(residual) == {f"{t}.weight" for t in targets}
    changed = [t for t in targets if not torch.equal(residual[f"{t}.weight"], original[f"{t}.weight"])]
    assert changed == targets
    assert all(l.lora_B["default"].weight.abs().sum() > 0 for l in layers.values())
    assert 0.0 <= stats["eps_dominated_share"] <= 1.0 and set(stats["relative_weighted_error"]) == set(targets)
    assert all(0 <= e < 1 for e in stats["relative_weighted_error"].values())
