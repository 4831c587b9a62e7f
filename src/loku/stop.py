"""Stop rules: when the unlearning loop stops, and which state it keeps (docs/algorithms.md §6, §12).

The trainer asks its rule three things and decides nothing itself: after each optimizer step
"check now, and stop?" (:meth:`StopRule.after_step`), after each epoch "stop?" (:meth:`StopRule.after_epoch`,
which sets the epoch record's ``success`` and ``stopped``), and at the end "which state is best?"
(:meth:`StopRule.keep_best`, which puts that state's trainable weights back). A rule is a class
registered in :data:`STOP_RULES` with its traits (``needs_validation``, ``checks_within_epoch``).

* ``paper``: LoKU / Jang et al.: after each epoch, stop once forget MA and EL_n are at or below the
  held-out values; the last state is kept.
* ``two-sided``: the target is the held-out level, with a band from the held-out set's own spread;
  below the band (still memorized) training goes on, above it (forgotten past text never seen) is
  an overshoot. Checked every ``--check-every`` optimizer steps (MA and NLL are one forward pass);
  the check closest to the held-out level is the state kept.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .errors import ConfigError
from .registry import Registry

BOOTSTRAP_SAMPLES = 1000  # resamples of the held-out set per band; the band's quantiles move < 1% beyond this
BOOTSTRAP_SEED_OFFSET = 30_000  # apart from the other seeded draws of a run (shuffles: +epoch, +10_000; Fisher: +20_000)


HeldOut = Callable[[Any], dict[str, float]]  # the run -> the held-out set's {"ma", "el"} the thresholds default to


class StopRule:
    """The paper's rule; the base of the others. Holds only the thresholds: the rest is in the epoch records.

    ``held_out``: where thresholds not given in the config come from (default: the run's own "before"
    measurement of the validation set; a sequence of requests gives the model before its first request's).
    """

    name = "paper"

    def __init__(self, cfg, held_out: HeldOut | None = None) -> None:
        self.cfg = cfg
        self.held_out = held_out
        self.thresholds: dict[str, float] | None = None  # {"ma", "el"}, set by set_thresholds

    def set_thresholds(self, run) -> None:
        """Forget MA/EL at or below these succeed (§6): each the config's, else the held-out set's before
        unlearning. Called fresh and on resume alike (the "before" numbers are in the checkpoint)."""
        given = {"ma": self.cfg.ma_threshold, "el": self.cfg.el_threshold}
        if any(v is None for v in given.values()):
            held = (self.held_out(run) if self.held_out is not None
                    else {"ma": run.before["val_ma"], "el": run.before["val_el"]})
            given = {k: held[k] if v is None else v for k, v in given.items()}
        self.thresholds = given

    def calibrate(self, run) -> None:
        """On the model before unlearning (``run.original``, else ``run.model`` before the adapter): the rule's
        targets."""

    def restore(self, state: dict[str, Any] | None, best: dict[str, Tensor]) -> None:
        """Resuming: the targets and the best state so far, from the checkpoint (:meth:`state`, :meth:`best_weights`)."""

    def after_step(self, run) -> bool:
        """After each optimizer step: True ends the epoch and the run here."""
        return False

    def after_epoch(self, run, record: dict[str, Any]) -> None:
        """Forget MA and EL at or below the held-out thresholds (§6); the record holds the epoch's measurement."""
        record["success"] = bool(record["forget_ma"] <= self.thresholds["ma"] and record.get("forget_el") is not None
                                 and record["forget_el"] <= self.thresholds["el"])

    def keep_best(self, run) -> None:
        """After the last epoch: leave the state the rule chose in ``run.model`` (the paper: the last one)."""

    def state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps besides the epoch records (JSON), or None."""
        return None

    def best_weights(self) -> dict[str, Tensor]:
        return {}

    def report(self) -> dict[str, Any] | None:
        return None


STOP_RULES: Registry[type[StopRule]] = Registry("stop rule")
STOP_RULES.register("paper")(StopRule)


def make_stop_rule(cfg, held_out: HeldOut | None = None) -> StopRule:
    """``cfg.stop_rule``'s rule; ``held_out``: see :class:`StopRule`."""
    return STOP_RULES.get(cfg.stop_rule)(cfg, held_out)


def check_stop_options(cfg) -> None:
    """Before any work: the rule exists, and has what it needs (a held-out set; checks inside an epoch)."""
    if cfg.stop_rule not in STOP_RULES:
        raise ConfigError(f"--stop-rule must be one of {', '.join(STOP_RULES.names())}, got {cfg.stop_rule!r}")
    if cfg.check_every is not None and not STOP_RULES.trait(cfg.stop_rule, "checks_within_epoch"):
        raise ConfigError(f"--check-every checks the stop rule between epochs' ends, which --stop-rule {cfg.stop_rule} "
                          "does not (it checks once an epoch): pass --stop-rule two-sided, or drop --check-every")
    if STOP_RULES.trait(cfg.stop_rule, "needs_validation") and not cfg.validation:
        raise ConfigError(f"--stop-rule {cfg.stop_rule} stops at the level of held-out text and takes its band from "
                          "that text's spread: pass --validation FILE (texts of the forget set's kind, never trained "
                          "on); --ma-threshold/--el-threshold are the paper rule's")


# --------------------------------------------------------------------------- two-sided


@dataclass(frozen=True)
class Band:
    """The held-out level of one metric and its band [lo, hi]; ``memorized`` is +1 where a higher value
    means more memorized (MA), -1 where lower does (NLL)."""

    center: float
    lo: float
    hi: float
    memorized: int

    def position(self, value: float) -> float:
        """Signed distance from the centre in band half-widths, positive towards "still memorized":
        in the band within [-1, 1], below -1 an overshoot."""
        width = (self.hi - self.center) if value >= self.center else (self.center - self.lo)
        return self.memorized * (value - self.center) / max(width, 1e-12)


def bootstrap_band(values: Tensor, draws: int, level: float, seed: int, memorized: int) -> Band:
    """The central ``level`` interval of the mean of ``draws`` sequences resampled from ``values``:
    the spread a set of ``draws`` never-seen sequences would show (the forget set's size)."""
    values = values.double()
    generator = torch.Generator().manual_seed(seed)
    means = values[torch.randint(len(values), (BOOTSTRAP_SAMPLES, draws), generator=generator)].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=means.dtype)).tolist()
    center = float(values.mean())
    return Band(center, min(lo, center), max(hi, center), memorized)


@dataclass
class Check:
    """One measurement of the forget set: where it stands against the held-out bands."""

    step: int
    epoch: int
    forget_ma: float
    forget_nll: float
    distance: float  # max over the metrics of |position|: <= 1 in the band
    side: str  # "under" (still memorized), "in" (at the held-out level) or "over" (past it)


def place(bands: dict[str, Band], values: dict[str, float]) -> tuple[float, str]:
    """(distance, side) of forget-set values against the bands: any metric past its band is an
    overshoot (further training only pushes it further), else any short of it is "under"."""
    positions = [bands[k].position(values[k]) for k in bands]
    side = "over" if min(positions) < -1 else "under" if max(positions) > 1 else "in"
    return max(abs(p) for p in positions), side


def sequence_scores(model, batches: list[dict]) -> tuple[Tensor, Tensor]:
    """(MA, mean token NLL) per sequence of ``batches``, one float32 forward pass each."""
    from .lm import eval_mode
    from .metrics.memorization import memorization_and_sequence_nll
    from .provenance import model_device

    device = model_device(model)
    ma, nll = [], []
    with eval_mode(model):
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            m, n = memorization_and_sequence_nll(model, b["input_ids"], b["attention_mask"], b["labels"])
            ma.append(m.float().cpu())
            nll.append(n.cpu())
    return torch.cat(ma), torch.cat(nll)


@STOP_RULES.register("two-sided", needs_validation=True, checks_within_epoch=True)
class TwoSidedRule(StopRule):
    """Stop at the held-out level, not past it (§12); keep the check closest to it.

    A check puts the forget set's mean MA and mean token NLL against bands around the held-out set's
    (measured on the model before unlearning, bootstrap over its sequences). The run stops at the
    first check past a band (an overshoot), or once a check in the bands has been seen and a later
    one is no closer (the level was passed), or after ``--max-epochs``. The state kept is the
    closest check's; the run succeeds when that check is in the bands.
    """

    name = "two-sided"

    def __init__(self, cfg, held_out: HeldOut | None = None) -> None:
        super().__init__(cfg, held_out)
        self.bands: dict[str, Band] = {}
        self.checks: list[Check] = []
        self.best: Check | None = None
        self._best_weights: dict[str, Tensor] = {}
        self.stop = False

    # ---- targets

    def calibrate(self, run) -> None:
        # The held-out level of the model the run is anchored to (a sequence: the model before its first
        # request, so a later request is not held to the level the earlier ones drifted to).
        anchor = run.original if run.original is not None else run.model

        def measure() -> dict[str, Any]:
            ma, nll = sequence_scores(anchor, run.eval_batches["validation"])
            # as many draws as the set the checks measure (the forget set, or --stop-on's texts)
            draws, seed = len(run.sets.measured()[0].ids), self.cfg.seed + BOOTSTRAP_SEED_OFFSET
            return {"forget_ma": asdict(bootstrap_band(ma, draws, self.cfg.stop_interval, seed, +1)),
                    "forget_nll": asdict(bootstrap_band(nll, draws, self.cfg.stop_interval, seed + 1, -1))}

        self.bands = {k: Band(**v) for k, v in run.on_main(measure).items()}

    def restore(self, state: dict[str, Any] | None, best: dict[str, Tensor]) -> None:
        self.bands = {k: Band(**v) for k, v in state["bands"].items()}
        self.checks = [Check(**c) for c in state["checks"]]
        self.best = min(self.checks, key=lambda c: c.distance, default=None)
        self._best_weights = dict(best)
        self.stop = bool(state["stop"])

    # ---- checks

    def check(self, run, epoch: int) -> None:
        """Measure the forget set now; remember the state if it is the closest so far; decide."""
        from .checkpoint import trainable_state

        model = run.accelerator.unwrap_model(run.model)
        values = run.on_main(lambda: {k: float(v.double().mean()) for k, v in
                                      zip(("forget_ma", "forget_nll"), sequence_scores(model, run.eval_batches["forget"]))})
        distance, side = place(self.bands, values)
        check = Check(run.optimizer_steps, epoch, values["forget_ma"], values["forget_nll"], distance, side)
        self.checks.append(check)
        if self.best is None or check.distance < self.best.distance:  # ties keep the earlier (fewer steps)
            self.best = check
            self._best_weights = {k: v.detach().to("cpu", copy=True) for k, v in trainable_state(model).items()}
        passed = self.best.side == "in" and check is not self.best
        self.stop = side == "over" or passed
        run.log(f"loku: step {check.step}: forget MA {check.forget_ma:.3f}, NLL {check.forget_nll:.3f} "
                f"({side}, distance {distance:.2f})")

    def after_step(self, run) -> bool:
        every = self.cfg.check_every
        if every is None or run.optimizer_steps % every:
            return False
        self.check(run, len(run.epochs) + 1)
        return self.stop

    def after_epoch(self, run, record: dict[str, Any]) -> None:
        epoch = record["epoch"]
        if not self.checks or self.checks[-1].step != run.optimizer_steps:
            self.check(run, epoch)
        record["checks"] = [asdict(c) for c in self.checks if c.epoch == epoch]
        in_band = self.best is not None and self.best.side == "in"
        # The last epoch ends the run: a success if the closest check was in the bands.
        record["stopped"] = self.stop or (epoch >= self.cfg.max_epochs and in_band)
        record["success"] = bool(record["stopped"] and in_band)

    def keep_best(self, run) -> None:
        if self.best is None or self.best.step == run.optimizer_steps:
            return
        params = dict(run.accelerator.unwrap_model(run.model).named_parameters())
        with torch.no_grad():
            for name, value in self._best_weights.items():
                params[name].copy_(value.to(params[name].device))

    # ---- records

    def state(self) -> dict[str, Any]:
        return {"bands": {k: asdict(b) for k, b in self.bands.items()}, "checks": [asdict(c) for c in self.checks],
                "stop": self.stop}

    def best_weights(self) -> dict[str, Tensor]:
        return self._best_weights

    def report(self) -> dict[str, Any]:
        best = self.best
        if best is None:
            verdict = "not checked"
        elif best.side == "in":
            verdict = "at the held-out level"
        elif any(c.side == "over" for c in self.checks):
            verdict = "overshoot"  # jumped past the band between two checks: a smaller --check-every or lr
        else:
            verdict = "not reached"
        return {"rule": self.name, "interval": self.cfg.stop_interval, "check_every": self.cfg.check_every,
                "bands": {k: asdict(b) for k, b in self.bands.items()}, "verdict": verdict,
                "overshoot_seen": any(c.side == "over" for c in self.checks),
                "chosen": asdict(best) if best is not None else None, "checks": len(self.checks)}
