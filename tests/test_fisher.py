"""Empirical Fisher (docs/algorithms.md §2) against gradients worked out by hand, and the fast per-sample
pass against the per-sequence autograd reference.

Per-sample loss L(x) = SUM of the sequence's token NLLs (paper Eq. 2); ``batch`` mode (official code)
squares the gradient of the batch's MEAN token NLL and weights it by the batch's token count.
Bigram model: logits at position t are column x_t of W, so dNLL_t/dW[:, x_t] = softmax(W[:, x_t]) - onehot(x_{t+1}).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from loku.data import make_batches
from loku.errors import TrainingDiverged
from loku.fisher import (
    empirical_fisher,
    fisher_bytes,
    fisher_chunks,
    gradient_moments,
    hookable_layers,
    relative_fisher,
    variance_fisher,
)
from loku.lm import is_conv1d
from loku.models import resolve_targets
from tiny_models import make_tiny_model

V = 5


class Bigram(nn.Module):
    """Its weight is no Linear weight: the Fisher takes the per-sequence autograd path."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(V, V, generator=g), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.w[:, input_ids].permute(1, 2, 0))  # [B, T, V]


def hand_gradient(w: torch.Tensor, tokens: list[list[int]], reduction: str) -> torch.Tensor:
    """Gradient of the sum (or mean) of the token NLLs over all predicted tokens of ``tokens`` (no autograd)."""
    grad = torch.zeros_like(w, dtype=torch.float64)
    count = 0
    for seq in tokens:
        for now, nxt in zip(seq[:-1], seq[1:]):
            p = torch.softmax(w[:, now].double(), dim=0)
            p[nxt] -= 1
            grad[:, now] += p
            count += 1
    return grad / count if reduction == "mean" else grad


def batch(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    return make_batches(seqs, len(seqs), pad_id=0)[0]


BATCHES = [[[0, 1, 2, 3], [4, 4, 1]], [[2, 0, 3, 1, 1]]]  # two batches, padding in the first
SEQUENCES = [s for b in BATCHES for s in b]


def test_per_sample_fisher_is_the_mean_of_squared_per_sequence_sum_loss_gradients():
    model = Bigram()
    fisher = empirical_fisher(model, [batch(b) for b in BATCHES], {"w": model.w}, mode="per_sample")["w"]
    expected = sum(hand_gradient(model.w, [s], "sum") ** 2 for s in SEQUENCES) / len(SEQUENCES)
    assert fisher.dtype == torch.float32
    torch.testing.assert_close(fisher.double(), expected, atol=1e-7, rtol=1e-5)
    assert not model.w.requires_grad and model.w.grad is None, "the pass must leave the parameter as it was"


def test_batch_fisher_is_the_official_codes_token_weighted_squared_batch_gradient():
    model = Bigram()
    fisher = empirical_fisher(model, [batch(b) for b in BATCHES], {"w": model.w}, mode="batch")["w"]
    tokens = [sum(len(s) - 1 for s in b) for b in BATCHES]
    expected = sum(n * hand_gradient(model.w, b, "mean") ** 2 for n, b in zip(tokens, BATCHES)) / sum(tokens)
    torch.testing.assert_close(fisher.double(), expected, atol=1e-7, rtol=1e-5)


def test_per_sample_and_batch_differ_when_a_batch_holds_several_sequences():
    model = Bigram()
    data = [batch(b) for b in BATCHES]
    per_sample = empirical_fisher(model, data, {"w": model.w}, mode="per_sample")["w"]
    batched = empirical_fisher(model, data, {"w": model.w}, mode="batch")["w"]
    assert not torch.allclose(per_sample, batched, rtol=1e-3)
    # One sequence per batch: batch mode weights g_mean^2 by the token count n, the paper squares g_sum = n g_mean.
    single = [batch([s]) for s in SEQUENCES]
    ps = empirical_fisher(model, single, {"w": model.w}, mode="per_sample")["w"]
    bt = empirical_fisher(model, single, {"w": model.w}, mode="batch")["w"]
    counts = [len(s) - 1 for s in SEQUENCES]
    means = [hand_gradient(model.w, [s], "mean") for s in SEQUENCES]
    torch.testing.assert_close(bt.double(), sum(n * g ** 2 for n, g in zip(counts, means)) / sum(counts),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ps.double(), sum((n * g) ** 2 for n, g in zip(counts, means)) / len(means),
                               rtol=1e-5, atol=1e-7)


class EmbedHead(nn.Module):
    """logits_t = W e(x_t) with W a Linear [V, D]: dL(x)/dW = sum_t (softmax(W e_t) - onehot(x_{t+1})) e_t^T."""

    def __init__(self, vocab: int = 7, dim: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))


def test_linear_weight_fisher_uses_the_sum_loss_of_each_sequence_in_a_padded_batch():
    """Two sequences of different lengths in ONE padded batch, expected value worked out by hand."""
    model = EmbedHead()
    seqs = [[1, 2, 3, 4, 5, 6, 0, 2], [3, 1, 4]]
    fisher = empirical_fisher(model, [batch(seqs)], {"head": model.head.weight})["head"]
    w, e = model.head.weight.detach().double(), model.embed.weight.detach().double()

    def grad(seq: list[int]) -> torch.Tensor:  # gradient of the sequence's summed token NLL
        g = torch.zeros_like(w)
        for now, nxt in zip(seq[:-1], seq[1:]):
            p = torch.softmax(w @ e[now], dim=0)
            p[nxt] -= 1
            g += torch.outer(p, e[now])
        return g

    expected = sum(grad(s) ** 2 for s in seqs) / len(seqs)
    torch.testing.assert_close(fisher.double(), expected, rtol=1e-5, atol=1e-8)
    # The data discriminates: the mean-loss Fisher (the old definition) is a different number.
    mean_loss = sum((grad(s) / (len(s) - 1)) ** 2 for s in seqs) / len(seqs)
    assert not torch.allclose(mean_loss, expected, rtol=1e-2)
    assert hookable_layers(model, {"head": model.head.weight}) == {"head": model.head}  # the fast path ran


def padded_batches(seed: int = 0, batch_size: int = 3) -> list[dict[str, torch.Tensor]]:
    """Sequences of uneven lengths (3..16 tokens), right-padded, so most batches hold padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 16, 9, 3, 12, 7, 14]
    return make_batches([torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths], batch_size, 0)


def assert_same_fisher(fast: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], rtol: float = 1e-5):
    """Relative to the reference's largest entry (entries near 0 carry cancellation noise), per tensor."""
    assert fast.keys() == reference.keys()
    for name, ref in reference.items():
        assert fast[name].shape == ref.shape and fast[name].dtype == torch.float32
        scale = ref.abs().max()
        assert scale > 0, name
        assert (fast[name] - ref).abs().max() <= rtol * scale, name


def target_weights(model, peft: bool) -> dict[str, nn.Parameter]:
    """The QV+FFN weights: plain, or the base layers of a LoRA-wrapped model as loku.initializers passes them."""
    targets = resolve_targets(model, "qv-ffn")
    if peft:
        conv = any(is_conv1d(m) for n, m in model.named_modules() if n in targets)
        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets,
                                                 fan_in_fan_out=conv))
        modules = dict(model.get_base_model().named_modules())
        return model, {t: modules[t].get_base_layer().weight for t in targets}
    modules = dict(model.named_modules())
    return model, {t: modules[t].weight for t in targets}


@pytest.mark.parametrize("arch", ["llama", "gpt_neo", "gpt2"])
@pytest.mark.parametrize("peft", [False, True])
@pytest.mark.parametrize("tile", [None, 100])
def test_one_pass_per_sample_fisher_equals_the_per_sequence_autograd_reference(arch, peft, tile, monkeypatch):
    """tile=100: the per-sample gradients in blocks of 1-3 rows (a last, shorter block included), as
    SmolLM2-sized layers take them; None: the tiny layers fit one block."""
    if tile is not None:
        monkeypatch.setattr("loku.fisher.TILE_ELEMENTS", tile)
    model, weights = target_weights(make_tiny_model(arch), peft)
    norm = next(n for n, p in model.named_parameters() if p.dim() == 1 and ("norm" in n or "ln_" in n))
    params = {**weights, norm: dict(model.named_parameters())[norm]}  # not a Linear weight: the loop path
    hooked = hookable_layers(model, params)
    assert set(hooked) == set(weights) and norm not in hooked  # else the test would compare the loop to itself
    requires = {n: p.requires_grad for n, p in params.items()}
    data = padded_batches()
    fast_second, fast_first, fast_n = gradient_moments(model, data, params, first_moment=True)
    ref_second, ref_first, ref_n = gradient_moments(model, data, params, mode="per_sample_loop", first_moment=True)
    assert fast_n == ref_n == 7
    assert_same_fisher(fast_second, ref_second)
    assert_same_fisher(fast_first, ref_first)
    # The hooks are gone and the parameters are as they were.
    assert all(not m._forward_hooks for m in model.modules())
    assert {n: p.requires_grad for n, p in params.items()} == requires and all(p.grad is None for p in params.values())


def test_per_sample_fisher_does_not_depend_on_the_batch_size():
    model = make_tiny_model("llama")
    _, weights = target_weights(model, peft=False)
    one = empirical_fisher(model, padded_batches(batch_size=1), weights)
    seven = empirical_fisher(model, padded_batches(batch_size=7), weights)
    assert_same_fisher(seven, one)


class Shared(nn.Module):
    """A Linear applied twice per forward: its per-sample gradient sums two uses, which the hooks do not do."""

    def __init__(self, vocab: int = 11, dim: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.twice = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(torch.tanh(self.twice(torch.tanh(self.twice(self.embed(input_ids)))))))


def test_a_layer_called_twice_falls_back_to_the_reference_path():
    model = Shared()
    params = {"twice": model.twice.weight, "head": model.head.weight, "bias": model.head.bias}
    g = torch.Generator().manual_seed(1)
    data = make_batches([torch.randint(0, 11, (n,), generator=g).tolist() for n in (4, 9, 6, 2)], 2, 0)
    fast = empirical_fisher(model, data, params)
    reference = empirical_fisher(model, data, params, mode="per_sample_loop")
    assert_same_fisher(fast, reference)
    assert all(not m._forward_hooks for m in model.modules())


def test_chunked_fisher_equals_one_pass_exactly():
    model = make_tiny_model("llama")
    _, weights = target_weights(model, peft=False)
    data = padded_batches()
    whole = empirical_fisher(model, data, weights)
    budget = fisher_bytes(weights) // 3
    chunks = fisher_chunks(weights, budget)
    assert len(chunks) >= 3 and [n for c in chunks for n in c] == list(weights)
    assert all(fisher_bytes(c) <= budget for c in chunks)
    for chunk in chunks:
        part = empirical_fisher(model, data, chunk)
        assert part.keys() == chunk.keys()
        for name, value in part.items():
            assert torch.equal(value, whole[name]), name


def test_fisher_bytes_counts_float32_buffers_and_chunks_cover_every_parameter():
    params = {"a": torch.zeros(10, 4), "b": torch.zeros(3, 3, dtype=torch.bfloat16), "c": torch.zeros(100)}
    assert fisher_bytes(params) == 2 * 4 * (40 + 9 + 100)
    assert fisher_bytes(params, sets=1, first_moment=True) == 2 * 4 * 149
    assert fisher_chunks(params, None) == [params]
    chunks = fisher_chunks(params, 2 * 4 * 49)  # a and b fit together; c is over budget alone: its own group
    assert [list(c) for c in chunks] == [["a", "b"], ["c"]]
    with pytest.raises(ValueError):
        fisher_chunks(params, 0)


def test_variance_fisher_subtracts_the_squared_mean_gradient():
    model = Bigram()
    fisher = variance_fisher(model, [batch(b) for b in BATCHES], {"w": model.w})["w"]
    tokens = torch.tensor([sum(len(s) - 1 for s in b) for b in BATCHES], dtype=torch.float64)
    grads = [hand_gradient(model.w, b, "mean") for b in BATCHES]
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


def test_unknown_mode_is_refused():
    model = Bigram()
    with pytest.raises(ValueError, match="fisher mode"):
        empirical_fisher(model, [batch([[0, 1, 2]])], {"w": model.w}, mode="mean")


def test_relative_row_sums_from_moment_sums_equal_the_fisher_ratio_summed_by_row():
    """§2-3: FILA's in-place path (moment sums -> row sums of F_f / (F_r + eps)) against empirical_fisher,
    relative_fisher and sum(dim=1), on a real pass and on a transposed (Conv1D-like) view."""
    from loku.fisher import relative_fisher_rows

    model = make_tiny_model("llama")
    _, weights = target_weights(model, peft=False)
    forget, retain = padded_batches(batch_size=3), padded_batches(batch_size=2)[1:]
    expected_f, expected_r = empirical_fisher(model, forget, weights), empirical_fisher(model, retain, weights)
    s_f, _, n_f = gradient_moments(model, forget, weights)
    s_r, _, n_r = gradient_moments(model, retain, weights)
    assert n_f != n_r  # the two sets' own counts must be used
    for name in weights:
        ratio, share = relative_fisher(expected_f[name], expected_r[name], eps=1e-5)
        for view in (lambda t: t, lambda t: t.T.contiguous().T):  # a strided view sums the same rows
            rows, got_share = relative_fisher_rows(view(s_f[name].clone()), n_f, view(s_r[name].clone()), n_r,
                                                   1e-5, name=name)
            assert rows.shape == (ratio.shape[0], 1) and got_share == pytest.approx(share)
            torch.testing.assert_close(rows, ratio.sum(dim=1, keepdim=True), rtol=1e-6, atol=0)


@pytest.mark.parametrize("role", ["forget", "retain"])
def test_relative_row_sums_refuse_a_non_finite_fisher_naming_the_weight(role):
    from loku.fisher import relative_fisher_rows

    sums = {"forget": torch.ones(3, 4), "retain": torch.ones(3, 4)}
    sums[role][1, 2] = float("inf")  # an inf retain entry would otherwise vanish from the ratio as 0
    with pytest.raises(TrainingDiverged, match=rf"Fisher of layer\.q \(Fisher \({role}\)\)"):
        relative_fisher_rows(sums["forget"], torch.tensor(2.0), sums["retain"], torch.tensor(2.0), name="layer.q")
