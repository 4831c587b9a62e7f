"""Attacks an unlearned model should survive (docs/algorithms.md §13; loku.metrics.attacks): the
quantizers against hand-computed roundings, quantization that brings a memorized text back when
the unlearning update sits inside one quantization step, prefix probing, and ``--suite attacks``."""
from __future__ import annotations

import copy
import csv

import pytest
import torch

from loku.errors import ConfigError, DataError
from loku.metrics.attacks import (NF4_CODE, AttackSettings, _quantizable, nf4_indices, prefix_probes,
                                  quantization_attack, quantize_int8_rows, quantize_nf4_blocks, quantized_copy)
from loku.metrics.memorization import memorization_accuracy
from tiny_models import make_tiny_model, memorize, random_sequences, texts_of, word_tokenizer

# ----------------------------------------------------------------------------- the quantizers by hand


def test_int8_rows_by_hand():
    """§13: absmax per row, q = round(w * 127 / absmax), w' = q * absmax / 127."""
    w = torch.tensor([[0.6, -1.0, 0.3, 0.0],
                      [2.0, 0.01, -0.03, 0.9]])
    # row 0: absmax 1 -> 0.6*127 = 76.2 -> 76, 0.3*127 = 38.1 -> 38
    # row 1: absmax 2 -> 127/2 = 63.5: 0.01 -> 0.635 -> 1, -0.03 -> -1.905 -> -2, 0.9 -> 57.15 -> 57
    expected = torch.tensor([[76 / 127, -1.0, 38 / 127, 0.0],
                             [2.0, 1 * 2 / 127, -2 * 2 / 127, 57 * 2 / 127]])
    assert torch.allclose(quantize_int8_rows(w), expected, atol=1e-7, rtol=0)
    assert quantize_int8_rows(torch.zeros(2, 3)).abs().sum() == 0  # an all-zero row stays zero
    assert quantize_int8_rows(w.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="2-D"):
        quantize_int8_rows(torch.ones(4))


def test_nf4_code_is_bitsandbytes():
    assert len(NF4_CODE) == 16 and NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    assert NF4_CODE[14] == pytest.approx(0.7229568362236023) and NF4_CODE[1] == pytest.approx(-0.6961928009986877)
    # nearest code, a tie (midpoint of 0 and 0.0796) to the lower one as the kernel's strict '>' does
    mid = (NF4_CODE[7] + NF4_CODE[8]) / 2
    got = nf4_indices(torch.tensor([0.7, 0.64, -0.45, 0.05, 0.03, -0.95, mid, 1.0, -1.0]))
    assert got.tolist() == [14, 13, 3, 8, 7, 0, 7, 15, 0]


def test_nf4_blocks_of_64_by_hand():
    """Blocks of 64 consecutive values of the row-major flattened weight, each with its own absmax;
    a [2, 96] weight has 3 blocks, the second across the row boundary."""
    w = torch.zeros(2, 96)
    flat = w.view(-1)
    # block 0 (absmax 2): normalized 0.7 -> 0.72296, -0.45 -> -0.39492, 0.05 -> 0.07958, 0.03 -> 0
    flat[0], flat[1], flat[2], flat[3], flat[4] = 2.0, 1.4, -0.9, 0.1, 0.06
    # block 1 (positions 64..127 = row 0 cols 64..95 and row 1 cols 0..31), absmax 0.5 at row 1 col 0
    flat[64], flat[96], flat[127] = -0.2, 0.5, 0.3  # -0.4 -> -0.39492, 0.6 -> 0.56262
    # block 2 (row 1 cols 32..95), absmax 4: -3.8 -> -0.95 -> -1
    flat[128], flat[191] = -3.8, 4.0
    expected = torch.zeros(192)
    expected[0], expected[1], expected[2], expected[3], expected[4] = (
        2.0, 2 * 0.7229568362236023, 2 * -0.39491748809814453, 2 * 0.07958029955625534, 0.0)
    expected[64], expected[96], expected[127] = 0.5 * -0.39491748809814453, 0.5, 0.5 * 0.5626170039176941
    expected[128], expected[191] = -4.0, 4.0
    got = quantize_nf4_blocks(w)
    assert got.shape == (2, 96)
    assert torch.allclose(got.reshape(-1), expected, atol=1e-6, rtol=0)


def test_nf4_short_last_block_is_its_own_block():
    w = torch.zeros(1, 70)
    w[0, 0], w[0, 64], w[0, 69] = 8.0, 0.11, -0.2  # block 1 = the last 6 values, absmax 0.2
    got = quantize_nf4_blocks(w)
    assert got[0, 0] == 8.0 and got[0, 69] == pytest.approx(-0.2)
    assert got[0, 64] == pytest.approx(0.2 * 0.5626170039176941)  # 0.55 -> nearest 0.56262 (midpoint 0.50166)


# ----------------------------------------------------------------------------- models


def test_quantized_copy_leaves_the_model_and_the_output_embedding_alone():
    model = make_tiny_model("llama", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone, names = quantized_copy(model, "nf4")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model changed"
    assert "lm_head" not in names and len(names) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert torch.equal(clone.lm_head.weight, model.lm_head.weight)
    q = clone.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q, quantize_nf4_blocks(model.model.layers[0].self_attn.q_proj.weight))
    gpt2 = make_tiny_model("gpt2", seed=0)
    clone, names = quantized_copy(gpt2, "int8")
    conv = gpt2.transformer.h[0].attn.c_attn.weight  # Conv1D: [in, out], rows of the transpose
    assert torch.equal(clone.transformer.h[0].attn.c_attn.weight, quantize_int8_rows(conv.t()).t())
    with pytest.raises(ConfigError, match="unknown quantization scheme"):
        quantized_copy(model, "int3")


def _cell_bounds(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For an NF4-quantized model: per weight the interval around each value that rounds back to it
    (90% of the way to the neighbouring midpoints; each block's absmax value pinned)."""
    code = torch.tensor(NF4_CODE)
    mid = (code[1:] + code[:-1]) / 2
    below, above = torch.cat([code[:1], mid]), torch.cat([mid, code[-1:]])
    bounds = {}
    for name, module, _ in _quantizable(model):
        w = module.weight.detach().reshape(-1, 64)
        absmax = w.abs().amax(1, keepdim=True)
        idx = nf4_indices(w / absmax)
        c = code[idx]
        lo, hi = (c + 0.9 * (below[idx] - c)) * absmax, (c + 0.9 * (above[idx] - c)) * absmax
        pinned = w.abs() == absmax
        bounds[name] = (torch.where(pinned, w, lo).reshape(module.weight.shape),
                        torch.where(pinned, w, hi).reshape(module.weight.shape))
    return bounds


def test_nf4_brings_back_text_an_update_inside_one_step_suppressed():
    """§13 (Zhang et al.): an unlearning update smaller than the quantization step is undone by
    rounding. A memorizing model on the NF4 grid is 'unlearned' by projected gradient ascent that
    keeps every weight in its rounding cell: MA drops, and the NF4 attack restores it exactly."""
    seqs = random_sequences(4, 16, seed=3)
    planted, _ = quantized_copy(memorize(make_tiny_model("llama", seed=0), seqs, steps=200), "nf4")
    assert memorization_accuracy(planted, seqs).mean() == 1.0
    bounds = _cell_bounds(planted)
    unlearned = copy.deepcopy(planted)
    modules = dict(unlearned.named_modules())
    for _ in range(60):
        unlearned.zero_grad()
        (-unlearned(input_ids=seqs, labels=seqs).loss).backward()
        with torch.no_grad():
            for name, (lo, hi) in bounds.items():
                w = modules[name].weight
                w.add_(-0.01 * w.grad.sign())
                w.copy_(torch.maximum(torch.minimum(w, hi), lo))
    unlearned.eval()
    suppressed = memorization_accuracy(unlearned, seqs).mean().item()
    attacked, _ = quantized_copy(unlearned, "nf4")
    assert suppressed < 0.8, "the update inside the cells should suppress the text"
    assert memorization_accuracy(attacked, seqs).mean().item() == 1.0
    # the same through the attack's report, with the planted model as reference
    tok = word_tokenizer()
    out = quantization_attack(unlearned, tok, texts_of(seqs), reference=planted,
                              settings=AttackSettings(schemes=("nf4",), bitsandbytes=False, batch_size=4))
    assert out["model"]["none"]["ma"] == pytest.approx(suppressed, abs=1e-6)
    assert out["model"]["nf4"]["ma"] == 1.0 == out["reference"]["nf4"]["ma"]
    assert out["model"]["nf4"]["el_10"] == pytest.approx(1.0) and out["layers"] == 14


# ----------------------------------------------------------------------------- prefix probing


@pytest.fixture(scope="module")
def memorizer():
    seqs = random_sequences(3, 20, seed=11)
    return memorize(make_tiny_model("llama", seed=0), seqs, steps=250), seqs


def test_prefix_probes_of_a_memorizing_model(memorizer):
    model, seqs = memorizer
    tok = word_tokenizer()
    settings = AttackSettings(prompt_tokens=4, shift=3, context_tokens=10, batch_size=2)
    context = texts_of(random_sequences(2, 30, seed=12))
    out = prefix_probes(model, tok, texts_of(seqs), context, settings=settings)
    assert out["plain"]["ma"] == 1.0 and out["plain"]["match"] == 1.0 and out["plain"]["el_10"] == 1.0
    # teacher-forced MA of the plain probe = MA of positions 5..20 of the text, counted by hand
    with torch.no_grad():
        predicted = model(input_ids=seqs).logits.argmax(-1)
    by_hand = (predicted[:, 3:-1] == seqs[:, 4:]).float().mean(1)
    assert out["plain"]["per_item"]["ma"] == pytest.approx(by_hand.tolist())
    # the random model has memorized nothing: its continuations rarely match
    fresh = prefix_probes(make_tiny_model("llama", seed=4), tok, texts_of(seqs), context, settings=settings)
    for probe in ("plain", "after_text", "shifted"):
        assert fresh[probe]["match"] < 0.5 and fresh[probe]["el_10"] < 0.5
    assert out["settings"]["context_tokens"] == 10 and out["n"] == 3
    with pytest.raises(DataError, match="fewer than 24 tokens"):
        prefix_probes(model, tok, texts_of(seqs), context, settings=AttackSettings(prompt_tokens=20, shift=3))


def test_the_after_text_probe_puts_the_context_before_the_prompt(memorizer, monkeypatch):
    """The after_text probe scores the same target tokens with the unrelated tokens before the prompt."""
    import loku.lm as lm

    model, seqs = memorizer
    tok = word_tokenizer()
    seen = []
    real = lm.greedy_generate
    monkeypatch.setattr(lm, "greedy_generate", lambda m, t, prompts, **k: seen.append(prompts) or real(m, t, prompts,
                                                                                                        **k))
    context = texts_of(random_sequences(1, 30, seed=12))
    prefix_probes(model, tok, texts_of(seqs[:1]), context,
                  settings=AttackSettings(prompt_tokens=4, shift=2, context_tokens=6))
    ctx = tok(context[0], add_special_tokens=False)["input_ids"][:6]
    text = seqs[0].tolist()
    assert seen == [[text[:4]], [ctx + text[:4]], [text[2:6]]]


def test_attack_settings_are_checked():
    with pytest.raises(ConfigError, match="unknown int3"):
        AttackSettings(schemes=("int3",)).validate()
    with pytest.raises(ConfigError, match="attacks.shift must be a positive integer"):
        AttackSettings(shift=0).validate()
    with pytest.raises(ConfigError, match="unknown option"):
        AttackSettings.from_dict({"shfit": 2})
    assert AttackSettings.from_dict({"schemes": ["nf4"]}).to_dict()["schemes"] == ["nf4"]


# ----------------------------------------------------------------------------- loku eval --suite attacks


def test_eval_attacks_suite_writes_every_attack(memorizer, tmp_path):
    from loku.evaluate import render_eval_markdown, run_suites

    model, seqs = memorizer
    for path, texts in ((tmp_path / "tdec" / "forget" / "lm_extraction_32_0.csv", texts_of(seqs)),
                        (tmp_path / "tdec" / "eval" / "pile.csv", texts_of(random_sequences(8, 30, seed=5)))):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows([["doc_id", "corpus", "text"]] + [[i, "pile", t] for i, t in enumerate(texts)])
    tok = word_tokenizer()
    loaded = []

    def load_reference():
        loaded.append(1)
        return make_tiny_model("llama", seed=0), word_tokenizer()

    results = run_suites(model, tok, ["attacks"], data_dir=tmp_path, batch_size=2, attack_prompt_tokens=4,
                         attack_shift=2, attack_context_tokens=8, load_reference=load_reference)
    out = results["suites"]["attacks"]
    assert loaded == [1] and "load_reference" not in results["meta"]["options"]
    q = out["quantization"]
    assert set(q["model"]) >= {"none", "int8", "nf4"} and set(q["reference"]) == set(q["model"])
    assert q["model"]["none"]["ma"] == 1.0 and q["reference"]["none"]["ma"] < 0.5
    assert out["probing"]["plain"]["match"] == 1.0 and out["probing_reference"]["plain"]["match"] < 0.5
    assert out["relearn"]["control"] is not None and out["relearn"]["n_test"] == 2
    md = render_eval_markdown(results)
    assert "quantization.model.nf4.el_10" in md and "probing.after_text.ma" in md
    alone = run_suites(model, tok, ["attacks"], data_dir=tmp_path, batch_size=2, attack_prompt_tokens=4,
                       attack_shift=2, attack_context_tokens=8)["suites"]["attacks"]
    assert alone["quantization"]["reference"] is None and alone["relearn"]["control"] is None
    with pytest.raises(ConfigError, match="unknown eval suite.*attacks"):
        run_suites(model, tok, ["atacks"], data_dir=tmp_path)
