"""GPUs and memory (README "GPUs and memory"): --device, the dtype a GPU defaults to, gradient checkpointing,
4/8-bit loading refused where it cannot run, and the distributed setups loku refuses. No GPU is needed: the
GPU-only paths are reached by faking CUDA's availability, and stop at the checks before any model loads."""
from __future__ import annotations

import re
import sys
import types

import pytest
import torch

from loku.checks import check_unlearn
from loku import devices
from loku.cli import main
from loku.config import UnlearnConfig
from loku.errors import ConfigError
from test_trainer import config as trainer_config
from tiny_models import make_tiny_model, random_sequences


@pytest.fixture(autouse=True)
def _no_process_device(monkeypatch):
    """use_device sets the placement of every later load: each test starts and ends without one."""
    monkeypatch.setattr(devices, "_default", None)
    monkeypatch.setattr(devices, "_default_map", None)


def fake_cuda(monkeypatch, *, count: int = 1, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def config(root, out, **kw) -> UnlearnConfig:
    """test_trainer's tiny fila-ihl run, two epochs."""
    return trainer_config(root, out, **{"max_epochs": 2, **kw})


# --------------------------------------------------------------------------- device and dtype


def test_auto_device_and_dtype_are_a_gpu_in_bf16_when_there_is_one(monkeypatch, memorized, tmp_path):
    assert devices.resolve_device("auto") == torch.device("cpu")  # this machine: no CUDA
    assert devices.default_dtype(torch.device("cpu")) == "float32"
    assert check_unlearn(config(memorized, tmp_path / "cpu")).dtype == "float32"
    fake_cuda(monkeypatch)
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.default_dtype(torch.device("cuda")) == "bfloat16"
    assert check_unlearn(config(memorized, tmp_path / "gpu")).dtype == "bfloat16"  # recorded in report.json
    assert check_unlearn(config(memorized, tmp_path / "given", dtype="float32")).dtype == "float32"
    fake_cuda(monkeypatch, bf16=False)  # a GPU without bf16 (pre-Ampere): float32
    assert devices.default_dtype(torch.device("cuda")) == "float32"


def test_bad_or_missing_devices_are_one_clear_error(monkeypatch):
    with pytest.raises(ConfigError, match="CUDA is not available here.*--device cpu"):
        devices.resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a device"):
        devices.resolve_device("gpu")
    with pytest.raises(ConfigError, match="not a device"):
        devices.resolve_device("cpu:1")
    fake_cuda(monkeypatch, count=2)
    assert devices.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="2 CUDA device"):
        devices.resolve_device("cuda:2")


@pytest.mark.parametrize("command", [
    ["unlearn", "--forget", "F", "--out", "O", "--device", "cuda"],
    ["eval", "--model", "M", "--out", "O", "--device", "cuda"],
    ["finetune", "--data", "D", "--device", "cuda"],
    ["reveal", "--request", "R", "--out", "O", "--device", "cuda"],
    ["bench", "tdec", "--device", "cuda"],
    ["bench", "tofu", "--device", "cuda"],
])
def test_every_command_that_loads_a_model_takes_device_and_refuses_a_missing_gpu(command, capsys):
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("loku: error: --device cuda: CUDA is not available here") and err.count("\n") == 1


def test_device_map_loads_and_excludes_device(memorized, capsys):
    from loku.models import load_model

    model, _ = load_model(memorized / "base", device_map="auto")  # accelerate: all of it on the CPU here
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert main(["eval", "--model", "M", "--out", "O", "--device-map", "auto", "--device", "cpu"]) == 2
    assert "--device-map auto places the model's layers itself: drop --device cpu" in capsys.readouterr().err


def test_use_device_places_models_loaded_without_a_placement(memorized, monkeypatch):
    from transformers import AutoModelForCausalLM

    from loku.models import load_model

    seen: list[dict] = []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: seen.append(k) or original(*a, **k))
    devices.use_device("auto", "auto")
    assert devices.default_placement() == (None, "auto")
    load_model(memorized / "base")
    assert seen[-1]["device_map"] == "auto"  # accelerate places it, as --device-map asked
    devices.use_device("cpu")
    model, _ = load_model(memorized / "base")
    assert devices.default_placement() == (torch.device("cpu"), None) and "device_map" not in seen[-1]


# --------------------------------------------------------------------------- gradient checkpointing


class AttentionCalls:
    """Counts the attention forwards that build a graph: a checkpointed layer runs its attention again
    in the backward pass."""

    def __init__(self, model):
        self.count = 0
        attention = [m for n, m in model.named_modules() if n.endswith(("self_attn", "attn.attention"))]
        for module in attention:
            module.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.count += torch.is_grad_enabled()


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_layers_recompute_in_eval_mode_without_dropout():
    """docs/algorithms.md §6 (no dropout while unlearning): GPT-Neo with every dropout at 0.5 gives the same
    loss and gradients with its layers checkpointed as without, while each attention runs twice."""
    model = make_tiny_model("gpt_neo")
    model.config.attention_dropout = model.config.resid_dropout = model.config.embed_dropout = 0.5
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    ids = random_sequences(3, 16)
    calls = AttentionCalls(model)
    model.eval()
    plain = loss_and_grads(model, ids)
    assert calls.count == 2  # two layers, once each
    devices.enable_gradient_checkpointing(model)
    model.eval()
    devices.checkpointed_layers_train(model)
    calls.count = 0
    checkpointed = loss_and_grads(model, ids)
    assert calls.count == 4, "each layer must run again in the backward pass"
    torch.testing.assert_close(checkpointed[0], plain[0])
    assert checkpointed[1].keys() == plain[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(checkpointed[1][name], plain[1][name], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_unlearns_to_the_same_result(memorized, tmp_path, monkeypatch):
    """The same fila-ihl run (docs/algorithms.md §3, §6) with --gradient-checkpointing: the same losses, metrics
    and adapter, the layers recomputed in every backward pass."""
    from loku import trainer

    counted: list[AttentionCalls] = []
    adapt_model = trainer.adapt_model

    def counting_adapt_model(model, *args, **kwargs):
        counted.append(AttentionCalls(model))
        return adapt_model(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "adapt_model", counting_adapt_model)
    results = {}
    for checkpointing in (False, True):
        result = trainer.unlearn(config(memorized, tmp_path / str(checkpointing),
                                        gradient_checkpointing=checkpointing))
        results[checkpointing] = (result, counted[-1].count)
        layers = [m for m in result.model.modules() if hasattr(m, "gradient_checkpointing")]
        assert layers and all(m.gradient_checkpointing is checkpointing for m in layers)
    (plain, plain_calls), (checkpointed, checkpointed_calls) = results[False], results[True]
    # The Fisher pass (before checkpointing is on) counts the same in both; each training step's forward
    # runs its attention once more in the backward pass.
    assert checkpointed_calls > plain_calls
    for a, b in zip(plain.report["epochs"], checkpointed.report["epochs"]):
        for key in ("loss_forget", "loss_retain", "forget_ma", "val_ppl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert len(plain.report["epochs"]) == len(checkpointed.report["epochs"])
    got = dict(checkpointed.model.named_parameters())
    for name, param in plain.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(got[name], param, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- 4-bit / 8-bit


@pytest.mark.parametrize("flags,message", [
    (["--method", "full-gd", "--load-in-4bit"], "trains every weight, which a 4bit base cannot hold; use a LoRA"),
    (["--method", "fila-ihl", "--load-in-4bit"], r"Fisher-weighted SVD of the base weights \(fila\).*use lora-ihl"),
    (["--method", "lora-ihl", "--load-in-8bit"], "pass --no-save-model"),
    (["--method", "lora-ihl", "--load-in-4bit", "--no-save-model"], "runs on a CUDA GPU, and the device is cpu"),
    (["--method", "lora-ihl", "--load-in-4bit", "--load-in-8bit"], "exclude each other"),
])
def test_quantized_loading_is_refused_where_it_cannot_run(memorized, tmp_path, capsys, monkeypatch, flags, message):
    import loku.models

    monkeypatch.setattr(loku.models, "load_model", lambda *a, **k: pytest.fail("refused before loading"))
    code = main(["unlearn", "--model", str(memorized / "base"), "--forget", str(memorized / "forget.txt"),
                 "--retain", str(memorized / "retain.txt"), "--validation", str(memorized / "validation.txt"),
                 "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("loku: error: --load-in-") and re.search(message, err), err


def test_quantized_loading_without_bitsandbytes_names_the_extra(memorized, tmp_path, capsys, monkeypatch):
    fake_cuda(monkeypatch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed (import fails)
    code = main(["unlearn", "--model", str(memorized / "base"), "--forget", str(memorized / "forget.txt"),
                 "--retain", str(memorized / "retain.txt"), "--validation", str(memorized / "validation.txt"),
                 "--out", str(tmp_path / "out"), "--method", "lora-ihl", "--load-in-4bit", "--no-save-model"])
    err = capsys.readouterr().err
    assert code == 2 and "needs the bitsandbytes package" in err and "pip install 'loku[bitsandbytes]'" in err, err


def test_quantized_request_sequences_are_refused(memorized, tmp_path, capsys, monkeypatch):
    fake_cuda(monkeypatch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    import loku.requests

    monkeypatch.setattr(loku.requests, "unlearn_requests", lambda *a, **k: pytest.fail("refused before running"))
    monkeypatch.setattr("loku.distributed.make_accelerator", lambda device: types.SimpleNamespace(
        distributed_type="NO", is_main_process=True))
    code = main(["unlearn", "--model", str(memorized / "base"), "--forget", str(memorized / "forget.txt"),
                 "--retain", str(memorized / "retain.txt"), "--validation", str(memorized / "validation.txt"),
                 "--out", str(tmp_path / "out"), "--method", "lora-ihl", "--load-in-4bit", "--no-save-model",
                 "--strategy", "stack"])
    err = capsys.readouterr().err
    assert code == 2 and "--load-in-4bit trains the adapter of one request" in err, err


# --------------------------------------------------------------------------- several processes


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_sharded_setups_are_refused_before_loading(kind, memorized, tmp_path, monkeypatch):
    """docs/algorithms.md §6: the stop-rule metrics read the full weights on the main process."""
    from accelerate.utils import DistributedType

    from loku import trainer

    monkeypatch.setattr(trainer, "load_sets", lambda cfg: pytest.fail("refused before reading the data"))
    fake = types.SimpleNamespace(distributed_type=DistributedType[kind], is_main_process=True)
    with pytest.raises(ConfigError, match=f"accelerate is configured for {kind}.*DDP"):
        trainer.prepare(config(memorized, tmp_path / "out"), accelerator=fake)
    for supported in ("NO", "MULTI_CPU", "MULTI_GPU"):
        devices.check_distributed(types.SimpleNamespace(distributed_type=DistributedType[supported]))


def test_finetune_gradient_checkpointing_gives_the_same_weights(tmp_path, monkeypatch):
    """loku finetune (docs/algorithms.md §7) with --gradient-checkpointing: the same losses and weights, every
    layer recomputed in the backward pass."""
    from transformers.models.llama import modeling_llama

    from loku.finetune import FinetuneConfig, finetune
    from tiny_models import texts_of, word_tokenizer

    calls = {"n": 0}
    forward = modeling_llama.LlamaAttention.forward

    def counted(self, *args, **kwargs):
        calls["n"] += torch.is_grad_enabled()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", counted)
    (tmp_path / "data.txt").write_text("\n".join(texts_of(random_sequences(8, 12))) + "\n")
    model, tokenizer = make_tiny_model("llama"), word_tokenizer()
    results = {}
    for checkpointing in (False, True):
        calls["n"] = 0
        cfg = FinetuneConfig(model="tiny", data=[str(tmp_path / "data.txt")], out=str(tmp_path / str(checkpointing)),
                             epochs=2, lr=3e-3, batch_size=4, progress=False, gradient_checkpointing=checkpointing)
        results[checkpointing] = (finetune(cfg, model=model, tokenizer=tokenizer), calls["n"])
    (plain, plain_calls), (checkpointed, checkpointed_calls) = results[False], results[True]
    assert checkpointed_calls == 2 * plain_calls > 0
    for a, b in zip(plain.report["epochs"], checkpointed.report["epochs"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    got = dict(checkpointed.model.named_parameters())
    for name, param in plain.model.named_parameters():
        torch.testing.assert_close(got[name], param, atol=1e-5, rtol=1e-4)


def test_rank_limit_reads_the_shape_of_a_packed_4bit_weight():
    """A bitsandbytes 4-bit weight is stored as a (n*m/2, 1) byte column: --rank is checked on the layer's shape."""
    from loku.models import check_rank

    model = make_tiny_model("llama")
    layer = model.model.layers[0].self_attn.q_proj
    shape = layer.weight.shape
    layer.weight = torch.nn.Parameter(torch.zeros(shape.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)
    layer.weight.quant_state = types.SimpleNamespace(shape=shape)
    name = "model.layers.0.self_attn.q_proj"
    check_rank(model, [name], min(shape))
    with pytest.raises(ConfigError, match=rf"--rank {min(shape) + 1} is larger than layer {name} allows \(shape "
                                          rf"\({shape[0]}, {shape[1]}\)\)"):
        check_rank(model, [name], min(shape) + 1)
