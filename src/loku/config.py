"""Run configuration: one dataclass, loadable from YAML, overridable from the command line, validated early."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class Method:
    """One row of the paper's Table 1: which parameters train, how the adapter starts, which loss."""

    adapter: str  # "full" or "lora"
    init: str | None  # initialiser name for LoRA (loku.init.INITIALIZERS)
    loss: str  # loku.losses.LOSSES
    lr: float  # the paper's learning rate for this kind of run (§6)


METHODS: dict[str, Method] = {
    "full-ga": Method("full", None, "ga", 5e-5),
    "full-gd": Method("full", None, "gd", 5e-5),
    "lora-gd": Method("lora", "gaussian", "gd", 2e-4),
    "lora-ihl": Method("lora", "gaussian", "ihl", 2e-4),
    "fila-gd": Method("lora", "fila", "gd", 2e-4),
    "fila-ihl": Method("lora", "fila", "ihl", 2e-4),  # LoKU
    "vila-ihl": Method("lora", "vila", "ihl", 2e-4),
    "npo": Method("full", None, "npo", 5e-5),
}


@dataclass
class UnlearnConfig:
    """Everything a run depends on; recorded in full in report.json."""

    forget: str | None = None
    retain: str | None = None
    validation: str | None = None
    out: str | None = None
    model: str = "smollm2-135m"
    method: str = "fila-ihl"
    rank: int = 16
    lora_alpha: float = 32.0
    targets: str = "qv-ffn"
    lr: float | None = None  # None: the method's paper default
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999  # Jang et al.'s code: 0.98
    batch_size: int = 8
    grad_accum: int = 1
    one_step_per_epoch: bool = False  # Jang et al.: effective batch = the whole forget set
    max_epochs: int = 20
    gamma: float = 1.0  # forget-term weight
    alpha: float = 1.0  # retain-term weight
    retain_term: str | None = None  # None: the loss's default (nll); "kl" or "none"
    npo_beta: float = 0.1
    fisher_mode: str = "per_sample"  # paper; "batch" = official code
    fisher_eps: float = 1e-5
    fisher_batches: int | None = None  # limit the Fisher pass to this many batches per set
    fisher_batch_size: int | None = None  # batch size of the Fisher pass; None = --batch-size
    svd: str = "exact"  # or "lowrank"
    el_n: int = 10
    el_every_epoch: bool = False
    ma_threshold: float | None = None  # None: measured on the validation set before unlearning
    el_threshold: float | None = None
    max_length: int | None = None  # None: the model's context
    truncate: bool = False
    eval_batch_size: int = 8
    eval_suites: str | None = None  # e.g. "ppl,reasoning": loku eval suites run before and after unlearning
    eval_data_dir: str | None = None  # their data (default $LOKU_DATA_DIR or ../shared/data)
    eval_limit: int | None = None  # first N items of every suite's sets
    seed: int = 0
    dtype: str = "float32"
    trust_remote_code: bool = False
    overwrite: bool = False
    progress: bool = True
    save_model: bool = True

    def method_spec(self) -> Method:
        return METHODS[self.method]

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else self.method_spec().lr

    def validate(self) -> "UnlearnConfig":
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if not self.forget:
            raise ConfigError("no forget set: pass --forget FILE (CSV with a text column, JSONL or text)")
        if not self.out:
            raise ConfigError("no output folder: pass --out DIR")
        positive = {"rank": self.rank, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "max_epochs": self.max_epochs, "el_n": self.el_n, "eval_batch_size": self.eval_batch_size}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.learning_rate() <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError(f"--adam-beta1/--adam-beta2 must lie in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        if self.fisher_batch_size is not None and (not isinstance(self.fisher_batch_size, int)
                                                   or self.fisher_batch_size < 1):
            raise ConfigError(f"--fisher-batch-size must be a positive integer, got {self.fisher_batch_size!r}")
        if self.fisher_mode not in ("per_sample", "batch"):
            raise ConfigError(f"--fisher-mode must be per_sample or batch, got {self.fisher_mode!r}")
        if self.svd not in ("exact", "lowrank"):
            raise ConfigError(f"--svd must be exact or lowrank, got {self.svd!r}")
        from .losses import RETAIN_TERMS

        if self.retain_term not in (None, "none", *RETAIN_TERMS.names()):
            raise ConfigError(f"--retain-term must be one of {', '.join(RETAIN_TERMS.names())} or none, "
                              f"got {self.retain_term!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.method_spec().adapter == "full" and self.dtype == "float16":
            raise ConfigError(f"method {self.method} trains every weight: float16 needs loss scaling, which loku does "
                              "not do; use --dtype bfloat16 (float32 master weights, bf16 compute) or float32")
        from .losses import uses_retain

        if uses_retain(self.method_spec().loss, self.retain_term) and not self.retain:
            raise ConfigError(f"method {self.method} has a retain term: pass --retain FILE (or --retain-term none)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(UnlearnConfig)}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> UnlearnConfig:
    """YAML file (optional) first, then non-None overrides on top; unknown keys are an error."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found; check the --config path") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: config file is not valid UTF-8 (byte offset {err.start}); "
                              "save it as UTF-8") from None
        except OSError as err:
            raise ConfigError(f"{path}: config file cannot be read ({err.strerror or err}); "
                              "check the --config path") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            problem = str(getattr(err, "problem", None) or err).replace("\n", " ")
            opened = getattr(err, "context_mark", None)  # e.g. an unclosed [ several lines up
            if getattr(err, "context", None) and opened and (not mark or opened.line != mark.line):
                problem += f", {err.context} on line {opened.line + 1}"
            raise ConfigError(f"{path}:{where} invalid YAML ({problem}); fix the syntax there") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a mapping of option: value")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = config_fields()
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f"{path}: " if path else ""
        guesses = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
        hint = ", ".join(f"did you mean {g[0]}?" for g in guesses.values() if g)
        raise ConfigError(f"{where}unknown option(s) {', '.join(unknown)}{f' ({hint})' if hint else ''}; "
                          f"use only known options: {', '.join(sorted(known))}")
    return UnlearnConfig(**values)
