"""Target resolution (docs/algorithms.md §5), rank checks and safe model loading."""
import json

import pytest

from loku.errors import ConfigError, ModelError
from loku.models import check_rank, linear_layer_names, load_model, resolve_targets
from loku.provenance import model_fingerprint
from tiny_models import make_tiny_model

QV_FFN = {
    "llama": {"self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "gemma": {"self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "gpt_neo": {"attn.attention.q_proj", "attn.attention.v_proj", "mlp.c_fc", "mlp.c_proj"},
    "gpt2": {"attn.c_attn", "mlp.c_fc", "mlp.c_proj"},
    "phi": {"self_attn.q_proj", "self_attn.v_proj", "mlp.fc1", "mlp.fc2"},
}


def _suffixes(names):
    # "model.layers.0.self_attn.q_proj" -> "self_attn.q_proj": strip the per-layer prefix
    return {".".join(n.split(".")[-2:]) if n.split(".")[-2] in ("self_attn", "mlp") else
            ".".join(n.split(".")[-3:]) if "attention" in n else ".".join(n.split(".")[-2:]) for n in names}


@pytest.mark.parametrize("arch", sorted(QV_FFN))
def test_qv_ffn_default_per_architecture(arch):
    model = make_tiny_model(arch)
    names = resolve_targets(model)
    assert len(names) == 2 * len(QV_FFN[arch])  # two layers
    assert _suffixes(names) == QV_FFN[arch]
    assert all("k_proj" not in n for n in names)


@pytest.mark.parametrize("arch", sorted(QV_FFN))
def test_all_linear_excludes_lm_head(arch):
    model = make_tiny_model(arch)
    names = resolve_targets(model, "all-linear")
    assert names == linear_layer_names(model)
    assert not any(n.endswith("lm_head") for n in names)
    assert set(resolve_targets(model, "attn")) | set(resolve_targets(model, "mlp")) <= set(names)


def test_explicit_list_and_unmatched_error_lists_layers():
    model = make_tiny_model("llama")
    assert resolve_targets(model, "k_proj,o_proj") == [n for n in linear_layer_names(model)
                                                      if n.endswith(("k_proj", "o_proj"))]
    with pytest.raises(ModelError) as err:
        resolve_targets(model, ["q_proj", "c_attn"])
    message = str(err.value)
    assert "c_attn" in message and "model.layers.N.self_attn.q_proj" in message


def test_rank_larger_than_layer_is_refused():
    model = make_tiny_model("llama")  # k_proj/v_proj are 32 -> 16 (2 kv heads of 8)
    targets = resolve_targets(model)
    check_rank(model, targets, 16)
    with pytest.raises(ConfigError, match="--rank 17 is larger"):
        check_rank(model, targets, 17)
    with pytest.raises(ConfigError, match="positive"):
        check_rank(model, targets, 0)


def test_load_local_folder_and_refuse_remote_code(tmp_path):
    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "a": 1}, unk_token="<pad>")),
                                  eos_token="a")
    tok.save_pretrained(tmp_path / "m")
    loaded, tokenizer = load_model(tmp_path / "m")
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert tokenizer.pad_token == "a"  # no pad token: falls back to eos

    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="--trust-remote-code"):
        load_model(tmp_path / "m")


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "nope") if str(tmp_path).startswith("/") else "./nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path / "empty")


# --------------------------------------------------------------------------- fingerprints across dtypes

def _saved_tiny(tmp_path, dtype="float32", seed=0, name="m"):
    import torch
    from tiny_models import word_tokenizer

    model = make_tiny_model("llama", seed=seed).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path / name)
    word_tokenizer().save_pretrained(tmp_path / name)
    return tmp_path / name


DTYPES = ("float32", "bfloat16", "float16")


def _loads(path):
    import torch

    out = {dt: load_model(path, dtype=dt, progress=False)[0] for dt in DTYPES}
    assert all(next(m.parameters()).dtype == getattr(torch, dt) for dt, m in out.items())
    return out


def test_fingerprint_agrees_across_load_dtypes_of_a_float32_checkpoint(tmp_path):
    from loku.provenance import fingerprints_match

    loads = _loads(_saved_tiny(tmp_path))
    prints = {dt: model_fingerprint(m) for dt, m in loads.items()}
    # Every pair involving the float32 load matches, in both directions (each is one rounding of the file).
    for dt in DTYPES:
        assert fingerprints_match(prints["float32"], loads[dt]), dt
        assert fingerprints_match(prints[dt], loads["float32"]), dt
    # bf16 vs fp16 of a float32 checkpoint: each rounding keeps what the other loses, so they cannot be
    # matched exactly (documented in model_fingerprint); adapters.attach_saved_adapter says what to do.
    assert not fingerprints_match(prints["bfloat16"], loads["float16"])
    assert prints["float32"].startswith("loku-fp2:float32:") and ":bf16=" in prints["float32"]


@pytest.mark.parametrize("saved", ["bfloat16", "float16"])
def test_fingerprint_agrees_across_all_load_dtypes_of_a_half_checkpoint(tmp_path, saved):
    from loku.provenance import fingerprints_match

    loads = _loads(_saved_tiny(tmp_path, saved))
    for a in DTYPES:
        for b in DTYPES:
            assert fingerprints_match(model_fingerprint(loads[a]), loads[b]), (a, b)


def test_fingerprint_refuses_another_base_in_every_dtype(tmp_path):
    import copy

    import torch

    from loku.provenance import fingerprints_match

    base = _loads(_saved_tiny(tmp_path))
    other = _loads(_saved_tiny(tmp_path, seed=5, name="other"))
    # The same base with one weight moved by 1 % (a "fine-tuned copy") is another base too.
    nudged = make_tiny_model("llama")
    with torch.no_grad():
        nudged.model.layers[1].mlp.down_proj.weight[3, 7] *= 1.01
    for a in DTYPES:
        nudged_print = model_fingerprint(copy.deepcopy(nudged).to(getattr(torch, a)))
        for b in DTYPES:
            assert not fingerprints_match(model_fingerprint(base[a]), other[b]), (a, b)
            assert not fingerprints_match(nudged_print, base[b]), (a, b)


def test_legacy_fingerprint_of_older_runs_is_still_checked(tmp_path):
    from loku.provenance import _legacy_fingerprint, fingerprints_match

    loads = _loads(_saved_tiny(tmp_path))
    old = _legacy_fingerprint(loads["float32"])
    assert len(old) == 64 and fingerprints_match(old, loads["float32"])
    assert not fingerprints_match(old, make_tiny_model("llama", seed=5))


def test_builtin_cache_is_per_transformers_major(monkeypatch, tmp_path):
    """A tokenizer saved by transformers 5 cannot be read by 4.x: environments of both majors (CI's floor
    and latest) sharing one cache must convert the built-in model into separate folders."""
    import transformers

    from loku.models import builtin_model_folder

    monkeypatch.setenv("LOKU_CACHE", str(tmp_path))
    folders = {}
    for version in ("4.56.0", "4.57.1", "5.24.0"):
        monkeypatch.setattr(transformers, "__version__", version)
        folders[version] = builtin_model_folder("smollm2-135m")
    assert folders["4.56.0"] == folders["4.57.1"] != folders["5.24.0"]
    assert all(f.parent == tmp_path / "models" for f in folders.values())
