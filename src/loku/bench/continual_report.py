"""results.json, results.md and plots/figure4.png of a `loku bench continual` folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..requests import forgetting, forgetting_lines
from .base import header_lines
from .verdicts import verdict_lines

__all__ = ["summarise", "write_outputs"]

SCORES = [("ppl_pile", "Pile PPL / original", True), ("ppl_wiki", "WikiText PPL / original", True),
          ("lambada", "LAMBADA acc.", False), ("pubmedqa", "PubMedQA acc.", False),
          ("dialogue_f1", "dialogue F1", False)]


def _scores(scores: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """Perplexities relative to the original model's, the rest as measured."""
    return {key: (scores[key] / original[key] if ratio else scores[key])
            for key, _, ratio in SCORES if scores.get(key) is not None}


def summarise(shared: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """Per task (0 = planted): scores, and the MA / EL of every request so far; plus outcomes and the gate."""
    original = shared["original_downstream"]
    report = variant["report"]
    names = [r["name"] for r in report["requests"]]
    rows = []
    for k, measured in enumerate(report["matrix"]):
        scores = shared["planted_downstream"] if k == 0 else variant["tasks"][k - 1]["downstream"]
        so_far = [measured["measured"][n] for n in (names[:k] if k else names) if n in measured["measured"]]
        rows.append({"task": k, **_scores(scores, original),
                     "ma_so_far": sum(m["ma"] for m in so_far) / len(so_far),
                     "el_so_far": sum(m["el"] for m in so_far) / len(so_far),
                     "ma_all": {n: measured["measured"][n]["ma"] for n in names if n in measured["measured"]}})
    out = {"options": variant["options"], "tasks": rows,
           "requests": [{k: r[k] for k in ("name", "outcome", "epochs_run")} for r in report["requests"]],
           # judged again from the matrix (§8), so variant files written before "not forgotten" was
           # told apart from a relapse are reported by the same rule
           **forgetting(report["matrix"], report["requests"]), "mean_overlap": report.get("mean_overlap"),
           "seconds": variant["seconds"]}
    if variant.get("gated"):
        gated, gate = variant["gated"], report.get("gate", {})
        out["gated"] = {"ppl_pile": gated["ppl"]["ppl_pile"] / original["ppl_pile"],
                        "ppl_wiki": gated["ppl"]["ppl_wiki"] / original["ppl_wiki"],
                        "adapters_applied": gated["adapters_applied"],
                        "ma": {n: v["ma"] for n, v in gated["requests"].items()},
                        "el": {n: v["el"] for n, v in gated["requests"].items()},
                        "false_positive_rate": gate.get("false_positive_rate", {}).get("any"),
                        "true_positive_rate": gate.get("true_positive_rate"),
                        "true_positive_rate_prompts": gate.get("true_positive_rate_prompts"),
                        "gate_warnings": gate.get("warnings", []), "mode": gate.get("mode", "hard"),
                        "dilution": gated.get("dilution")}
    return out


DILUTION_ROWS = (("prompt", "the forget prompt alone"), ("preamble", "ordinary text + the forget prompt"),
                 ("suffix", "the forget prompt + ordinary text (decided on both, continued from the prompt)"))


def dilution_lines(dilution: dict[str, Any] | None) -> list[str]:
    """results.md's table of the dilution attack: extraction of the forget continuation from its prompt."""
    if not dilution:
        return []
    lines = ["", f"Dilution attack ({dilution['texts']} forget texts: the first {dilution['prompt_tokens']} tokens as "
                 f"prompt, {dilution['dilution_tokens']} tokens of Pile text around it; MA / EL_{dilution['el_n']} / "
                 "share of greedily reproduced tokens of the rest of the text):", "",
             "| input | own adapter switched on | through the gate | every adapter on | planted (no adapter) |",
             "|---|---:|---:|---:|---:|"]
    for key, label in DILUTION_ROWS:
        a = dilution["attacks"][key]
        cells = [" / ".join(_f(a[s][m]) for m in ("ma", "el", "reproduced"))
                 for s in ("through_gate", "adapters_on", "planted")]
        lines.append(f"| {label} | {_f(a['adapter_on'], 2)} | " + " | ".join(cells) + " |")
    return lines


def write_outputs(out: Path, cfg, record: dict[str, Any], *, command: list[str] | None = None,
                  seconds: float | None = None) -> dict[str, Any]:
    from .base import read_json, write_results

    shared = read_json(out / "shared.json") if (out / "shared.json").is_file() else {}
    variants = {}
    for name in cfg.variants:
        path = out / "variants" / f"{name}.json"
        if path.is_file() and shared:
            variants[name] = summarise(shared, read_json(path))
    fields = {"planting": shared.get("planting", {}).get("measurements"),
              "original": shared.get("original_downstream"), "variants": variants,
              "missing": [v for v in cfg.variants if v not in variants]}

    def plot(summary: dict[str, Any]) -> list[Path]:
        title = f"{cfg.model}: {cfg.requests} requests"
        return [plot_figure4(variants, out / "plots" / "figure4.png", title)] if variants else []

    return write_results(out, "continual", cfg, record, command=command, seconds=seconds,
                         seeds={"bench": cfg.seed, "planting": cfg.planting.seed}, fields=fields, plot=plot,
                         render=render_markdown)


def plot_figure4(variants: dict[str, dict], path: Path, title: str) -> Path:
    """The paper's Figure 4: each score after each task, one line per variant (gated: a star at the end)."""
    from ..plots import _pyplot, save_figure

    plt = _pyplot()
    panels = [("ma_so_far", "forget MA (requests so far)")] + [(k, label) for k, label, _ in SCORES]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0))
    for i, (name, summary) in enumerate(variants.items()):
        color = plt.get_cmap("tab10")(i % 10)
        for ax, (key, label) in zip(axes, panels):
            xs = [r["task"] for r in summary["tasks"] if key in r]
            ax.plot(xs, [r[key] for r in summary["tasks"] if key in r], "-o", color=color, label=name, ms=3)
            gated = summary.get("gated", {})
            if key in ("ppl_pile", "ppl_wiki") and key in gated:
                ax.plot([xs[-1]], [gated[key]], "*", color=color, ms=10, label=f"{name} + gate")
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("task")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render_markdown(summary: dict[str, Any]) -> str:
    cfg = summary["config"]
    lines = [*header_lines(summary, "continual"),
             f"Seeds: bench {summary['seeds']['bench']}, planting {summary['seeds']['planting']}; "
             f"wall time of this invocation: {_f((summary['seconds'] or 0) / 60, 1)} min  ",
             f"Requests: {cfg['requests']} x {cfg['sizes']['n_forget']} sequences of {cfg['sizes']['forget_tokens']} "
             f"tokens (rows of lm_extraction_{cfg['pool']}_{cfg['split']}.csv, in order), all planted at once; held-out: "
             f"{cfg['sizes']['n_heldout']} rows of lm_extraction_{cfg['pool']}_{cfg['heldout_split']}.csv (never planted)."]
    planting = summary.get("planting")
    if planting:
        o, p = planting["original"], planting["planted"]
        lines += ["", f"Planting: forget MA {o['forget']['ma']:.3f} → {p['forget']['ma']:.3f}, held-out MA "
                      f"{o['heldout']['ma']:.3f} → {p['heldout']['ma']:.3f}, Pile PPL {o['ppl']:.2f} → {p['ppl']:.2f} "
                      f"(×{p['ppl'] / o['ppl']:.3f})."]
    for name, v in summary["variants"].items():
        opts = ", ".join(f"{k} {val}" for k, val in v["options"].items())
        outcomes = ", ".join(f"{r['name']} {r['outcome']} ({r['epochs_run']})" for r in v["requests"])
        lines += ["", f"## {name} ({opts})", "", f"Requests (epochs): {outcomes}.  ",
                  *forgetting_lines(v),
                  *([f"Mean subspace overlap of the adapters' A: {v['mean_overlap']:.4f}  "]
                    if v.get("mean_overlap") is not None else []),
                  f"Unlearning {v['seconds']['unlearn']:.0f} s, evaluation {v['seconds']['evaluation']:.0f} s.", "",
                  "| task | MA so far | EL_10 so far | " + " | ".join(label for _, label, _ in SCORES) + " |",
                  "|---:" * (3 + len(SCORES)) + "|"]
        for r in v["tasks"]:
            lines.append(f"| {r['task']} | {_f(r['ma_so_far'])} | {_f(r['el_so_far'])} | "
                         + " | ".join(_f(r.get(k)) for k, _, _ in SCORES) + " |")
        gated = v.get("gated")
        if gated:
            lines += ["", f"With the gate, after the last request: Pile PPL / original {_f(gated['ppl_pile'])}, "
                          f"WikiText {_f(gated['ppl_wiki'])} (adapters applied to "
                          f"{_f(gated['adapters_applied'].get('ppl_pile'), 2)} of Pile and "
                          f"{_f(gated['adapters_applied'].get('ppl_wiki'), 2)} of WikiText excerpts); forget MA "
                          + ", ".join(f"{n} {_f(x)}" for n, x in gated["ma"].items()) + "; EL_10 "
                          + ", ".join(f"{n} {_f(x)}" for n, x in gated["el"].items())
                          + f" (each text routed on its first tokens, as deployed). Gate ({gated['mode']}) false-"
                            f"positive rate on held-out TDEC {_f(gated['false_positive_rate'])}; true-positive rate on "
                            "forget texts it was not fitted on (cross-fitted), whole text / first window: "
                          + ", ".join(f"{n} {_f(x, 2)} / {_f((gated.get('true_positive_rate_prompts') or {}).get(n), 2)}"
                                      for n, x in (gated["true_positive_rate"] or {}).items()) + "."]
            lines += [f"Gate warning: {w}" for w in gated.get("gate_warnings", [])]
            lines += dilution_lines(gated.get("dilution"))
    lines += ["", *verdict_lines("continual", summary.get("verdicts") or {},
                                 "## Against the targets (§12: after the last request, without the gate)")]
    if summary["missing"]:
        lines += ["", f"Missing variants: {', '.join(summary['missing'])}"]
    if summary["plots"]:
        lines += ["", *[f"![{Path(p).stem}]({p})" for p in summary["plots"]]]
    return "\n".join(lines) + "\n"
