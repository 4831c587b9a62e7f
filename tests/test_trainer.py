"""End to end (docs/algorithms.md §3, §6): a tiny model that memorized 4 sequences is unlearned by
fila-ihl until the stop rule holds; the saved output reloads with plain transformers."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from loku.checks import check_unlearn
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
        # The known bug of the public code (adapter on the ORIGINAL base gives W + sBA, not W_res + sBA) is
        # avoided: the saved adapter is s(BA - B0A0) on the original base, so plain PEFT gives the model too.
        from peft import PeftModel
        plain = PeftModel.from_pretrained(load_model(cfg.model)[0], str(out / "adapter"))
        torch.testing.assert_close(plain(input_ids=batch["input_ids"]).logits, expected, atol=1e-5, rtol=1e-5)

    other = make_tiny_model("llama", seed=5)
    with pytest.raises(ModelError, match="different base"):
        from loku.adapters import attach_saved_adapter
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
        check_unlearn(UnlearnConfig(forget="f", out="o", method="magic"))


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


def test_one_step_per_epoch_makes_exactly_one_optimizer_step_per_epoch(memorized, tmp_path, monkeypatch):
    # Jang et al.'s schedule (docs/algorithms.md §6): effective batch = the whole forget set.
    steps = []
    original_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or original_step(self, *a, **k))
    cfg = config(memorized, tmp_path / "run", batch_size=1, one_step_per_epoch=True, max_epochs=3,
                 ma_threshold=0.0, el_threshold=0.0)  # never met: all 3 epochs run
    report = unlearn(cfg).report
    assert report["epochs_run"] == 3 and len(steps) == 3
    assert [e["optimizer_steps"] for e in report["epochs"]] == [1, 2, 3]
    steps.clear()
    report = unlearn(config(memorized, tmp_path / "accum", batch_size=1, grad_accum=3, max_epochs=1,
                            ma_threshold=0.0, el_threshold=0.0)).report
    assert len(steps) == 2 and report["epochs"][0]["optimizer_steps"] == 2  # 4 micro-batches in groups of 3, 1


def test_plan_steps_weights_give_the_single_process_gradient():
    from loku.distributed import plan_steps

    pairs = list("abcde")
    # One process, accumulation 2: the short last group is divided by its own size (1), not by 2.
    assert plan_steps(pairs, 2, 1, 0) == [[("a", 0.5), ("b", 0.5)], [("c", 0.5), ("d", 0.5)], [("e", 1.0)]]
    # Three processes, global group 3, 4 micro-batches: the processes with no batch left pad with weight 0,
    # every process makes the same number of passes, and the DDP mean of the weighted gradients is the mean
    # over each group's real micro-batches.
    shares = [plan_steps(pairs[:4], 3, 3, rank) for rank in range(3)]
    assert [len(s) for s in shares] == [2, 2, 2] and all(len(step) == 1 for s in shares for step in s)
    for step in range(2):
        real = [(p, w) for s in shares for p, w in s[step] if w > 0]
        assert sum(w / 3 for _, w in real) == pytest.approx(1.0)
        assert len({w for _, w in real}) == 1
    assert shares[0][1] == [("d", 3.0)] and shares[1][1] == [("d", 0.0)] and shares[2][1] == [("d", 0.0)]


def test_lazy_el_stops_at_the_same_epoch_as_el_every_epoch(memorized, tmp_path):
    # EL is measured only once MA passes (its threshold must hold too): the same stopping epoch.
    lazy = unlearn(config(memorized, tmp_path / "lazy")).report
    every = unlearn(config(memorized, tmp_path / "every", el_every_epoch=True)).report
    assert lazy["outcome"] == every["outcome"] == "success"
    assert lazy["epochs_to_success"] == every["epochs_to_success"]
    assert all(e["forget_el"] is not None for e in every["epochs"])
    assert lazy["epochs"][-1]["forget_el"] == every["epochs"][-1]["forget_el"]


def test_bf16_full_fine_tuning_keeps_every_update(memorized, tmp_path):
    # Adam steps of lr 5e-5 are below bf16's resolution for most weights: without float32 master weights
    # about half of the weights never change at all.
    cfg = config(memorized, tmp_path / "run", method="full-ga", lr=5e-5, batch_size=1, max_epochs=3, dtype="bfloat16",
                 ma_threshold=0.0, el_threshold=0.0)
    original, _ = load_model(cfg.model)
    result = unlearn(cfg)
    assert result.report["precision"] == {"weights": "float32", "compute": "bfloat16"}
    after = dict(result.model.named_parameters())
    changed = total = 0
    for name, before in original.named_parameters():
        if before.ndim != 2:
            continue
        now = after[name].detach().float()
        changed += int(((now != before) & (now != before.bfloat16().float())).sum())
        total += before.numel()
    assert changed / total > 0.95


def test_float16_full_fine_tuning_is_refused_and_threshold_sources_are_reported_each(memorized, tmp_path):
    from loku.errors import ConfigError

    with pytest.raises(ConfigError, match="bfloat16"):
        check_unlearn(config(memorized, tmp_path / "x", method="full-gd", dtype="float16"))
    report = unlearn(config(memorized, tmp_path / "run", ma_threshold=0.5, max_epochs=1)).report
    assert report["thresholds"]["ma"] == 0.5 and report["thresholds"]["el"] == report["before"]["val_el"]
    assert report["thresholds"]["source"] == "MA given and EL from the validation set, before unlearning"


def test_paper_config_takes_one_step_per_epoch_with_jangs_adam():
    # configs/tdec-gptneo-125m.yaml claims the paper's schedule (docs/algorithms.md §6): 32 sequences, one step per epoch.
    from pathlib import Path

    from loku.config import load_config
    from loku.distributed import plan_steps, step_group_size

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tdec-gptneo-125m.yaml")
    batches = list(range(32 // cfg.batch_size))
    for world in (1, 3):
        group = step_group_size(cfg.one_step_per_epoch, cfg.grad_accum, len(batches), world)
        assert [len(plan_steps(batches, group, world, rank)) for rank in range(world)] == [1] * world
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.weight_decay) == (0.9, 0.98, 0.0)
    assert (cfg.method, cfg.rank, cfg.targets, cfg.learning_rate()) == ("fila-ihl", 16, "qv-ffn", 2e-4)


def test_fisher_retain_sample_defaults_to_the_forget_set_size(memorized, tmp_path):
    """§2: the retain Fisher is estimated on a seeded sample (as many as the forget set by default)."""
    from loku.data import TokenizedSet
    from loku.trainer import fisher_retain_sample

    retain = TokenizedSet([[i, i + 1] for i in range(10)], [0] * 10)
    cfg = config(memorized, tmp_path / "x")
    sample = fisher_retain_sample(retain, 3, cfg)
    assert len(sample) == 3 and all(ids in retain.ids for ids in sample.ids)
    assert sample.ids == sorted(sample.ids), "file order is kept"
    assert fisher_retain_sample(retain, 3, cfg).ids == sample.ids, "the sample depends on the seed only"
    assert fisher_retain_sample(retain, 3, config(memorized, tmp_path / "x", seed=1)).ids != sample.ids
    assert fisher_retain_sample(retain, 3, config(memorized, tmp_path / "x", fisher_retain_sequences=0)) is retain
    assert len(fisher_retain_sample(retain, 3, config(memorized, tmp_path / "x", fisher_retain_sequences=7))) == 7
    assert fisher_retain_sample(retain, 30, cfg) is retain

    result = unlearn(config(memorized, tmp_path / "run", max_epochs=1))
    assert result.report["init"]["fisher_sequences"] == {"forget": 4, "retain": 4}


@pytest.mark.parametrize("method", ["fila-ihl-margin", "fila-undial", "fila-me", "lora-undial"])
def test_never_seen_forget_terms_unlearn_end_to_end(memorized, tmp_path, method):
    """docs/algorithms.md §12: each new method runs through `loku unlearn`'s loop; its loss stays finite
    and the memorized forget set's MA goes down (UNDIAL with its frozen copy of the model before)."""
    cfg = config(memorized, tmp_path / method, method=method, max_epochs=2, batch_size=2)
    report = unlearn(cfg).report
    assert report["epochs_run"] == 2
    assert all(torch.isfinite(torch.tensor([e["loss_forget"], e["loss_retain"]])).all() for e in report["epochs"])
    assert report["before"]["forget_ma"] > 0.95 and report["after"]["forget_ma"] < report["before"]["forget_ma"] - 0.2


def test_one_entry_for_every_caller_no_measuring_and_thresholds_from_the_stop_rule(memorized, tmp_path):
    """trainer.unlearn is the one entry (issue 22): ``measure=False`` runs exactly max_epochs with no MA/EL and
    no stop rule, calling ``on_epoch`` after each; the paper rule's thresholds come from its ``held_out`` (§6)."""
    from loku.stop import make_stop_rule

    seen = []
    cfg = config(memorized, tmp_path / "fixed", max_epochs=2)
    report = unlearn(cfg, measure=False, on_epoch=lambda record, model: seen.append((record["epoch"], model))).report
    assert [e for e, _ in seen] == [1, 2] and report["epochs_run"] == 2 and report["outcome"] == "not measured"
    assert report["after"] is None and report["thresholds"] is None and "forget_ma" not in report["epochs"][0]
    assert all(m is not None and not m.training for _, m in seen)

    asked = []

    def held_out(run):
        asked.append(run.before["val_ma"])
        return {"ma": 1.5, "el": 1.5}  # above any MA/EL: the first epoch succeeds

    cfg = config(memorized, tmp_path / "held", max_epochs=5)
    report = unlearn(cfg, stop=make_stop_rule(cfg, held_out=held_out)).report
    assert len(asked) == 1 and report["thresholds"]["ma"] == 1.5 and report["epochs_run"] == 1
    assert report["outcome"] == "success"
