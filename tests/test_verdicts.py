"""The benches' verdicts against the "as if never seen" targets (docs/algorithms.md §12, Targets) and
`loku bench report`, which rewrites a results folder's report from its results.json alone."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loku.bench.rereport import rewrite
from loku.bench.verdicts import verdict_lines, verdicts
from loku.cli import main
from loku.errors import ConfigError

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _stats(mean):
    return {"mean": mean, "std": 0.0, "n": 3, "values": [mean] * 3}


def _tdec_row(**means):
    row = {"succeeded": 3, "splits": 3, "epochs": _stats(6.0), "forget_nll_gap": _stats(0.0),
           "mia_auc_gap": _stats(0.0), "repetition_ratio": _stats(1.0), "ppl_pile_ratio": _stats(1.0),
           "relearn_ma": _stats(0.40), "relearn_ma_control": _stats(0.40)}
    row.update({k: (v if isinstance(v, (int, dict)) else _stats(v)) for k, v in means.items()})
    return row


def _tdec(rows):
    return {"models": {"m": {"table": rows}}}


@pytest.mark.parametrize("key, inside, outside", [
    ("forget_nll_gap", 0.5, 0.5001), ("forget_nll_gap", -0.5, -0.5001), ("mia_auc_gap", -0.05, -0.0501),
    ("repetition_ratio", 1.2, 1.2001), ("ppl_pile_ratio", 1.05, 1.0501)])
def test_tdec_bounds_are_the_issue_targets(key, inside, outside):
    judged = verdicts("tdec", _tdec({"fila-ihl": _tdec_row(), "a": _tdec_row(**{key: inside}),
                                     "b": _tdec_row(**{key: outside})}))["m"]
    assert judged["a"][key]["pass"] is True and judged["a"]["all"] is True
    assert judged["b"][key]["pass"] is False and judged["b"]["all"] is False
    assert judged["b"][key]["value"] == outside


def test_tdec_epochs_relearning_and_stop_rule():
    judged = verdicts("tdec", _tdec({
        "fila-ihl": _tdec_row(epochs=_stats(6.0)),
        "slower": _tdec_row(epochs=_stats(6.5)),
        "relearns": _tdec_row(relearn_ma=_stats(0.4201)),  # control 0.40: more than +0.02 back
        "not_every_split": _tdec_row(succeeded=2),
        "unmeasured": {k: v for k, v in _tdec_row().items() if k != "mia_auc_gap"}}))["m"]
    assert judged["fila-ihl"]["all"] and judged["fila-ihl"]["epochs"]["bound"] == "≤ fila-ihl's: 6.0"
    assert judged["slower"]["epochs"]["pass"] is False
    assert judged["relearns"]["relearn_excess"]["pass"] is False
    assert judged["relearns"]["relearn_excess"]["value"] == pytest.approx(0.0201)
    assert judged["not_every_split"]["stop_rule"] == {"value": [2, 3], "bound": "every split", "pass": False}
    # A number the folder never measured is not a pass.
    assert judged["unmeasured"]["mia_auc_gap"]["pass"] is None and not judged["unmeasured"]["all"]


def test_continual_tofu_reveal_targets():
    ok = {"requests": [{"outcome": "success"}, {"outcome": "failed"}], "not_forgotten": [], "relapses": [],
          "tasks": [{"ppl_pile": 0.9}, {"ppl_pile": 1.15}]}
    bad = {**ok, "not_forgotten": [{"request": "r2"}], "relapses": [{"request": "r1"}],
           "tasks": [{"ppl_pile": 0.9}, {"ppl_pile": 1.1501}]}
    judged = verdicts("continual", {"variants": {"ok": ok, "bad": bad}})
    # request 2 failed its own run but met the rule at a later measurement: forgotten (§8)
    assert judged["ok"]["forgotten"]["value"] == [2, 2] and judged["ok"]["all"]
    assert [judged["bad"][k]["pass"] for k in ("forgotten", "relapses", "ppl_pile_ratio")] == [False, False, False]

    runs = [{"method": "a", "rank": 8, "final": {"forget_quality": 0.5, "model_utility": 0.38}},
            {"method": "b", "rank": None, "final": {"forget_quality": 0.49, "model_utility": 0.3799}}]
    judged = verdicts("tofu", {"runs": {"forget01": runs}, "target": {"forget01": {"model_utility": 0.40}}})["forget01"]
    assert judged["a r8"]["all"] and not judged["b full"]["forget_quality"]["pass"]
    assert not judged["b full"]["model_utility"]["pass"]

    original = {"ma": 0.40, "ppl_pile": 30.0}
    arms = {"x": {"scores": {"ma": 0.43, "ppl_pile": 36.0}}, "y": {"scores": {"ma": 0.4301, "ppl_pile": 36.03}},
            "coverage": {"curves": {}}}
    judged = verdicts("reveal", {"original": original, "arms": arms})
    assert set(judged) == {"x", "y"} and judged["x"]["all"]
    assert not judged["y"]["real_text_ma"]["pass"] and not judged["y"]["ppl_pile_ratio"]["pass"]
    lines = verdict_lines("reveal", judged, "T")
    assert lines[0] == "T" and "| x | ✓ 0.430 | ✓ 1.200 | ✓ |" in lines and "| y | ✗ 0.430 | ✗ 1.201 | ✗ |" in lines


@pytest.mark.parametrize("bench", ["tdec", "tofu"])
def test_report_rewrites_a_committed_folder_from_its_results_json(bench, tmp_path):
    folder = tmp_path / bench
    shutil.copytree(RESULTS / f"{bench}_cpu", folder)
    before = json.loads((folder / "results.json").read_text())
    assert main(["bench", "report", str(folder)]) == 0
    after = json.loads((folder / "results.json").read_text())
    assert {k: v for k, v in after.items() if k != "verdicts"} == {k: v for k, v in before.items() if k != "verdicts"}
    md = (folder / "results.md").read_text()
    assert "Against the targets" in md
    if bench == "tdec":
        table = before["models"]["smollm2-135m"]["table"]["fila-ihl"]
        entry = after["verdicts"]["smollm2-135m"]["fila-ihl"]
        assert entry["forget_nll_gap"]["value"] == table["forget_nll_gap"]["mean"]
        assert entry["forget_nll_gap"]["pass"] is (abs(table["forget_nll_gap"]["mean"]) <= 0.5)


def test_report_bad_folder(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        rewrite(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"command": ["loku", "unlearn"]}))
    with pytest.raises(ConfigError, match="only a bench's results.json"):
        rewrite(tmp_path)
