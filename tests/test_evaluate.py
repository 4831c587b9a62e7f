"""The suite runner, its outputs, the `loku eval` command pieces, and the plots."""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from loku import evaluate as E
from loku import provenance
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
    assert set(E.SUITES.names()) == set(E.ALL_SUITES) | set(E.EXTRA_SUITES)
    assert "attacks" not in E.expand_suites(["all"]) and E.expand_suites(["attacks"]) == ["attacks"]


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
    # No pre-unlearning thresholds: the model's own held-out numbers are reported, never used to decide.
    assert tdec["thresholds"] is None and tdec["forgotten"] is None and tdec["threshold_source"] is None
    assert tdec["forgotten_note"].startswith("undetermined (no pre-unlearning thresholds: pass --thresholds-from")
    fixed = E.run_suites(model, tok, ["tdec"], data_dir=shared_data, limit=1, thresholds={"ma": 1.0, "el": 1.0})
    assert fixed["suites"]["tdec"]["forgotten"] is True and fixed["suites"]["tdec"]["threshold_source"] == "given"
    # "self": the evaluated model is the one before unlearning, so its held-out means are the thresholds.
    own = E.run_suites(model, tok, ["tdec"], data_dir=shared_data, limit=1, thresholds="self")["suites"]["tdec"]
    assert own["thresholds"] == {"ma": own["heldout"]["ma"], "el_10": own["heldout"]["el_10"]}
    assert isinstance(own["forgotten"], bool) and own["threshold_source"] == "self"
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

    out = provenance.jsonable({"a": torch.tensor(0.5), "b": [float("nan"), 1], "c": Path("x"), 1: torch.tensor([1, 2])})
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
    assert data["meta"]["seed"] == 5 and data["meta"]["model"] == "m" and data["meta"]["dtype"] == "float32"
    assert data["suites"]["dialogue"]["wizard_of_wikipedia"]["n"] == 1
    assert (tmp_path / "o" / "eval.md").is_file()
    bad = parser.parse_args(["--model", "m", "--out", "x", "--ma-threshold", "0.3"])
    with pytest.raises(ConfigError, match="both --ma-threshold and --el-threshold"):
        E.run_eval_command(bad)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LOKU_DATA_DIR", str(tmp_path))
    assert provenance.default_data_dir() == tmp_path
    monkeypatch.delenv("LOKU_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert provenance.default_data_dir() == tmp_path.parent / "shared" / "data"


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


# ----------------------------------------------------------------------------- tdec thresholds (§6)

# Made-up MA/EL numbers: the base memorized the forget set; unlearning forgot it but also lowered the
# held-out numbers. Against the pre-unlearning held-out means it is forgotten; against its own, not.
NUMBERS = {("base", "forget"): (0.9, 0.8), ("base", "heldout"): (0.5, 0.2),
           ("unlearned", "forget"): (0.3, 0.1), ("unlearned", "heldout"): (0.1, 0.05)}


@pytest.fixture
def fake_models(gpt2_tok, monkeypatch):
    """``load_model`` returning labelled stand-in models, and ``_ma_el`` giving NUMBERS for them."""
    import torch

    import loku.models

    models = {}
    loads = []

    def fake_load_model(name, *, adapter=None, dtype="float32", trust_remote_code=False, **_):
        label = "unlearned" if adapter is not None or "run" in str(name) else "base"
        model = torch.nn.Linear(1, 1).to(getattr(torch, dtype))
        models[id(model)] = label
        loads.append({"name": str(name), "adapter": adapter, "dtype": dtype})
        return model, gpt2_tok

    def fake_ma_el(model, batches, el_n, progress, desc):
        ma, el = NUMBERS[(models[id(model)], desc.split()[-1])]
        return {"ma": ma, f"el_{el_n}": el, "n": 2}

    monkeypatch.setattr(loku.models, "load_model", fake_load_model)
    monkeypatch.setattr(E, "_ma_el", fake_ma_el)
    return loads


def _eval(shared_data, out, *argv):
    parser = E.add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--suite", "tdec", "--data-dir", str(shared_data), "--limit", "2", "--no-progress",
                              "--out", str(out), *argv])
    assert E.run_eval_command(args) == 0
    return json.loads((out / "eval.json").read_text())


def _run_folder(tmp_path, shared_data, **thresholds):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "adapter").mkdir()
    forget = shared_data / E.DEFAULT_FORGET
    report = {"config": {"el_n": 10}, "outcome": "success",
              "thresholds": {"ma": 0.5, "el": 0.2, "source": "validation set, before unlearning", **thresholds},
              "data": {"forget": {"path": str(forget), "sha256": provenance.file_sha256(forget)}}}
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_tdec_thresholds_from_the_base_model_not_the_evaluated_one(fake_models, shared_data, tmp_path, capsys):
    data = _eval(shared_data, tmp_path / "o", "--model", "unlearned-run", "--thresholds-from", "base-model",
                 "--dtype", "bfloat16")
    tdec = data["suites"]["tdec"]
    assert tdec["thresholds"] == {"ma": 0.5, "el_10": 0.2}  # the base's held-out means, not 0.1 / 0.05
    assert tdec["forgotten"] is True and tdec["heldout"]["ma"] == 0.1
    assert tdec["threshold_source"] == "base model" and tdec["thresholds_from"] == "base-model"
    assert [(c["name"], c["dtype"]) for c in fake_models] == [("base-model", "bfloat16"),
                                                              ("unlearned-run", "bfloat16")]
    assert data["meta"]["dtype"] == "bfloat16"
    assert data["meta"]["options"]["thresholds"]["source"] == "base model"
    assert "tdec forgotten: yes (thresholds: base model)" in capsys.readouterr().out
    # --thresholds-from naming the evaluated model itself: measured once, its own held-out means.
    same = _eval(shared_data, tmp_path / "s", "--model", "base-model", "--thresholds-from", "base-model")
    assert same["suites"]["tdec"]["thresholds"] == {"ma": 0.5, "el_10": 0.2} and len(fake_models) == 3
    assert same["suites"]["tdec"]["forgotten"] is False


def test_tdec_thresholds_from_the_runs_report(fake_models, shared_data, tmp_path, capsys):
    run = _run_folder(tmp_path, shared_data)
    for argv in (["--model", str(run)], ["--model", str(run / "model")],
                 ["--model", "base-model", "--adapter", str(run / "adapter")],
                 ["--model", "base-model", "--adapter", str(run)]):
        tdec = _eval(shared_data, tmp_path / "o", *argv)["suites"]["tdec"]
        assert tdec["thresholds"] == {"ma": 0.5, "el_10": 0.2} and tdec["forgotten"] is True, argv
        assert tdec["threshold_source"] == "run report" and tdec["thresholds_from"] == str(run / "report.json")
        assert tdec["thresholds_note"] == "validation set, before unlearning"
        assert "thresholds_warning" not in tdec
    assert all(c["dtype"] == "float32" for c in fake_models)
    # The run unlearned another forget file than the one evaluated: said in eval.json and on stderr.
    report = json.loads((run / "report.json").read_text())
    report["data"]["forget"] = {"path": "other.csv", "sha256": "0" * 64}
    (run / "report.json").write_text(json.dumps(report))
    tdec = _eval(shared_data, tmp_path / "o", "--model", str(run))["suites"]["tdec"]
    assert "another forget file (other.csv)" in tdec["thresholds_warning"]
    assert "warning: the run unlearned another forget file" in capsys.readouterr().err
    # Explicit numbers win over the report, and say so.
    tdec = _eval(shared_data, tmp_path / "o", "--model", str(run), "--ma-threshold", "0.2",
                 "--el-threshold", "0.2")["suites"]["tdec"]
    assert tdec["forgotten"] is False and tdec["threshold_source"] == "given"
    # A report made with another EL_n cannot decide EL_10.
    report = json.loads((run / "report.json").read_text())
    report["config"]["el_n"] = 5
    (run / "report.json").write_text(json.dumps(report))
    with pytest.raises(ConfigError, match="--el-n 5"):
        _eval(shared_data, tmp_path / "o", "--model", str(run))


def test_tdec_without_pre_unlearning_thresholds_is_undetermined(fake_models, shared_data, tmp_path, capsys):
    data = _eval(shared_data, tmp_path / "o", "--model", "unlearned-run")
    tdec = data["suites"]["tdec"]
    assert tdec["forgotten"] is None and tdec["thresholds"] is None and tdec["threshold_source"] is None
    assert tdec["heldout"] == {"ma": 0.1, "el_10": 0.05, "n": 2}  # still reported
    assert "forgotten: undetermined (no pre-unlearning thresholds: pass --thresholds-from" in capsys.readouterr().out
    assert "forgotten: undetermined" in (tmp_path / "o" / "eval.md").read_text()
    with pytest.raises(ConfigError, match="either --thresholds-from or"):
        _eval(shared_data, tmp_path / "o", "--model", "x", "--thresholds-from", "b", "--ma-threshold", "0.1",
              "--el-threshold", "0.1")
