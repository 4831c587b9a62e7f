"""`loku bench continual --smoke` (docs/algorithms.md §8, the paper's Figure 4) end to end on a tiny random
model and synthetic TDEC-shaped data: every variant, the per-task scores, the gate, resume."""
from __future__ import annotations

import json

import pytest

from loku.bench.continual import load_continual_config, run_continual
from loku.errors import ConfigError
from test_bench_tdec import bench_env  # noqa: F401  (the shared fixture)


def _cfg(env, **overrides):
    values = {"model": env["model"], "data_dir": str(env["data"]), "cache_dir": str(env["cache"]), **overrides}
    return load_continual_config("cpu", values, smoke=True)


def test_smoke_continual_bench_end_to_end(bench_env, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "continual"
    summary = run_continual(_cfg(bench_env), out, progress=False, command=["loku", "bench", "continual", "--smoke"])
    assert summary["missing"] == []
    assert set(summary["variants"]) == {"lora-gd", "lora-ihl", "fila-ihl", "fila-ihl-orthogonal", "fila-ihl-margin"}
    for name, v in summary["variants"].items():
        assert [t["task"] for t in v["tasks"]] == [0, 1, 2], name  # task 0: the planted model
        assert all("ppl_pile" in t for t in v["tasks"])
        # Requests so far, from the variant's own matrix (§8): task 0 all requests, task k requests 1..k.
        matrix = json.loads((out / "variants" / f"{name}.json").read_text())["report"]["matrix"]
        for k, row in enumerate(matrix):
            so_far = [row["measured"][n] for n in (["request-01", "request-02"][:k] if k else row["measured"])]
            assert v["tasks"][k]["ma_so_far"] == pytest.approx(sum(m["ma"] for m in so_far) / len(so_far))
        # The tiny random model never reaches the held-out bar in its epochs: both requests fail, stay above
        # it, and are "not forgotten" (once each, last measured after request-02), never relapses (§8).
        assert [r["outcome"] for r in v["requests"]] == ["failed", "failed"]
        assert v["relapses"] == []
        # §12 targets: neither request forgotten is a fail, whatever else passes
        assert summary["verdicts"][name]["forgotten"] == {"value": [0, 2], "bound": "all", "pass": False}
        assert summary["verdicts"][name]["relapses"]["pass"] is True and not summary["verdicts"][name]["all"]
        assert [(r["request"], r["after"], r["ma"], r["el"]) for r in v["not_forgotten"]] == [
            (n, "request-02", matrix[-1]["measured"][n]["ma"], matrix[-1]["measured"][n]["el"])
            for n in ("request-01", "request-02")]
    orth = summary["variants"]["fila-ihl-orthogonal"]
    gated = orth["gated"]
    assert set(gated["ma"]) == {"request-01", "request-02"} and 0.0 <= gated["adapters_applied"]["ppl_pile"] <= 1.0
    assert gated["false_positive_rate"] is not None and orth["mean_overlap"] is not None
    check_dilution(gated["dilution"], n_texts=4)
    assert summary["variants"]["fila-ihl"]["mean_overlap"] is not None
    md = (out / "results.md").read_text()
    assert "## fila-ihl-orthogonal" in md and "With the gate" in md and (out / "plots" / "figure4.png").is_file()
    assert "| ordinary text + the forget prompt |" in md and "Dilution attack (4 forget texts" in md
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"]["bench"] == 0 and results["data_sha256"] and results["planting"]["planted"]
    assert md.count("Relapses (met the stop rule, then back above its thresholds): none") == 5
    assert md.count("Not forgotten (never met the stop rule; last measured): request-01 after request-02") == 5

    # A rerun reads every finished variant back; nothing is unlearned again.
    monkeypatch.setattr("loku.requests.unlearn_requests", lambda *a, **k: pytest.fail("unlearned again"))
    assert run_continual(_cfg(bench_env), out, progress=False)["missing"] == []


def check_dilution(dilution, n_texts):
    """The dilution attack's numbers (§8 pitfalls): every attack, every setting, rates in [0, 1], and the
    settings that do not depend on the gate behave as their definition says."""
    assert dilution["texts"] == n_texts and dilution["prompt_tokens"] == 8 and dilution["el_n"] == 10
    assert set(dilution["attacks"]) == {"prompt", "preamble", "suffix"}
    for name, attack in dilution["attacks"].items():
        assert 0.0 <= attack["adapter_on"] <= 1.0 and 0.0 <= attack["mean_weight"] <= attack["adapter_on"] + 1e-12
        for setting in ("through_gate", "adapters_on", "planted"):
            assert set(attack[setting]) == {"ma", "el", "reproduced"}
            assert all(0.0 <= v <= 1.0 for v in attack[setting].values()), (name, setting)
        # A hard gate that switched every text's adapter fully on (or off) is exactly that fixed setting.
        if attack["adapter_on"] == 1.0 and attack["mean_weight"] == 1.0:
            assert attack["through_gate"] == attack["adapters_on"], name
        if attack["adapter_on"] == 0.0:
            assert attack["through_gate"] == attack["planted"], name
    # The suffix only moves the decision: with a fixed setting it is the prompt alone, continued from the prompt.
    for setting in ("adapters_on", "planted"):
        assert dilution["attacks"]["suffix"][setting] == dilution["attacks"]["prompt"][setting]
    # The planted model reproduces its planted texts from the prompt better than the unlearned one.
    assert dilution["attacks"]["prompt"]["planted"]["ma"] > dilution["attacks"]["prompt"]["adapters_on"]["ma"]


def test_routing_switches_exactly_the_named_adapters(bench_env):  # noqa: F811
    """The gated scores' primitive: no adapter is the base model, a request's adapter is its delta."""
    import torch

    from loku.gate import Gate, GatedModel
    from loku.models import load_model
    from loku.requests import Delta, apply_deltas, stacked_model

    model, _ = load_model(bench_env["model"], progress=False)
    layer = "model.layers.0.self_attn.q_proj"
    weight = dict(model.named_modules())[layer].weight
    torch.manual_seed(0)
    delta = Delta("request-01", "f.jsonl", {layer: torch.randn(2, weight.shape[1])},
                  {layer: torch.randn(weight.shape[0], 2)}, {layer: torch.randn(2, weight.shape[1])})
    hidden = model.config.hidden_size
    gate = Gate(["request-01"], torch.zeros(1, hidden), torch.eye(hidden), torch.zeros(1), 0.05, 0.2)
    gated, ids = GatedModel(stacked_model(model, [delta]), gate), torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        with gated.adapters_only([]):
            torch.testing.assert_close(gated.model(input_ids=ids).logits, model(input_ids=ids).logits)
        with gated.adapters_only(["request-01"]):
            torch.testing.assert_close(gated.model(input_ids=ids).logits,
                                       apply_deltas(model, [delta])(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(input_ids=ids).logits, apply_deltas(model, [delta])(input_ids=ids).logits)


def test_bad_continual_input(bench_env, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="heldout_split must differ"):
        run_continual(_cfg(bench_env, heldout_split="0"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="unknown split 7"):
        run_continual(_cfg(bench_env, split="7"), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="variant broken"):
        run_continual(_cfg(bench_env, variants={"broken": {"method": "full-gd", "strategy": "magic"}}),
                      tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="no bench here"):
        run_continual(_cfg(bench_env), tmp_path / "never-run", progress=False, report_only=True)
    for name in ("cpu", "paper"):
        load_continual_config(name).validate()
