"""`loku unlearn | eval | demo`: argument parsing only; the work is done by the library."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from .config import METHODS, UnlearnConfig, config_fields, load_config
from .errors import LokuError

HELP = {
    "model": "HF hub id, local model folder, loku output folder, or built-in name (default: smollm2-135m)",
    "forget": "forget set: CSV with a `text` column, JSONL with `text` or `question`/`answer`, or text (one per line)",
    "retain": "retain set, same formats (the paper: WikiText)",
    "validation": "held-out set never trained on; its EL/MA before unlearning are the stop thresholds",
    "out": "output folder (written atomically)",
    "method": f"one of: {', '.join(METHODS)} (default fila-ihl = LoKU)",
    "targets": "qv-ffn (default), attn, mlp, all-linear, or comma-separated module-name suffixes",
    "lr": "learning rate (default: 5e-5 full fine-tuning, 2e-4 LoRA/FILA, as in the paper)",
    "one_step_per_epoch": "Jang et al.'s schedule: one optimizer step per epoch (effective batch = forget set)",
    "fisher_mode": "per_sample (paper, default) or batch (official code)",
    "retain_term": "retain loss: nll (default) or kl to the original model, or none",
    "el_every_epoch": "compute EL every epoch (default: only once forget MA passes; same stopping epoch)",
    "truncate": "truncate sequences longer than the context (default: refuse them)",
    "trust_remote_code": "allow custom model code named by a local model's config (off by default)",
    "overwrite": "replace an existing output folder",
}


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(UnlearnConfig)
    for name, f in config_fields().items():
        flag = "--" + name.replace("_", "-")
        kind = hints[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if kind is bool:
            if default:  # flags that are on by default get a --no-... form
                parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false", default=None,
                                    help=HELP.get(name, f"disable {name.replace('_', ' ')}"))
            else:
                parser.add_argument(flag, dest=name, action="store_true", default=None, help=HELP.get(name))
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        parser.add_argument(flag, dest=name, type=base, default=None,
                            help=(HELP.get(name, "") + f" [default: {default}]").strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loku", description="Make a causal LM forget specific data (LoKU).")
    sub = parser.add_subparsers(dest="command", required=True)

    unlearn = sub.add_parser("unlearn", help="unlearn a forget set from a model")
    unlearn.add_argument("--config", help="YAML file of options; command-line options override it")
    unlearn.add_argument("--resume", metavar="OUT", help="continue the killed run that was writing to OUT, "
                         "from its last per-epoch checkpoint (OUT.ckpt), with its original options")
    _add_config_arguments(unlearn)

    demo = sub.add_parser("demo", help="plant memorized text in SmolLM2-135M, then unlearn it with fila-ihl")
    demo.add_argument("--data-dir", default=None, help="shared data folder (default: $LOKU_DATA_DIR or ../shared/data)")
    demo.add_argument("--out", default="runs/demo", help="output folder [default: runs/demo]")
    demo.add_argument("--sequences", type=int, default=8, help="number of sequences to plant and forget")
    demo.add_argument("--tokens", type=int, default=64, help="tokens kept of each sequence")
    demo.add_argument("--seed", type=int, default=0)

    try:
        from .evaluate import add_eval_arguments
    except ImportError:  # evaluation suite not available in this build
        pass
    else:
        add_eval_arguments(sub.add_parser("eval", help="measure a model: tdec, ppl, reasoning, dialogue, tofu, mia"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "unlearn":
            return run_unlearn(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(data_dir=args.data_dir, out=args.out, n_sequences=args.sequences,
                            n_tokens=args.tokens, seed=args.seed)
        if args.command == "eval":
            from .evaluate import run_eval_command

            return run_eval_command(args)
    except LokuError as err:
        print(f"loku: error: {err}", file=sys.stderr)
        return 2
    return 1


def run_unlearn(args: argparse.Namespace) -> int:
    from .report import write_run
    from .distributed import make_accelerator
    from .trainer import unlearn

    overrides = {name: getattr(args, name) for name in config_fields()}
    if args.resume:
        cfg = resumed_config(args.resume, overrides)
    else:
        cfg = load_config(args.config, overrides).validate()
    accelerator = make_accelerator()
    result = unlearn(cfg, accelerator=accelerator, resume=bool(args.resume))
    if not accelerator.is_main_process:
        return 0
    out = write_run(result, cfg)
    report = result.report
    print(f"loku: {report['outcome']} after {report['epochs_run']} epoch(s); results in {out}/report.md")
    return 0 if report["outcome"] == "success" else 3


def resumed_config(out: str, overrides: dict) -> UnlearnConfig:
    """The killed run's own options; only those that cannot change the result may be overridden."""
    from .checkpoint import RESUME_MAY_CHANGE, read_state

    values = read_state(out)["config"]
    values.update({k: v for k, v in overrides.items() if v is not None and k in RESUME_MAY_CHANGE})
    values["out"] = out
    return UnlearnConfig(**values).validate()


if __name__ == "__main__":
    sys.exit(main())
