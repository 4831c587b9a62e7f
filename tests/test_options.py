"""One declaration per option: the dataclass fields carry help and range, and both CLIs are built from them."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from loku.cli import build_parser
from loku.config import UnlearnConfig
from loku.errors import ConfigError
from loku.eval_options import EvalCommand, EvalOptions
from loku.evaluate import add_eval_arguments
from loku.options import _hints, _kinds, check_fields, cli_fields, flag_of


@pytest.mark.parametrize("cls", [UnlearnConfig, EvalOptions, EvalCommand])
def test_every_option_has_help_and_every_number_a_range(cls):
    hints = _hints(cls)
    for f in cli_fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        if _kinds(hints[f.name]) & {int, float}:
            assert f.metadata.get("range"), f"{cls.__name__}.{f.name} is a number without a valid range"


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


def test_both_clis_are_built_from_the_fields():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    unlearn, evaluate = sub.choices["unlearn"], sub.choices["eval"]
    actions = _flags(unlearn)
    for f in dataclasses.fields(UnlearnConfig):
        assert f.name in actions and actions[f.name].default is None  # None: only given flags override the YAML
        assert actions[f.name].help.startswith(f.metadata["help"])
    actions = _flags(evaluate)
    for cls in (EvalCommand, EvalOptions):
        for f in cli_fields(cls):
            assert flag_of(f) in actions[f.name].option_strings
    assert {"debug", "config", "resume"} <= set(_flags(unlearn)) and "debug" in _flags(evaluate)
    assert "--tofu-forget" in actions["tofu_forget_split"].option_strings  # the flag names of before stay
    assert actions["progress"].option_strings == ["--no-progress"] and actions["progress"].default is True


def test_unlearn_eval_options_are_the_suite_options():
    fields = {f.name: f for f in dataclasses.fields(UnlearnConfig)}
    suite = {f.name: f for f in dataclasses.fields(EvalOptions)}
    for name in ("batch_size", "data_dir", "limit"):
        mine, theirs = fields[f"eval_{name}"], suite[name]
        assert mine.default == theirs.default and mine.metadata.get("range") == theirs.metadata.get("range")
        assert theirs.metadata["help"] in mine.metadata["help"] and flag_of(mine) == f"--eval-{name.replace('_', '-')}"
    cfg = UnlearnConfig(eval_limit=3, eval_batch_size=2, eval_data_dir="d")
    assert cfg.eval_options() == {"batch_size": 2, "data_dir": "d", "limit": 3, "tofu_template": None}


def test_add_eval_arguments_parses_into_the_dataclasses(tmp_path):
    from loku.evaluate import eval_config

    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", "m", "--out", "o", "--data-dir", str(tmp_path), "--forget", "f.csv", "--tofu-forget", "forget01",
         "--lm-eval-tasks", "a, b", "--lm-eval-include", "inc", "--no-progress", "--suite", "ppl", "--suite", "mia"])
    cmd, opts = eval_config(args)
    assert (cmd.model, cmd.out, cmd.suite) == ("m", "o", ["ppl", "mia"])
    assert opts.data_dir == tmp_path and str(opts.forget_path) == "f.csv" and opts.tofu_forget_split == "forget01"
    assert opts.lm_eval_tasks == ["a", "b"] and opts.lm_eval_include_path == "inc" and opts.progress is False
    with pytest.raises(ConfigError, match=r"--tofu-template must be one of chat, tofu, none, llama2, phi, chatml, generic, got 'x'"):
        EvalOptions(tofu_template="x").validate()


@pytest.mark.parametrize("value, ok", [(0.0, True), (0.999, True), (1.0, False), (-0.1, False), (float("inf"), False),
                                       (True, False), ("0.5", False)])
def test_range_boundaries(value, ok):
    cfg = UnlearnConfig(forget="f", out="o", adam_beta1=value)
    if ok:
        check_fields(cfg)
    else:
        with pytest.raises(ConfigError, match="--adam-beta1 must"):
            check_fields(cfg)
