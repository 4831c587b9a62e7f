"""--report-to (docs/algorithms.md §6, the unlearning loop's records): tensorboard's event files hold the
step-level loss terms, lr and grad norm, and each epoch's report.json numbers at the step the epoch ended on."""
from __future__ import annotations

import json

import pytest
import torch

from loku import tracking
from loku.cli import main
from tiny_models import make_tiny_model, random_sequences

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def unlearn_args(root, out, *extra: str) -> list[str]:
    return ["unlearn", "--model", str(root / "base"), "--forget", str(root / "forget.txt"),
            "--retain", str(root / "retain.txt"), "--validation", str(root / "validation.txt"),
            "--rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--batch-size", "2", "--max-epochs", "3",
            "--no-progress", "--out", str(out), *extra]


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_each_step_and_the_report_epochs(memorized, tmp_path):
    out = tmp_path / "run"
    assert main(unlearn_args(memorized, out, "--report-to", "tensorboard")) in (0, 3)
    report = json.loads((out / "report.json").read_text())
    assert not (tmp_path / "run.runs").exists(), "the staged logs move into the output"
    logged = scalars(out / "runs")
    epochs = report["epochs"]
    steps = epochs[-1]["optimizer_steps"]
    assert steps == 2 * len(epochs)  # 4 forget sequences, batches of 2: two optimizer steps an epoch
    for term in ("loss_forget", "loss_retain"):
        values = logged[f"train/{term}"]
        assert [s for s, _ in values] == list(range(1, steps + 1))
        # One micro-batch a step: the epoch's mean term is the mean of its steps' values.
        for e in epochs:
            mine = [v for s, v in values if e["optimizer_steps"] - 2 < s <= e["optimizer_steps"]]
            assert sum(mine) / 2 == pytest.approx(e[term], rel=1e-5)
    assert [v for _, v in logged["train/lr"]] == pytest.approx([1e-2] * steps)
    norms = [v for _, v in logged["train/grad_norm"]]
    assert len(norms) == steps and all(v > 0 and v == v for v in norms)
    for key in ("forget_ma", "val_ma", "val_ppl", "loss_forget", "success"):
        assert logged[f"epoch/{key}"] == [(e["optimizer_steps"], pytest.approx(float(e[key]), rel=1e-6))
                                          for e in epochs], key
    measured_el = [(e["optimizer_steps"], pytest.approx(e["forget_el"], rel=1e-6)) for e in epochs
                   if e["forget_el"] is not None]
    assert logged.get("epoch/forget_el", []) == measured_el


def test_two_sided_checks_and_an_explicit_logging_dir(memorized, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    assert main(unlearn_args(memorized, out, "--report-to", "tensorboard", "--logging-dir", str(logs),
                             "--stop-rule", "two-sided", "--check-every", "1")) in (0, 3)
    report = json.loads((out / "report.json").read_text())
    assert not (out / "runs").exists()
    logged = scalars(logs)
    checks = [c for e in report["epochs"] for c in e["checks"]]
    assert checks and logged["stop/forget_nll"] == [(c["step"], pytest.approx(c["forget_nll"], rel=1e-6))
                                                    for c in checks]
    assert [s for s, _ in logged["stop/distance"]] == [c["step"] for c in checks]


def test_finetune_logs_its_steps(memorized, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(memorized / "base"), "--data", str(memorized / "retain.txt"),
                 "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--no-progress", "--out", str(out),
                 "--report-to", "tensorboard"]) == 0
    report = json.loads((out / "finetune.json").read_text())
    logged = scalars(out / "runs")
    assert [s for s, _ in logged["train/loss"]] == list(range(1, report["steps"] + 1))
    assert logged["epoch/loss"] == [(e["steps"], pytest.approx(e["loss"], rel=1e-6)) for e in report["epochs"]]


def test_grad_norm_is_the_norm_clipping_would_see():
    model = make_tiny_model("llama")
    ids = random_sequences(2, 12)
    model(input_ids=ids, labels=ids).loss.backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert tracking.grad_norm(model.parameters()) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("value, message", [
    ("tensorbord", "unknown tracker"),
    ("wandb", "pip install wandb"),
    ("tensorboard,trackio", "pip install trackio"),
])
def test_bad_report_to_fails_before_the_model_loads(memorized, tmp_path, capsys, monkeypatch, value, message):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the option was checked")

    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name: None if name in ("wandb", "trackio") else real(name))
    monkeypatch.setattr("loku.trainer.load_model", never)
    assert main(unlearn_args(memorized, tmp_path / "run", "--report-to", value)) == 2
    err = capsys.readouterr().err
    assert err.startswith("loku: error: --report-to") and message in err
    assert not (tmp_path / "run.runs").exists()


def test_logging_dir_inside_the_output_and_sequences_are_refused(memorized, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(unlearn_args(memorized, out, "--report-to", "tensorboard", "--logging-dir", str(out / "tb"))) == 2
    assert "--logging-dir" in capsys.readouterr().err
    assert main(unlearn_args(memorized, out, "--report-to", "tensorboard", "--strategy", "stack")) == 2
    assert "single unlearning run" in capsys.readouterr().err


def test_report_to_names():
    assert tracking.tracker_names("none") == [] and tracking.tracker_names(None) == []
    assert tracking.tracker_names(["tensorboard,wandb", "tensorboard"]) == ["tensorboard", "wandb"]
