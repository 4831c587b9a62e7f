"""Pictures of a TDEC bench (the house style of :mod:`loku.plots`: matplotlib Agg, atomic PNGs).

* ``figure1.png``   the paper's Figure 1: cost (training + Fisher FLOPs) against each downstream
  metric, one point per method (mean over splits, bars: std).
* ``forgetting_vs_utility.png``   every method: forgetting (1 - EL_10) against Pile perplexity
  relative to the original model (:func:`loku.plots.plot_utility_vs_forgetting`).
* ``epochs.png``   per-epoch forget MA, forget EL_10 and held-out perplexity relative to the
  original model, every method in one figure (one line per split).
* ``relearn.png``   relearning curves (MA of the held-back forget half) of every method and the control.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..plots import _pyplot, save_figure, plot_utility_vs_forgetting

__all__ = ["plot_model"]

DOWNSTREAM = [("ppl_pile_ratio", "Pile PPL / original"), ("ppl_wiki_ratio", "WikiText PPL / original"),
              ("lambada", "LAMBADA acc."), ("pubmedqa", "PubMedQA acc."), ("dialogue_f1", "dialogue F1")]


def _colors(methods: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _name(prefix: str, name: str) -> str:
    return f"{prefix}-{name}" if prefix else name


def plot_figure1(table: dict[str, dict], path: Path, title: str) -> Path | None:
    methods = [m for m in table if table[m].get("tflops", {}).get("mean") is not None]
    panels = [(k, label) for k, label in DOWNSTREAM
              if any(table[m].get(k, {}).get("mean") is not None for m in methods)]
    if not methods or not panels:
        return None
    plt = _pyplot()
    colors = _colors(methods)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for m in methods:
            x, y = table[m]["tflops"], table[m].get(key, {})
            if y.get("mean") is None:
                continue
            ax.errorbar([x["mean"]], [y["mean"]], xerr=[x.get("std") or 0], yerr=[y.get("std") or 0], fmt="o",
                        color=colors[m], label=m, markersize=5, capsize=2)
        ax.set_xscale("log")
        ax.set_xlabel("training + Fisher TFLOPs")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_epochs(splits: dict[str, Any], path: Path, title: str) -> Path | None:
    """Per-epoch curves of every method (epoch 0 = the planted model), one line per split."""
    methods = sorted({m for s in splits.values() for m in s["runs"]})
    if not methods:
        return None
    plt = _pyplot()
    colors = _colors(methods)
    panels = [("forget_ma", "forget MA"), ("forget_el", "forget EL_10"), ("ppl", "held-out PPL / original")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    labelled: set[str] = set()
    for split, content in splits.items():
        base_ppl = content["split"].get("original_heldout_ppl")
        for method, run in content["runs"].items():
            records = [{"epoch": 0, **run["before"]}, *run["epochs"]]
            label = method if method not in labelled else None
            labelled.add(method)
            for ax, (key, _) in zip(axes, panels):
                if key == "ppl":
                    pts = [(r["epoch"], r["val_ppl"] / base_ppl) for r in records
                           if r.get("val_ppl") is not None and base_ppl]
                else:
                    pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=colors[method], markersize=3,
                            linewidth=1, alpha=0.8, label=label)
            if run.get("thresholds"):
                axes[0].axhline(run["thresholds"]["ma"], color="grey", linestyle=":", linewidth=0.8)
                axes[1].axhline(run["thresholds"]["el"], color="grey", linestyle=":", linewidth=0.8)
    for ax, (_, label) in zip(axes, panels):
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ratios = [y for line in axes[2].get_lines() for y in line.get_ydata()]
    if ratios and max(ratios) / max(min(ratios), 1e-12) > 20:  # a collapse (x1000) next to x1.1: log scale
        axes[2].set_yscale("log")
    axes[2].axhline(1.0, color="black", linewidth=0.8)
    axes[0].legend(fontsize=7)
    fig.suptitle(title + " (dotted: stop thresholds)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_relearn(splits: dict[str, Any], path: Path, title: str) -> Path | None:
    methods = sorted({m for s in splits.values() for m, r in s["runs"].items() if r.get("relearn")})
    if not methods:
        return None
    plt = _pyplot()
    colors = _colors(methods)
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    labelled: set[str] = set()
    for content in splits.values():
        for method, run in content["runs"].items():
            curve = (run.get("relearn") or {}).get("unlearned")
            if not curve:
                continue
            ax.plot(curve["steps"], curve["ma"], "-o", color=colors[method], markersize=3, linewidth=1,
                    label=None if method in labelled else method)
            labelled.add(method)
        control = content["split"].get("relearn_control")
        if control:
            ax.plot(control["steps"], control["ma"], "--", color="black", linewidth=1.5,
                    label=None if "control" in labelled else "control (original model)")
            labelled.add("control")
    ax.set_xlabel("fine-tuning steps on the other half of the forget set")
    ax.set_ylabel("MA of the held-back half")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_model(folder: Path, prefix: str, model: str, entry: dict[str, Any], summary: dict[str, Any]) -> list[Path]:
    """Every plot of one model's results; returns the PNGs written."""
    table = summary["table"]
    written = [plot_figure1(table, folder / f"{_name(prefix, 'figure1')}.png", f"{model}: cost vs utility"),
               plot_epochs(entry["splits"], folder / f"{_name(prefix, 'epochs')}.png", f"{model}: per-epoch"),
               plot_relearn(entry["splits"], folder / f"{_name(prefix, 'relearn')}.png", f"{model}: relearning")]
    points = [{"label": m, "forgetting": 1 - s["el"]["mean"], "utility": s["ppl_pile_ratio"]["mean"]}
              for m, s in table.items()
              if s.get("el", {}).get("mean") is not None and s.get("ppl_pile_ratio", {}).get("mean") is not None]
    if points:
        written.append(plot_utility_vs_forgetting(
            points, folder / f"{_name(prefix, 'forgetting_vs_utility')}.png", x_label="forgetting (1 - EL_10)",
            y_label="Pile perplexity / original model's", title=f"{model}: every method (mean over splits)"))
    return [p for p in written if p is not None]
