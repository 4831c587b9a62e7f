"""Atomic outputs: a crash or a full disk never leaves a file or folder that looks complete."""
import errno
import os

import pytest

from loku.errors import ConfigError
from loku.save import atomic_dir, atomic_write_json, atomic_write_text, check_output_dir


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert path.read_text().strip().endswith("}") and '"a": 2' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_disk_full_while_writing_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    atomic_write_text(path, "old complete report\n")

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "new report that never finishes")
    assert path.read_text() == "old complete report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_atomic_dir_crash_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed mid-save")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_existing_folder_only_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(final) as tmp:
            (tmp / "b").write_text("2")
            raise ValueError
    assert sorted(p.name for p in final.iterdir()) == ["a"]
    with atomic_dir(final) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_output_folder_is_refused_unless_overwrite(tmp_path):
    check_output_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "report.json").write_text("{}")
    with pytest.raises(ConfigError, match="--overwrite"):
        check_output_dir(tmp_path / "used", overwrite=False)
    check_output_dir(tmp_path / "used", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        check_output_dir(tmp_path / "file", overwrite=True)


def test_outputs_get_the_usual_permissions_not_the_private_temp_ones(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_text("1")
    finally:
        os.umask(umask)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


# --------------------------------------------------------------------------- adapters with residual base (§3)

def _adapter_run(tmp_path):
    """A saved float32 base and a loku adapter folder made on it (residual base + LoRA with nonzero B)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loku.adapters import save_adapter
    from loku.models import load_model
    from loku.provenance import model_fingerprint
    from tiny_models import make_tiny_model, word_tokenizer

    base_dir = tmp_path / "base"
    make_tiny_model("llama").save_pretrained(base_dir)
    word_tokenizer().save_pretrained(base_dir)
    base, _ = load_model(base_dir, progress=False)
    fingerprint = model_fingerprint(base)
    name = "model.layers.0.self_attn.q_proj.weight"
    residual = {name: base.get_parameter(name).detach() * 0.5}
    with torch.no_grad():
        base.get_parameter(name).copy_(residual[name])
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    save_adapter(peft_model, tmp_path / "adapter", residual=residual,
                 meta={"base_model": str(base_dir), "base_fingerprint": fingerprint, "method": "fila-ihl"})
    return base_dir, tmp_path / "adapter", ids, expected


def test_adapter_loads_on_its_base_in_any_dtype(tmp_path):
    import torch

    from loku.models import load_model

    base_dir, adapter, ids, expected = _adapter_run(tmp_path)
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 0.15), ("float16", 0.02)):
        model, _ = load_model(base_dir, adapter=adapter, dtype=dtype, progress=False)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        torch.testing.assert_close(logits, expected, atol=tol, rtol=tol, msg=dtype)


def test_adapter_is_refused_on_another_base_in_any_dtype(tmp_path):
    from loku.errors import ModelError
    from loku.models import load_model
    from tiny_models import make_tiny_model, word_tokenizer

    _, adapter, _, _ = _adapter_run(tmp_path)
    make_tiny_model("llama", seed=5).save_pretrained(tmp_path / "other")
    word_tokenizer().save_pretrained(tmp_path / "other")
    for dtype in ("float32", "bfloat16", "float16"):
        with pytest.raises(ModelError, match="different base"):
            load_model(tmp_path / "other", adapter=adapter, dtype=dtype, progress=False)


def test_bf16_made_adapter_on_fp16_load_of_fp32_checkpoint_says_which_dtype(tmp_path):
    import json

    from loku.errors import ModelError
    from loku.models import load_model
    from loku.provenance import model_fingerprint

    base_dir, adapter, _, _ = _adapter_run(tmp_path)
    meta_path = adapter / "loku_adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["base_fingerprint"] = model_fingerprint(load_model(base_dir, dtype="bfloat16", progress=False)[0])
    meta_path.write_text(json.dumps(meta))
    load_model(base_dir, adapter=adapter, dtype="float32", progress=False)
    load_model(base_dir, adapter=adapter, dtype="bfloat16", progress=False)
    with pytest.raises(ModelError, match="--dtype bfloat16 or float32"):
        load_model(base_dir, adapter=adapter, dtype="float16", progress=False)
