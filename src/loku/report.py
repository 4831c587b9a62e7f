"""report.json (everything needed to reproduce and audit a run), report.md (for people), plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapters import save_adapter
from .cards import before_after_table, run_card_body, write_cards  # noqa: F401 - demo reads the table here
from .cards import format_value as _fmt
from .checkpoint import STATE, checkpoint_dir
from .checkpoint import discard as discard_checkpoint
from .config import UnlearnConfig
from .models import transformers_progress
from .provenance import library_versions
from .save import atomic_dir, atomic_write_json, atomic_write_text, merged_copy
from .tracking import move_into_output


def suites_table(before: dict, after: dict) -> str:
    """Every scalar of the `loku eval` suites run before and after unlearning, side by side."""
    from .evaluate import flatten_metrics

    old, new = flatten_metrics(before["suites"]), flatten_metrics(after["suites"])
    lines = ["| metric | before | after |", "|---|---:|---:|"]
    lines += [f"| {key} | {old.get(key, '–')} | {new.get(key, '–')} |" for key in dict.fromkeys([*old, *new])]
    return "\n".join(lines)


def render_run_markdown(report: dict[str, Any]) -> str:
    """report.md: the outcome, before/after table, one row per epoch, the suites and the cost of a run
    (``loku eval``'s eval.md is :func:`loku.evaluate.render_eval_markdown`)."""
    cfg = report["config"]
    th = report["thresholds"]
    verdict = (f"**forgotten** after {report['epochs_to_success']} epoch(s)" if report["outcome"] == "success"
               else f"**failed**: stop rule not met within {cfg['max_epochs']} epochs")
    lines = [
        f"# loku unlearning report: {cfg['method']} on {cfg['model']}",
        "",
        f"Outcome: {verdict}. Stop rule: forget EL_{cfg['el_n']} <= {th['el']:.4f} and forget MA <= {th['ma']:.4f} "
        f"({th['source']}).",
        "",
        before_after_table(report["before"], report["after"]),
        "",
        "## Epochs",
        "",
        "| epoch | forget loss | retain loss | MA forget | EL forget | MA held-out | PPL held-out | s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in report["epochs"]:
        lines.append(f"| {e['epoch']} | {_fmt(e.get('loss_forget'))} | {_fmt(e.get('loss_retain'))} | "
                     f"{_fmt(e['forget_ma'])} | {_fmt(e.get('forget_el'))} | {_fmt(e.get('val_ma'))} | "
                     f"{_fmt(e.get('val_ppl'))} | {e['seconds']:.1f} |")
    if report.get("suites"):
        lines += ["", "## Evaluation suites", "", suites_table(report["suites"]["before"], report["suites"]["after"])]
    flops = report["flops"]
    lines += [
        "",
        "## Cost",
        "",
        f"- trainable parameters: {report['trainable_parameters']:,} of {report['total_parameters']:,} "
        f"({100 * report['trainable_share']:.2f}%)",
        f"- estimated FLOPs: training {flops['training']:.3g}, Fisher {flops['fisher']:.3g}, "
        f"evaluation (teacher-forced) {flops['evaluation_teacher_forced']:.3g}",
        f"- wall time {report['seconds']['total']:.1f} s (initialisation {report['seconds']['init']:.1f} s), "
        f"peak memory {report['peak_memory_bytes'] / 2**30:.2f} GiB",
        f"- seed {cfg['seed']}; versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()
                                                         if k != "platform" and v),
        "",
        "Outputs: `model/` (merged, loads with `AutoModelForCausalLM.from_pretrained`), "
        "`adapter/` (a standard LoRA on the original base: `PeftModel.from_pretrained(BASE_MODEL, \"OUT/adapter\")`).",
    ]
    return "\n".join(lines) + "\n"


def write_run(result, cfg: UnlearnConfig, *, extra: dict[str, Any] | None = None) -> Path:
    """Write the whole output folder under a temporary name, then rename it into place."""
    from peft import PeftModel

    report = {"config": cfg.to_dict(), "versions": library_versions(), **result.report, **(extra or {})}
    out = Path(cfg.out)
    ckpt = checkpoint_dir(out)
    hint = (f"free space, then `loku unlearn --resume {out}` writes it from the checkpoint {ckpt} without "
            "training again" if (ckpt / STATE).is_file() else None)
    with atomic_dir(out, disk_full_hint=hint) as tmp, transformers_progress(cfg.progress):
        if cfg.save_model:
            merged = merged_copy(result.model)
            merged.save_pretrained(tmp / "model")
            result.tokenizer.save_pretrained(tmp / "model")
        if isinstance(result.model, PeftModel):
            from .requests import extract_delta

            delta = extract_delta("adapter", cfg.forget, result.model, result.start)
            save_adapter(tmp / "adapter", delta.a, delta.b, fan_in_fan_out=delta.fan_in_fan_out,
                         meta={"base_model": cfg.model, "base_fingerprint": report["base_fingerprint"],
                               "method": cfg.method})
        write_cards(tmp, report, run_card_body(report), {"model": "transformers", "adapter": "peft"})
        try:
            from .plots import plot_epoch_curves

            # Epoch 0 is the model before unlearning; the stop-rule thresholds are drawn as lines.
            thresholds = {"el_threshold": report["thresholds"]["el"], "ma_threshold": report["thresholds"]["ma"]}
            plot_epoch_curves([{"epoch": 0, **report["before"], **thresholds}, *report["epochs"]], tmp / "epochs.png",
                              title=f"{cfg.method} on {cfg.model}: {report['outcome']}")
        except ImportError:  # plotting is optional; the numbers are all in report.json
            pass
        atomic_write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", render_run_markdown(report))
    discard_checkpoint(out)  # the complete output supersedes it
    move_into_output(cfg, out)  # the --report-to logs, staged beside OUT while it trained
    return out
