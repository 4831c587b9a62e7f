"""`loku unlearn`'s job once its options are read (loku.cli only parses): which kind of job the options ask
for (one run; a sequence of deletion requests; Reveal-and-Release rounds), the checks that belong to that
choice, the job itself, its output folder and the exit code (0 done, 3 the stop rule was not met)."""
from __future__ import annotations

import dataclasses

from .checks import check_unlearn
from .config import UnlearnConfig
from .tracking import refuse_sequence


def unlearn_job(cfg: UnlearnConfig, *, resume: bool = False, strategy_given: bool = True) -> int:
    """Run the job ``cfg`` (validated) asks for and write its output; ``resume``: continue the killed run
    writing to ``cfg.out``; ``strategy_given``: --strategy was given (else --reveal runs orthogonal)."""
    from .distributed import make_accelerator
    from .report import write_run
    from .trainer import unlearn

    accelerator = make_accelerator(cfg.device)
    if cfg.reveal is not None:  # the forget sets are generated, round by round (docs/algorithms.md §9)
        from .release import run_release

        refuse_sequence(cfg)
        refuse_quantized_sequence(cfg)
        if not strategy_given and not resume:  # a resumed run keeps the strategy it had
            cfg = dataclasses.replace(cfg, strategy="orthogonal")
        return run_release(cfg, accelerator, resume=resume)
    if is_sequence(cfg):
        return run_requests(cfg, accelerator, resume=resume)
    result = unlearn(cfg, accelerator=accelerator, resume=resume)
    if not accelerator.is_main_process:
        return 0
    out = write_run(result, cfg)
    report = result.report
    print(f"loku: {report['outcome']} after {report['epochs_run']} epoch(s); results in {out}/report.md")
    return 0 if report["outcome"] == "success" else 3


def is_sequence(cfg: UnlearnConfig) -> bool:
    """A sequence of requests, or one request kept as its own adapter (--strategy stack/orthogonal, --gate-fpr):
    a single run folds its adapter into the weights and fits no gate, so those options would do nothing there;
    --model naming a finished sequence's folder: one request more."""
    from .requests import previous_sequence
    from .strategies import STRATEGIES

    return (len(cfg.forget_files()) > 1 or STRATEGIES.trait(cfg.strategy, "keeps_adapters")
            or cfg.gate_fpr is not None or previous_sequence(cfg.model) is not None)


def run_requests(cfg: UnlearnConfig, accelerator, *, resume: bool) -> int:
    """Several --forget files: deletion requests one after another (docs/algorithms.md §8)."""
    from .requests import unlearn_requests, write_requests

    refuse_sequence(cfg)
    refuse_quantized_sequence(cfg)
    result = unlearn_requests(cfg, accelerator=accelerator, resume=resume)
    if not accelerator.is_main_process:
        return 0
    out = write_requests(result, cfg)
    report = result.report
    failed = [r["name"] for r in report["requests"] if r["outcome"] != "success"]
    relapsed = sorted({r["request"] for r in report["relapses"]})
    kept = [r["request"] for r in report["not_forgotten"]]
    n = len(report["requests"])
    print(f"loku: {n} request{'s' if n != 1 else ''} ({report['strategy']}); failed: {', '.join(failed) or 'none'}; "
          f"relapsed: {', '.join(relapsed) or 'none'}; not forgotten: {', '.join(kept) or 'none'}; "
          f"results in {out}/report.md")
    # Exit 3 when a request failed its own stop rule (every request not forgotten did) or relapsed.
    return 0 if not failed and not relapsed else 3


def refuse_quantized_sequence(cfg: UnlearnConfig) -> None:
    """A sequence of requests (or --reveal) stacks and merges adapters on the base, which a 4/8-bit base cannot take."""
    from .devices import quantization_of
    from .errors import ConfigError

    bits = quantization_of(cfg)
    if bits is not None:
        raise ConfigError(f"--load-in-{bits} trains the adapter of one request (one --forget, --strategy merge, no "
                          f"--gate-fpr or --reveal): a sequence folds each adapter into a base that {bits} cannot "
                          "hold; run the sequence in full precision")


def resumed_config(out: str, overrides: dict) -> UnlearnConfig:
    """The killed run's own options; only those that cannot change the result may be overridden."""
    from .checkpoint import RESUME_MAY_CHANGE, read_state
    from .release import resumable, saved_config

    # a --reveal run: its own options (its checkpoint, if any, is of the round it was killed in)
    values = saved_config(out) if resumable(out) else read_state(out)["config"]
    values.update({k: v for k, v in overrides.items() if v is not None and k in RESUME_MAY_CHANGE})
    values["out"] = out
    return check_unlearn(UnlearnConfig(**values))
