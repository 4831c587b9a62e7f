"""Where a model runs and in what precision (README "GPUs and memory").

``--device`` (cpu, cuda, cuda:N, mps, auto), ``--device-map`` for inference-only commands, the default
dtype (bf16 on a GPU that has it, float32 elsewhere), ``--gradient-checkpointing``, 4/8-bit loading through
bitsandbytes for LoRA methods, and the distributed setups loku refuses (FSDP, DeepSpeed). Everything that
can be wrong is checked before a model is loaded.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from .errors import ConfigError

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placements over GPUs and CPU

DEVICE_HELP = ("cpu, cuda, cuda:N, mps or auto (the GPU when CUDA has one, else the CPU; mps only when asked) "
               "[default: auto]")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")
# Set by a command's --device / --device-map for every model it loads (use_device); None: the CPU.
_default: torch.device | None = None
_default_map: str | None = None


def add_device_arguments(parser: Any, *, device_map: bool = False) -> Any:
    """``--device`` (and, for commands that only run the model, ``--device-map``) on an argparse parser."""
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    if device_map:
        parser.add_argument("--device-map", default=None, metavar="{" + ",".join(DEVICE_MAPS) + "}",
                            help="instead of --device: spread a large model's layers over the GPUs (and the CPU)")
    return parser


def resolve_device(name: str | None = "auto") -> torch.device:
    """The device ``--device NAME`` means, or one clear error (a GPU asked for where there is none).

    ``auto`` is the device :func:`use_device` set for this process, else ``cuda`` when CUDA has a device,
    else the CPU: MPS only when asked, since MPS has no float64, which some metric sums use."""
    name = (name or "auto").strip().lower()
    match = _DEVICE.match(name)
    if match is None or (match[2] is not None and match[1] != "cuda"):
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N (N a GPU index), mps or auto")
    kind, index = match[1], match[2]
    if kind == "auto":
        return _default if _default is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                              f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu, or install a CUDA "
                              "build of torch on a machine with an NVIDIA GPU")
        if index is not None and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        return torch.device(name)
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: MPS (Apple GPU) is not available here; use --device cpu")
    return torch.device(kind)


def use_device(name: str | None, device_map: str | None = None) -> torch.device:
    """Make ``--device NAME`` (or ``--device-map``) the placement of every model this command loads
    (:func:`loku.models.load_model` without a placement of its own) and unlearns (``--device auto``): the
    evaluated, reference and threshold models of ``loku eval``; the benches' planting, unlearning and
    measurements."""
    global _default, _default_map
    check_device_map(device_map, name)
    _default, _default_map = None, None
    _default, _default_map = resolve_device(name), device_map
    return _default


def default_placement() -> tuple[torch.device | None, str | None]:
    """(device, device_map) set by :func:`use_device`; (None, None): models stay where they load, the CPU."""
    return (None if _default_map else _default), _default_map


def default_dtype(device: torch.device) -> str:
    """The dtype a model is loaded in when ``--dtype auto``: bfloat16 on a CUDA device that supports it (half
    the memory, the tensor cores' format), float32 elsewhere (bf16 matmuls are slow on CPUs, and the
    numbers loku reports on CPU are float32 ones)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    return default_dtype(device) if dtype in (None, "auto") else dtype


def place(model: Any, device: torch.device | str | None) -> Any:
    """``model.to(device)``, except for a bitsandbytes model, which was placed when it was loaded."""
    if device is not None and not getattr(model, "is_quantized", False):
        model.to(device)
    return model


def check_device_map(device_map: str | None, device: str | None) -> None:
    if device_map is None:
        return
    if device_map not in DEVICE_MAPS:
        raise ConfigError(f"--device-map {device_map!r}: use one of {', '.join(DEVICE_MAPS)}")
    if (device or "auto") != "auto":
        raise ConfigError(f"--device-map {device_map} places the model's layers itself: drop --device {device}")


# --------------------------------------------------------------------------- 4-bit / 8-bit (QLoRA)


def quantization_of(cfg: Any) -> str | None:
    """``"4bit"``, ``"8bit"`` or None from ``cfg.load_in_4bit`` / ``cfg.load_in_8bit``."""
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ConfigError("--load-in-4bit and --load-in-8bit exclude each other: pass one")
    return "4bit" if cfg.load_in_4bit else "8bit" if cfg.load_in_8bit else None


def check_device_options(cfg: Any) -> None:
    """--device names a device here, --dtype "auto" becomes the dtype the run will have (the report records
    it), and the dtype and quantization suit the method."""
    device = resolve_device(cfg.device)
    cfg.dtype = resolve_dtype(cfg.dtype, device)
    check_quantization(cfg, device)
    if cfg.method_spec().full_weights and cfg.dtype == "float16":
        raise ConfigError(f"method {cfg.method} trains every weight: float16 needs loss scaling, which loku does "
                          "not do; use --dtype bfloat16 (float32 master weights, bf16 compute) or float32")


def check_quantization(cfg: Any, device: torch.device) -> None:
    """A 4/8-bit base trains only a LoRA adapter on a CUDA GPU with bitsandbytes: anything else is refused
    here, before the model is loaded, naming the fix."""
    bits = quantization_of(cfg)
    if bits is None:
        return
    flag = f"--load-in-{bits}"
    method = cfg.method_spec()
    if method.full_weights:
        raise ConfigError(f"{flag}: method {cfg.method} trains every weight, which a {bits} base cannot hold; use a "
                          "LoRA method (lora-ihl, lora-gd, lora-npo, ...) or drop the flag")
    from .initializers import INITIALIZERS

    if INITIALIZERS.trait(method.init, "uses_fisher") or INITIALIZERS.trait(method.init, "replaces_base"):
        raise ConfigError(f"{flag}: method {cfg.method} starts its adapter from the Fisher-weighted SVD of the base "
                          f"weights ({method.init}), which a {bits} base does not hold in full precision; use "
                          "lora-ihl (the same loss, a Gaussian start) or drop the flag")
    if cfg.save_model:
        raise ConfigError(f"{flag}: folding the adapter into a {bits} base would round it away; pass --no-save-model "
                          "(the adapter and the report are saved; attach the adapter to the full-precision base)")
    if device.type != "cuda":
        raise ConfigError(f"{flag}: bitsandbytes quantization runs on a CUDA GPU, and the device is {device}; run on a "
                          "machine with an NVIDIA GPU (--device cuda) or drop the flag")
    from .extras import require

    require("bitsandbytes", "bitsandbytes", flag)


def bitsandbytes_config(bits: str, compute_dtype: str) -> Any:
    """transformers' BitsAndBytesConfig: NF4 with double quantization (QLoRA) or LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if bits == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=getattr(torch, compute_dtype))
    return BitsAndBytesConfig(load_in_8bit=True)


def prepare_quantized(model: Any, gradient_checkpointing: bool) -> Any:
    """PEFT's preparation of a 4/8-bit base for training an adapter (norms in float32, input gradients)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


# --------------------------------------------------------------------------- gradient checkpointing


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (non-reentrant
    checkpoints). With a PEFT model it is set on the base model; transformers then also makes the embeddings'
    output require gradients, which the frozen base of an adapter needs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()


def checkpointed_layers_train(model: torch.nn.Module) -> None:
    """Set the training flag of the checkpointed layers alone (not of their children).

    transformers checkpoints a layer only in training mode, and loku unlearns in eval mode (no dropout,
    Jang et al.). The flag of the layer itself turns its checkpointing on; its attention and dropout modules
    keep theirs (off). A layer that applies dropout by its own flag (OPT's) would drop out; the supported
    architectures (Llama, Mistral, Qwen2, Gemma, GPT-Neo, GPT-2, Phi) do not. ``model.eval()`` undoes it."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True


# --------------------------------------------------------------------------- several processes


def check_distributed(accelerator: Any) -> None:
    """Refuse the accelerate setups under which loku's numbers would be wrong.

    The stop-rule metrics run on the main process on the unwrapped model (distributed.main_then_broadcast):
    with FSDP or DeepSpeed ZeRO-3 its parameters are shards; under DeepSpeed every ``accelerator.backward``
    also steps the engine, which loku's own gradient accumulation (distributed.plan_steps) does not expect.
    DDP (the default of ``accelerate launch`` and ``torchrun``) keeps a full copy on every process."""
    kind = str(getattr(accelerator, "distributed_type", "")).split(".")[-1].upper()
    reasons = {"FSDP": "FSDP shards the parameters, and the stop-rule metrics read the full weights on the main "
                       "process",
               "DEEPSPEED": "DeepSpeed steps its engine in every backward pass (and ZeRO-3 shards the parameters), "
                            "which loku's gradient accumulation and stop-rule metrics do not support",
               "MEGATRON_LM": "Megatron-LM splits the layers across processes"}
    if kind in reasons:
        raise ConfigError(f"accelerate is configured for {kind}: {reasons[kind]}; run with DDP instead (`accelerate "
                          "config`: multi-GPU, no FSDP/DeepSpeed; or `torchrun`), and use --load-in-4bit or "
                          "--gradient-checkpointing for a model that does not fit one GPU")
