"""The results of a TDEC bench folder: per-run rows, mean and spread over splits, Markdown, JSON.

Reads every finished result of the folder (so results of earlier invocations count), whatever
subset of models, splits and methods the current invocation asked for.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from .verdicts import verdict_lines

__all__ = ["METRICS", "aggregate", "collect", "render_markdown", "row_metrics", "write_outputs"]

# (key, column title, format) of the per-method numbers, in table order.
METRICS: list[tuple[str, str, str]] = [
    ("trainable_pct", "trainable %", "{:.2f}"),
    ("paper_epochs", "paper epochs", "{:.1f}"),
    ("el", "EL_10", "{:.3f}"),
    ("ma", "MA", "{:.3f}"),
    ("ppl_pile_ratio", "Pile PPL / orig", "{:.3f}"),
    ("ppl_wiki_ratio", "WikiText PPL / orig", "{:.3f}"),
    ("lambada", "LAMBADA", "{:.3f}"),
    ("pubmedqa", "PubMedQA", "{:.3f}"),
    ("dialogue_f1", "dialogue F1", "{:.3f}"),
    ("tflops", "train+Fisher TFLOPs", "{:.2f}"),
    ("seconds", "unlearn s", "{:.0f}"),
    ("forget_nll_gap", "forget NLL gap", "{:+.3f}"),
    ("heldout_kl", "KL(orig‖model)", "{:.4f}"),
    ("mia_auc_loss", "MIA AUC (loss)", "{:.3f}"),
    ("mia_auc_gap", "MIA AUC gap", "{:+.3f}"),
    ("repetition_rate", "repetition", "{:.3f}"),
    ("repetition_ratio", "repetition / orig", "{:.2f}"),
    ("agreement_f1", "agreement F1", "{:.3f}"),
    ("relearn_ma", "relearn MA", "{:.3f}"),
    ("relearn_ma_control", "control MA", "{:.3f}"),
    ("relearn_el", "relearn EL", "{:.3f}"),
    ("relearn_el_control", "control EL", "{:.3f}"),
    ("int8_ma", "int8 MA", "{:.3f}"),
    ("int8_el", "int8 EL_10", "{:.3f}"),
    ("nf4_ma", "NF4 MA", "{:.3f}"),
    ("nf4_el", "NF4 EL_10", "{:.3f}"),
    ("probe_plain_ma", "prompt MA", "{:.3f}"),
    ("probe_plain_el", "prompt EL_10", "{:.3f}"),
    ("probe_after_text_ma", "after text MA", "{:.3f}"),
    ("probe_after_text_el", "after text EL_10", "{:.3f}"),
    ("probe_shifted_ma", "shifted MA", "{:.3f}"),
    ("probe_shifted_el", "shifted EL_10", "{:.3f}"),
    ("exact_memorization", "exact_memorization", "{:.3f}"),
    ("extraction_strength", "extraction_strength", "{:.3f}"),
    ("privleak", "privleak", "{:+.1f}"),
]
# Epochs to the stop rule in the paper's Table 1 (GPT-Neo-125M, 32 x 200 tokens, one step per epoch).
PAPER_EPOCHS = {"full-ga": 17.2, "full-gd": 4.6, "lora-gd": 8.6, "lora-ihl": 11.4, "fila-ihl": 6.0}
UTILITY = ["trainable_pct", "epochs", "paper_epochs", "el", "ma", "ppl_pile_ratio", "ppl_wiki_ratio", "lambada", "pubmedqa",
           "dialogue_f1", "tflops", "seconds"]
DISTANCE = ["forget_nll_gap", "heldout_kl", "mia_auc_loss", "mia_auc_gap", "repetition_rate", "repetition_ratio",
            "agreement_f1", "relearn_ma", "relearn_ma_control", "relearn_el", "relearn_el_control"]
ATTACKS = ["ma", "el", "int8_ma", "int8_el", "nf4_ma", "nf4_el", "probe_plain_ma", "probe_plain_el",
           "probe_after_text_ma", "probe_after_text_el", "probe_shifted_ma", "probe_shifted_el"]
PROBES = ("plain", "after_text", "shifted")
# OpenUnlearning's key names (docs/algorithms.md §14), on the forget set.
OPENUNLEARNING = ["exact_memorization", "extraction_strength", "privleak"]


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def collect(out: Path) -> dict[str, dict[str, Any]]:
    """``{model folder: {"original": ..., "splits": {split: {"split": split.json, "runs": {method: result}}}}}``."""
    models: dict[str, dict[str, Any]] = {}
    for folder in sorted(p for p in Path(out).iterdir() if p.is_dir() and (p / "original.json").is_file()):
        entry: dict[str, Any] = {"original": _read(folder / "original.json"), "splits": {}}
        for split_dir in sorted(folder.glob("split-*")):
            split = split_dir.name[len("split-"):]
            runs = {p.stem: _read(p) for p in sorted((split_dir / "runs").glob("*.json"))}
            info = _read(split_dir / "split.json") if (split_dir / "split.json").is_file() else {}
            entry["splits"][split] = {"split": info, "runs": runs}
        name = entry["original"].get("model", {}).get("name", folder.name)
        models[name] = entry
    return models


def _get(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def _distance_metrics(reference: dict | None, relearn: dict | None) -> dict[str, Any]:
    gen = _get(reference, "generation") or {}
    final = _get(relearn, "final") or {}
    el_key = next((k for k in final if k.startswith("el_")), None)
    return {
        "forget_nll_gap": _get(reference, "forget_nll", "gap"),
        "heldout_kl": _get(reference, "heldout_kl", "model"),
        "mia_auc_loss": _get(reference, "mia_auc", "loss", "model"),
        "mia_auc_gap": _get(reference, "mia_auc", "loss", "gap"),
        "repetition_rate": _get(gen, "repetition_rate", "model"),
        "repetition_ratio": gen.get("repetition_ratio"),
        "agreement_f1": _get(gen, "agreement_f1", "model"),
        "relearn_ma": final.get("ma"),
        "relearn_ma_control": final.get("control_ma"),
        "relearn_el": final.get(el_key) if el_key else None,
        "relearn_el_control": final.get(f"control_{el_key}") if el_key else None,
    }


def _attack_metrics(attacks: dict | None) -> dict[str, Any]:
    """Forget MA / EL_n of the model rounded to int8 and NF4, and of the prefix probes (§13)."""
    quantized = _get(attacks, "quantization", "model") or {}
    probing = _get(attacks, "probing") or {}
    el_key = next((k for k in (quantized.get("none") or {}) if k.startswith("el_")), "el_10")
    out: dict[str, Any] = {}
    for scheme in ("int8", "nf4"):
        out[f"{scheme}_ma"] = _get(quantized, scheme, "ma")
        out[f"{scheme}_el"] = _get(quantized, scheme, el_key)
    for probe in PROBES:
        out[f"probe_{probe}_ma"] = _get(probing, probe, "ma")
        out[f"probe_{probe}_el"] = _get(probing, probe, el_key)
    return out


def _openunlearning_metrics(numbers: dict | None) -> dict[str, Any]:
    return {key: _get(numbers, key) for key in OPENUNLEARNING}


def row_metrics(run: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """The table's numbers of one (split, method) result; ratios are to the ORIGINAL model."""
    down, flops = run.get("downstream", {}), run.get("flops", {})
    return {
        "success": run["outcome"] == "success",
        "epochs": run.get("epochs_to_success"),
        "epochs_run": run.get("epochs_run"),
        "trainable_pct": 100 * run["trainable_share"],
        "el": _get(run, "after", "forget_el"),
        "ma": _get(run, "after", "forget_ma"),
        "ppl_pile": down.get("ppl_pile"),
        "ppl_pile_ratio": _ratio(down.get("ppl_pile"), original.get("ppl_pile")),
        "ppl_wiki_ratio": _ratio(down.get("ppl_wiki"), original.get("ppl_wiki")),
        "lambada": down.get("lambada"),
        "pubmedqa": down.get("pubmedqa"),
        "dialogue_f1": down.get("dialogue_f1"),
        "tflops": (flops.get("training", 0.0) + flops.get("fisher", 0.0)) / 1e12,
        "seconds": _get(run, "seconds", "unlearn_wall"),
        **_distance_metrics(run.get("reference"), run.get("relearn")),
        **_attack_metrics(run.get("attacks")),
        **_openunlearning_metrics(run.get("openunlearning")),
    }


def planted_metrics(split: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """The planted model's numbers (before unlearning), as a row of the same table."""
    down = split.get("planted_downstream", {})
    before = split.get("before") or {}
    return {"el": before.get("forget_el"), "ma": before.get("forget_ma"),
            "ppl_pile": down.get("ppl_pile"),
            "ppl_pile_ratio": _ratio(down.get("ppl_pile"), original.get("ppl_pile")),
            "ppl_wiki_ratio": _ratio(down.get("ppl_wiki"), original.get("ppl_wiki")),
            "lambada": down.get("lambada"), "pubmedqa": down.get("pubmedqa"),
            "dialogue_f1": down.get("dialogue_f1"),
            **_distance_metrics(split.get("planted_reference"), None),
            **_attack_metrics(split.get("planted_attacks")),
            **_openunlearning_metrics(split.get("planted_openunlearning"))}


def original_attack_metrics(split: dict[str, Any]) -> dict[str, Any]:
    """The original model's forget MA / EL (unquantized) and attack numbers, as a row of the attack table."""
    attacks = split.get("original_attacks")
    none = _get(attacks, "quantization", "model", "none") or {}
    el_key = next((k for k in none if k.startswith("el_")), "el_10")
    return {"ma": none.get("ma"), "el": none.get(el_key), **_attack_metrics(attacks),
            **_openunlearning_metrics(split.get("original_openunlearning"))}


def _stats(values: list[Any]) -> dict[str, Any]:
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not nums:
        return {"mean": None, "std": None, "n": 0, "values": values}
    return {"mean": statistics.fmean(nums), "std": statistics.stdev(nums) if len(nums) > 1 else 0.0, "n": len(nums),
            "values": values}


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation over splits of every metric; epochs over the successful splits."""
    out: dict[str, Any] = {}
    keys = dict.fromkeys(k for row in rows for k in row)
    for key in keys:
        if key == "epochs":
            out[key] = _stats([r["epochs"] for r in rows if r.get("success")])
        elif key != "success":
            out[key] = _stats([r.get(key) for r in rows])
    out["succeeded"] = sum(1 for r in rows if r.get("success"))
    out["splits"] = len(rows)
    return out


def summarise_model(entry: dict[str, Any]) -> dict[str, Any]:
    original = entry["original"].get("downstream", {})
    per_method: dict[str, list[dict]] = {}
    per_split: dict[str, Any] = {}
    planted_rows, original_attack_rows = [], []
    for split, content in entry["splits"].items():
        info = content["split"]
        planting = _get(info, "planting", "measurements")
        per_split[split] = {"planting": planting, "before": info.get("before"),
                            "runs": {m: row_metrics(r, original) for m, r in content["runs"].items()}}
        if info.get("planted_downstream"):
            planted_rows.append(planted_metrics(info, original))
        if info.get("original_attacks"):
            original_attack_rows.append(original_attack_metrics(info))
        for method, run in content["runs"].items():
            per_method.setdefault(method, []).append(row_metrics(run, original))
    table = {method: aggregate(rows) for method, rows in per_method.items()}
    planted = None
    if planted_rows:
        planted = {k: v for k, v in aggregate(planted_rows).items() if k not in ("succeeded", "splits")}
    original_attacks = None
    if original_attack_rows:
        original_attacks = {k: v for k, v in aggregate(original_attack_rows).items() if k not in ("succeeded", "splits")}
    return {"original": original, "planted": planted, "original_attacks": original_attacks, "table": table,
            "splits": per_split}


def _cell(stats: dict | None, fmt: str) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    text = fmt.format(stats["mean"])
    if stats["n"] > 1:
        text += " ± " + fmt.format(stats["std"]).lstrip("+")
    return text


def _epochs_cell(stats: dict) -> str:
    ok, n = stats.get("succeeded", 0), stats.get("splits", 0)
    if not ok:
        return f"failed ({ok}/{n})"
    return f"{_cell(stats['epochs'], '{:.1f}')} ({ok}/{n})"


def _table(rows: dict[str, dict], keys: list[str], extra: dict[str, dict] | None = None) -> list[str]:
    titles = {k: (title, fmt) for k, title, fmt in METRICS}
    header = ["method"] + ["epochs (ok/splits)" if k == "epochs" else titles[k][0] for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(keys) + "|"]
    for name, stats in {**(extra or {}), **rows}.items():
        cells = []
        for key in keys:
            if key == "epochs":
                cells.append(_epochs_cell(stats) if "succeeded" in stats else "–")
            elif key == "paper_epochs":
                cells.append(titles[key][1].format(PAPER_EPOCHS[name]) if name in PAPER_EPOCHS else "–")
            else:
                cells.append(_cell(stats.get(key), titles[key][1]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(summary: dict[str, Any]) -> str:
    cfg = summary["config"]
    sizes, ev, rec = cfg["sizes"], cfg["evals"], cfg["relearn"]
    lines = [f"# loku bench tdec: {cfg['name']}", ""]
    lines += [f"Command: `{' '.join(summary.get('command') or [])}`  ",
              f"Machine: {summary['machine'].get('processor')}, {summary['machine'].get('cpu_count')} CPU(s)"
              + (f", {summary['machine']['gpu']}" if summary["machine"].get("gpu") else "")
              + f"; torch {summary['versions'].get('torch')}, transformers {summary['versions'].get('transformers')}, "
                f"peft {summary['versions'].get('peft')}  ",
              f"Seeds: bench {cfg['seed']}, planting {cfg['planting']['seed']}, relearning {rec['seed']}  ",
              f"Data: {sizes['n_forget']} forget sequences of {sizes['forget_tokens']} tokens per split "
              f"(lm_extraction_{cfg['pool']}_SPLIT.csv), {sizes['n_heldout']} held-out "
              + ("TDEC sequences (the split file's unplanted rows after the forget set" if cfg.get("heldout", "pile")
                 == "tdec" else "Pile sequences (")
              + "; stop thresholds, MIA non-members), "
              f"{sizes['n_retain']} WikiText retain texts of {sizes['retain_tokens']} tokens; perplexity on "
              f"{sizes['n_ppl']} Pile and {sizes['n_ppl']} WikiText excerpts of {sizes['ppl_tokens']} tokens; "
              f"LAMBADA {ev['lambada'] or '–'} items, PubMedQA {ev['pubmedqa'] or '–'} items, dialogue F1 on "
              f"{ev['dialogue'] or '–'} dialogues of each of the 4 sets (small subsets: differences of a few points "
              "are noise).  ",
              f"Relearning: {rec['optimizer']} lr {rec['lr']:g}, {rec['batch_size']} texts a step, MA/EL of the second "
              f"half of the forget set after {rec['steps'][-1]} steps on the first half; control = the original model "
              "given the same fine-tune.", ""]
    for model, result in summary["models"].items():
        lines += [f"## {model}", ""]
        if cfg.get("plant", True):
            lines += ["### Planting (original → planted)", "",
                      "| split | forget MA | forget EL_10 | held-out MA | held-out EL_10 | Pile PPL |",
                      "|---|---:|---:|---:|---:|---:|"]
            for split, info in result["splits"].items():
                p = info.get("planting")
                if not p:
                    continue
                o, q = p["original"], p["planted"]
                el = next(k for k in o["forget"] if k.startswith("el_"))
                lines.append(f"| {split} | {o['forget']['ma']:.3f} → {q['forget']['ma']:.3f} | "
                             f"{o['forget'][el]:.3f} → {q['forget'][el]:.3f} | {o['heldout']['ma']:.3f} → "
                             f"{q['heldout']['ma']:.3f} | {o['heldout'][el]:.3f} → {q['heldout'][el]:.3f} | "
                             f"{o['ppl']:.2f} → {q['ppl']:.2f} (×{p['checks']['ppl_ratio']:.3f}) |")
            lines.append("")
        orig = result["original"]
        extra = {"original": {"ppl_pile_ratio": {"mean": 1.0, "n": 1}, "ppl_wiki_ratio": {"mean": 1.0, "n": 1},
                              **{k: {"mean": orig.get(k), "n": 1} for k in ("lambada", "pubmedqa", "dialogue_f1")}}}
        if result.get("planted"):
            extra["planted (before unlearning)"] = result["planted"]
        lines += ["### Forgetting, utility and cost (mean ± std over splits)", ""]
        lines += _table(result["table"], UTILITY, extra)
        lines += ["", f"Original model: Pile PPL {orig.get('ppl_pile', float('nan')):.2f}, WikiText PPL "
                      f"{orig.get('ppl_wiki', float('nan')):.2f}. Epochs: mean over the splits where the stop rule "
                      "was met "
                      "(forget EL_10 and MA at or below the planted model's held-out values); paper epochs: the "
                      "paper's Table 1 on GPT-Neo-125M (32 x 200 tokens, one optimizer step per epoch).", ""]
        if cfg.get("plant", True):
            lines += ["### Distance to the original model (never saw the forget set) and relearning", ""]
            lines += _table(result["table"], DISTANCE,
                            {"planted (before unlearning)": result["planted"]} if result.get("planted") else None)
            lines += ["", "forget NLL gap: mean token NLL of the forget texts minus the original's (far above 0 marks "
                          "the text); KL per token on held-out text; MIA AUC forget vs held-out (the original's value "
                          "is the target); repetition: seq-rep-4 of greedy continuations of forget prompts, and its "
                          "ratio to the original's; agreement F1: token overlap with the original's continuation.", ""]
        lines += verdict_lines("tdec", (summary.get("verdicts") or {}).get(model, {}),
                               "### Against the targets (§12: as if never seen; means over the splits)")
        lines += _attack_section(result, cfg)
        lines += _openunlearning_section(result)
    if summary.get("missing"):
        lines += [f"Missing results ({len(summary['missing'])}): " + ", ".join(
            "/".join(m) for m in summary["missing"][:20]), ""]
    if summary.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in summary["plots"]] + [""]
    return "\n".join(lines)


def _reference_rows(result: dict[str, Any]) -> dict[str, dict]:
    """The original's and the planted model's rows, shown above the methods of a forget-set table."""
    extra = {}
    if result.get("original_attacks"):
        extra["original (never saw the text)"] = result["original_attacks"]
    if result.get("planted"):
        extra["planted (before unlearning)"] = result["planted"]
    return extra


def _attack_section(result: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The attack table (§13): forget MA / EL_10 unquantized, after int8 / NF4 rounding and under the probes."""
    if not any(stats.get("nf4_ma", {}).get("n") for stats in result["table"].values()):
        return []  # a folder from before the attacks were measured
    a = cfg.get("attacks") or {}
    extra = _reference_rows(result)
    return ["### Attacks: quantization and prefix probing (forget set, mean ± std over splits)", "",
            *_table(result["table"], ATTACKS, extra), "",
            "MA / EL_10: the model as it is; int8: every Linear weight (not lm_head) rounded to 8 bits with one "
            "absmax per row, NF4: to the 16 NF4 values in absmax blocks of 64, as bitsandbytes stores them "
            "(Zhang et al., ICLR 2025: an update smaller than one rounding step is undone). Probes: greedy "
            f"continuation of a {a.get('prompt_tokens')}-token forget prompt (MA: teacher-forced on the rest of "
            f"the text; EL_10: n-gram overlap of the continuation with it), the prompt alone, after "
            f"{a.get('context_tokens')} tokens of unrelated Pile text, and starting {a.get('shift')} tokens into "
            "the text.", ""]


def _openunlearning_section(result: dict[str, Any]) -> list[str]:
    """OpenUnlearning's forget-set metrics under their key names (§14), for comparison with its tables."""
    if not any(stats.get("extraction_strength", {}).get("n") for stats in result["table"].values()):
        return []  # a folder from before they were measured
    extra = _reference_rows(result)
    return ["### OpenUnlearning's metrics (forget set, mean ± std over splits)", "",
            *_table(result["table"], OPENUNLEARNING, extra), "",
            "Key names as in OpenUnlearning's summaries. exact_memorization: share of tokens whose teacher-forced "
            "argmax is the text's next token (= MA); extraction_strength: 1 - k/|y|, k the first position from "
            "which every argmax matches; privleak: MUSE's (AUC - AUC_original) / AUC_original × 100 with Min-40% "
            "membership scores, forget vs held-out, MUSE's AUC orientation, the original model standing for the "
            "retrained one (about -100: not unlearned, 0: like the original, large positive: over-unlearned).", ""]


def write_outputs(out: Path, cfg, record: dict[str, Any], *, command: list[str] | None = None,
                  seconds: float | None = None) -> dict[str, Any]:
    """results.json, results.md and the plots of everything finished in ``out``."""
    from .base import slug, write_results

    collected = collect(out)
    models = {name: summarise_model(entry) for name, entry in collected.items()}
    missing = []
    for model in cfg.models:
        for split in cfg.splits:
            runs = _get(collected, model, "splits", split, "runs") or {}
            missing += [[model, split, m] for m in cfg.methods if m not in runs]

    def plot(summary: dict[str, Any]) -> list[Path]:
        from .plots import plot_model

        return [path for name, entry in collected.items()
                for path in plot_model(out / "plots", slug(name) if len(collected) > 1 else "", name, entry,
                                       models[name])]

    fields = {"models": models, "missing": missing, "runs": {m: e["splits"] for m, e in collected.items()}}
    return write_results(out, "tdec", cfg, record, command=command, seconds=seconds,
                         seeds={"bench": cfg.seed, "planting": cfg.planting.seed, "relearn": cfg.relearn.seed},
                         fields=fields, plot=plot, render=render_markdown)
