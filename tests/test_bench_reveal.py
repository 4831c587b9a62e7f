"""`loku bench reveal --smoke` (docs/algorithms.md §9, Reveal-and-Release where the truth is known) end to end on
a tiny random model and synthetic TDEC-shaped data: the three arms, the rounds, the coverage curves, resume."""
from __future__ import annotations

import json

import pytest

from loku.bench.reveal import load_reveal_config, run_reveal_bench
from loku.bench.reveal_report import queries_to_reach, summarise_coverage
from loku.errors import ConfigError
from test_bench_tdec import bench_env  # noqa: F401  (the shared fixture)


def _cfg(env, **overrides):
    values = {"model": env["model"], "data_dir": str(env["data"]), "cache_dir": str(env["cache"]), **overrides}
    return load_reveal_config("cpu", values, smoke=True)


def test_smoke_reveal_bench_end_to_end(bench_env, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "reveal"
    summary = run_reveal_bench(_cfg(bench_env), out, progress=False, command=["loku", "bench", "reveal", "--smoke"])
    assert summary["missing"] == []
    arms = summary["arms"]
    for arm in ("real-text", "self-generated"):
        assert {"ma", "el", "heldout_ma", "ppl_pile"} <= set(arms[arm]["scores"] or {"ma", "el", "heldout_ma",
                                                                                     "ppl_pile"}), arm
    rounds = arms["self-generated"]["rounds"]
    assert 1 <= len(rounds) <= 2 and all(0.0 <= r["coverage_so_far"] <= 1.0 for r in rounds)
    assert all(r["retain_verbatim"] == 0 for r in rounds)
    # §9/§12: a round is unlearned only when it revealed something new, and says how much
    assert all(0 <= r["novel"] <= r["collected"] and 0.0 <= r["new_ngram_share"] <= 1.0 for r in rounds)
    assert all((r["outcome"] is not None) == (r["novel"] > 0) for r in rounds)
    if arms["self-generated"]["forget_texts"]:  # the lower bound trains as long as the rounds did
        assert arms["random-text"]["epochs_run"] == max(1, arms["self-generated"]["epochs_run"])
        assert arms["random-text"]["forget_texts"] == arms["self-generated"]["forget_texts"]
    curves = arms["coverage"]["curves"]
    assert set(curves) == {"neural-ucb", "random"} and all(len(c) == 4 for cs in curves.values() for c in cs)
    assert all(a <= b for cs in curves.values() for c in cs for a, b in zip(c, c[1:]))  # coverage only grows
    md = (out / "results.md").read_text()
    assert "upper bound" in md and "lower bound" in md and (out / "plots" / "reveal.png").is_file()
    assert set(summary["verdicts"]) == {"real-text", "self-generated", "self-generated-fragments", "random-text"}
    # §9 with §12: the fragments arm's rounds are stopped by the two-sided rule on the request's fragments
    fragment_rounds = [r for r in arms["self-generated-fragments"]["rounds"] if r["outcome"] is not None]
    assert fragment_rounds and all(r["stop_verdict"] is not None for r in fragment_rounds)
    assert all(r["stop_verdict"] is None for r in rounds if r["outcome"] is not None)  # the paper rule's rounds
    assert summary["verdicts"]["real-text"]["real_text_ma"]["value"] == arms["real-text"]["scores"]["ma"]
    assert "Against the targets" in md
    request = json.loads((out / "data" / "request.json").read_text())
    assert len(request["fragments"]) == 2 and all(len(f.split()) == 6 for f in request["fragments"])

    # A rerun reads every finished arm back; nothing is unlearned or revealed again.
    monkeypatch.setattr("loku.bench.reveal._ARM_FUNCTIONS", {})
    assert run_reveal_bench(_cfg(bench_env), out, progress=False)["missing"] == []


def test_coverage_summary_counts_queries_to_shares_of_the_best():
    curves = {"a": [[0.0, 0.2, 0.4, 0.8], [0.0, 0.4, 0.8, 0.8]], "b": [[0.0, 0.0, 0.1, 0.2], [0.0, 0.0, 0.0, 0.0]]}
    summary = summarise_coverage(curves)
    half, most = summary["a"]["queries_to"]["0.5"], summary["a"]["queries_to"]["0.8"]
    assert half["recall"] == pytest.approx(0.4) and most["recall"] == pytest.approx(0.64)
    assert half["per_seed"] == [3, 2] and most["per_seed"] == [4, 3]
    assert summary["b"]["queries_to"]["0.5"]["per_seed"] == [None, None]
    assert queries_to_reach([0.1, 0.5], 0.5) == 2 and queries_to_reach([], 0.1) is None


def test_bad_reveal_bench_configs(bench_env):  # noqa: F811
    with pytest.raises(ConfigError, match="prefix_tokens"):
        _cfg(bench_env, prefix_tokens=16).validate()
    with pytest.raises(ConfigError, match="selectors"):
        _cfg(bench_env, coverage={"selectors": ["nope"], "seeds": [0], "budget": 2}).validate()
    with pytest.raises(ConfigError, match="unknown bench option"):
        _cfg(bench_env, rounds=3)


def test_the_cli_runs_the_arms_in_worker_processes(bench_env, tmp_path):  # noqa: F811
    from loku.cli import main

    common = ["bench", "reveal", "--smoke", "--model", bench_env["model"], "--data-dir", str(bench_env["data"]),
              "--cache-dir", str(bench_env["cache"]), "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "none"), "--report-only"]) == 2  # nothing to report yet
    assert main([*common, "--out", str(tmp_path / "x"), "--jobs", "0"]) == 2
    out = tmp_path / "jobs"
    assert main([*common, "--out", str(out), "--jobs", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["missing"] == [] and results["invocations"][0]["jobs"] == 2
