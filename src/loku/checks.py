"""All of a ``loku unlearn`` configuration's checks, in one order, before any file is read or written.

:meth:`loku.config.UnlearnConfig.validate` checks the options on their own; what another module knows is
checked by that module (device and dtype: :mod:`loku.devices`; chat template: :mod:`loku.chat`; strategy
and gate: :mod:`loku.strategies`; loss terms: :mod:`loku.losses`; stop rule: :mod:`loku.stop`; evaluation
suites: :mod:`loku.evaluate`; trackers: :mod:`loku.tracking`; reveal settings: :mod:`loku.reveal`), and
what the output may replace here. ``loku unlearn`` (:mod:`loku.run`) and :func:`loku.trainer.unlearn`
call :func:`check_unlearn`, so a bad option fails the same way from the command line and from Python.
"""
from __future__ import annotations

from pathlib import Path

from .chat import check_template
from .checkpoint import checkpoint_dir
from .config import UnlearnConfig, resolved_path
from .devices import check_device_options
from .errors import ConfigError
from .evaluate import check_suite_options
from .losses import check_term_options
from .stop import check_stop_options
from .strategies import check_strategy_options
from .tracking import check_tracking


def check_unlearn(cfg: UnlearnConfig) -> UnlearnConfig:
    """``cfg`` checked in full (its "auto" dtype resolved); one :class:`ConfigError` naming the flag and the fix."""
    cfg.validate()
    if cfg.reveal is not None:  # each round is a run whose forget set the round generates
        from .reveal import checked_settings
        from .reveal_options import settings_from_unlearn

        cfg.dtype = check_unlearn(cfg.round_config()).dtype
        checked_settings(settings_from_unlearn(cfg), "--reveal-")  # the selector's name, before any model loads
        return cfg
    check_device_options(cfg)
    check_template(cfg.template)
    check_strategy_options(cfg)
    check_term_options(cfg)
    check_stop_options(cfg)
    check_suite_options(cfg)
    check_output_apart(cfg)
    check_tracking(cfg)
    return cfg


def model_folder(model: str) -> Path | None:
    """The local folder ``--model`` reads (a built-in model's cache folder), or None for a hub id."""
    if not model:
        return None
    from .models import BUILTIN_MODELS, builtin_model_folder

    if model in BUILTIN_MODELS:
        return builtin_model_folder(model)
    path = Path(model).expanduser()
    return path if path.is_dir() else None


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_apart(cfg: UnlearnConfig) -> None:
    """Refuse an ``--out`` whose writing could destroy or alter an input, before anything is written.

    The output replaces OUT as a whole (``--overwrite``, ``--resume``) and removes the checkpoint
    folder OUT.ckpt, so neither may be or contain the model folder or a data file; nor may OUT lie
    inside the model folder (the output would be written into the model). OUT may lie inside a data
    file's folder (``--forget forget.csv --out runs/x``): writing or removing OUT cannot touch the file.
    """
    if not cfg.out:
        return
    out = resolved_path(cfg.out)
    owned = {"--out": out, "its checkpoint folder": resolved_path(checkpoint_dir(cfg.out))}
    hint = "choose an --out folder apart from the model and the data"
    folder = model_folder(cfg.model)
    if folder is not None:
        model = resolved_path(folder)
        for what, path in owned.items():
            if _within(model, path):
                relation = "is" if model == path else "contains"
                raise ConfigError(f"--out {cfg.out}: {what} {relation} the model folder {folder} (--model), which "
                                  f"--overwrite would delete; {hint}")
        if _within(out, model):
            raise ConfigError(f"--out {cfg.out} lies inside the model folder {folder} (--model), so the output would "
                              f"be written into the model; {hint}")
    folders = [("--eval-data-dir", cfg.eval_data_dir)] if cfg.eval_suites and cfg.eval_data_dir else []
    forgets = [("--forget", f) for f in cfg.forget_files()]
    for flag, given in [*forgets, ("--retain", cfg.retain), ("--validation", cfg.validation), *folders]:
        if not given:
            continue
        path = resolved_path(given)
        for what, mine in owned.items():
            if _within(path, mine):
                kind = "data folder" if flag == "--eval-data-dir" else "data file"
                relation = "is" if path == mine else "contains"
                raise ConfigError(f"--out {cfg.out}: {what} {relation} the {kind} {given} ({flag}), which "
                                  f"--overwrite would delete; {hint}")
