"""results.json, results.md and plots/figure5.png of a `loku bench tofu` folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import header_lines
from .verdicts import verdict_lines

__all__ = ["write_outputs"]

QUALITY_TARGET = 0.05  # TOFU: forget quality (a KS p-value) above 0.05 = indistinguishable from the reference


def _trajectory(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"epoch": e["epoch"], "forget_quality": e["tofu"]["forget_quality"],
             "model_utility": e["tofu"]["model_utility"]} for e in entry["epochs"]]


def _final(entry: dict[str, Any], trajectory: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's result: the state a stop rule kept (a run with a held-out set), else the last epoch's."""
    if "final" not in entry:
        return trajectory[-1]
    final, chosen = entry["final"], (entry["final"].get("stop") or {}).get("chosen") or {}
    return {"epoch": None, "forget_quality": final["tofu"]["forget_quality"],
            "model_utility": final["tofu"]["model_utility"], "outcome": final["outcome"],
            "verdict": (final.get("stop") or {}).get("verdict"), "step": chosen.get("step"),
            "epochs_run": final["epochs_run"]}


def write_outputs(out: Path, cfg, record: dict[str, Any], *, command: list[str] | None = None,
                  seconds: float | None = None) -> dict[str, Any]:
    from .base import read_json, write_results

    shared = read_json(out / "shared.json") if (out / "shared.json").is_file() else {}
    runs, missing = {}, []
    for split, method, rank in cfg.runs():
        path = cfg.result_path(out, split, method, rank)
        if not path.is_file():
            missing.append([split, method, rank])
            continue
        entry = read_json(path)
        trajectory = _trajectory(entry)
        qualities = [t["forget_quality"] for t in trajectory]
        runs.setdefault(split, []).append({
            "method": method, "rank": rank, "trainable_share": entry["trainable_share"], "trajectory": trajectory,
            "best_forget_quality": max(qualities), "reached_target": max(qualities) >= QUALITY_TARGET,
            "final": _final(entry, trajectory), "seconds": entry["seconds"]})
    fields = {"target": {s: _point(shared.get(f"target/{s}")) for s in cfg.forget_splits},
              "reference": {s: _point(shared.get(f"reference/{s}")) for s in cfg.forget_splits},
              "reference_seed_quality": {s: _get_quality(shared.get(f"reference_seed_quality/{s}"))
                                         for s in cfg.forget_splits},
              "finetune": {"target": shared.get("target_finetune"),
                           "reference": {s: shared.get(f"reference_finetune/{s}") for s in cfg.forget_splits}},
              "runs": runs, "missing": missing}
    return write_results(out, "tofu", cfg, record, command=command, seconds=seconds, seeds={"bench": cfg.seed},
                         fields=fields, plot=lambda summary: plot_figure5(summary, out / "plots") if runs else [],
                         render=render_markdown)


def _point(scores: dict | None) -> dict[str, Any] | None:
    if not scores:
        return None
    return {"forget_quality": scores.get("forget_quality"), "model_utility": scores.get("model_utility")}


def plot_figure5(summary: dict[str, Any], folder: Path) -> list[Path]:
    """The paper's Figure 5: model utility (x) against forget quality (y, log), one trajectory per method
    (epochs 1..E), one panel per LoRA rank plus one for full fine-tuning; the target model as a cross."""
    from ..plots import _pyplot, save_figure

    plt = _pyplot()
    paths = []
    for split, entries in summary["runs"].items():
        panels = sorted({e["rank"] for e in entries if e["rank"] is not None}) + (
            [None] if any(e["rank"] is None for e in entries) else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
        methods = sorted({e["method"] for e in entries})
        colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
        target = summary["target"].get(split)
        for ax, rank in zip(axes[0], panels):
            for e in (e for e in entries if e["rank"] == rank):
                xs = [t["model_utility"] for t in e["trajectory"]]
                ys = [max(t["forget_quality"], 1e-30) for t in e["trajectory"]]
                ax.plot(xs, ys, "-o", ms=3, color=colors[e["method"]], label=e["method"])
                if e["final"].get("epoch") is None:  # the state a stop rule kept
                    ax.plot([e["final"]["model_utility"]], [max(e["final"]["forget_quality"], 1e-30)], "*", ms=9,
                            color=colors[e["method"]])
            if target and target["forget_quality"] is not None:
                ax.plot([target["model_utility"]], [max(target["forget_quality"], 1e-30)], "kx", ms=8, label="target")
            ax.axhline(QUALITY_TARGET, color="grey", lw=0.8, ls="--")
            ax.set_yscale("log")
            ax.set_xlabel("model utility")
            ax.set_title("full fine-tuning" if rank is None else f"LoRA rank {rank}", fontsize=9)
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("forget quality")
        fig.suptitle(f"TOFU {split}")
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(save_figure(fig, folder / ("figure5.png" if len(summary["runs"]) == 1 else f"figure5-{split}.png")))
    return paths


def _f(value: Any, fmt: str = ".3f") -> str:
    return "–" if value is None else format(value, fmt)


def _get_quality(check: dict | None) -> float | None:
    return None if check is None else check.get("forget_quality")


def render_markdown(summary: dict[str, Any]) -> str:
    cfg = summary["config"]
    lines = [*header_lines(summary, "tofu"),
             f"Seed {cfg['seed']}; wall time of this invocation {_f((summary['seconds'] or 0) / 60, '.1f')} min  ",
             f"Subset: {cfg['retain_authors']} retain authors + the forget split's authors (20 questions each); "
             f"scored each epoch on {_f(cfg['evals']['forget'], 'd') if cfg['evals']['forget'] else 'all'} forget, "
             f"{cfg['evals']['retain']} retain, {cfg['evals']['real_authors']} real-author and "
             f"{cfg['evals']['world_facts']} world-fact items."]
    for split, entries in summary["runs"].items():
        target, reference = summary["target"].get(split) or {}, summary["reference"].get(split) or {}
        lines += ["", f"## {split}", "",
                  f"Target (fine-tuned on every author): forget quality {_f(target.get('forget_quality'), '.3g')}, "
                  f"model utility {_f(target.get('model_utility'))}. Reference (without the forget authors): model "
                  f"utility {_f(reference.get('model_utility'))}; " + (
                      f"a second reference fine-tuned with another seed: forget quality "
                      f"{_f(summary['reference_seed_quality'].get(split), '.3g')} against the first (what a model "
                      "that never saw the forget authors reaches)." if "reference_seed_quality" in summary else
                      "no second reference in these results (written before it was measured)."), "",
                  "| method | rank | trainable % | best forget quality | reached 0.05 | final forget quality | "
                  "final model utility | s |", "|---|---:|---:|---:|---|---:|---:|---:|"]
        ordered = sorted(entries, key=lambda e: (e["rank"] is None, e["rank"] or 0, e["method"]))
        for e in ordered:
            lines.append(f"| {e['method']} | {e['rank'] or 'full'} | {100 * e['trainable_share']:.2f} | "
                         f"{_f(e['best_forget_quality'], '.3g')} | {'yes' if e['reached_target'] else '**no**'} | "
                         f"{_f(e['final']['forget_quality'], '.3g')} | {_f(e['final']['model_utility'])} | "
                         f"{e['seconds']:.0f} |")
        epochs = max(len(e["trajectory"]) for e in entries)
        lines += ["", "Forget quality / model utility after every epoch:", "",
                  "| method | rank | " + " | ".join(f"epoch {k}" for k in range(1, epochs + 1)) + " |",
                  "|---|---:|" + "---:|" * epochs]
        for e in ordered:
            lines.append(f"| {e['method']} | {e['rank'] or 'full'} | " + " | ".join(
                f"{_f(t['forget_quality'], '.3g')} / {_f(t['model_utility'])}" for t in e["trajectory"]) + " |")
        kept = [e for e in ordered if "step" in e["final"]]
        if kept:
            lines += ["", f"Stopped by the {cfg['unlearn'].get('stop_rule', 'paper')} rule on {cfg['held_out']} "
                      "(the final point is the state the rule kept, scored once more):", "",
                      "| method | rank | rule's verdict | step kept | epochs run | forget quality | model utility |",
                      "|---|---:|---|---:|---:|---:|---:|"]
            lines += [f"| {e['method']} | {e['rank'] or 'full'} | {e['final']['verdict'] or e['final']['outcome']} | "
                      f"{_f(e['final']['step'], 'd')} | {e['final']['epochs_run']} | "
                      f"{_f(e['final']['forget_quality'], '.3g')} | {_f(e['final']['model_utility'])} |" for e in kept]
        lines += ["", *verdict_lines("tofu", (summary.get("verdicts") or {}).get(split, {}),
                                     "### Against the targets (§12: the final point, not the best epoch)")]
    if summary["missing"]:
        lines += ["", f"Missing runs ({len(summary['missing'])}): "
                  + ", ".join("/".join(str(p) for p in m if p is not None) for m in summary["missing"])]
    lines += ["", *[f"![{Path(p).stem}]({p})" for p in summary["plots"]]]
    return "\n".join(lines) + "\n"
