"""Experiment tracking (``--report-to``, as transformers' ``report_to``): step-level loss terms, learning
rate and gradient norm, and every epoch's stop-rule metrics, sent to tensorboard, wandb or trackio.

One class per tracker in :data:`TRACKERS` (traits: the module it imports and the package to install),
so a new tracker is one decorated class. Only the main process logs. The trackers' packages are
checked when the options are (:func:`check_report_to`), before any model is loaded.

Where the logs go: ``--logging-dir`` if given; otherwise ``OUT.runs`` while the run trains (OUT itself
is written whole at the end, temp then rename) and ``OUT/runs`` once the output is written
(:func:`move_into_output`).
"""
from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .errors import ConfigError
from .registry import Registry

if TYPE_CHECKING:
    import torch

TRACKERS: Registry = Registry("tracker")
NONE = "none"
PROJECT = "loku"  # the wandb / trackio project runs are logged to


def tracker_names(report_to: str | Iterable[str] | None) -> list[str]:
    """``--report-to`` as a list of tracker names: a name, comma-separated names or a list of them; none -> []."""
    if report_to is None:
        return []
    pieces = report_to.split(",") if isinstance(report_to, str) else [p for item in report_to
                                                                      for p in str(item).split(",")]
    names = list(dict.fromkeys(p.strip() for p in pieces if p.strip()))
    return [] if names == [NONE] else names


def check_report_to(report_to: str | Iterable[str] | None) -> list[str]:
    """The tracker names, each known and with its package installed; else one :class:`ConfigError`."""
    names = tracker_names(report_to)
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--report-to {name}: unknown tracker; choose from {', '.join(TRACKERS.names())} "
                              f"or {NONE} (comma-separated for several)")
        if importlib.util.find_spec(TRACKERS.trait(name, "module")) is None:
            package, extra = TRACKERS.trait(name, "package"), TRACKERS.trait(name, "extra")
            raise ConfigError(f"--report-to {name} needs the {package} package, which is not installed: "
                              f"pip install {package}" + (f" (or pip install 'loku[{extra}]')" if extra else ""))
    return names


def staging_dir(out: str | Path) -> Path:
    """Where a run without --logging-dir logs while it trains (beside OUT, like its checkpoint OUT.ckpt)."""
    out = Path(out)
    return out.with_name(out.name + ".runs")


def log_dir(logging_dir: str | None, out: str | None) -> Path:
    return Path(logging_dir) if logging_dir else staging_dir(out or "runs/loku")


def move_into_output(cfg: Any, folder: Path) -> None:
    """The staged logs become ``folder/runs`` (the finished output) when --logging-dir was not given."""
    staged = staging_dir(cfg.out)
    if tracker_names(cfg.report_to) and not cfg.logging_dir and staged.is_dir():
        shutil.move(str(staged), str(folder / "runs"))


# --------------------------------------------------------------------------- the trackers


class Tracker:
    """One backend: scalars at a step; ``close`` flushes."""

    def log(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Write what is buffered (after each epoch, so a killed run keeps its curves)."""

    def close(self) -> None:
        self.flush()


@TRACKERS.register("tensorboard", module="tensorboard", package="tensorboard", extra="tracking")
class TensorBoardTracker(Tracker):
    def __init__(self, folder: Path, config: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run's steps after its checkpoint replace those the killed run had logged.
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=resume_step)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@TRACKERS.register("wandb", module="wandb", package="wandb")
class WandbTracker(Tracker):
    def __init__(self, folder: Path, config: dict[str, Any], resume_step: int | None) -> None:
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=PROJECT, name=Path(str(config.get("out") or folder)).name, dir=str(folder),
                              config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


@TRACKERS.register("trackio", module="trackio", package="trackio")
class TrackioTracker(Tracker):
    def __init__(self, folder: Path, config: dict[str, Any], resume_step: int | None) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=PROJECT, name=Path(str(config.get("out") or folder)).name, config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


# --------------------------------------------------------------------------- what a run logs


class Tracking:
    """The trackers of one run; empty (every call does nothing) when none is asked for or off the main process."""

    def __init__(self, trackers: list[Tracker] | None = None) -> None:
        self.trackers = trackers or []

    @property
    def active(self) -> bool:
        return bool(self.trackers)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(scalars, step)

    def log_step(self, step: int, loss_sums: dict[str, float], micro_batches: int, model, optimizer) -> None:
        """One optimizer step, before the update: its loss terms (mean over this process's micro-batches),
        the learning rate and the gradient norm. The trainer does not clip, so this norm is the step's."""
        if not self.active:
            return
        scalars = {f"train/{key}": value / max(micro_batches, 1) for key, value in loss_sums.items()}
        scalars["train/lr"] = float(optimizer.param_groups[0]["lr"])
        scalars["train/grad_norm"] = grad_norm(model.parameters())
        self.log(scalars, step)

    def log_epoch(self, record: dict[str, Any], step: int) -> None:
        """An epoch's record (report.json's ``epochs`` entry) at the optimizer step it ended on; the two-sided
        rule's checks each at their own step."""
        if not self.active:
            return
        self.log({f"epoch/{key}": value for key, value in numbers(record).items()}, step)
        for check in record.get("checks", []):
            self.log({f"stop/{key}": value for key, value in numbers(check).items() if key not in ("step", "epoch")},
                     check["step"])
        self.flush()

    def flush(self) -> None:
        for tracker in self.trackers:
            tracker.flush()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a record (flags as 0/1); None and text are left out."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, str) and math.isfinite(float(v))}


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """The L2 norm of every gradient together, accumulated in float32."""
    import torch

    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def open_tracking(report_to: str | Iterable[str] | None, logging_dir: str | None, out: str | None,
                  config: dict[str, Any], *, is_main_process: bool = True, resume_step: int | None = None) -> Tracking:
    """The trackers ``report_to`` names, logging under ``log_dir(logging_dir, out)``; none off the main process."""
    names = check_report_to(report_to)
    if not names or not is_main_process:
        return Tracking()
    folder = log_dir(logging_dir, out)
    if resume_step is None and not logging_dir:  # a fresh run: a killed earlier run's staged logs are stale
        shutil.rmtree(folder, ignore_errors=True)
    return Tracking([TRACKERS.get(name)(folder, config, resume_step) for name in names])


def check_tracking(cfg: Any) -> None:
    """--report-to names installed trackers; --logging-dir lies apart from what the output replaces."""
    if not check_report_to(cfg.report_to) or not cfg.logging_dir or not cfg.out:
        return
    from .checkpoint import checkpoint_dir

    logs = Path(cfg.logging_dir).expanduser().resolve()
    for owned in (Path(cfg.out), checkpoint_dir(cfg.out)):
        owned = owned.expanduser().resolve()
        if logs == owned or owned in logs.parents:
            raise ConfigError(f"--logging-dir {cfg.logging_dir} lies inside {owned}, which the output replaces when "
                              "it is written; leave --logging-dir out (the logs then go to OUT/runs) or choose a "
                              "folder apart from --out")


def refuse_sequence(cfg: Any) -> None:
    """Tracking covers single runs; a sequence of requests (or --reveal's rounds) restarts the trainer per request."""
    if tracker_names(cfg.report_to):
        raise ConfigError("--report-to tracks a single unlearning run; it is not supported with several --forget "
                          "requests, --strategy stack/orthogonal, --gate-fpr, --reveal or --model OUT_OF_A_SEQUENCE: "
                          "drop --report-to (each request's epochs are in report.json)")
