"""Empirical Fisher (ALGORITHMS.md §2) against gradients worked out by hand on a bigram model:
logits at position t are column x_t of W, so dNLL/dW[:, x_t] = softmax(W[:, x_t]) - onehot(x_{t+1})."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from loku.data import make_batches
from loku.errors import TrainingDiverged
from loku.fisher import empirical_fisher, relative_fisher, variance_fisher

V = 5


class Bigram(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(V, V, generator=g), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.w[:, input_ids].permute(1, 2, 0))  # [B, T, V]


def hand_gradient(w: torch.Tensor, tokens: list[list[int]]) -> torch.Tensor:
    """Gradient of the mean token NLL over all predicted tokens of ``tokens`` (no autograd)."""
    grad = torch.zeros_like(w, dtype=torch.float64)
    count = 0
    for seq in tokens:
        for now, nxt in zip(seq[:-1], seq[1:]):
            p = torch.softmax(w[:, now].double(), dim=0)
            p[nxt] -= 1
            grad[:, now] += p
            count += 1
    return grad / count


def batch(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    return make_batches(seqs, len(seqs), pad_id=0)[0]


BATCHES = [[[0, 1, 2, 3], [4, 4, 1]], [[2, 0, 3, 1, 1]]]  # two batches, padding in the first


def test_per_sample_fisher_is_the_mean_of_squared_per_sequence_gradients():
    model = Bigram()
    fisher = empirical_fisher(model, [batch(b) for b in BATCHES], {"w": model.w}, mode="per_sample")["w"]
    sequences = [s for b in BATCHES for s in b]
    expected = sum(hand_gradient(model.w, [s]) ** 2 for s in sequences) / len(sequences)
    assert fisher.dtype == torch.float32
    torch.testing.assert_close(fisher.double(), expected, atol=1e-7, rtol=1e-5)
    assert not model.w.requires_grad and model.w.grad is None, "the pass must leave the parameter as it was"


def test_batch_fisher_is_the_official_codes_token_weighted_squared_batch_gradient():
    model = Bigram()
    fisher = empirical_fisher(model, [batch(b) for b in BATCHES], {"w": model.w}, mode="batch")["w"]
    tokens = [sum(len(s) - 1 for s in b) for b in BATCHES]
    expected = sum(n * hand_gradient(model.w, b) ** 2 for n, b in zip(tokens, BATCHES)) / sum(tokens)
    torch.testing.assert_close(fisher.double(), expected, atol=1e-7, rtol=1e-5)


def test_per_sample_and_batch_differ_when_a_batch_holds_several_sequences():
    model = Bigram()
    data = [batch(b) for b in BATCHES]
    per_sample = empirical_fisher(model, data, {"w": model.w}, mode="per_sample")["w"]
    batched = empirical_fisher(model, data, {"w": model.w}, mode="batch")["w"]
    assert not torch.allclose(per_sample, batched, rtol=1e-3)
    # With one sequence per batch the two differ only by the token weighting.
    single = [batch([s]) for b in BATCHES for s in b]
    ps = empirical_fisher(model, single, {"w": model.w}, mode="per_sample")["w"]
    bt = empirical_fisher(model, single, {"w": model.w}, mode="batch")["w"]
    weights = torch.tensor([len(s) - 1 for b in BATCHES for s in b], dtype=torch.float64)
    grads = [hand_gradient(model.w, [s]) ** 2 for b in BATCHES for s in b]
    torch.testing.assert_close(bt.double(), sum(w * g for w, g in zip(weights, grads)) / weights.sum(), rtol=1e-5,
                               atol=1e-7)
    torch.testing.assert_close(ps.double(), sum(grads) / len(grads), rtol=1e-5, atol=1e-7)


def test_variance_fisher_subtracts_the_squared_mean_gradient():
    model = Bigram()
    fisher = variance_fisher(model, [batch(b) for b in BATCHES], {"w": model.w})["w"]
    tokens = torch.tensor([sum(len(s) - 1 for s in b) for b in BATCHES], dtype=torch.float64)
    grads = [hand_gradient(model.w, b) for b in BATCHES]
    mean = sum(n * g for n, g in zip(tokens, grads)) / tokens.sum()
    second = sum(n * g ** 2 for n, g in zip(tokens, grads)) / tokens.sum()
    torch.testing.assert_close(fisher.double(), (second - mean ** 2).clamp(min=0), atol=1e-6, rtol=1e-4)


def test_relative_fisher_and_the_share_where_eps_dominates():
    forget = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    retain = torch.tensor([[1e-9, 1.0], [1e-3, 0.0]])
    ratio, share = relative_fisher(forget, retain, eps=1e-5)
    torch.testing.assert_close(ratio, forget / (retain + 1e-5))
    assert share == pytest.approx(0.5)  # 1e-9 and 0.0 sit below eps


def test_non_finite_fisher_is_an_error_naming_the_weight():
    model = Bigram()
    with torch.no_grad():
        model.w[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="Fisher of w"):
        empirical_fisher(model, [batch([[0, 1, 2]])], {"w": model.w})
