"""Losses (docs/algorithms.md §1): IHL value and gradient against the closed form of the paper's
appendix E, masking, float32 math for bf16 logits, GA/GD/NPO/KL against hand formulas."""
from __future__ import annotations

import math

import pytest
import torch

from loku.losses import (
    FORGET_TERMS,
    RETAIN_TERMS,
    inverted_hinge_loss,
    kl_to_reference,
    mean_nll,
    needs_reference,
    reference_sides,
    npo_loss,
    unlearning_loss,
)
from tiny_models import make_tiny_model, random_sequences


def ihl_by_definition(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 + p(x_t) - max_{v != x_t} p(v), averaged over unmasked tokens, one token at a time."""
    values = []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            p = torch.softmax(logits[b, t].double(), dim=-1)
            others = torch.cat([p[:target], p[target + 1:]])
            values.append(max(0.0, 1 + float(p[target]) - float(others.max())))
    return torch.tensor(sum(values) / len(values))


def masked_labels(shape, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[0, -3:] = -100  # padding at the end of a row
    labels[1, 2] = -100  # a masked token inside a row
    return labels


def test_ihl_value_matches_definition():
    logits = torch.randn(3, 7, 11) * 3
    labels = masked_labels((3, 7), 11)
    assert inverted_hinge_loss(logits, labels).item() == pytest.approx(ihl_by_definition(logits, labels).item(), abs=1e-6)


def test_ihl_is_low_for_a_token_far_below_the_runner_up_and_high_for_a_memorized_one():
    logits = torch.tensor([[[0.0, 10.0, 0.0], [0.0, 0.0, 0.0]]])
    forgotten = inverted_hinge_loss(logits, torch.tensor([[0, 0]]))  # p(label 0) ~ 0, runner-up ~ 1
    memorized = inverted_hinge_loss(logits, torch.tensor([[0, 1]]))  # p(label 1) ~ 1, runner-up ~ 0
    assert forgotten.item() < 1e-3 and memorized.item() > 1.99


def test_ihl_gradient_matches_closed_form_of_appendix_e():
    vocab = 13
    logits = (torch.randn(2, 6, vocab) * 2).requires_grad_(True)
    labels = masked_labels((2, 6), vocab, seed=1)
    inverted_hinge_loss(logits, labels).backward()
    n_tokens = int((labels[:, 1:] != -100).sum())
    for b in range(2):
        assert torch.all(logits.grad[b, -1] == 0), "the last position predicts nothing"
        for t in range(5):
            target = int(labels[b, t + 1])
            if target == -100:
                assert torch.all(logits.grad[b, t] == 0), "masked tokens must get no gradient"
                continue
            p = torch.softmax(logits[b, t].detach().double(), dim=-1)
            p_t = p[target]
            runner = int(torch.cat([p[:target], torch.tensor([-1.0], dtype=p.dtype), p[target + 1:]]).argmax())
            p_v = p[runner]
            expected = p * (p_v - p_t)  # every other token
            expected[target] = p_t * (1 - p_t + p_v)
            expected[runner] = -p_v * (1 - p_v + p_t)
            torch.testing.assert_close(logits.grad[b, t].double(), expected / n_tokens, atol=1e-7, rtol=1e-5)


def test_ihl_takes_runner_up_when_the_label_is_the_top_token():
    logits = torch.tensor([[[5.0, 3.0, 0.0], [0.0, 0.0, 0.0]]])
    p = torch.softmax(logits[0, 0], -1)
    assert inverted_hinge_loss(logits, torch.tensor([[0, 0]])).item() == pytest.approx(float(1 + p[0] - p[1]), abs=1e-6)


def test_bf16_logits_give_float32_math():
    logits = torch.randn(2, 5, 17)
    labels = masked_labels((2, 5), 17)
    low = logits.to(torch.bfloat16)
    for fn in (inverted_hinge_loss, mean_nll):
        value = fn(low, labels)
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(fn(low.float(), labels).item(), abs=1e-7)


def test_ga_and_gd_are_the_negated_and_added_language_model_losses():
    model = make_tiny_model("llama")
    forget, retain = random_sequences(2, 9, seed=2), random_sequences(2, 9, seed=3)
    with torch.no_grad():
        nll_f = model(input_ids=forget, labels=forget).loss
        nll_r = model(input_ids=retain, labels=retain).loss
        lf, lr = model(input_ids=forget).logits, model(input_ids=retain).logits
    ga, parts = unlearning_loss("ga", lf, forget, lr, retain)
    assert ga.item() == pytest.approx(-nll_f.item(), rel=1e-5) and "retain" not in parts
    gd, parts = unlearning_loss("ga", lf, forget, lr, retain, retain_term="nll", gamma=0.5, alpha=2.0)
    assert gd.item() == pytest.approx(-0.5 * nll_f.item() + 2.0 * nll_r.item(), rel=1e-5)
    assert parts == pytest.approx({"forget": -nll_f.item(), "retain": nll_r.item()}, rel=1e-5)
    ihl, parts = unlearning_loss("ihl", lf, forget, lr, retain, retain_term="nll")
    assert ihl.item() == pytest.approx(inverted_hinge_loss(lf, forget).item() + nll_r.item(), rel=1e-5)


def test_npo_equals_its_formula_and_is_2_over_beta_log_2_at_the_reference():
    logits = torch.randn(3, 6, 10)
    ref = torch.randn(3, 6, 10)
    labels = masked_labels((3, 6), 10)
    beta = 0.5
    assert npo_loss(ref, ref, labels, beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    logp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    logp_ref = torch.log_softmax(ref, -1)[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    keep = labels[:, 1:] != -100
    ratio = ((logp - logp_ref) * keep).sum(1)
    expected = (2 / beta * torch.log1p(torch.exp(beta * ratio))).mean()
    assert npo_loss(logits, ref, labels, beta).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_retain_term_is_zero_at_the_reference_and_positive_elsewhere():
    ref = torch.randn(2, 5, 9)
    labels = masked_labels((2, 5), 9)
    assert kl_to_reference(ref, ref, labels).item() == pytest.approx(0.0, abs=1e-6)
    moved = ref + torch.randn_like(ref)
    p_ref = torch.softmax(ref[:, :-1], -1)
    kl = (p_ref * (torch.log_softmax(ref[:, :-1], -1) - torch.log_softmax(moved[:, :-1], -1))).sum(-1)
    keep = labels[:, 1:] != -100
    assert kl_to_reference(moved, ref, labels).item() == pytest.approx((kl[keep]).mean().item(), rel=1e-5)


def test_which_methods_need_the_frozen_reference_model():
    from loku.methods import METHODS

    def needs(method, retain_term=None):
        return needs_reference(*METHODS[method].loss_terms(retain_term))

    assert needs("npo") and needs("fila-ihl", "kl") and needs("fila-undial")
    assert not needs("fila-ihl") and not needs("full-gd") and not needs("fila-ihl-margin") and not needs("fila-me")
    assert set(FORGET_TERMS.names()) >= {"ga", "ihl", "npo", "ihl_margin", "undial", "me"}
    assert set(RETAIN_TERMS.names()) >= {"nll", "kl"}
    assert METHODS["full-ga"].loss_terms() == ("ga", "none") and METHODS["full-gd"].loss_terms() == ("ga", "nll")
    # Only the side whose term compares gets a reference forward pass (IHL + KL: retain only).
    assert reference_sides("ihl", "kl") == (False, True) and reference_sides("npo", "nll") == (True, False)
    assert reference_sides("npo", "kl") == (True, True) and reference_sides("ga", "none") == (False, False)
    assert reference_sides("undial", "nll") == (True, False) and reference_sides("ga", "none") == (False, False)
    with pytest.raises(ValueError, match="unknown forget term"):
        unlearning_loss("magic", torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long))


# --------------------------------------------------------------------------- finite optimum at "never seen" (§12)


def per_token_rows(logits: torch.Tensor, labels: torch.Tensor):
    """(b, t, target, p) for every position that predicts an unmasked label; p in float64."""
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            target = int(labels[b, t + 1])
            yield b, t, target, torch.softmax(logits[b, t].detach().double(), dim=-1)


def assert_masked_rows_get_no_gradient(grad: torch.Tensor, labels: torch.Tensor) -> None:
    assert torch.all(grad[:, -1] == 0), "the last position predicts nothing"
    for b, t in (labels[:, 1:] == -100).nonzero().tolist():
        assert torch.all(grad[b, t] == 0), "masked tokens must get no gradient"


def test_margin_hinge_is_zero_once_beaten_by_the_margin_and_has_the_hand_gradient():
    """§12 bounded IHL: max(0, p_t - p_v* + m). Active tokens: IHL's gradient (appendix E); tokens
    already beaten by m: exactly 0 (nothing pushes further), unlike IHL."""
    from loku.losses import margin_hinge_loss

    vocab, margin = 13, 0.2
    logits = torch.randn(2, 6, vocab) * 2
    labels = masked_labels((2, 6), vocab, seed=1)
    # Make some rows forgotten past the margin (label far below the top token), others memorized.
    for b, t, target, _ in per_token_rows(logits, labels):
        if target != -100:
            logits[b, t, target] = -8.0 if (b + t) % 2 == 0 else logits[b, t].max() + 0.1 * t
    logits.requires_grad_(True)
    loss = margin_hinge_loss(logits, labels, margin)
    loss.backward()
    n_tokens = int((labels[:, 1:] != -100).sum())
    expected_value, active_rows = 0.0, 0
    for b, t, target, p in per_token_rows(logits, labels):
        if target == -100:
            continue
        others = p.clone()
        others[target] = -1.0
        runner = int(others.argmax())
        p_t, p_v = p[target], p[runner]
        hinge = float(p_t - p_v + margin)
        if hinge <= 0:
            assert torch.all(logits.grad[b, t] == 0), "a token beaten by the margin must get no gradient"
            continue
        active_rows += 1
        expected_value += hinge
        expected = p * (p_v - p_t)
        expected[target] = p_t * (1 - p_t + p_v)
        expected[runner] = -p_v * (1 - p_v + p_t)
        torch.testing.assert_close(logits.grad[b, t].double(), expected / n_tokens, atol=1e-7, rtol=1e-5)
    assert 0 < active_rows < n_tokens, "the case must hold both active and beaten tokens"
    assert loss.item() == pytest.approx(expected_value / n_tokens, abs=1e-6)
    assert_masked_rows_get_no_gradient(logits.grad, labels)


def test_undial_gradient_is_p_minus_the_adjusted_reference_distribution():
    """§12 UNDIAL: CE(softmax(z0 - beta*onehot(x_t)), p); d/dz = (p - q) / N, none into z0."""
    from loku.losses import undial_loss

    vocab, beta = 11, 3.0
    logits = (torch.randn(2, 6, vocab) * 2).requires_grad_(True)
    ref = (torch.randn(2, 6, vocab) * 2).requires_grad_(True)
    labels = masked_labels((2, 6), vocab, seed=2)
    loss = undial_loss(logits, ref, labels, beta)
    loss.backward()
    assert ref.grad is None or torch.all(ref.grad == 0), "the frozen model's logits are a fixed target"
    n_tokens = int((labels[:, 1:] != -100).sum())
    value = 0.0
    for b, t, target, p in per_token_rows(logits, labels):
        if target == -100:
            continue
        z0 = ref[b, t].detach().double().clone()
        z0[target] -= beta
        q = torch.softmax(z0, dim=-1)
        value += float(-(q * torch.log(p)).sum())
        torch.testing.assert_close(logits.grad[b, t].double(), (p - q) / n_tokens, atol=1e-7, rtol=1e-5)
    assert loss.item() == pytest.approx(value / n_tokens, rel=1e-5)
    assert_masked_rows_get_no_gradient(logits.grad, labels)
    # Its optimum is finite: at p = q the gradient vanishes (the model before unlearning, x_t lowered by beta).
    target_logits = ref.detach().clone()
    target_logits[:, :-1].scatter_add_(2, labels[:, 1:].clamp(min=0)[..., None],
                                       torch.full((2, 5, 1), -beta))
    at_optimum = target_logits.requires_grad_(True)
    undial_loss(at_optimum, ref.detach(), labels, beta).backward()
    assert at_optimum.grad.abs().max() < 1e-6


def test_me_gradient_is_p_minus_uniform_and_the_loss_is_kl_from_uniform():
    """§12 ME: KL(U || p) per forget token; d/dz = (p - 1/V) / N; 0 at the uniform distribution."""
    from loku.losses import uniform_kl_loss

    vocab = 9
    logits = (torch.randn(2, 6, vocab) * 2).requires_grad_(True)
    labels = masked_labels((2, 6), vocab, seed=3)
    loss = uniform_kl_loss(logits, labels)
    loss.backward()
    n_tokens = int((labels[:, 1:] != -100).sum())
    value = 0.0
    for b, t, target, p in per_token_rows(logits, labels):
        if target == -100:
            continue
        value += float((torch.log(torch.tensor(1.0 / vocab, dtype=p.dtype)) - torch.log(p)).sum() / vocab)
        torch.testing.assert_close(logits.grad[b, t].double(), (p - 1.0 / vocab) / n_tokens, atol=1e-7, rtol=1e-5)
    assert loss.item() == pytest.approx(value / n_tokens, rel=1e-5)
    assert_masked_rows_get_no_gradient(logits.grad, labels)
    assert uniform_kl_loss(torch.zeros(1, 4, vocab), torch.ones(1, 4, dtype=torch.long)).item() == pytest.approx(0, abs=1e-6)


def test_new_forget_terms_go_through_unlearning_loss_with_their_options():
    from loku.losses import margin_hinge_loss, undial_loss

    logits, ref = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = masked_labels((2, 5), 7)
    total, parts = unlearning_loss("ihl_margin", logits, labels, ihl_margin=0.3)
    assert parts["forget"] == pytest.approx(float(margin_hinge_loss(logits, labels, 0.3)))
    total, parts = unlearning_loss("undial", logits, labels, ref_forget_logits=ref, undial_beta=30.0)
    assert parts["forget"] == pytest.approx(float(undial_loss(logits, ref, labels, 30.0)))
