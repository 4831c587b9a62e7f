"""Run configuration: one dataclass, loadable from YAML, overridable from the command line, validated early."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import ConfigError
from .eval_options import DTYPES, EvalOptions
from .methods import METHODS, MethodSpec
from .options import check_fields, coerce_numbers
from .reveal_options import reveal_field


def suite_option(name: str) -> Any:
    """The ``eval_<name>`` field of :class:`UnlearnConfig`: the evaluation-suite option ``name`` of
    :class:`loku.eval_options.EvalOptions`, with its default, help and range (declared there once)."""
    source = EvalOptions.__dataclass_fields__[name]
    meta = {k: v for k, v in source.metadata.items() if k != "flag"}
    meta["help"] = "--eval-suites: " + meta["help"]
    meta["suite_option"] = name
    return field(default=source.default, metadata=meta)


@dataclass
class UnlearnConfig:
    """Everything a run depends on; recorded in full in report.json. One field per ``loku unlearn`` flag."""

    forget: str | list[str] | None = field(default=None, metadata={
        "action": "append",
        "help": "forget set: CSV with a `text` column, JSONL with `text` or `question`/`answer`, or text "
                "(one per line); repeat it for a sequence of deletion requests, unlearned one after another "
                "(docs/algorithms.md §8)"})
    retain: str | None = field(default=None, metadata={"help": "retain set, same formats (the paper: WikiText)"})
    validation: str | None = field(default=None, metadata={
        "help": "held-out set never trained on, not the forget set; its EL/MA before unlearning are the stop "
                "thresholds"})
    out: str | None = field(default=None, metadata={
        "help": "output folder (written atomically); apart from the model folder and the data files' folders"})
    model: str = field(default="smollm2-135m", metadata={
        "help": "HF hub id, local model folder, loku output folder, or built-in name (default: smollm2-135m)"})
    method: str = field(default="fila-ihl", metadata={
        "help": f"one of: {', '.join(METHODS)} (default fila-ihl = LoKU)"})
    rank: int = field(default=16, metadata={"help": "LoRA rank", "range": ">= 1"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale = alpha / rank)", "range": "> 0"})
    targets: str = field(default="qv-ffn", metadata={
        "help": "qv-ffn (default), attn, mlp, all-linear, or comma-separated module-name suffixes"})
    lr: float | None = field(default=None, metadata={  # None: the method's paper default
        "help": "learning rate (default: 5e-5 full fine-tuning, 2e-4 LoRA/FILA, as in the paper)", "range": "> 0"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "range": ">= 0"})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1", "range": "[0, 1)"})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2 (Jang et al.'s code: 0.98)",
                                                       "range": "[0, 1)"})
    batch_size: int = field(default=8, metadata={"help": "forget (and retain) sequences per micro-batch",
                                                 "range": ">= 1"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step", "range": ">= 1"})
    one_step_per_epoch: bool = field(default=False, metadata={
        "help": "Jang et al.'s schedule: one optimizer step per epoch (effective batch = forget set)"})
    max_epochs: int = field(default=20, metadata={"help": "give up (outcome: failure) after this many epochs",
                                                  "range": ">= 1"})
    gamma: float = field(default=1.0, metadata={"help": "weight of the forget term of the loss", "range": ">= 0"})
    alpha: float = field(default=1.0, metadata={"help": "weight of the retain term of the loss", "range": ">= 0"})
    retain_term: str | None = field(default=None, metadata={  # None: the method's default
        "help": "retain loss: nll (default) or kl to the original model, or none"})
    forget_term: str | None = field(default=None, metadata={  # None: the method's
        "help": "forget loss instead of the method's (a registered term: ga, ihl, ihl_margin, undial, me, npo, ...); "
                "the method still sets what trains, how the adapter starts and the learning rate"})
    npo_beta: float = field(default=0.1, metadata={"help": "NPO's beta (inverse temperature)", "range": "> 0"})
    ihl_margin: float = field(default=0.1, metadata={
        "help": "ihl-margin methods: the hinge max(0, p(x_t) - max_(v != x_t) p(v) + m) is 0 once the memorized "
                "token trails the runner-up by m (m >= 1 would never reach 0: that is IHL)", "range": "(0, 1)"})
    undial_beta: float = field(default=10.0, metadata={
        "help": "undial methods: how far the memorized token's logit is lowered in the self-distillation target "
                "softmax(z_before - beta * onehot(x_t)) (UNDIAL: 3, 10 or 30)", "range": "> 0"})
    stop_rule: str = field(default="paper", metadata={
        "help": "paper (default: after each epoch, stop once forget MA and EL_10 are at or below the held-out "
                "values) or two-sided (stop at the held-out level, not past it: docs/algorithms.md §12)"})
    check_every: int | None = field(default=None, metadata={
        "help": "--stop-rule two-sided: check forget MA and NLL every K optimizer steps (default: once an epoch)",
        "range": ">= 1"})
    stop_interval: float = field(default=0.9, metadata={
        "help": "--stop-rule two-sided: the held-out band is this central bootstrap interval", "range": "(0, 1)"})
    stop_on: str | None = field(default=None, metadata={
        "help": "measure the stop rule on these texts instead of the forget set (the forget set's MA, EL and NLL "
                "in the records are theirs), e.g. the fragments a request gives when the forget set is the model's "
                "own text; the validation set is cut to their longest token length so both are measured alike "
                "(docs/algorithms.md §12)"})
    fisher_mode: str = field(default="per_sample", metadata={
        "help": "per_sample (paper, default) or batch (official code)", "choices": ("per_sample", "batch")})
    fisher_eps: float = field(default=1e-5, metadata={
        "help": "added to the Fisher before it weights the SVD (FILA)", "range": "> 0"})
    fisher_batches: int | None = field(default=None, metadata={
        "help": "limit the Fisher pass to this many batches per set (default: all)", "range": ">= 1"})
    fisher_retain_sequences: int | None = field(default=None, metadata={
        "help": "retain sequences (a seeded sample) in the Fisher pass (default: as many as the forget set; "
                "0: all of them)", "range": ">= 0"})
    fisher_batch_size: int | None = field(default=None, metadata={
        "help": "batch size of the Fisher pass (default: --batch-size)", "range": ">= 1"})
    svd: str = field(default="exact", metadata={
        "help": "SVD of the FILA/VILA initialisation: exact (float32 Gram + float64 refinement), exact64 "
                "(float64 Gram, the reference) or lowrank (randomized)", "choices": ("exact", "exact64", "lowrank")})
    el_n: int = field(default=10, metadata={"help": "n of the extraction likelihood EL_n", "range": ">= 1"})
    el_every_epoch: bool = field(default=False, metadata={
        "help": "compute EL every epoch (default: only once forget MA passes; same stopping epoch)"})
    ma_threshold: float | None = field(default=None, metadata={
        "help": "stop once forget MA is at most this (default: measured on --validation before unlearning)",
        "range": "[0, 1]"})
    el_threshold: float | None = field(default=None, metadata={
        "help": "stop once forget EL_n is at most this (default: measured on --validation before unlearning)",
        "range": "[0, 1]"})
    max_length: int | None = field(default=None, metadata={
        "help": "longest sequence in tokens, at most the model's context (default: the model's context)",
        "range": ">= 2"})
    truncate: bool = field(default=False, metadata={
        "help": "truncate sequences longer than the context (default: refuse them)"})
    template: str | None = field(default=None, metadata={
        "help": "how question/answer, prompt/completion and messages items become tokens: chat (the tokenizer's "
                "chat template; default when it has one), tofu (TOFU's strings; the default otherwise), none (as "
                "given), or a TOFU template name (chatml, llama2, phi, generic); only the answer is unlearned; "
                "--eval-suites tofu scores with it too",
        "suite_option": "tofu_template"})  # scored in the format it was unlearned in
    eval_batch_size: int = suite_option("batch_size")
    eval_suites: str | None = field(default=None, metadata={
        "help": "loku eval suites run before and after unlearning, e.g. ppl,reasoning"})
    eval_data_dir: str | None = suite_option("data_dir")
    eval_limit: int | None = suite_option("limit")
    seed: int = field(default=0, metadata={"help": "random seed", "range": "[0, 4294967295]"})
    dtype: str = field(default="auto", metadata={
        "help": "dtype the model is loaded and trained in; auto: bfloat16 on a CUDA GPU, float32 elsewhere",
        "choices": ("auto", *DTYPES)})
    device: str = field(default="auto", metadata={
        "help": "cpu, cuda, cuda:N, mps or auto (a CUDA GPU when there is one); under accelerate launch each "
                "process uses its own GPU"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each layer's activations in the backward pass (less memory; each layer runs forward "
                "twice a step)"})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "LoRA methods with a Gaussian start: load the base in 4-bit NF4 (QLoRA; bitsandbytes, a CUDA "
                "GPU, --no-save-model)"})
    load_in_8bit: bool = field(default=False, metadata={
        "help": "LoRA methods with a Gaussian start: load the base in 8-bit (bitsandbytes, a CUDA GPU, "
                "--no-save-model)"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow custom model code named by a local model's config (off by default)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})
    progress: bool = field(default=True, metadata={"help": "hide progress bars"})
    report_to: str | list[str] | None = field(default="none", metadata={
        "action": "append", "help": "log step-level loss terms, lr and grad norm and each epoch's metrics to "
                                    "tensorboard, wandb or trackio (comma-separated or repeated; default none)"})
    logging_dir: str | None = field(default=None, metadata={
        "help": "--report-to: folder of the logs (default: OUT/runs, written beside OUT while training)"})
    save_model: bool = field(default=True, metadata={
        "help": "do not save the merged model (the adapter and the report are saved)"})
    strategy: str = field(default="merge", metadata={
        "help": "with several --forget requests: merge (each request's adapter folded into the model before the "
                "next, the paper), stack (one frozen adapter per request) or orthogonal (stack plus O-LoRA's "
                "penalty between the new adapter and the earlier ones)"})
    orthogonal_lambda: float = field(default=0.5, metadata={
        "help": "--strategy orthogonal: weight lambda of sum_i ||A_i A_k^T||_F^2 (O-LoRA's default 0.5)",
        "range": ">= 0"})
    gate_fpr: float | None = field(default=None, metadata={
        "help": "--strategy stack or orthogonal: fit the gate (each request's adapter only for inputs close to its "
                "forget set), thresholds for this false-positive rate on half of --validation, rates reported on "
                "the other half (default: no gate)", "range": "[0, 1]"})
    gate_shrinkage: float = field(default=0.2, metadata={
        "help": "the gate's covariance shrinkage towards a scaled identity", "range": "[0, 1]"})
    gate_mode: str = field(default="hard", metadata={
        "choices": ("hard", "soft"),
        "help": "--gate-fpr: hard (a request's adapter fully on or off) or soft (O3: scaled by sigmoid(10c - 2) of "
                "a calibrated score c, 1 within the threshold, 0 beyond the distance calibrated for twice the rate)"})
    gate_window: int = field(default=8, metadata={
        "help": "--gate-fpr: the gate scores windows of this many tokens (stride half of it) and decides from the "
                "most in-distribution one, so text around a forget prompt cannot dilute it; about a prompt's "
                "length", "range": ">= 2"})
    reveal: str | None = field(default=None, metadata={
        "help": "instead of --forget: a request (JSON/YAML {description, fragments} or text) whose text the model "
                "reveals itself, unlearned in rounds of reveal -> unlearn, one adapter a round (Reveal-and-Release, "
                "docs/algorithms.md §9; --strategy orthogonal unless given)"})
    reveal_rounds: int = field(default=3, metadata={"help": "--reveal: at most this many rounds", "range": ">= 1"})
    reveal_budget: int = reveal_field("budget")  # a round's; the options of loku.reveal_options.RevealSettings
    reveal_selector: str = reveal_field("selector")
    reveal_max_new_tokens: int = reveal_field("max_new_tokens")
    reveal_stop_reward: float = field(default=0.1, metadata={
        "help": "--reveal: stop once a round's mean reward is below this (the generations stopped revealing)",
        "range": ">= 0"})
    reveal_patience: int = field(default=2, metadata={
        "help": "--reveal: stop after this many rounds in a row that reveal nothing new (see --reveal-min-novelty)",
        "range": ">= 1"})
    reveal_min_novelty: float = field(default=0.5, metadata={
        "help": "--reveal: a round reveals something new when one of its collected texts has at least this share of "
                "its n-grams in neither the request nor an earlier round's texts; a round that reveals nothing new "
                "is not unlearned (it would push the earlier rounds' text down again) and counts towards "
                "--reveal-patience", "range": "(0, 1]"})
    reveal_stop_on: str = field(default="revealed", metadata={
        "help": "--reveal: what each round's stop rule measures: revealed (its own generated texts) or fragments "
                "(the request's fragments, against the validation set cut to their length: the rounds end once "
                "a round leaves the fragments at the held-out level; docs/algorithms.md §9, §12)",
        "choices": ("revealed", "fragments")})

    def __post_init__(self) -> None:
        # One --forget (the flag appends) is the single run it always was: the field holds a path.
        if isinstance(self.forget, (list, tuple)):
            self.forget = self.forget[0] if len(self.forget) == 1 else list(self.forget)

    def forget_files(self) -> list[str]:
        """The forget files in request order (one for a single run)."""
        if not self.forget:
            return []
        return [self.forget] if isinstance(self.forget, str) else list(self.forget)

    def method_spec(self) -> MethodSpec:
        return METHODS[self.method]

    def loss_terms(self) -> tuple[str, str]:
        """(forget term, retain term) of the run: the method's, --forget-term / --retain-term replacing them."""
        return self.method_spec().loss_terms(self.retain_term, self.forget_term)

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else self.method_spec().lr

    def validate(self) -> "UnlearnConfig":
        """The options on their own, before any file is read or written: each option alone (type, range
        and choices from its field), the ones that must agree, the input paths against each other. What
        another module knows (a strategy's traits, a loss term's needs, the device, the suites, what the
        output may replace) its owner checks: :func:`loku.checks.check_unlearn` runs both, and is what
        ``loku unlearn`` and :func:`loku.trainer.unlearn` call. One-line :class:`ConfigError` naming the flag
        and what to do."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.reveal is not None:
            return self._validate_reveal()
        if not self.forget:
            raise ConfigError("no forget set: pass --forget FILE (CSV with a text column, JSONL or text), or "
                              "--reveal REQUEST to unlearn what the model reveals about a request")
        if not self.out:
            raise ConfigError("no output folder: pass --out DIR")
        check_fields(self)  # type, range and choices of every option, from its field
        check_targets(self.targets)
        if not all(isinstance(f, str) and f for f in self.forget_files()):
            raise ConfigError(f"--forget must be file paths, got {self.forget!r}")
        check_forget_files_distinct(self.forget_files())
        if self.gate_fpr is None and self.gate_mode != "hard":
            raise ConfigError(f"--gate-mode {self.gate_mode} sets how the gate scales the adapters: fit a gate with "
                              "--gate-fpr RATE (and --strategy stack or orthogonal)")
        if self.gate_fpr is not None and not self.validation:
            raise ConfigError("--gate-fpr calibrates the gate on held-out text: pass --validation FILE")
        check_validation_apart(self)
        if self.stop_on is not None and not self.validation:
            raise ConfigError(f"--stop-on {self.stop_on} is measured against the held-out level: pass --validation "
                              "FILE (cut to the --stop-on texts' length)")
        return self

    def _validate_reveal(self) -> "UnlearnConfig":
        """--reveal: the forget set of each round is generated; everything else as a sequence of requests."""
        if self.forget:
            raise ConfigError("--reveal generates the forget set: pass --reveal REQUEST or --forget FILE, not both")
        if not Path(self.reveal).is_file():
            raise ConfigError(f"{self.reveal}: request file not found (--reveal); write the description and/or "
                              "fragments there")
        if self.gate_fpr is not None:
            raise ConfigError("--gate-fpr is not supported with --reveal (the rounds' forget sets are the model's own "
                              "text, too close to everything to gate on)")
        if self.reveal_stop_on == "fragments" and self.stop_on is not None:
            raise ConfigError("--reveal-stop-on fragments measures the request's fragments: drop --stop-on, or pass "
                              "--reveal-stop-on revealed")
        self.round_config().validate()
        return self

    def round_config(self) -> "UnlearnConfig":
        """A --reveal run's options as one round's run: its forget set the file the first round writes (and,
        with --reveal-stop-on fragments, its stop rule on the request's fragments, which the run writes)."""
        work = f"{self.out}.reveal"
        return dataclasses.replace(self, reveal=None, forget=f"{work}/round-01/forget.jsonl",
                                   stop_on=f"{work}/fragments.jsonl" if self.reveal_stop_on == "fragments"
                                   else self.stop_on)

    def eval_options(self) -> dict[str, Any]:
        """The ``eval_*`` options as :class:`loku.eval_options.EvalOptions` fields (``run_suites`` keywords)."""
        return {f.metadata["suite_option"]: getattr(self, f.name) for f in dataclasses.fields(self)
                if "suite_option" in f.metadata}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def option_defaults() -> dict[str, Any]:
    """Every ``loku unlearn`` option's default, as ``UnlearnConfig.to_dict()`` writes it."""
    return {f.name: f.default for f in dataclasses.fields(UnlearnConfig) if f.default is not dataclasses.MISSING}


def check_targets(targets: str | Sequence[str]) -> None:
    """--targets names at least one layer: a preset or module-name suffixes. An empty value would reach
    PEFT as an adapter on nothing (its own error, exit 1, after the model is loaded)."""
    pieces = targets.split(",") if isinstance(targets, str) else list(targets)
    if not any(isinstance(p, str) and p.strip() for p in pieces):
        raise ConfigError(f"--targets {targets!r} names no layer; pass a preset (qv-ffn, attn, mlp, all-linear) or "
                          "comma-separated module-name suffixes such as q_proj,v_proj")


def resolved_path(path: str | Path) -> Path:
    """``path`` made absolute with its links followed, to compare two paths for the same file."""
    path = Path(path).expanduser()
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare the path as written
        return path.absolute()


def check_validation_apart(cfg: UnlearnConfig) -> None:
    """The validation set gives the stop thresholds, so it must not be the forget set (same file).

    Same texts in another file are refused once the sets are read (:func:`loku.data.check_validation_not_forget`).
    """
    for forget in cfg.forget_files():
        if cfg.validation and resolved_path(cfg.validation) == resolved_path(forget):
            raise ConfigError(f"--validation {cfg.validation} is the forget set (--forget {forget}): the stop "
                              "thresholds would be measured on the texts being unlearned; pass held-out texts the "
                              "model was never trained on, or --ma-threshold and --el-threshold instead of "
                              "--validation")


def check_forget_files_distinct(files: list[str]) -> None:
    """A sequence of requests unlearns each file once (docs/algorithms.md §8): the same file twice is refused.

    Requests that are different files sharing texts are refused once read
    (:func:`loku.data.check_requests_disjoint`).
    """
    seen: dict[Path, int] = {}
    for number, given in enumerate(files, start=1):
        key = resolved_path(given)
        if key in seen:
            raise ConfigError(f"--forget {given} is given twice (requests {seen[key]} and {number}): each deletion "
                              "request is unlearned once; remove the repeated --forget (put texts that belong "
                              "together in one file)")
        seen[key] = number


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
    return UnlearnConfig(**coerce_numbers(UnlearnConfig, values))
