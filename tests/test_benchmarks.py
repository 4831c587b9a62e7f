"""Smoke runs of the benchmark scripts (benchmarks/): tiny random models, CPU, a few seconds each.

They run as subprocesses, exactly as a user runs them, and write their JSON into a temporary folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"


def test_el_speed_on_tiny_model_is_exact_and_reports_speed(tmp_path):
    run_script("el_speed.py", "--models", "tiny-llama-random", "--device", "cpu", "--sequences", "2",
               "--tokens", "24", "--n", "4", "--repeats", "1", out=tmp_path)
    report = json.loads((tmp_path / "el_speed_cpu.json").read_text())
    assert report["benchmark"] == "el_speed"
    for key in ("torch", "transformers", "device", "dtype", "git"):
        assert key in report["environment"]
    assert report["settings"]["tokens"] == 24 and report["settings"]["n"] == 4
    assert set(report["targets"]) == {"memorized_min_ratio", "never_slower"}
    (result,) = report["results"]
    assert result["status"] == "ok" and result["model"] == "tiny-llama-random"
    assert set(result["cases"]) == {"memorized", "partly_memorized", "unmemorized"}
    for case in result["cases"].values():
        assert case["identical"] is True
        assert case["el_fast"] == case["el_plain"] and len(case["el_fast"]) == 2
        assert case["ratio"] > 0 and case["fast_best_seconds"] > 0 and case["plain_best_seconds"] > 0
        assert case["plain_prefixes"] == 2 * (24 - 4)
        assert 0 <= case["fast_generated_rows"] <= 2 * 23
    memorized = result["cases"]["memorized"]
    # one-token prompt + the model's own greedy continuation: reproduced (MA = EL = 1 up to rounding between
    # the teacher-forced pass and generation), so there is (almost) nothing to generate
    assert memorized["ma_mean"] >= 0.9 and memorized["el_mean"] >= 0.9 and memorized["fast_generated_rows"] <= 2
    for key in ("memorized_target_met", "never_slower_met", "all_identical"):
        assert isinstance(result[key], bool)
    assert report["summary"]["all_identical"] is True


def test_gpu_step_smoke_records_every_phase(tmp_path):
    run_script("gpu_step.py", "--smoke", out=tmp_path)
    report = json.loads((tmp_path / "gpu_step_cpu.json").read_text())
    assert report["benchmark"] == "gpu_step"
    assert report["settings"]["smoke"] is True and report["environment"]["dtype"] == "float32"
    results = {(r["model"], r["method"]): r for r in report["results"]}
    assert set(results) == {(m, k) for m in ("tiny-llama", "tiny-gpt-neo") for k in ("lora-gd", "fila-ihl", "full-gd")}
    for (model, method), r in results.items():
        assert r["status"] == "ok", r
        step = r["step"]
        assert len(step["seconds"]) == report["settings"]["steps"] and step["median_seconds"] > 0
        assert step["loss_finite"] and step["tokens_per_step"] == 2 * 2 * 16
        factor = 6 if method == "full-gd" else 4
        assert r["flops_per_step"] == factor * r["parameters"] * step["tokens_per_step"]
        assert r["achieved_tflops"] > 0 and "mfu" in r
        has_fila = method == "fila-ihl"
        for phase in ("fisher_per_sample", "fisher_batch", "fila_svd"):
            assert (phase in r) == has_fila
            if has_fila:
                assert r[phase]["seconds"] > 0
        assert (r["trainable_share"] == 1.0) == (method == "full-gd")


def test_fisher_speed_smoke_compares_one_pass_with_per_sequence_fisher(tmp_path):
    run_script("fisher_speed.py", "--smoke", out=tmp_path)
    report = json.loads((tmp_path / "fisher_speed_cpu.json").read_text())
    assert report["benchmark"] == "fisher_speed" and report["settings"]["smoke"] is True
    assert "fisher_speed.py" in " ".join(report["command"]) and report["settings"]["seed"] == 0
    for key in ("torch", "transformers", "device", "dtype", "git", "cpu_threads"):
        assert key in report["environment"]
    r = report["result"]
    assert r["model"] == "tiny-llama-random"
    # the trainer's default Fisher sets: the forget set and a retain sample of its size
    assert r["sequences"] == {"forget": 4, "retain_set": 6, "retain_fisher_sample": 4}
    assert r["fisher_old_per_sequence"]["backward_passes"] == 8  # one per sequence
    assert r["fisher_new_one_pass"]["backward_passes"] == 2  # one per batch of 4
    for phase in ("fisher_old_per_sequence", "fisher_new_one_pass"):
        assert r[phase]["seconds"] > 0
    load = r["load_average_1min"]
    assert {"before", "after", "max_during", "own_threads", "busy", "busy_reasons"} <= set(load)
    # busy exactly when the load before exceeded the threshold or the load while running exceeded own threads + it
    assert load["busy"] == (load["before"] > 0.5 or load["max_during"] > load["own_threads"] + 0.5)
    assert r["busy"] == load["busy"] and r["ratios"]["valid"] == (not load["busy"])
    agree = r["agreement_default_vs_exact"]["summary"]  # the default start against the float64 reference
    assert agree["input_subspace_overlap"]["min"] > 0.99 and agree["output_subspace_overlap"]["min"] > 0.99
    assert r["fila_init"]["svd_seconds"] > 0 and r["epoch"]["mean_seconds"] > 0 and r["fila_init"]["svd"] == "exact"
    for diff in r["max_relative_difference_new_vs_old"].values():
        assert 0 <= diff["max"] < 1e-5
    assert set(r["ratios"]) == {"new_over_old", "fila_init_over_epoch", "fila_init_over_epoch_cpu",
                                "fila_init_full_retain_over_epoch", "valid"}
    plan = r["memory_plan_llama2_7b"]  # the 7B plan: 43 GB of Fisher buffers, chunked to fit an 80 GB GPU
    assert 42e9 < plan["fisher_bytes_forget_plus_retain"] < 44e9 and plan["passes"] >= 2
    assert plan["largest_chunk_bytes"] <= plan["budget_bytes"]
    agree = r["agreement_sample_vs_full_retain"]
    for row in agree["per_layer"].values():
        assert 0 <= row["input_subspace_overlap"] <= 1 + 1e-9 and 0 <= row["output_subspace_overlap"] <= 1 + 1e-9
        assert row["relative_difference_of_BA"] >= 0
    shares = r["eps_share"]["relative_fisher_eps_dominated_share"]
    assert set(shares) == {"mean_loss", "sum_loss"}
    for layer, mean_share in shares["mean_loss"].items():
        # the mean loss divides every gradient by the token count: its Fisher is never above the sum loss's
        assert 0 <= shares["sum_loss"][layer] <= mean_share <= 1
