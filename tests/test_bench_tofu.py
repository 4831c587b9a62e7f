"""`loku bench tofu --smoke` (docs/algorithms.md §7, the paper's Figure 5) end to end on a tiny model and
synthetic TOFU-shaped data: target and reference fine-tuned here, every (method, rank), every epoch scored."""
from __future__ import annotations

import json
import random

import pytest

from loku.bench.tofu import author_rows, load_tofu_bench_config, run_tofu_bench
from loku.errors import ConfigError
from tiny_models import WORDS, make_tiny_model, word_tokenizer


def _words(rng, n):
    return " ".join(rng.choice(WORDS[3:]) for _ in range(n))


def _qa(rng, perturbed=False):
    row = {"question": _words(rng, 4), "answer": _words(rng, 5)}
    if perturbed:
        row.update(paraphrased_answer=_words(rng, 5), perturbed_answer=[_words(rng, 5) for _ in range(2)])
    return row


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def tofu_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tofu")
    rng = random.Random(0)
    tofu = root / "data" / "tofu"
    tofu.mkdir(parents=True)
    full = [_qa(rng) for _ in range(4000)]
    _write(tofu / "full.jsonl", full)
    perturbed = lambda rows: [{**r, "paraphrased_answer": _words(rng, 5),  # noqa: E731
                               "perturbed_answer": [_words(rng, 5) for _ in range(2)]} for r in rows]
    _write(tofu / "forget01_perturbed.jsonl", perturbed(full[3960:]))
    _write(tofu / "retain_perturbed.jsonl", perturbed(full[:400]))
    _write(tofu / "holdout01.jsonl", [_qa(rng) for _ in range(40)])  # authors outside full.jsonl
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        _write(tofu / f"{name}.jsonl", [{k: v for k, v in _qa(rng, True).items() if k != "paraphrased_answer"}
                                        for _ in range(6)])
    model_dir = root / "tiny"
    make_tiny_model("llama", seed=0, n_ctx=64).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    return {"data": root / "data", "model": str(model_dir), "cache": root / "cache"}


def _cfg(env, **overrides):
    values = {"model": env["model"], "data_dir": str(env["data"]), "cache_dir": str(env["cache"]),
              "template": "generic", **overrides}
    return load_tofu_bench_config("cpu", values, smoke=True)


def test_the_subset_keeps_tofus_structure(tofu_env):
    rows = author_rows(_cfg(tofu_env))
    assert len(rows["retain"]) == 40 and len(rows["forget"]["forget01"]) == 40 and len(rows["train"]) == 80
    assert rows["forget"]["forget01"] == rows["train"][40:]  # forget01: the last 2 authors of full.jsonl
    assert len(rows["reference_train"]["forget01"]) == 40
    assert not [r for r in rows["reference_train"]["forget01"] if r in rows["forget"]["forget01"]]


def test_smoke_tofu_bench_end_to_end(tofu_env, tmp_path, monkeypatch):
    out = tmp_path / "tofu"
    summary = run_tofu_bench(_cfg(tofu_env), out, progress=False, command=["loku", "bench", "tofu", "--smoke"])
    assert summary["missing"] == []
    entries = summary["runs"]["forget01"]
    assert {(e["method"], e["rank"]) for e in entries} == {("lora-gd", 2), ("fila-ihl", 2), ("full-ga", None)}
    for e in entries:
        assert [t["epoch"] for t in e["trajectory"]] == [1, 2]
        assert all(0.0 <= t["forget_quality"] <= 1.0 and t["model_utility"] >= 0 for t in e["trajectory"])
    # The reference's check (§7): a second reference fine-tuned with another seed, its forget quality
    # against the first -- not KS(x, x), which is 1.0 whatever the models are.
    shared = json.loads((out / "shared.json").read_text())
    first = shared["reference/forget01"]["forget_truth_ratios"]
    second = shared["reference_seed_quality/forget01"]
    assert second["seed"] == 1 and second["forget_truth_ratios"] != first
    from scipy.stats import ks_2samp

    assert summary["reference_seed_quality"]["forget01"] == pytest.approx(
        ks_2samp(second["forget_truth_ratios"], first).pvalue)
    assert len(list((tofu_env["cache"] / "tofu").glob("reference-forget01-*/finetune.json"))) == 2
    assert "a second reference fine-tuned with another seed" in (out / "results.md").read_text()
    assert summary["target"]["forget01"]["forget_quality"] is not None
    md = (out / "results.md").read_text()
    assert "| fila-ihl | 2 |" in md and (out / "plots" / "figure5.png").is_file()
    judged = summary["verdicts"]["forget01"]["fila-ihl r2"]
    assert judged["forget_quality"]["value"] == next(
        r["final"]["forget_quality"] for r in summary["runs"]["forget01"] if r["method"] == "fila-ihl")
    assert "### Against the targets" in md
    assert list((tofu_env["cache"] / "tofu").glob("target-*/finetune.json"))

    # A rerun reads every finished run back; the cached target and reference are not fine-tuned again.
    monkeypatch.setattr("loku.finetune.finetune", lambda *a, **k: pytest.fail("fine-tuned again"))
    monkeypatch.setattr("loku.trainer.train_epoch", lambda *a, **k: pytest.fail("unlearned again"))
    assert run_tofu_bench(_cfg(tofu_env), out, progress=False)["missing"] == []


def test_tofu_runs_stop_at_the_held_out_level_and_report_the_kept_state(tofu_env, tmp_path):
    """§12 on TOFU: with held_out, each run stops by the two-sided rule with TOFU's held-out authors as its
    validation set, and its final point is the state the rule kept, scored once more."""
    cfg = _cfg(tofu_env, methods=["fila-ihl"], held_out="holdout01",
               unlearn={"stop_rule": "two-sided", "check_every": 1, "max_epochs": 3})
    out = tmp_path / "tofu-stopped"
    summary = run_tofu_bench(cfg, out, progress=False, command=["loku", "bench", "tofu", "--smoke"])
    entry = json.loads((out / "forget01" / "fila-ihl-r2.json").read_text())
    assert entry["unlearn_config"]["validation"] == str(out / "data" / "holdout01.jsonl")
    stop = entry["final"]["stop"]
    assert stop["rule"] == "two-sided" and stop["checks"] == sum(len(e["checks"]) for e in entry["epochs"])
    checks = [c for e in entry["epochs"] for c in e["checks"]]
    assert stop["chosen"] == min(checks, key=lambda c: c["distance"])  # the closest check is the state kept
    # The kept state was scored: its forget MA (the trainer's "after") is the chosen check's.
    assert entry["final"]["after"]["forget_ma"] == pytest.approx(stop["chosen"]["forget_ma"], abs=1e-6)
    run = summary["runs"]["forget01"][0]
    assert run["final"]["forget_quality"] == entry["final"]["tofu"]["forget_quality"]
    assert run["final"]["step"] == stop["chosen"]["step"]
    assert summary["verdicts"]["forget01"]["fila-ihl r2"]["forget_quality"]["value"] == run["final"]["forget_quality"]
    assert "Stopped by the two-sided rule on holdout01" in (out / "results.md").read_text()
    # Folders made before held_out existed keep their identity.
    assert "held_out" not in _cfg(tofu_env).identity() and cfg.identity()["held_out"] == "holdout01"


def test_bad_tofu_bench_input(tofu_env, tmp_path):
    with pytest.raises(ConfigError, match="held_out"):
        _cfg(tofu_env, unlearn={"stop_rule": "two-sided"}).validate()
    with pytest.raises(ConfigError, match="held_out: choose from"):
        _cfg(tofu_env, held_out="forget01").validate()
    with pytest.raises(ConfigError, match="forget_splits"):
        _cfg(tofu_env, forget_splits="forget99").validate()
    with pytest.raises(ConfigError, match="unknown method"):
        _cfg(tofu_env, methods="magic").validate()
    with pytest.raises(ConfigError, match="ranks"):
        _cfg(tofu_env, ranks=[0]).validate()
    for name in ("cpu", "paper"):
        load_tofu_bench_config(name).validate()
