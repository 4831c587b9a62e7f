"""PNG plots of unlearning runs (matplotlib, Agg backend, atomic writes).

* :func:`plot_epoch_curves` -- per-epoch EL / MA on the forget vs held-out set, and held-out
  perplexity when recorded, from the trainer's per-epoch records.
* :func:`plot_utility_vs_forgetting` -- one labelled point per run/method: forgetting on x
  (e.g. 1 - EL, or TOFU forget quality), utility on y.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from loku.errors import ConfigError

__all__ = ["plot_epoch_curves", "plot_utility_vs_forgetting"]

# (panel title, [(record key, legend label, style)])
_PANELS = (
    ("Extraction likelihood (EL)", [("forget_el", "forget", "-o"), ("val_el", "held-out", "--s")], "el_threshold"),
    ("Memorization accuracy (MA)", [("forget_ma", "forget", "-o"), ("val_ma", "held-out", "--s")], "ma_threshold"),
    ("Held-out perplexity", [("val_ppl", "held-out", "-o")], None),
)


def _pyplot():
    from loku.extras import require

    matplotlib = require("matplotlib", "plots", "plotting")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def save_figure(fig: Any, path: str | Path) -> Path:
    """``fig`` written to ``path`` as PNG (atomically: no half-written file after a crash), then closed."""
    from loku.save import atomic_file

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return Path(path)


def plot_epoch_curves(epochs: Sequence[dict], path: str | Path, *, title: str | None = None) -> Path:
    """Plot per-epoch metrics from records like ``{"epoch", "forget_el", "val_el", "forget_ma", "val_ma", "val_ppl"}``.

    Missing keys are skipped; a panel with no data is left out. A record without ``"epoch"``
    takes its position (0, 1, ...). Thresholds (``"el_threshold"``, ``"ma_threshold"`` in a
    record) are drawn as dotted lines. Returns the written PNG path.
    """
    if not epochs:
        raise ConfigError("no per-epoch records to plot")
    xs = [_number(r.get("epoch")) if _number(r.get("epoch")) is not None else float(i) for i, r in enumerate(epochs)]
    panels = []
    for title_text, series, threshold_key in _PANELS:
        lines = []
        for key, label, style in series:
            pts = [(x, _number(r.get(key))) for x, r in zip(xs, epochs)]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                lines.append((label, style, pts))
        thr = next((_number(r.get(threshold_key)) for r in epochs if threshold_key and _number(r.get(threshold_key)) is not None), None)
        if lines:
            panels.append((title_text, lines, thr))
    if not panels:
        raise ConfigError("the per-epoch records have none of forget_el, val_el, forget_ma, val_ma, val_ppl")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title_text, lines, thr) in zip(axes[0], panels):
        for label, style, pts in lines:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, markersize=4)
        if thr is not None:
            ax.axhline(thr, color="grey", linestyle=":", linewidth=1, label="threshold")
        ax.set_title(title_text, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_utility_vs_forgetting(
    points: Sequence[dict],
    path: str | Path,
    *,
    x_label: str = "forgetting (1 - EL)",
    y_label: str = "utility",
    title: str | None = None,
) -> Path:
    """Scatter of runs: each point ``{"label", "forgetting" (or "x"), "utility" (or "y")}``, labelled."""
    clean = []
    for i, p in enumerate(points):
        x = _number(p.get("forgetting", p.get("x")))
        y = _number(p.get("utility", p.get("y")))
        if x is None or y is None:
            raise ConfigError(f"point {i} ({p.get('label', '?')}) needs numeric 'forgetting' and 'utility' values")
        clean.append((str(p.get("label", p.get("method", f"run {i}"))), x, y))
    if not clean:
        raise ConfigError("no points to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for label, x, y in clean:
        ax.scatter([x], [y], s=36)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)
