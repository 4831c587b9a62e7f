"""End to end (ALGORITHMS.md §3, §6): a tiny model that memorized 4 sequences is unlearned by
fila-ihl until the stop rule holds; the saved output reloads with plain transformers."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from loku.cli import main
from loku.config import UnlearnConfig
from loku.errors import ModelError
from loku.models import load_model, model_fingerprint
from loku.report import write_run
from loku.trainer import unlearn
from tiny_models import VOCAB, make_tiny_model, texts_of

def config(root, out, **kw) -> UnlearnConfig:
    base = dict(model=str(root / "base"), forget=str(root / "forget.txt"), retain=str(root / "retain.txt"),
                validation=str(root / "validation.txt"), out=str(out), method="fila-ihl", rank=4, lora_alpha=8,
                lr=1e-2, batch_size=4, max_epochs=40, progress=False, seed=0)
    base.update(kw)
    return UnlearnConfig(**base)


def test_fila_ihl_forgets_until_stop_rule_and_saved_model_reloads(memorized, tmp_path):
    cfg = config(memorized, tmp_path / "run")
    original, tokenizer = load_model(cfg.model)
    fingerprint = model_fingerprint(original)
    result = unlearn(cfg, model=original, tokenizer=tokenizer)
    report = result.report
    assert model_fingerprint(original) == fingerprint, "the input model must not be modified"
    assert report["outcome"] == "success", report["epochs"]
    assert report["before"]["forget_ma"] > 0.95 and report["before"]["forget_el"] > 0.9
    last = report["epochs"][-1]
    assert last["forget_ma"] <= report["thresholds"]["ma"] and last["forget_el"] <= report["thresholds"]["el"]
    assert report["after"]["forget_el"] == pytest.approx(last["forget_el"])
    # EL is only measured once MA passes; earlier epochs leave it empty, never a stale value.
    for e in report["epochs"][:-1]:
        assert e["forget_el"] is None or e["forget_ma"] <= report["thresholds"]["ma"]
    assert 0 < report["trainable_share"] < 0.5
    assert report["targets"] and report["init"]

    out = write_run(result, cfg)
    saved = json.loads((out / "report.json").read_text())
    assert saved["config"]["method"] == "fila-ihl" and saved["versions"]["torch"]
    assert saved["data"]["forget"]["sha256"] and "failed" not in (out / "report.md").read_text().split("Outcome")[1][:30]
    assert not list(tmp_path.glob(".run*")), "no temporary folder may remain"

    batch = tokenizer(texts_of(torch.randint(3, VOCAB, (2, 12))), return_tensors="pt")
    with torch.no_grad():
        expected = result.model(input_ids=batch["input_ids"]).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits, expected, atol=1e-5, rtol=1e-5)
        rebuilt, _ = load_model(cfg.model, adapter=out / "adapter")
        torch.testing.assert_close(rebuilt(input_ids=batch["input_ids"]).logits, expected, atol=1e-5, rtol=1e-5)
        # The known bug of the public code: adapter on the ORIGINAL base gives W + sBA, not W_res + sBA.
        from peft import PeftModel
        wrong = PeftModel.from_pretrained(load_model(cfg.model)[0], str(out / "adapter"))
        assert not torch.allclose(wrong(input_ids=batch["input_ids"]).logits, expected, atol=1e-3)

    other = make_tiny_model("llama", seed=5)
    with pytest.raises(ModelError, match="different base"):
        from loku.save import attach_saved_adapter
        attach_saved_adapter(other, out / "adapter")


def test_failure_is_reported_when_max_epochs_pass(memorized, tmp_path):
    cfg = config(memorized, tmp_path / "run", lr=1e-9, max_epochs=2, method="lora-ihl")
    result = unlearn(cfg)
    assert result.report["outcome"] == "failed"
    assert result.report["epochs_run"] == 2 and result.report["epochs_to_success"] is None
    write_run(result, cfg)
    assert "**failed**" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize("method", ["full-ga", "full-gd", "lora-gd", "fila-gd", "npo", "vila-ihl"])
def test_every_method_runs_an_epoch(memorized, tmp_path, method):
    cfg = config(memorized, tmp_path / method, method=method, max_epochs=1, lr=1e-3)
    result = unlearn(cfg)
    assert result.report["epochs_run"] == 1
    assert torch.isfinite(torch.tensor(result.report["epochs"][0]["loss_forget"]))


def test_given_thresholds_and_one_step_per_epoch(memorized, tmp_path):
    cfg = config(memorized, tmp_path / "run", validation=None, ma_threshold=0.5, el_threshold=0.2,
                 one_step_per_epoch=True, max_epochs=3)
    report = unlearn(cfg).report
    assert report["thresholds"] == {"ma": 0.5, "el": 0.2, "source": "given"}


def test_cli_unlearn_and_bad_input(memorized, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["unlearn", "--model", str(memorized / "base"), "--forget", str(memorized / "forget.txt"),
            "--retain", str(memorized / "retain.txt"), "--validation", str(memorized / "validation.txt"),
            "--rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--batch-size", "4", "--max-epochs", "40",
            "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert (out / "report.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert main(args) == 2  # the output folder exists now
    assert "--overwrite" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("id,body\n1,hello\n")
    assert main(["unlearn", "--forget", str(bad), "--validation", str(bad), "--retain", str(bad),
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "text" in err


def test_yaml_config_with_cli_override(memorized, tmp_path):
    from loku.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(f"method: lora-gd\nrank: 4\nforget: {memorized / 'forget.txt'}\n")
    cfg = load_config(path, {"rank": 8, "out": str(tmp_path / "o")})
    assert cfg.method == "lora-gd" and cfg.rank == 8
    from loku.errors import ConfigError
    path.write_text("ranks: 4\n")
    with pytest.raises(ConfigError, match="unknown option"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown method"):
        UnlearnConfig(forget="f", out="o", method="magic").validate()


def test_eval_suites_run_before_and_after_and_reach_the_report(memorized, tmp_path, shared_data):
    cfg = config(memorized, tmp_path / "run", max_epochs=1, eval_suites="dialogue", eval_data_dir=str(shared_data),
                 eval_limit=1)
    result = unlearn(cfg)
    suites = result.report["suites"]
    assert suites["before"]["meta"]["suites"] == ["dialogue"] and suites["after"]["suites"]["dialogue"]["mean_f1"] >= 0
    write_run(result, cfg)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Evaluation suites" in md and "| dialogue.blended_skill_talk.f1 |" in md
    from loku.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown eval suite"):
        unlearn(config(memorized, tmp_path / "bad", eval_suites="nope"))
