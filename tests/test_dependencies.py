"""The libraries loku leans on (pyproject.toml): optional packages missing give one error naming the extra,
and loku's own calls pass only parameters the installed versions still have."""
from __future__ import annotations

import inspect
import json
import sys
import tomllib
from pathlib import Path

import pytest
import transformers

from loku.cli import main
from loku.errors import describe_error
from loku.extras import MissingExtra

ROOT = Path(__file__).resolve().parents[1]


def test_missing_gguf_names_the_extra(monkeypatch, tmp_path):
    from loku.models import builtin_model_dir

    monkeypatch.setenv("LOKU_CACHE", str(tmp_path))  # nothing converted yet: the GGUF file must be read
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` does where it is not installed
    with pytest.raises(MissingExtra) as caught:
        builtin_model_dir("smollm2-135m", progress=False)
    code, message = describe_error(caught.value)
    assert code == 2 and "pip install 'loku[gguf]'" in message and "smollm2-135m" in message


def test_missing_matplotlib_names_the_extra_and_reports_are_still_written(monkeypatch, tmp_path):
    from loku.plots import plot_epoch_curves

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtra, match=r"pip install 'loku\[plots\]'"):
        plot_epoch_curves([{"epoch": 1, "forget_ma": 0.5}], tmp_path / "epochs.png")
    assert not (tmp_path / "epochs.png").exists()


@pytest.fixture
def strict_save_pretrained(monkeypatch):
    """transformers' save_pretrained swallows unknown keywords (**kwargs) silently: here they fail."""
    real = transformers.PreTrainedModel.save_pretrained
    named = {name for name, p in inspect.signature(real).parameters.items() if p.kind is not p.VAR_KEYWORD}

    def strict(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - named)
        if unknown:
            raise TypeError(f"save_pretrained() has no parameter {', '.join(unknown)} in transformers "
                            f"{transformers.__version__}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", strict)


def test_unlearn_and_finetune_save_with_current_parameters(memorized, tmp_path, strict_save_pretrained):
    out = tmp_path / "run"
    assert main(["unlearn", "--model", str(memorized / "base"), "--forget", str(memorized / "forget.txt"),
                 "--retain", str(memorized / "retain.txt"), "--validation", str(memorized / "validation.txt"),
                 "--rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--batch-size", "4", "--max-epochs", "1",
                 "--no-progress", "--out", str(out), "--debug"]) in (0, 3)
    assert (out / "model" / "model.safetensors").is_file()
    ft = tmp_path / "ft"
    assert main(["finetune", "--model", str(memorized / "base"), "--data", str(memorized / "retain.txt"),
                 "--epochs", "1", "--no-progress", "--out", str(ft), "--debug"]) == 0
    assert (ft / "model.safetensors").is_file() and json.loads((ft / "finetune.json").read_text())["steps"]


def test_every_library_loku_calls_has_an_upper_bound_and_the_floors_are_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(req): req for req in project["dependencies"]}
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors"):
        assert "<" in declared[name], f"{name} has no upper bound"
    pins = dict(line.split("==") for line in (ROOT / "constraints" / "minimum.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    extras = project["optional-dependencies"]
    # The README's first command installs ".[test]": everything the demo and the tests import.
    tested = extras["test"][1].removeprefix("loku[").rstrip("]").split(",")
    assert set(tested) >= {"gguf", "plots", "tracking", "lm-eval"}
    for req in [*project["dependencies"], extras["test"][0], *[r for e in tested for r in extras[e]]]:
        name = _name(req)
        if name != "torch":  # pinned by the install command itself
            floor = req.split(">=")[1].split(",")[0]
            assert pins.get(name) == floor or pins.get(name, "").startswith(floor + "."), (name, pins.get(name))


def _name(requirement: str) -> str:
    return requirement.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
