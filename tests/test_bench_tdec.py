"""`loku bench tdec --smoke` end to end on a tiny random model and synthetic TDEC-shaped data (seconds):
outputs, resumability, extension with a new method, and the bad input refused before any work."""
from __future__ import annotations

import json
import random

import pytest

from loku.bench import tdec
from loku.bench.base import claim_folder
from loku.bench.tdec import load_bench_config, run_bench
from loku.errors import ConfigError, DataError
from tiny_models import WORDS, make_tiny_model, word_tokenizer, write_csv

METHODS = ["full-gd", "fila-ihl", "npo"]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS[3:]) for _ in range(n))


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory):
    """A data folder shaped like ../shared/data/tdec (random words) and a tiny Llama model folder."""
    root = tmp_path_factory.mktemp("bench")
    rng = random.Random(0)
    data = root / "data"
    for split in ("0", "1"):
        write_csv(data / "tdec" / "forget" / f"lm_extraction_32_{split}.csv", ["doc_id", "corpus", "text"],
             [[i, "pile", _words(rng, 24)] for i in range(12)])
    write_csv(data / "tdec" / "eval" / "pile.csv", ["doc_id", "corpus", "text"], [[i, "pile", _words(rng, 30)]
                                                                              for i in range(560)])
    write_csv(data / "tdec" / "eval" / "wikitext.csv", ["text"], [[_words(rng, 30)] for _ in range(300)])
    write_csv(data / "tdec" / "eval" / "lambada.csv", ["id", "token_length", "text", "task"],
         [[i, 10, _words(rng, 10), "lambada"] for i in range(4)])
    write_csv(data / "tdec" / "eval" / "pubmed_qa.csv", ["pubid", "question", "context", "long_answer", "final_decision",
                                                    "abstract"],
         [[i, _words(rng, 4), _words(rng, 8), _words(rng, 4), "yes", _words(rng, 8)] for i in range(4)])
    for name in ("blended_skill_talk", "empathetic_dialogues", "wizard_of_internet", "wizard_of_wikipedia"):
        dialogues = {str(i): [_words(rng, 5), _words(rng, 5), _words(rng, 5)] for i in range(3)}
        (data / "tdec" / "eval" / f"{name}.json").write_text(json.dumps({"text": dialogues}))
    model_dir = root / "tiny"
    make_tiny_model("llama", seed=0).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    return {"data": data, "model": str(model_dir), "cache": root / "cache"}


def _cfg(env, **overrides):
    values = {"model": env["model"], "splits": "0", "methods": ",".join(METHODS), "data_dir": str(env["data"]),
              "cache_dir": str(env["cache"]), **overrides}
    return load_bench_config("cpu", values, smoke=True)


def test_smoke_bench_end_to_end_and_resumable(bench_env, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    summary = run_bench(_cfg(bench_env), out, progress=False, command=["loku", "bench", "tdec", "--smoke"])
    assert summary["missing"] == []
    model = summary["models"][bench_env["model"]]
    assert set(model["table"]) == set(METHODS)
    row = model["table"]["fila-ihl"]
    for key in ("trainable_pct", "el", "ma", "ppl_pile_ratio", "lambada", "pubmedqa", "dialogue_f1", "tflops",
                "forget_nll_gap", "heldout_kl", "mia_auc_gap", "repetition_ratio", "relearn_ma", "relearn_ma_control"):
        assert key in row, key
    assert row["trainable_pct"]["mean"] < model["table"]["full-gd"]["trainable_pct"]["mean"] == 100.0
    run = json.loads((out / "tiny" / "split-0" / "runs" / "fila-ihl.json").read_text())
    assert run["seed"] == 0 and run["relearn"]["control"]["steps"] == [0, 1, 2]
    assert run["reference"]["settings"]["new_tokens"] == 4 and run["flops"]["fisher"] > 0
    # §13: every run is attacked, next to the planted model rounded the same way
    attacks = run["attacks"]
    assert set(attacks["quantization"]["model"]) >= {"none", "int8", "nf4"}
    assert attacks["quantization"]["reference"] is not None and attacks["quantization"]["layers"] > 0
    assert attacks["probing"]["settings"]["prompt_tokens"] == 4 and set(attacks["probing"]) >= {
        "plain", "after_text", "shifted"}
    for m in METHODS:  # the table's numbers are the run's own
        got = json.loads((out / "tiny" / "split-0" / "runs" / f"{m}.json").read_text())["attacks"]
        table = model["table"][m]
        assert table["nf4_el"]["mean"] == pytest.approx(got["quantization"]["model"]["nf4"]["el_10"])
        assert table["int8_ma"]["mean"] == pytest.approx(got["quantization"]["model"]["int8"]["ma"])
        assert table["probe_after_text_ma"]["mean"] == pytest.approx(got["probing"]["after_text"]["ma"])
        for key in ("int8_ma", "int8_el", "nf4_ma", "nf4_el", "probe_plain_el", "probe_shifted_ma"):
            assert 0.0 <= table[key]["mean"] <= 1.0, (m, key)
    split = json.loads((out / "tiny" / "split-0" / "split.json").read_text())
    # §14: OpenUnlearning's metrics under their key names, the table's numbers being the run's own
    for m in METHODS:
        got = json.loads((out / "tiny" / "split-0" / "runs" / f"{m}.json").read_text())
        ou, table = got["openunlearning"], model["table"][m]
        for key in ("exact_memorization", "extraction_strength", "privleak"):
            assert table[key]["mean"] == pytest.approx(ou[key]), (m, key)
        assert ou["exact_memorization"] == pytest.approx(got["after"]["forget_ma"], abs=1e-6)  # = MA
        assert 0.0 <= ou["extraction_strength"] <= 1.0 and len(ou["per_item"]["extraction_strength"]) == 4
        auc = got["reference"]["mia_auc"]["min_k_40"]
        assert ou["privleak"] == pytest.approx((auc["original"] - auc["model"]) / (1 - auc["original"]) * 100)
    planted = split["planted_openunlearning"]
    assert planted["exact_memorization"] == pytest.approx(split["before"]["forget_ma"], abs=1e-6)
    assert model["planted"]["privleak"]["mean"] == pytest.approx(split["planted_reference"]["privleak"])
    assert model["original_attacks"]["extraction_strength"]["n"] == 1
    assert split["planting"]["measurements"]["planted"]["forget"]["ma"] >= 0
    assert {"before", "reference_stats", "relearn_control", "planted_downstream", "planted_attacks",
            "original_attacks"} <= set(split)
    # the attack's reference is the planted model: the same numbers as stored once for the split
    assert attacks["quantization"]["reference"] == split["planted_attacks"]["quantization"]["model"]
    # the planted model memorized its forget set; unquantized, its MA is the stop rule's "before" MA
    assert split["planted_attacks"]["quantization"]["model"]["none"]["ma"] == pytest.approx(
        split["before"]["forget_ma"], abs=1e-6)
    assert model["planted"]["nf4_ma"]["n"] == 1 and model["original_attacks"]["int8_el"]["n"] == 1
    results = json.loads((out / "results.json").read_text())
    assert results["command"][:3] == ["loku", "bench", "tdec"] and results["versions"]["torch"]
    assert results["data_sha256"] and results["seeds"]["bench"] == 0
    md = (out / "results.md").read_text()
    assert "| fila-ihl |" in md and "Planting (original → planted)" in md and "Distance to the original" in md
    assert "Attacks: quantization and prefix probing" in md and "| NF4 EL_10 |" in md
    assert "| original (never saw the text) |" in md
    # §12 targets: every method judged on the table's means (verdicts.py), in results.json and results.md
    verdicts = results["verdicts"][bench_env["model"]]
    assert set(verdicts) == set(model["table"])
    assert verdicts["fila-ihl"]["forget_nll_gap"]["value"] == model["table"]["fila-ihl"]["forget_nll_gap"]["mean"]
    assert "### Against the targets" in md
    assert "OpenUnlearning's metrics" in md and "| exact_memorization | extraction_strength | privleak |" in md
    for plot in ("figure1", "epochs", "relearn", "forgetting_vs_utility"):
        assert (out / "plots" / f"{plot}.png").is_file(), plot

    # A rerun skips every finished (split, method); adding a method runs only that one.
    calls = []
    real = tdec.unlearn_from
    monkeypatch.setattr(tdec, "unlearn_from", lambda cfg, *a, **k: calls.append(cfg.method) or real(cfg, *a, **k))
    run_bench(_cfg(bench_env), out, progress=False)
    assert calls == []
    run_bench(_cfg(bench_env, methods="full-gd,lora-ihl"), out, progress=False)
    assert calls == ["lora-ihl"]
    assert "| lora-ihl |" in (out / "results.md").read_text()


def test_jobs_run_the_same_bench_in_worker_processes(bench_env, tmp_path):
    """--jobs 2: the waves of tasks in two spawned workers give the serial bench's results."""
    cfg = dict(splits="0,1", methods="fila-ihl,full-gd")
    serial = run_bench(_cfg(bench_env, **cfg), tmp_path / "serial", progress=False)
    parallel = run_bench(_cfg(bench_env, **cfg), tmp_path / "jobs", progress=False, jobs=2)
    assert serial["missing"] == parallel["missing"] == []
    for split in ("0", "1"):
        for method in ("fila-ihl", "full-gd"):
            a, b = (json.loads((tmp_path / name / "tiny" / f"split-{split}" / "runs" / f"{method}.json").read_text())
                    for name in ("serial", "jobs"))
            assert a["epochs_run"] == b["epochs_run"] and a["outcome"] == b["outcome"]
            for ea, eb in zip(a["epochs"], b["epochs"]):
                assert eb["loss_forget"] == pytest.approx(ea["loss_forget"], rel=1e-4, abs=1e-5)
                assert eb["val_ppl"] == pytest.approx(ea["val_ppl"], rel=1e-4)
            assert b["downstream"]["ppl_pile"] == pytest.approx(a["downstream"]["ppl_pile"], rel=1e-4)
    history = json.loads((tmp_path / "jobs" / "invocations.json").read_text())
    assert history[-1]["jobs"] == 2


def test_bad_input_fails_before_any_work(bench_env, tmp_path, monkeypatch):
    monkeypatch.setattr(tdec, "run_split", lambda *a, **k: pytest.fail("no work should start"))
    out = tmp_path / "bench"
    with pytest.raises(ConfigError, match="unknown method.*full-gx"):
        run_bench(_cfg(bench_env, methods="full-gx"), out, progress=False)
    with pytest.raises(ConfigError, match="unknown split.*7.*splits there: 0, 1"):
        run_bench(_cfg(bench_env, splits="0,7"), out, progress=False)
    assert not out.exists()
    with pytest.raises(ConfigError, match="unknown bench option.*methds"):
        load_bench_config("cpu", {"methds": "npo"})
    with pytest.raises(ConfigError, match="sizes: unknown option.*n_forgt"):
        load_bench_config("cpu", {"sizes": {"n_forgt": 3}})
    with pytest.raises(ConfigError, match="unlearn options of method full-gd: unknown option.*batch_sise .did you"):
        run_bench(_cfg(bench_env, unlearn={"batch_sise": 2}), out, progress=False)
    with pytest.raises(ConfigError, match="heldout: tdec needs plant: true"):
        run_bench(_cfg(bench_env, plant=False), out, progress=False)
    with pytest.raises(ConfigError, match="heldout must be one of tdec, pile"):
        run_bench(_cfg(bench_env, heldout="wiki"), out, progress=False)
    with pytest.raises(DataError, match="fewer than 13 rows: 9 held-out sequences asked after the 4 forget rows"):
        run_bench(_cfg(bench_env, sizes={"n_heldout": 9}), out, progress=False)


def test_a_folder_from_another_configuration_is_refused(bench_env, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    monkeypatch.setattr(tdec, "run_split", lambda *a, **k: {})
    monkeypatch.setattr(tdec, "load_model", lambda *a, **k: pytest.fail("not loaded"), raising=False)
    cfg = _cfg(bench_env)
    claim_folder(out, cfg, cfg.check_data())
    other = _cfg(bench_env, sizes={"n_forget": 6})
    with pytest.raises(ConfigError, match="another configuration .*sizes.n_forget"):
        run_bench(other, out, progress=False)
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a bench folder"):
        run_bench(cfg, tmp_path / "stranger", progress=False)


def test_named_configs_load_and_validate():
    cpu = load_bench_config("cpu").validate()
    assert cpu.models == ["smollm2-135m"] and cpu.splits == ["0", "1", "2"] and sorted(cpu.methods) == sorted(tdec.DEFAULT_METHODS)
    paper = load_bench_config("paper").validate()
    assert paper.sizes.n_forget == 32 and paper.sizes.forget_tokens == 200
    assert paper.models[0] == "EleutherAI/gpt-neo-125m" and paper.unlearn["rank"] == 16
    # §6: thresholds from text of the forget set's kind; GPT-Neo saw every TDEC row, so Pile there
    assert cpu.heldout == "tdec" and cpu.plant and paper.heldout == "pile" and not paper.plant
    assert load_bench_config("cpu", {"model": "x,y"}).models == ["x", "y"]


def test_two_sided_rule_is_calibrated_on_the_shared_before(bench_env, tmp_path):
    """A split's methods share one "before" measurement (taken by the first); the two-sided rule (§12) must
    still be calibrated on the planted model for every method, the first and the ones that reuse it."""
    options = {"stop_rule": "two-sided", "check_every": 1}
    cfg = _cfg(bench_env, methods="fila-ihl,fila-undial",
               method_options={"fila-ihl": options, "fila-undial": options})
    summary = run_bench(cfg, tmp_path / "bench", progress=False)
    assert summary["missing"] == []
    runs = summary["runs"][bench_env["model"]]["0"]["runs"]
    bands = [runs[m]["stop"]["bands"] for m in ("fila-ihl", "fila-undial")]
    assert bands[0] == bands[1] and set(bands[0]) == {"forget_ma", "forget_nll"}  # the same planted model
    for method in ("fila-ihl", "fila-undial"):
        stop = runs[method]["stop"]
        assert stop["rule"] == "two-sided" and stop["checks"], method
        # success means the kept check sits in the band (§12)
        assert (runs[method]["outcome"] == "success") == (stop["verdict"] == "at the held-out level"), method
