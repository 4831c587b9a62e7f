"""The options of the evaluation suites and of ``loku eval``, each declared once.

:class:`EvalOptions` holds what the suites of :mod:`loku.evaluate` need besides the model; its
fields are the flags of ``loku eval`` and, through :func:`loku.config.suite_option`, the
``--eval-*`` flags of ``loku unlearn``. :class:`EvalCommand` holds the options of the ``loku eval``
command itself (model, output, thresholds). Both are validated by their ``validate()``; help text,
default and valid range sit in each field (:mod:`loku.options`). Kept free of torch so the
configuration can import it cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ConfigError
from .devices import DEVICE_MAPS
from .options import check_fields

ALL_SUITES = ("tdec", "ppl", "reasoning", "dialogue", "tofu", "mia")
# Suites only run when named (not part of "all"): the attacks fine-tune and quantize copies of the model.
EXTRA_SUITES = ("attacks",)
DEFAULT_FORGET = Path("tdec") / "forget" / "lm_extraction_32_0.csv"
DTYPES = ("float32", "bfloat16", "float16")
OUTPUT_FORMATS = ("loku", "openunlearning")  # eval.json/eval.md always; openunlearning.json beside them


def _parse_tasks(value: str | Sequence[str] | None) -> list[str] | None:
    """``"paper"`` -> the paper's nine lm-eval tasks; ``"a,b"`` -> ``["a", "b"]``; lists pass."""
    if value is None:
        return None
    if not isinstance(value, str):
        return list(value) or None
    if value.strip() == "paper":
        from .metrics.lm_eval_backend import PAPER_TASKS

        return list(PAPER_TASKS)
    return [t.strip() for t in value.split(",") if t.strip()] or None


@dataclass
class EvalOptions:
    """Everything a suite needs besides the model; ``files`` collects ``{path: role}`` it read."""

    data_dir: Path | None = field(default=None, metadata={
        "help": "shared data folder [default: $LOKU_DATA_DIR or ../shared/data]"})
    limit: int | None = field(default=None, metadata={
        "help": "use only the first N items of every set (N forget sequences for tdec/mia)", "range": ">= 1"})
    forget_path: Path | None = field(default=None, metadata={
        "flag": "--forget", "help": f"forget file for tdec/mia [default: DATA_DIR/{DEFAULT_FORGET.as_posix()}]"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass", "range": ">= 1"})
    seed: int = field(default=0, metadata={
        "help": "random seed, set before loading and before each suite", "range": "[0, 4294967295]"})
    progress: bool = field(default=False, metadata={"flag": "--no-progress", "help": "hide progress bars"})
    el_n: int = field(default=10, metadata={"help": "n of the EL_n metric", "range": ">= 1"})
    # Pre-unlearning thresholds for tdec: {"ma": float, "el": float, "source"?, "from"?, "note"?, "el_n"?};
    # "self" (or a dict without numbers) when the evaluated model IS the model before unlearning, so
    # its own held-out means are the thresholds; None: "forgotten" stays undetermined.
    thresholds: dict | str | None = field(default=None, metadata={"cli": False, "help": "set by loku eval"})
    tofu_forget_split: str = field(default="forget10", metadata={
        "flag": "--tofu-forget", "help": "TOFU forget split", "choices": ("forget01", "forget05", "forget10")})
    tofu_reference: str | Path | None = field(default=None, metadata={
        "help": "retain-only model's reference log or eval.json, for TOFU forget quality"})
    tofu_legacy_300: bool = field(default=False, metadata={
        "help": "truncate TOFU eval sets to 300 items like the original pipeline"})
    tofu_template: str | None = field(default=None, metadata={
        "help": "TOFU prompt template: chat (the tokenizer's chat template), tofu (TOFU's strings, by tokenizer / "
                "model type), none, or one of TOFU's by name [default: chat when the tokenizer has one, else tofu]",
        "choices": ("chat", "tofu", "none", "llama2", "phi", "chatml", "generic")})
    tofu_max_new_tokens: int = field(default=128, metadata={
        "help": "longest TOFU answer generated for ROUGE-L", "range": ">= 1"})
    lm_eval_tasks: Sequence[str] | None = field(default=None, metadata={
        "help": "comma-separated lm-eval tasks to add to the reasoning suite; 'paper' = the paper's nine "
                "(needs pip install 'loku[lm-eval]' and the hub)"})
    lm_eval_limit: int | float | None = field(default=None, metadata={
        "help": "items per lm-eval task (a fraction below 1: that share of each task) [default: --limit]",
        "range": "> 0"})
    lm_eval_include_path: str | Path | None = field(default=None, metadata={
        "flag": "--lm-eval-include", "help": "folder of custom lm-eval task YAMLs"})
    attack_prompt_tokens: int = field(default=32, metadata={
        "help": "attacks suite: prompt length of the prefix probes", "range": ">= 1"})
    attack_shift: int = field(default=16, metadata={
        "help": "attacks suite: the shifted probe's prompt starts this many tokens into the forget text",
        "range": ">= 1"})
    attack_context_tokens: int = field(default=96, metadata={
        "help": "attacks suite: tokens of unrelated Pile text put before the forget prompt", "range": ">= 1"})
    # () -> (model, tokenizer): the model that never saw the forget set (loku eval --reference), loaded by
    # the attacks suite only when it runs; quantized like the evaluated model and the relearning control.
    load_reference: Callable[[], tuple[Any, Any]] | None = field(default=None, metadata={
        "cli": False, "help": "set by loku eval --reference"})
    files: dict[str, str] = field(default_factory=dict, metadata={"cli": False, "help": "set by the suites"})
    # Items of named sets ("lambada", "pubmedqa", "dialogue": per dialogue set) in place of ``limit``; 0 leaves
    # the set out. The benches score small subsets of each, in one run_suites call.
    set_limits: dict[str, int] | None = field(default=None, metadata={"cli": False, "help": "set by the benches"})

    def __post_init__(self) -> None:
        if self.data_dir is None:
            from .provenance import default_data_dir

            self.data_dir = default_data_dir()
        self.data_dir = Path(self.data_dir)
        if self.forget_path is not None:
            self.forget_path = Path(self.forget_path)
        self.lm_eval_tasks = _parse_tasks(self.lm_eval_tasks)

    def validate(self) -> "EvalOptions":
        """Type and range of every option (one line naming the flag and its valid values)."""
        check_fields(self)
        return self

    def use(self, path: str | Path, role: str) -> Path:
        """``path`` as a set the suites read (a file, a saved ``datasets`` folder or ``hf:...``), recorded
        in ``files`` with its role; a missing file says how to point at the data."""
        from .data import is_dataset_source
        from .errors import DataError

        path = Path(path)
        if not (path.is_file() or is_dataset_source(path)):
            hint = "check --forget" if role == "forget" and self.forget_path is not None else (
                "pass --data-dir pointing at the shared data folder (or set LOKU_DATA_DIR)")
            raise DataError(f"{path}: {role} file not found; {hint}")
        self.files[str(path)] = role
        return path

    def eval_file(self, name: str) -> Path:
        return self.data_dir / "tdec" / "eval" / name

    def limit_of(self, name: str) -> int | None:
        """Items of the set ``name`` to score: its own limit where ``set_limits`` has one, else ``limit``."""
        return (self.set_limits or {}).get(name, self.limit)

    def take(self, items: list) -> list:
        return items if self.limit is None else items[: self.limit]


@dataclass
class EvalCommand:
    """The options of ``loku eval`` beside the suite options (:class:`EvalOptions`)."""

    model: str | None = field(default=None, metadata={
        "required": True, "help": "model: built-in name (smollm2-135m), local folder, loku output folder or hub id"})
    adapter: str | None = field(default=None, metadata={"help": "a loku adapter folder (OUT/adapter) to attach"})
    suite: list[str] | None = field(default=None, metadata={
        "action": "append", "help": f"suite(s) to run: {', '.join(ALL_SUITES + EXTRA_SUITES)} or all (= "
                                    f"{', '.join(ALL_SUITES)}); repeat or comma-separate [default: all]"})
    dtype: str = field(default="auto", metadata={
        "choices": ("auto", *DTYPES), "help": "dtype the model (and --thresholds-from, --reference models) is "
                                              "loaded in; auto: bfloat16 on a CUDA GPU, float32 elsewhere"})
    device: str = field(default="auto", metadata={
        "help": "cpu, cuda, cuda:N, mps or auto (a CUDA GPU when there is one) for every model loaded"})
    device_map: str | None = field(default=None, metadata={
        "choices": DEVICE_MAPS,
        "help": "instead of --device: spread a large model's layers over the GPUs (and the CPU) with accelerate"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow custom model code from the model folder (read it first)"})
    thresholds_from: str | None = field(default=None, metadata={
        "metavar": "BASE_MODEL",
        "help": "tdec: the model BEFORE unlearning; its held-out MA/EL are the forgetting thresholds "
                "[default: the thresholds in report.json when --model/--adapter is a loku output "
                "folder, else 'forgotten' is left undetermined]"})
    ma_threshold: float | None = field(default=None, metadata={
        "range": "[0, 1]", "help": "tdec: fixed MA threshold instead of the pre-unlearning held-out mean "
                                   "(Jang: 0.2994)"})
    el_threshold: float | None = field(default=None, metadata={
        "range": "[0, 1]", "help": "tdec: fixed EL threshold instead of the pre-unlearning held-out mean "
                                   "(Jang: 0.0499)"})
    reference: str | None = field(default=None, metadata={
        "metavar": "ORIGINAL_MODEL",
        "help": "also measure the distances to this model, the one that never saw the forget set (forget NLL "
                "gap, KL on held-out text, MIA AUC, repetition of continuations; docs/algorithms.md §10)"})
    relearn: bool = field(default=False, metadata={
        "help": "also run the relearning check (§11): fine-tune a copy 5/10/20 steps on half the forget file, "
                "MA/EL of the other half; --reference gets the same fine-tune as control"})
    gate: bool = field(default=True, metadata={
        "flag": "--no-gate", "help": "--model OUT with a gate (OUT/gate, --gate-fpr): evaluate the merged model (every adapter on) "
                "instead of routing each text through the gate [default: through the gate]"})
    out: str | None = field(default=None, metadata={
        "required": True, "help": "output folder for eval.json and eval.md"})
    output_format: str = field(default="loku", metadata={
        "flag": "--format", "choices": OUTPUT_FORMATS,
        "help": "openunlearning: also write openunlearning.json, the metrics computed under OpenUnlearning's key "
                "names (forget_quality, model_utility, forget_Truth_Ratio, privleak with --reference, "
                "extraction_strength, exact_memorization) [default: loku]"})

    def validate(self) -> "EvalCommand":
        """Every option alone (type, range, choices), then the ones that go together."""
        check_fields(self)
        from .devices import check_device_map, resolve_device, resolve_dtype

        check_device_map(self.device_map, self.device)
        self.dtype = resolve_dtype(self.dtype, resolve_device(self.device))  # recorded in eval.json
        if (self.ma_threshold is None) != (self.el_threshold is None):
            raise ConfigError("give both --ma-threshold and --el-threshold, or neither")
        if self.ma_threshold is not None and self.thresholds_from:
            raise ConfigError("give either --thresholds-from or --ma-threshold/--el-threshold, not both")
        return self
