"""The suite runner, its outputs, the `loku eval` command pieces, and the plots."""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from loku import evaluate as E
from loku.errors import ConfigError, DataError
from test_reasoning import gpt2_tok  # noqa: F401  (fixture re-used)
from tiny_models import make_tiny_model

OTHERS = ("loku.metrics.memorization", "loku.metrics.perplexity", "loku.metrics.mia")


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def tiny(gpt2_tok):
    return make_tiny_model("gpt_neo", vocab=50257, n_ctx=512), gpt2_tok


def test_expand_suites():
    assert E.expand_suites(["all"]) == list(E.ALL_SUITES)
    assert E.expand_suites(["tofu,ppl", "tofu"]) == ["tofu", "ppl"]
    with pytest.raises(ConfigError, match="unknown eval suite 'nope'"):
        E.expand_suites(["nope"])
    with pytest.raises(ConfigError):
        E.expand_suites([""])
    assert set(E.SUITES.names()) == set(E.ALL_SUITES)


def test_run_suites_on_a_tiny_model_and_write_outputs(tiny, shared_data, tmp_path):
    model, tok = tiny
    results = E.run_suites(model, tok, ["reasoning", "dialogue", "tofu"], data_dir=shared_data, limit=2,
                           batch_size=4, seed=3, model_name="tiny", tofu_forget_split="forget01",
                           tofu_max_new_tokens=4)
    suites = results["suites"]
    assert suites["reasoning"]["lambada"]["n"] == 2 and suites["reasoning"]["pubmedqa"]["n"] == 2
    assert suites["dialogue"]["blended_skill_talk"]["n"] == 2 and 0 <= suites["dialogue"]["mean_f1"] <= 1
    assert suites["tofu"]["splits"]["forget"]["n"] == 2 and suites["tofu"]["model_utility"] is not None
    meta = results["meta"]
    assert meta["seed"] == 3 and meta["limit"] == 2 and meta["suites"] == ["reasoning", "dialogue", "tofu"]
    assert meta["versions"]["torch"] and meta["versions"]["transformers"]
    lambada = str(shared_data / "tdec" / "eval" / "lambada.csv")
    assert meta["data_files"][lambada]["sha256"] == hashlib.sha256(Path(lambada).read_bytes()).hexdigest()
    assert any(p.endswith("forget01_perturbed.jsonl") for p in meta["data_files"])
    assert set(meta["seconds"]) == {"reasoning", "dialogue", "tofu"}

    json_path, md_path = E.write_eval_outputs(results, tmp_path / "out")
    loaded = json.loads(json_path.read_text())
    assert loaded["suites"]["reasoning"]["lambada"]["accuracy"] == suites["reasoning"]["lambada"]["accuracy"]
    md = md_path.read_text()
    assert md.startswith("# loku eval") and "## reasoning" in md and "| lambada.accuracy |" in md
    assert "| splits.retain.rouge_l_recall |" in md and "per_item" not in md
    assert not list((tmp_path / "out").glob(".*"))  # no temp files left behind

    # The same model's eval.json serves as its own TOFU reference: forget quality 1.
    again = E.run_suites(model, tok, ["tofu"], data_dir=shared_data, limit=2, tofu_forget_split="forget01",
                         tofu_max_new_tokens=2, tofu_reference=json_path)
    assert again["suites"]["tofu"]["forget_quality"] == pytest.approx(1.0)
    assert str(json_path) in again["meta"]["data_files"]


@pytest.mark.skipif(not all(_have(m) for m in OTHERS), reason="memorization/perplexity/mia modules not present yet")
def test_tdec_ppl_mia_suites_on_a_tiny_model(tiny, shared_data):
    model, tok = tiny
    results = E.run_suites(model, tok, ["tdec", "ppl", "mia"], data_dir=shared_data, limit=2, batch_size=2)
    tdec = results["suites"]["tdec"]
    assert tdec["forget"]["n"] == 2 and tdec["heldout"]["n"] == 2
    assert 0 <= tdec["forget"]["ma"] <= 1 and 0 <= tdec["forget"]["el_10"] <= 1
    assert tdec["thresholds"] == {"ma": tdec["heldout"]["ma"], "el_10": tdec["heldout"]["el_10"]}
    assert isinstance(tdec["forgotten"], bool)
    fixed = E.run_suites(model, tok, ["tdec"], data_dir=shared_data, limit=1, thresholds={"ma": 1.0, "el": 1.0})
    assert fixed["suites"]["tdec"]["forgotten"] is True
    ppl = results["suites"]["ppl"]
    assert set(ppl) == {"pile", "wikitext", "dm_mathematics"}
    assert all(v["ppl"] > 1 and v["n"] == 2 for v in ppl.values())
    assert results["suites"]["mia"]["n_members"] == 2
    json.dumps(results, allow_nan=False)


def test_run_suites_errors(tiny, tmp_path, shared_data):
    model, tok = tiny
    with pytest.raises(DataError, match="data folder not found"):
        E.run_suites(model, tok, ["reasoning"], data_dir=tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"lambada\.csv: LAMBADA file not found"):
        E.run_suites(model, tok, ["reasoning"], data_dir=tmp_path)
    with pytest.raises(ConfigError, match="limit"):
        E.run_suites(model, tok, ["reasoning"], data_dir=shared_data, limit=0)
    with pytest.raises(ConfigError, match="unknown evaluation option"):
        E.run_suites(model, tok, ["reasoning"], data_dir=shared_data, colour="red")


def test_jsonable_cleans_tensors_and_nan():
    import torch

    out = E._jsonable({"a": torch.tensor(0.5), "b": [float("nan"), 1], "c": Path("x"), 1: torch.tensor([1, 2])})
    assert out == {"a": 0.5, "b": [None, 1], "c": "x", "1": [1, 2]}


def test_cli_arguments_and_command(tiny, shared_data, tmp_path, monkeypatch):
    model, tok = tiny
    parser = E.add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", "m", "--suite", "dialogue", "--data-dir", str(shared_data), "--limit", "1",
                              "--seed", "5", "--out", str(tmp_path / "o"), "--no-progress"])
    calls = {}

    def fake_load_model(name, *, adapter=None, trust_remote_code=False, **_):
        calls.update(name=name, adapter=adapter, trust=trust_remote_code)
        return model, tok

    import loku.models

    monkeypatch.setattr(loku.models, "load_model", fake_load_model, raising=False)
    assert E.run_eval_command(args) == 0
    assert calls == {"name": "m", "adapter": None, "trust": False}
    data = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert data["meta"]["seed"] == 5 and data["meta"]["model"] == "m"
    assert data["suites"]["dialogue"]["wizard_of_wikipedia"]["n"] == 1
    assert (tmp_path / "o" / "eval.md").is_file()
    bad = parser.parse_args(["--model", "m", "--out", "x", "--ma-threshold", "0.3"])
    with pytest.raises(ConfigError, match="both --ma-threshold and --el-threshold"):
        E.run_eval_command(bad)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LOKU_DATA_DIR", str(tmp_path))
    assert E.default_data_dir() == tmp_path
    monkeypatch.delenv("LOKU_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert E.default_data_dir() == tmp_path / ".." / "shared" / "data"


# ----------------------------------------------------------------------------- plots

def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_epoch_curves_png(tmp_path):
    from loku.plots import plot_epoch_curves

    epochs = [{"epoch": 0, "forget_ma": 0.9, "val_ma": 0.3, "forget_el": 0.5, "val_el": 0.05, "val_ppl": 20.0},
              {"epoch": 1, "forget_ma": 0.5, "val_ma": 0.3, "forget_el": 0.2, "val_el": 0.05, "val_ppl": 21.0},
              {"epoch": 2, "forget_ma": 0.2, "val_ma": 0.3, "forget_el": 0.01, "val_el": 0.05, "val_ppl": None}]
    out = plot_epoch_curves(epochs, tmp_path / "sub" / "epochs.png")
    assert _is_png(out) and out == tmp_path / "sub" / "epochs.png"
    assert _is_png(plot_epoch_curves([{"forget_ma": 0.5}, {"forget_ma": 0.4}], tmp_path / "ma_only.png"))
    with pytest.raises(ConfigError):
        plot_epoch_curves([], tmp_path / "x.png")
    with pytest.raises(ConfigError):
        plot_epoch_curves([{"epoch": 0, "loss": 1.0}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists() and not list(tmp_path.glob(".*"))


def test_utility_vs_forgetting_png(tmp_path):
    from loku.plots import plot_utility_vs_forgetting

    points = [{"label": "GA", "forgetting": 0.9, "utility": 0.4}, {"label": "FILA+IHL", "x": 0.95, "y": 0.6}]
    assert _is_png(plot_utility_vs_forgetting(points, tmp_path / "tradeoff.png", x_label="1 - EL_10"))
    with pytest.raises(ConfigError, match="point 0"):
        plot_utility_vs_forgetting([{"label": "bad"}], tmp_path / "bad.png")
