"""Each bench's numbers against the "forget as if never seen" targets (docs/algorithms.md §12, "Targets").

A target is a pure function of a method's summary row and the bench's context that returns the value it
judges and whether it passes; a bench's verdicts are ``{method: {target: {"value", "bound", "pass"}}}``,
stored in results.json and drawn as one table in results.md. ``pass`` is None where the number is missing
(a folder written before it was measured): missing is never a pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Target", "TARGETS", "judge", "verdict_lines", "verdicts"]

@dataclass(frozen=True)
class Target:
    name: str
    label: str  # the table's column title
    measure: Callable[[dict[str, Any], dict[str, Any]], Any]  # (row, context) -> value or None
    passes: Callable[[Any, dict[str, Any]], bool]  # (value, context) -> bool
    bound: Callable[[dict[str, Any]], str]  # context -> the bound, as the table says it


def _mean(stats: dict[str, Any] | None) -> float | None:
    return None if not stats else stats.get("mean")


def _within(limit: float) -> Callable[[Any, dict], bool]:
    return lambda v, ctx: abs(v) <= limit


def _at_most(limit: float) -> Callable[[Any, dict], bool]:
    return lambda v, ctx: v <= limit


# bench tdec (mean over the splits of each method's row in results.json's table)
TDEC = [
    Target("stop_rule", "stop rule met", lambda r, c: (r.get("succeeded"), r.get("splits")),
           lambda v, c: v[0] == v[1] and v[1] > 0, lambda c: "every split"),
    Target("forget_nll_gap", "forget NLL gap", lambda r, c: _mean(r.get("forget_nll_gap")),
           _within(0.5), lambda c: "±0.5 nats"),
    Target("mia_auc_gap", "MIA AUC gap", lambda r, c: _mean(r.get("mia_auc_gap")), _within(0.05),
           lambda c: "±0.05"),
    Target("repetition_ratio", "repetition / orig", lambda r, c: _mean(r.get("repetition_ratio")), _at_most(1.2),
           lambda c: "≤ 1.2"),
    Target("ppl_pile_ratio", "Pile PPL / orig", lambda r, c: _mean(r.get("ppl_pile_ratio")), _at_most(1.05),
           lambda c: "≤ 1.05"),
    Target("epochs", "epochs", lambda r, c: _mean(r.get("epochs")),
           lambda v, c: c.get("reference_epochs") is not None and v <= c["reference_epochs"],
           lambda c: "≤ fila-ihl's" + (f": {c['reference_epochs']:.1f}" if c.get("reference_epochs") else "")),
    Target("relearn_excess", "relearn MA − control", lambda r, c: (
        None if _mean(r.get("relearn_ma")) is None or _mean(r.get("relearn_ma_control")) is None
        else _mean(r["relearn_ma"]) - _mean(r["relearn_ma_control"])), _at_most(0.02), lambda c: "≤ +0.02"),
]

# bench continual (each variant after its last request, without the gate)
CONTINUAL = [
    # forgotten: met its stop rule in its own run or at a later measurement (requests.forgetting, §8)
    Target("forgotten", "requests forgotten", lambda r, c: (
        len(r["requests"]) - len(r.get("not_forgotten", [])), len(r["requests"])),
           lambda v, c: v[0] == v[1], lambda c: "all"),
    Target("relapses", "relapses", lambda r, c: len(r["relapses"]), lambda v, c: v == 0, lambda c: "none"),
    Target("ppl_pile_ratio", "Pile PPL / orig after the last", lambda r, c: r["tasks"][-1].get("ppl_pile"),
           _at_most(1.15), lambda c: "≤ 1.15"),
]

# bench tofu (each run's final point)
TOFU = [
    Target("forget_quality", "final forget quality", lambda r, c: (r.get("final") or {}).get("forget_quality"),
           lambda v, c: v >= 0.5, lambda c: "≥ 0.5"),
    Target("model_utility", "final model utility", lambda r, c: (r.get("final") or {}).get("model_utility"),
           lambda v, c: c.get("target_utility") is not None and v >= c["target_utility"] - 0.02,
           lambda c: "≥ target's − 0.02" + (f": {c['target_utility'] - 0.02:.3f}"
                                            if c.get("target_utility") is not None else "")),
]

# bench reveal (each unlearned arm's final scores on the REAL planted text)
REVEAL = [
    Target("real_text_ma", "MA of the real text", lambda r, c: (r.get("scores") or {}).get("ma"),
           lambda v, c: v <= c["original_ma"] + 0.03, lambda c: f"≤ original's + 0.03: {c['original_ma'] + 0.03:.3f}"),
    Target("ppl_pile_ratio", "Pile PPL / orig", lambda r, c: (
        None if not r.get("scores") else r["scores"]["ppl_pile"] / c["original_ppl"]), _at_most(1.2),
           lambda c: "≤ 1.2"),
]

TARGETS: dict[str, list[Target]] = {"tdec": TDEC, "continual": CONTINUAL, "tofu": TOFU, "reveal": REVEAL}


def judge(targets: list[Target], rows: dict[str, dict[str, Any]], context: dict[str, Any]) -> dict[str, Any]:
    """``{method: {target: {"value", "bound", "pass"}}}`` plus ``"all"``: every target passed."""
    out: dict[str, Any] = {}
    for method, row in rows.items():
        entry: dict[str, Any] = {}
        for t in targets:
            value = t.measure(row, context)
            missing = value is None or (isinstance(value, tuple) and None in value)
            entry[t.name] = {"value": list(value) if isinstance(value, tuple) else value, "bound": t.bound(context),
                             "pass": None if missing else bool(t.passes(value, context))}
        entry["all"] = all(e["pass"] is True for e in entry.values())
        out[method] = entry
    return out


def verdicts(bench: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The verdicts of one bench's results.json summary (keyed by model for tdec, by forget split for tofu)."""
    if bench == "tdec":
        out = {}
        for model, result in summary["models"].items():
            table = result["table"]
            context = {"reference_epochs": _mean((table.get("fila-ihl") or {}).get("epochs"))}
            out[model] = judge(TDEC, table, context)
        return out
    if bench == "continual":
        return judge(CONTINUAL, summary["variants"], {})
    if bench == "tofu":
        return {split: judge(TOFU, {f"{r['method']} {'r' + str(r['rank']) if r['rank'] else 'full'}": r for r in runs},
                             {"target_utility": (summary["target"].get(split) or {}).get("model_utility")})
                for split, runs in summary["runs"].items()}
    if bench == "reveal":
        original = summary.get("original")
        if not original:
            return {}
        arms = {a: v for a, v in summary["arms"].items() if "scores" in v}
        return judge(REVEAL, arms, {"original_ma": original["ma"], "original_ppl": original["ppl_pile"]})
    raise ValueError(f"no targets for bench {bench!r}; known: {', '.join(TARGETS)}")


SIGNED = {"forget_nll_gap", "mia_auc_gap", "relearn_excess"}  # differences: shown with their sign


def _cell(entry: dict[str, Any], name: str) -> str:
    value, ok = entry["value"], entry["pass"]
    if ok is None:  # judge() leaves pass None exactly where the number is missing
        return "–"
    if isinstance(value, list):
        text = f"{value[0]}/{value[1]}"
    elif isinstance(value, int):
        text = str(value)
    else:
        text = f"{value:+.3f}" if name in SIGNED else f"{value:.3f}"
    return f"{'✓' if ok else '✗'} {text}"


def verdict_lines(bench: str, judged: dict[str, Any], heading: str = "### Against the targets") -> list[str]:
    """A Markdown table: one row per method, one column per target (✓/✗ and the value), and "all"."""
    if not judged:
        return []
    targets = TARGETS[bench]
    first = next(iter(judged.values()))
    lines = [heading, "", "| method | " + " | ".join(f"{t.label} ({first[t.name]['bound']})" for t in targets)
             + " | all |", "|---" + "|---:" * (len(targets) + 1) + "|"]
    for method, entry in judged.items():
        cells = [_cell(entry[t.name], t.name) for t in targets]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'✓' if entry['all'] else '✗'} |")
    return lines + [""]
