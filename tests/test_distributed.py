"""Multi-process unlearning (gloo, 2 CPU processes) equals one process with the same global batch:
Fisher sums are reduced across processes, metrics computed once and broadcast, one writer."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def launch(root, out, processes: int, grad_accum: int, port: int = 29531, extra: tuple[str, ...] = ()):
    # --forget repeats for a sequence of requests, so an extra --forget replaces the default one here
    forget = [] if "--forget" in extra else ["--forget", str(root / "forget.txt")]
    args = ["unlearn", "--model", str(root / "base"), *forget,
            "--retain", str(root / "retain.txt"), "--validation", str(root / "validation.txt"),
            "--method", "fila-ihl", "--rank", "4", "--lora-alpha", "8", "--lr", "5e-3", "--batch-size", "1",
            "--grad-accum", str(grad_accum), "--max-epochs", "3", "--no-progress", "--out", str(out), *extra]
    if processes == 1:
        cmd = [sys.executable, "-m", "loku.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(port), "-m", "loku.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # a hang fails, not blocks
    # 3 = stop rule not met within max epochs; torchrun relays a rank's non-zero exit as 1 and names it.
    relayed_not_met = processes > 1 and result.returncode == 1 and "exitcode  : 3" in result.stderr
    assert result.returncode in (0, 3) or relayed_not_met, result.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def test_two_processes_equal_one_with_same_global_batch(memorized, tmp_path):
    # Global batch 2 sequences per optimizer step: 2 processes x 1, or 1 process x 1 x 2 accumulation.
    two = launch(memorized, tmp_path / "two", processes=2, grad_accum=1)
    one = launch(memorized, tmp_path / "one", processes=1, grad_accum=2)
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["init"].keys() == one["init"].keys()
    for a, b in zip(two["epochs"], one["epochs"]):
        for key in ("forget_ma", "val_ma", "val_ppl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5)
    assert [e["success"] for e in two["epochs"]] == [e["success"] for e in one["epochs"]]
    wa = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    # Adam divides each gradient entry by its own running magnitude, so the ~1e-7 rounding of a
    # different summation order (all-reduce vs local accumulation) grows in near-zero entries:
    # compare whole tensors. FILA's start (Fisher + SVD, no Adam), the second half of the rank-2r factors
    # [A; A0] and s[B, -B0] of the saved adapter, is checked entry by entry.
    for key in wa:
        assert float((wa[key] - wb[key]).norm() / wb[key].norm()) < 1e-3, key
        start = (slice(wa[key].shape[0] // 2, None), slice(None)) if "lora_A" in key else \
            (slice(None), slice(wa[key].shape[1] // 2, None))
        torch.testing.assert_close(wa[key][start], wb[key][start], atol=1e-5, rtol=1e-4)
    assert not list(tmp_path.glob(".*partial"))


def test_uneven_batches_pad_with_zero_weight_and_give_the_single_process_result(memorized, tmp_path):
    # 3 forget batches on 2 processes: the second optimizer step has one micro-batch, so process 1 makes a
    # zero-weight pass to keep DDP's all-reduce in step. Weights are powers of two here (2/2, 2/1), so the
    # result must equal one process with the same global batch bit for bit (gaussian init: no Fisher sums).
    (memorized / "forget3.txt").write_text("".join((memorized / "forget.txt").read_text().splitlines(True)[:3]))
    extra = ("--method", "lora-ihl", "--forget", str(memorized / "forget3.txt"))
    two = launch(memorized, tmp_path / "two", processes=2, grad_accum=1, port=29532, extra=extra)
    one = launch(memorized, tmp_path / "one", processes=1, grad_accum=2, extra=extra)
    assert [e["optimizer_steps"] for e in two["epochs"]] == [e["optimizer_steps"] for e in one["epochs"]] == [2, 4, 6]
    for a, b in zip(two["epochs"], one["epochs"]):
        assert {k: a[k] for k in a if k != "seconds"} == {k: b[k] for k in b if k != "seconds"}
    wa = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_three_processes_with_uneven_batches_do_not_hang(memorized, tmp_path):
    # 4 forget batches on 3 processes (2, 1, 1): the old round-robin sharding hung in DDP's all-reduce.
    # Dividing by 3 is inexact: even an even 3-process split differs from one process by ~1e-3 in the
    # adapter after Adam (measured), so this compares at that level; the exact check is the test above.
    extra = ("--method", "lora-ihl")
    three = launch(memorized, tmp_path / "three", processes=3, grad_accum=1, port=29533, extra=extra)
    one = launch(memorized, tmp_path / "one", processes=1, grad_accum=3, extra=extra)
    assert three["processes"] == 3
    assert [e["optimizer_steps"] for e in three["epochs"]] == [e["optimizer_steps"] for e in one["epochs"]] == [2, 4, 6]
    for a, b in zip(three["epochs"], one["epochs"]):
        for key in ("loss_forget", "loss_retain", "forget_ma", "val_ma", "val_ppl"):
            assert a[key] == pytest.approx(b[key], rel=1e-2), key
    wa = load_file(str(tmp_path / "three" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    for key in wa:
        assert float((wa[key] - wb[key]).norm() / wb[key].norm()) < 1e-2, key
