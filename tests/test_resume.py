"""Crash safety: a run killed with SIGKILL mid-epoch resumes to exactly the uninterrupted result,
and a killed run never leaves an output folder that looks complete."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from loku.checkpoint import checkpoint_dir
from loku.config import UnlearnConfig
from loku.errors import ConfigError, ModelError, TrainingDiverged
from loku.trainer import unlearn

TIMING_KEYS = {"seconds", "peak_memory_bytes", "resumed", "config", "versions"}


def cli_args(root, out, *extra):
    return [sys.executable, "-m", "loku.cli", "unlearn", "--model", str(root / "base"),
            "--forget", str(root / "forget.txt"), "--retain", str(root / "retain.txt"),
            "--validation", str(root / "validation.txt"), "--method", "fila-ihl", "--rank", "4",
            "--lora-alpha", "8", "--lr", "1e-3", "--batch-size", "2", "--max-epochs", "4",
            "--no-progress", "--out", str(out), *extra]


def run(args, **env):
    return subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def comparable(report: dict) -> dict:
    """The report without wall-clock numbers (which differ between any two runs)."""
    out = {k: v for k, v in report.items() if k not in TIMING_KEYS}
    out["epochs"] = [{k: v for k, v in e.items() if k != "seconds"} for e in report["epochs"]]
    out["init"] = {k: v for k, v in report["init"].items() if k != "seconds"}
    return out


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(memorized, tmp_path):
    killed = tmp_path / "killed"
    # 4 forget sequences, batch 2 -> 2 steps per epoch: step 5 is inside epoch 3.
    crash = run(cli_args(memorized, killed), LOKU_FAILPOINT="step:5")
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-2000:]
    assert not killed.exists(), "a killed run must not leave an output folder"
    state = json.loads((checkpoint_dir(killed) / "state.json").read_text())
    assert [e["epoch"] for e in state["epochs"]] == [1, 2]

    resumed = run([sys.executable, "-m", "loku.cli", "unlearn", "--resume", str(killed), "--no-progress"])
    assert resumed.returncode in (0, 3), resumed.stderr[-2000:]
    assert not checkpoint_dir(killed).exists()

    straight = tmp_path / "straight"
    done = run(cli_args(memorized, straight))
    assert done.returncode == resumed.returncode, done.stderr[-2000:]

    a = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    ra = json.loads((killed / "report.json").read_text())
    rb = json.loads((straight / "report.json").read_text())
    assert ra["resumed"] is True and rb["resumed"] is False
    assert comparable(ra) == comparable(rb)


def test_resume_refuses_other_settings_or_base(memorized, tmp_path):
    out = tmp_path / "run"
    crash = run(cli_args(memorized, out), LOKU_FAILPOINT="step:3")
    assert crash.returncode == -signal.SIGKILL
    cfg = UnlearnConfig(**json.loads((checkpoint_dir(out) / "state.json").read_text())["config"])
    cfg.rank = 2
    with pytest.raises(ConfigError, match="other settings.*rank"):
        unlearn(cfg, resume=True)
    # A fresh run onto the same folder must not silently discard the unfinished one.
    cfg.rank = 4
    with pytest.raises(ConfigError, match="--resume"):
        unlearn(cfg)
    other = tmp_path / "other-base"
    from tiny_models import make_tiny_model, word_tokenizer
    make_tiny_model("llama", seed=9).save_pretrained(other)
    word_tokenizer().save_pretrained(other)
    state_file = checkpoint_dir(out) / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["model"] = str(other)
    state_file.write_text(json.dumps(state))
    cfg.model = str(other)
    with pytest.raises(ModelError, match="different base"):
        unlearn(cfg, resume=True)


def test_nan_loss_stops_and_names_the_epoch(memorized, tmp_path, monkeypatch):
    import loku.losses as losses

    real = losses.unlearning_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan"), parts) if calls["n"] == 3 else (loss, parts)

    monkeypatch.setattr(losses, "unlearning_loss", poisoned)
    cfg = UnlearnConfig(model=str(memorized / "base"), forget=str(memorized / "forget.txt"),
                        retain=str(memorized / "retain.txt"), validation=str(memorized / "validation.txt"),
                        out=str(tmp_path / "run"), rank=4, lora_alpha=8, lr=1e-3, batch_size=2, max_epochs=4,
                        progress=False)
    with pytest.raises(TrainingDiverged, match="epoch 2, step 1.*checkpoint of epoch 1"):
        unlearn(cfg)
    state = json.loads((checkpoint_dir(cfg.out) / "state.json").read_text())
    assert [e["epoch"] for e in state["epochs"]] == [1]
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_older_than_an_option_resumes_when_the_option_is_at_its_default(memorized, tmp_path):
    """Upgrading loku adds options; a checkpoint written before one existed was made with its default."""
    from loku.checkpoint import load_checkpoint
    from loku.config import option_defaults
    from loku.models import load_model, model_fingerprint

    out = tmp_path / "run"
    crash = run(cli_args(memorized, out), LOKU_FAILPOINT="step:3")
    assert crash.returncode == -signal.SIGKILL
    state_file = checkpoint_dir(out) / "state.json"
    state = json.loads(state_file.read_text())
    config = dict(state["config"])
    assert config["strategy"] == option_defaults()["strategy"] == "merge"
    del state["config"]["strategy"]  # as written by a loku without --strategy
    state_file.write_text(json.dumps(state))
    fingerprint = model_fingerprint(load_model(str(memorized / "base"))[0])
    assert load_checkpoint(out, config, fingerprint, option_defaults()).state["epochs"] == state["epochs"]
    with pytest.raises(ConfigError, match="other settings.*strategy"):
        load_checkpoint(out, {**config, "strategy": "stack"}, fingerprint, option_defaults())


def test_resume_from_a_checkpoint_without_the_start_still_saves_a_standard_adapter(memorized, tmp_path):
    """A checkpoint of an earlier loku kept FILA's residual W_res but not the start (A0, B0) the standard
    adapter needs (docs/algorithms.md §3): it is recovered as the rank-r SVD of W - W_res, so OUT/adapter
    on the original base with plain PEFT is still OUT/model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    crash = run(cli_args(memorized, out), LOKU_FAILPOINT="step:3")
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-2000:]
    (checkpoint_dir(out) / "start.safetensors").unlink(missing_ok=True)  # as an earlier loku left it
    resumed = run([sys.executable, "-m", "loku.cli", "unlearn", "--resume", str(out), "--no-progress"])
    assert resumed.returncode in (0, 3), resumed.stderr[-2000:]
    ids = torch.randint(3, 97, (3, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(out / "model").eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(memorized / "base")
        loaded = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(input_ids=ids).logits
    assert float((loaded - expected).abs().max()) <= 1e-4
