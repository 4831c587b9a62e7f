"""The field's common metrics under OpenUnlearning's names (docs/algorithms.md §14): extraction strength and
privleak on hand-computed cases, ``loku eval --format openunlearning`` giving loku's own numbers under
their key names, and lm-eval's native results file beside eval.json."""
from __future__ import annotations

import argparse
import json
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from loku import evaluate as E
from loku.metrics.memorization import extraction_strength, memorization_accuracy, strength_from_hits
from loku.metrics.mia import PRIVLEAK_ATTACK, privleak, text_scores
from loku.metrics.openunlearning import KEYS, openunlearning_summary
from test_reasoning import gpt2_tok  # noqa: F401  (fixture re-used)
from tiny_models import make_tiny_model

VOCAB = 16


class ScriptedLM(torch.nn.Module):
    """A stand-in LM whose argmax at position t is ``script[b][t]`` (whatever the input): the hits are chosen."""

    def __init__(self, script: list[list[int]]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter, so the model has a device and a dtype
        self.script = script

    def forward(self, input_ids, attention_mask=None, **_):
        width = input_ids.shape[1]
        rows = [row + [0] * (width - len(row)) for row in self.script]
        return SimpleNamespace(logits=F.one_hot(torch.tensor(rows), VOCAB).float() + 0 * self.anchor)


def test_extraction_strength_by_hand():
    """§14: ES = 1 - k/|y|, k the smallest index from which the argmax suffix equals the label suffix."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10],   # labels 6 7 8 9 10
                        [5, 6, 7, 8, 9, 10],
                        [5, 6, 7, 8, 9, 10],
                        [5, 6, 7, 0, 0, 0]])   # 3 tokens, then padding: labels 6 7
    mask = torch.tensor([[1] * 6, [1] * 6, [1] * 6, [1, 1, 1, 0, 0, 0]])
    script = [[6, 1, 1, 9, 10, 0],   # hits 1 0 0 1 1: suffix from index 3 matches -> 1 - 3/5
              [6, 7, 8, 9, 10, 0],   # every token: 1
              [6, 7, 8, 9, 1, 0],    # the last token misses: only the empty suffix, k = 5 -> 0
              [1, 7, 0, 0, 0, 0]]    # hits 0 1 of 2 labels: 1 - 1/2
    model = ScriptedLM(script)
    es = extraction_strength(model, ids, attention_mask=mask)
    assert es.tolist() == pytest.approx([0.4, 1.0, 0.0, 0.5])
    # exact memorization is MA: 3/5, 5/5, 4/5, 1/2 -- the same positions, another statistic
    assert memorization_accuracy(model, ids, attention_mask=mask).tolist() == pytest.approx([0.6, 1.0, 0.8, 0.5])
    # the pure form; a row without labels scores 0 as in OpenUnlearning
    hits = torch.tensor([[True, False, True, True], [True, True, True, True]])
    assert strength_from_hits(hits, torch.tensor([4, 0])).tolist() == pytest.approx([0.5, 0.0])


def test_privleak_arithmetic():
    """MUSE's privleak with loku's member-high AUC a: MUSE's AUC is 1 - a, so (a_r - a_u) / (1 - a_r) * 100."""
    assert privleak(1.0, 0.5) == pytest.approx(-100.0)   # the forget set fully recognised: not unlearned
    assert privleak(0.5, 0.5) == pytest.approx(0.0)
    assert privleak(0.62, 0.62) == pytest.approx(0.0)    # exactly like the retrained model
    assert privleak(0.2, 0.6) == pytest.approx(100.0)    # (0.8 - 0.4) / 0.4: over-unlearned
    assert privleak(0.7, 0.6) == pytest.approx(-25.0)    # (0.3 - 0.4) / 0.4
    assert privleak(0.3, 1.0) is None and privleak(None, 0.5) is None  # undefined, not a number


def test_min_k_40_is_the_privleak_statistic():
    """Min-40%: the mean of the floor(0.4 n) lowest token log-probabilities, whatever k the other attacks use."""
    lp = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    logits = torch.randn(5, VOCAB)
    scores = text_scores(lp, logits, torch.arange(5), zlib_bytes=10, k=0.2)
    assert scores[PRIVLEAK_ATTACK] == pytest.approx(-4.5) and scores["min_k"] == pytest.approx(-5.0)


@pytest.fixture
def two_models(gpt2_tok, monkeypatch):
    """``load_model`` giving one tiny model for --model and another (the "original") for --reference."""
    import loku.models

    made = {}

    def fake_load_model(name, *, adapter=None, dtype="float32", trust_remote_code=False, **_):
        seed = 1 if "orig" in str(name) else 2
        made.setdefault(name, make_tiny_model("gpt_neo", vocab=50257, n_ctx=512, seed=seed))
        return made[name], gpt2_tok

    monkeypatch.setattr(loku.models, "load_model", fake_load_model)
    return made


def _eval(shared_data, out, *argv):
    parser = E.add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--data-dir", str(shared_data), "--limit", "2", "--no-progress", "--batch-size", "2",
                              "--tofu-max-new-tokens", "2", "--out", str(out), *argv])
    assert E.run_eval_command(args) == 0
    return json.loads((out / "eval.json").read_text())


def test_eval_format_openunlearning_writes_lokus_numbers_under_their_keys(two_models, shared_data, tmp_path,
                                                                         monkeypatch):
    """§14: openunlearning.json holds exactly loku's own numbers of this evaluation, under OpenUnlearning's keys."""
    monkeypatch.setattr(E, "TDEC_TOKENS", 24)  # EL of a random model generates from every prefix: keep it short
    _eval(shared_data, tmp_path / "ref", "--model", "orig", "--suite", "tofu")
    data = _eval(shared_data, tmp_path / "o", "--model", "unlearned", "--suite", "tdec,tofu", "--reference", "orig",
                 "--tofu-reference", str(tmp_path / "ref" / "eval.json"), "--format", "openunlearning")
    got = json.loads((tmp_path / "o" / "openunlearning.json").read_text())
    suites = data["suites"]
    assert set(got) == set(KEYS)
    assert got["exact_memorization"] == suites["tdec"]["forget"]["ma"]
    assert got["extraction_strength"] == suites["tdec"]["forget"]["extraction_strength"]
    assert got["forget_quality"] == suites["tofu"]["forget_quality"]
    assert got["model_utility"] == suites["tofu"]["model_utility"]
    assert got["forget_Truth_Ratio"] == suites["tofu"]["splits"]["forget"]["truth_ratio"]
    auc = suites["reference"]["mia_auc"][PRIVLEAK_ATTACK]
    assert got["privleak"] == suites["reference"]["privleak"] == pytest.approx(
        (auc["original"] - auc["model"]) / (1 - auc["original"]) * 100)
    per_item = suites["tdec"]["forget"]["per_item"]["extraction_strength"]
    assert len(per_item) == 2 and got["extraction_strength"] == pytest.approx(sum(per_item) / 2)
    assert all(0 <= v <= 1 for v in per_item)
    # without --format openunlearning no such file; without --reference no privleak
    data = _eval(shared_data, tmp_path / "plain", "--model", "unlearned", "--suite", "tdec")
    assert not (tmp_path / "plain" / "openunlearning.json").exists()
    assert set(openunlearning_summary(data["suites"])) == {"exact_memorization", "extraction_strength"}


def test_lm_eval_native_results_file_beside_eval_json(monkeypatch, tmp_path):
    """The harness's whole results dict (configs included) goes to lm_eval_results.json, JSON-safe; eval.json
    keeps loku's summary and names the file."""
    import numpy as np

    from loku.metrics import lm_eval_backend as B

    raw = {"results": {"copa": {"alias": "copa", "acc,none": np.float64(0.75), "acc_stderr,none": float("nan")}},
           "configs": {"copa": {"task": "copa", "metric_list": [{"metric": "acc"}], "process": len,
                                "tags": {"a"}}},
           "n-samples": {"copa": {"original": 100, "effective": np.int64(4)}}, "n-shot": {"copa": 0},
           "versions": {"copa": 1.0}}
    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = lambda **kwargs: raw
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = lambda **kwargs: None
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.TaskManager = lambda include_path=None: SimpleNamespace(all_tasks=["copa"])
    for name, mod in {"lm_eval": fake, "lm_eval.models": types.ModuleType("lm_eval.models"),
                      "lm_eval.models.huggingface": hf, "lm_eval.tasks": tasks}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    out = B.run_lm_eval(make_tiny_model("gpt2"), "TOK", ["copa"])
    E.write_eval_outputs({"meta": {}, "suites": {"reasoning": {"lm_eval": out}}}, tmp_path)
    native = json.loads((tmp_path / E.LM_EVAL_FILE).read_text())
    assert native["configs"]["copa"]["metric_list"] == [{"metric": "acc"}]
    assert native["configs"]["copa"]["tags"] == ["a"] and native["configs"]["copa"]["process"] == str(len)
    assert native["results"]["copa"]["acc,none"] == 0.75 and native["results"]["copa"]["acc_stderr,none"] is None
    assert native["n-samples"]["copa"]["effective"] == 4
    summary = json.loads((tmp_path / "eval.json").read_text())["suites"]["reasoning"]["lm_eval"]
    assert summary["native_file"] == E.LM_EVAL_FILE and "native" not in summary
    assert summary["tasks"]["copa"]["acc"] == 0.75
