"""results.json, results.md and plots/reveal.png of a `loku bench reveal` folder."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .base import header_lines
from .continual_report import _f
from .verdicts import verdict_lines

__all__ = ["queries_to_reach", "write_outputs"]

# random-text needs self-generated's sizes; self-generated-fragments: each round's stop rule on the request's
# fragments (--reveal-stop-on fragments, two-sided, every step), the rest as self-generated
ARMS = ("real-text", "self-generated", "self-generated-fragments", "coverage", "random-text")

UNLEARNED = ("real-text", "self-generated", "self-generated-fragments", "random-text")
ROUNDS = ("self-generated", "self-generated-fragments")  # the arms of rounds


def queries_to_reach(curve: list[float], level: float) -> int | None:
    """The number of queries after which ``curve`` first reaches ``level`` (None: never)."""
    return next((t + 1 for t, value in enumerate(curve) if value >= level), None)


LEVELS = (0.5, 0.8)  # coverage levels compared, as shares of the best selector's mean final recall


def summarise_coverage(curves: dict[str, list[list[float]]]) -> dict[str, Any]:
    """Per selector: the mean curve over seeds, its final recall (mean, sd), and for each of :data:`LEVELS`
    the queries each seed needed to reach that share of the best selector's mean final recall."""
    finals = {s: [c[-1] for c in cs] for s, cs in curves.items()}
    best = max(statistics.mean(f) for f in finals.values())
    out = {}
    for selector, cs in curves.items():
        out[selector] = {"mean_curve": [statistics.mean(v) for v in zip(*cs)],
                         "final_mean": statistics.mean(finals[selector]),
                         "final_sd": statistics.pstdev(finals[selector]),
                         "queries_to": {str(level): {"recall": level * best,
                                                     "per_seed": [queries_to_reach(c, level * best) if best > 0
                                                                  else None for c in cs]}
                                        for level in LEVELS}}
    return out


def write_outputs(out: Path, cfg, record: dict[str, Any], *, command: list[str] | None = None,
                  seconds: float | None = None) -> dict[str, Any]:
    from .base import read_json, write_results

    shared = read_json(out / "shared.json") if (out / "shared.json").is_file() else {}
    arms = {a: read_json(out / "arms" / f"{a}.json") for a in ARMS if (out / "arms" / f"{a}.json").is_file()}
    fields = {"planting": shared.get("planting", {}).get("measurements"), "original": shared.get("original"),
              "planted": shared.get("planted"), "arms": arms, "missing": [a for a in ARMS if a not in arms]}
    if "coverage" in arms:
        fields["coverage"] = summarise_coverage(arms["coverage"]["curves"])

    def plot(summary: dict[str, Any]) -> list[Path]:
        return [plot_reveal(summary, out / "plots" / "reveal.png")] if arms and shared.get("original") else []

    return write_results(out, "reveal", cfg, record, command=command, seconds=seconds,
                         seeds={"bench": cfg.seed, "planting": cfg.planting.seed, "coverage": cfg.coverage["seeds"]},
                         fields=fields, plot=plot, render=render_markdown)


def plot_reveal(summary: dict[str, Any], path: Path) -> Path:
    """Coverage of the hidden text against queries per selector; MA / EL_10 of the real text per arm."""
    from ..plots import _pyplot, save_figure

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for selector, entry in summary.get("coverage", {}).items():
        curve = entry["mean_curve"]
        left.plot(range(1, len(curve) + 1), curve, label=selector)
    left.set_xlabel("queries")
    left.set_ylabel(f"hidden {4}-gram recall")
    left.set_title("what the planted model reveals", fontsize=9)
    if summary.get("coverage"):
        left.legend(fontsize=7)
    rows = [("original", summary["original"]), ("planted", summary["planted"])] + [
        (arm, summary["arms"][arm]["scores"]) for arm in UNLEARNED
        if arm in summary["arms"] and summary["arms"][arm].get("scores")]
    xs = range(len(rows))
    right.bar([x - 0.2 for x in xs], [r["ma"] for _, r in rows], 0.4, label="MA")
    right.bar([x + 0.2 for x in xs], [r["el"] for _, r in rows], 0.4, label="EL_10")
    right.set_xticks(list(xs))
    right.set_xticklabels([name for name, _ in rows], fontsize=7, rotation=20)
    right.set_title("the real planted text", fontsize=9)
    right.legend(fontsize=7)
    fig.suptitle(f"{summary['config']['model']}: unlearning from self-generated data")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def _score_row(name: str, what: str, epochs: Any, s: dict[str, Any] | None, original: dict[str, Any]) -> str:
    if not s:
        return f"| {name} | {what} | {epochs} | – | – | – | – |"
    return (f"| {name} | {what} | {epochs} | {_f(s['el'])} | {_f(s['ma'])} | {_f(s['heldout_ma'])} | "
            f"{_f(s['ppl_pile'] / original['ppl_pile'])} |")


def render_markdown(summary: dict[str, Any]) -> str:
    cfg, arms, original = summary["config"], summary["arms"], summary.get("original")
    sizes = cfg["sizes"]
    lines = [*header_lines(summary, "reveal"),
             f"Seeds: bench {summary['seeds']['bench']}, planting {summary['seeds']['planting']}, coverage "
             f"{summary['seeds']['coverage']}; wall time of this invocation: {_f((summary['seconds'] or 0) / 60, 1)} min  ",
             f"Planted: the first {sizes['n_forget']} rows of lm_extraction_{cfg['pool']}_{cfg['split']}.csv "
             f"({sizes['forget_tokens']} tokens each); the request gives the first {cfg['prefix_tokens']} tokens of "
             f"each; method {cfg['method']}."]
    if original:
        lines += ["", "| arm | forget set | epochs | EL_10 (real text) | MA (real text) | held-out MA | Pile PPL / "
                      "original |", "|---|---|---:|---:|---:|---:|---:|",
                  _score_row("original", "–", "–", original, original),
                  _score_row("planted", "–", "–", summary["planted"], original)]
        labels = {"real-text": "the planted text (upper bound)", "self-generated": "what the model revealed",
                  "self-generated-fragments": "what the model revealed, rounds stopped on the request's fragments",
                  "random-text": "unplanted Pile text, same size and epochs (lower bound)"}
        for arm in UNLEARNED:
            if arm in arms:
                a = arms[arm]
                lines.append(_score_row(arm, f"{labels[arm]}: {a.get('forget_texts', 0)} texts", a.get("epochs_run"),
                                        a.get("scores"), original))
    for arm in (a for a in ROUNDS if a in arms):
        gen = arms[arm]
        title = {"self-generated": "Self-generated rounds",
                 "self-generated-fragments": "Self-generated rounds, each stopped on the request's fragments"}[arm]
        lines += ["", f"{title} ({gen['stopped']}; mean subspace overlap of the rounds' A: "
                      f"{_f(gen.get('mean_overlap'), 4)}):", "",
                  "| round | queries | collected | repeated | texts with new n-grams (share new) | mean reward | "
                  "hidden 4-gram recall (round / so far) | retain texts inside | outcome (epochs) | "
                  "MA / EL_10 real text after |", "|---:" * 10 + "|"]
        for r in gen["rounds"]:
            s = r.get("scores")
            lines.append(f"| {r['round']} | {r['queries']} | {r['collected']} | {r['repeated']} | "
                         f"{r.get('novel', '–')} ({_f(r.get('new_ngram_share'))}) | {_f(r['mean_reward'])} | {_f(r['coverage'])} / {_f(r['coverage_so_far'])} | "
                         f"{r['retain_verbatim']} | {r['outcome'] or 'not unlearned'}"
                         + (f", {r['stop_verdict']}" if r.get("stop_verdict") else "") + f" ({r['epochs_run']}) | "
                         + (f"{_f(s['ma'])} / {_f(s['el'])}" if s else "–") + " |")
    cov = summary.get("coverage")
    if cov:
        levels = next(iter(cov.values()))["queries_to"]
        lines += ["", f"Instruction selection on the planted model ({len(summary['seeds']['coverage'])} seeds, "
                      f"{cfg['coverage']['budget']} queries each): hidden 4-gram recall of the collected texts, and "
                      "the queries each seed needed to reach " + " and ".join(
                          f"{_f(v['recall'])} ({float(k):.0%} of the best selector's mean final recall)"
                          for k, v in levels.items()) + ".",
                  "", "| selector | final recall (mean ± sd) | "
                  + " | ".join(f"queries to {_f(v['recall'])}, per seed" for v in levels.values()) + " |",
                  "|---|---:|" + "---|" * len(levels)]
        for selector, entry in cov.items():
            needed = [", ".join("never" if q is None else str(q) for q in v["per_seed"])
                      for v in entry["queries_to"].values()]
            lines.append(f"| {selector} | {_f(entry['final_mean'])} ± {_f(entry['final_sd'])} | "
                         + " | ".join(needed) + " |")
    lines += ["", *verdict_lines("reveal", summary.get("verdicts") or {},
                                 "Against the targets (§12: each arm's end, scored on the real planted text):")]
    lines += ["", "Arms computed: " + ", ".join(f"{a} {arms[a].get('written', 'at an earlier invocation')}"
                                               for a in arms) + "."]
    if summary["missing"]:
        lines += ["", f"Missing arms: {', '.join(summary['missing'])}"]
    if summary["plots"]:
        lines += ["", *[f"![{Path(p).stem}]({p})" for p in summary["plots"]]]
    return "\n".join(lines) + "\n"
