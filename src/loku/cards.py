"""Model cards for what a run ships: ``OUT/model/README.md`` and ``OUT/adapter/README.md``.

Written with huggingface_hub's :class:`~huggingface_hub.ModelCard`, so the hub, PEFT and anyone reading
the folder see where the weights come from and what was measured: the base model, the method, the
data files with their SHA-256, the stop rule and its outcome, the before/after numbers, the loku
version and the gate, when one was fitted. The numbers are copied from the run's report, never
recomputed here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .save import atomic_write_text


def format_value(value: Any) -> str:
    """A number as the reports print it (4 decimals, 3 significant digits from 1000), None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.3g}"
    return str(value)


BEFORE_AFTER_ROWS = (
    ("EL_n forget", "forget_el"),
    ("MA forget", "forget_ma"),
    ("EL_n held-out", "val_el"),
    ("MA held-out", "val_ma"),
    ("PPL held-out", "val_ppl"),
)


def before_after_table(before: dict, after: dict) -> str:
    lines = ["| metric | before | after |", "|---|---:|---:|"]
    for label, key in BEFORE_AFTER_ROWS:
        if key in before or key in after:
            lines.append(f"| {label} | {format_value(before.get(key))} | {format_value(after.get(key))} |")
    return "\n".join(lines)


TAGS = ["unlearning", "loku"]
# What each folder is and how to load it, by the library the card names (huggingface_hub's library_name).
LOADING = {
    "transformers": ("the unlearned model, every adapter merged into its weights",
                     "from transformers import AutoModelForCausalLM\n\n"
                     "model = AutoModelForCausalLM.from_pretrained(\"{folder}\")"),
    "peft": ("a standard LoRA adapter on the ORIGINAL base model (the unlearning's change of the weights, "
             "scaling folded in)",
             "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
             "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base}\"), \"{folder}\")"),
}


def model_card(report: dict[str, Any], body: str, *, library: str, folder: str):
    """The card of one output folder: metadata (base_model, library_name, tags) and ``body``."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = report["config"]
    base = cfg["model"]
    data = ModelCardData(base_model=base, library_name=library, tags=list(TAGS))
    what, loading = LOADING[library]
    head = [f"# {cfg['method']} unlearning of {base}", "",
            f"This folder holds {what}, made by loku {_loku_version(report)} (LoKU, ICLR 2025) from the base model "
            f"`{base}` with the method `{cfg['method']}`.", "", "```python", loading.format(folder=folder, base=base),
            "```", "", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(head) + body)


def _loku_version(report: dict[str, Any]) -> str:
    from . import __version__

    return (report.get("versions") or {}).get("loku") or __version__


def data_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """(role, {"path", "sha256", "sequences"}) rows as a table: which bytes the run was made from."""
    lines = ["| data | file | sequences | sha256 |", "|---|---|---:|---|"]
    lines += [f"| {role} | `{d['path']}` | {d.get('sequences', '–')} | `{d['sha256']}` |" for role, d in rows]
    return "\n".join(lines)


def gate_section(report: dict[str, Any]) -> list[str]:
    """What the report says about the gate, if the run fitted one."""
    gate = report.get("gate")
    if not gate:
        return []
    target = gate.get("fpr_target")
    return ["", "## Gate", "",
            "A gate was fitted: each request's adapter is applied only to inputs the gate routes to that request"
            + (f" (target false-positive rate {target:g})" if target is not None else "")
            + ". Its rates are in `report.json` (`gate`); the gate's files are in the run's output folder, beside "
              "`model/`. Loading this folder alone applies every adapter to every input.", ""]


def run_card_body(report: dict[str, Any]) -> str:
    """A single run (loku.report): data, stop rule and outcome, before/after numbers."""

    cfg, th = report["config"], report["thresholds"]
    outcome = (f"**forgotten** after {report['epochs_to_success']} epoch(s)" if report["outcome"] == "success"
               else f"**failed**: the stop rule was not met within {report['epochs_run']} epoch(s)")
    lines = ["## Data", "", data_table(list(report["data"].items())), "",
             "## Stop rule", "",
             f"Outcome: {outcome}. Stop rule: forget EL_{cfg['el_n']} <= {th['el']:.4f} and forget MA <= "
             f"{th['ma']:.4f} ({th['source']}).", "",
             "## Before / after", "", before_after_table(report["before"], report["after"]), "",
             "EL_n: extraction likelihood (n-gram overlap of greedy continuations), MA: memorization accuracy "
             "(next-token accuracy under teacher forcing); `report.json` in the run's folder holds every number.", ""]
    return "\n".join(lines) + "\n".join(gate_section(report))


def requests_card_body(report: dict[str, Any], runs: Sequence[dict[str, Any]]) -> str:
    """A sequence of deletion requests (loku.requests): each request's data, outcome and MA/EL before the
    first request and after the last."""
    first, last = report["matrix"][0], report["matrix"][-1]
    lines = [f"{len(report['requests'])} deletion request(s), strategy `{report['strategy']}`.", "", "## Data", ""]
    rows = [(f"forget ({r['name']})", run["data"]["forget"]) for r, run in zip(report["requests"], runs)]
    shared = runs[0]["data"] if runs else {}
    rows += [(role, shared[role]) for role in ("retain", "validation") if role in shared]
    lines += [data_table(rows), "", "## Stop rule and outcome", "",
              "| request | outcome | epochs | MA threshold | EL threshold | MA / EL before | MA / EL after |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["requests"]:
        lines.append(f"| {r['name']} | {r['outcome']} | {r['epochs_run']} | {r['thresholds']['ma']:.4f} | "
                     f"{r['thresholds']['el']:.4f} | {_ma_el(first, r['name'])} | {_ma_el(last, r['name'])} |")
    lines += ["", f"Before: the base model (row `{first['after']}`); after: once request `{last['after']}` was "
                  "unlearned. `report.json` holds the whole matrix, the relapses and the overlaps.", ""]
    return "\n".join(lines) + "\n".join(gate_section(report))


def _ma_el(row: dict[str, Any], name: str) -> str:
    value = row["measured"].get(name)
    return f"{value['ma']:.3f} / {value['el']:.3f}" if value else "–"


def write_cards(out: Path, report: dict[str, Any], body: str, folders: dict[str, str]) -> None:
    """README.md in each of ``folders`` (name under ``out`` -> library) that exists, atomically."""
    for name, library in folders.items():
        if (out / name).is_dir():
            card = model_card(report, body, library=library, folder=f"OUT/{name}")
            atomic_write_text(out / name / "README.md", str(card))
