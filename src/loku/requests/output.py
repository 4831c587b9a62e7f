"""A sequence's results (docs/algorithms.md §8): relapses and requests not forgotten, from the matrix of
MA/EL after each request; the report; the output folder (report.json/.md, one adapter per request, the
merged model, the deltas a later request continues from)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..checkpoint import discard as discard_checkpoint
from ..save import atomic_dir, atomic_write_json, atomic_write_text
from .delta import Delta, overlaps, stacked_model, write_delta

if TYPE_CHECKING:
    from ..config import UnlearnConfig
    from .sequence import RequestsResult


SEQUENCE = "sequence.json"  # in a sequence's output folder: what a later request continues from


def _above(value: dict[str, float], limit: dict[str, float]) -> bool:
    return value["ma"] > limit["ma"] or value["el"] > limit["el"]


def forgetting(matrix: Sequence[dict[str, Any]], requests: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Relapses and requests not forgotten (§8), from the MA/EL matrix and each request's outcome and thresholds.

    ``matrix`` rows are ``{"after": name_k, "measured": {name_j: {"ma", "el"}}}`` in request order (a row
    "before" is skipped; a request missing from a row, its forget file deleted, is not judged there);
    ``requests`` are ``{"name", "outcome", "thresholds": {"ma", "el"}}`` (a sequence's report rows).

    A request has met its stop rule once its own run succeeded or a measurement has it at or below both
    thresholds (the rule's condition). ``relapses``: every (after request k, earlier request j) where j had
    met it and is back above a threshold. ``not_forgotten``: each request that never met it, with its last
    measurement: it cannot relapse (it was never forgotten), and counting it as a relapse after every later
    request hid that its MA may well be falling.
    """
    limits = {r["name"]: r["thresholds"] for r in requests}
    met = {r["name"] for r in requests if r["outcome"] == "success"}
    found, last, done = [], {}, []
    for row in matrix:
        if row["after"] == "before":
            continue
        for name in [*done, row["after"]]:
            if name not in row["measured"]:
                continue
            value, limit = row["measured"][name], limits[name]
            entry = {"after": row["after"], "request": name, "ma": value["ma"], "el": value["el"],
                     "ma_threshold": limit["ma"], "el_threshold": limit["el"]}
            last[name] = entry
            if not _above(value, limit):
                met.add(name)
            elif name in met and name != row["after"]:
                found.append(entry)
        done.append(row["after"])
    return {"relapses": found, "not_forgotten": [last[n] for n in done if n not in met and n in last]}


def forgetting_lines(report: dict[str, Any]) -> list[str]:
    """The relapses and the requests not forgotten (§8), one line each, for a report.md / results.md."""
    def named(entries: list[dict[str, Any]]) -> str:
        return "; ".join(f"{r['request']} after {r['after']} (MA {r['ma']:.3f}, EL {r['el']:.3f})"
                         for r in entries) or "none"

    return [f"Relapses (met the stop rule, then back above its thresholds): {named(report['relapses'])}  ",
            f"Not forgotten (never met the stop rule; last measured): {named(report.get('not_forgotten', []))}"]


def sequence_report(state: dict, deltas: Sequence[Delta]) -> dict[str, Any]:
    pairs = overlaps(deltas)
    means = [p["mean"] for p in pairs if p["mean"] is not None]
    return {
        "strategy": state["strategy"],
        "requests": [{k: v for k, v in f.items() if k != "run"} for f in state["finished"]],
        "matrix": state["matrix"],
        **forgetting(state["matrix"], state["finished"]),
        "overlaps": pairs,
        "mean_overlap": sum(means) / len(means) if means else None,
        "thresholds_source": "given, or each request's validation set on the model before the first request",
        "base_fingerprint": state["base_fingerprint"],
        "resumed": state.get("resumed", False),
    }


def write_requests(result: RequestsResult, cfg: UnlearnConfig, out: str | None = None,
                   extra: Callable[[Path], None] | None = None) -> Path:
    """The sequence's output folder, written under a temporary name then renamed: report.json/.md,
    ``adapters/`` (one PEFT adapter per request on the original base, whatever the strategy), and
    ``model/`` (the final model, every request folded in) unless ``save_model`` is off."""
    from ..cards import requests_card_body, write_cards
    from ..provenance import library_versions
    from ..models import transformers_progress
    from ..save import merged_copy

    out_path = Path(out or cfg.out)
    report = {"config": cfg.to_dict(), "versions": library_versions(), **result.report}
    with atomic_dir(out_path) as tmp, transformers_progress(cfg.progress):
        if result.deltas:
            stacked = stacked_model(result.original, result.deltas)
            stacked.save_pretrained(tmp / "adapters", safe_serialization=True)
            atomic_write_json(tmp / "adapters" / "loku_requests.json",
                              {"base_model": cfg.model, "base_fingerprint": report["base_fingerprint"],
                               "adapters": [d.name for d in result.deltas],
                               "forget": [d.forget for d in result.deltas],
                               "note": "each adapter is its request's change on the ORIGINAL base weights"})
            if result.gate is not None:  # what GatedModel.from_pretrained(OUT) and `loku eval --model OUT` route with
                from ..gate import GATE_DIR, adapter_fingerprints, save_gate

                save_gate(result.gate, tmp / GATE_DIR, adapter_fingerprints(stacked, result.gate.names),
                          report.get("gate"))
            if cfg.save_model:
                merged_copy(result.model).save_pretrained(tmp / "model")
                result.tokenizer.save_pretrained(tmp / "model")
                write_cards(tmp, report, requests_card_body(report, result.runs), {"model": "transformers"})
        for delta in result.deltas:  # what `--model THIS_FOLDER --forget NEXT` continues from
            (tmp / "requests" / delta.name).mkdir(parents=True)
            write_delta(tmp / "requests" / delta.name, delta)
        if result.state is not None:
            atomic_write_json(tmp / SEQUENCE, result.state)
        atomic_write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", render_requests_markdown(report))
        if extra is not None:  # more files of the caller's (loku unlearn --reveal: the rounds' data)
            extra(tmp)
    discard_checkpoint(out_path)
    return out_path


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def gate_markdown(gate: dict[str, Any]) -> list[str]:
    """The gate's lines of report.md: its settings, honest rates and any warning."""
    lines = [f"Gate (target false-positive rate {gate['fpr_target']:g}, {gate.get('mode', 'hard')}, windows of "
             f"{gate.get('window', '-')} tokens, calibrated on {gate['calibrated_on']} held-out texts): false-positive rate "
             f"{gate['false_positive_rate']['any']:.3f} on {gate['reported_on']} other held-out texts (steps of "
             f"{1 / gate['reported_on']:.3f}); true-positive rate on forget texts it was not fitted on (cross-fitted), "
             "whole texts / first window: " + ", ".join(
                 f"{n} {_rate(v)} / {_rate(gate.get('true_positive_rate_prompts', {}).get(n))}"
                 for n, v in gate["true_positive_rate"].items())]
    lines += [f"Gate warning: {w}" for w in gate.get("warnings", [])]
    return lines


def render_requests_markdown(report: dict[str, Any]) -> str:
    names = [r["name"] for r in report["requests"]]
    lines = [f"# loku: {len(names)} deletion requests, strategy {report['strategy']}", "",
             "| request | forget | outcome | epochs | MA threshold | EL threshold |", "|---|---|---|---|---|---|"]
    for r in report["requests"]:
        lines.append(f"| {r['name']} | {r['forget']} | {r['outcome']} | {r['epochs_run']} | "
                     f"{r['thresholds']['ma']:.4f} | {r['thresholds']['el']:.4f} |")
    lines += ["", "MA / EL of every request so far, after each request:", "",
              "| after | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in report["matrix"]:
        cells = [f"{row['measured'][n]['ma']:.3f} / {row['measured'][n]['el']:.3f}" if n in row["measured"] else ""
                 for n in names]
        lines.append(f"| {row['after']} | " + " | ".join(cells) + " |")
    lines += ["", *forgetting_lines(report)]
    if report.get("gate"):
        lines += gate_markdown(report["gate"])
    if report["mean_overlap"] is not None:
        lines.append(f"Mean subspace overlap of the adapters' A: {report['mean_overlap']:.4f}")
    if report.get("reveal"):
        lines += ["", f"Reveal-and-Release rounds ({report['reveal']['request']}): {report['reveal']['stopped']}", "",
                  "| round | queries | collected | repeated | new (enough new n-grams) | mean reward | request | outcome |",
                  "|---" * 8 + "|"]
        for r in report["reveal"]["rounds"]:
            lines.append(f"| {r['round']} | {r['queries']} | {r['collected']} | {r['repeated']} | {r.get('novel', '-')} | "
                         f"{r['mean_reward']:.3f} | {r.get('request', '-')} | {r.get('outcome', 'not unlearned')} |")
    return "\n".join(lines) + "\n"
