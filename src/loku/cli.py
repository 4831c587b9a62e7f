"""`loku unlearn | eval | demo | convert-adapter | ...`: argument parsing only; the work is done by the library."""
from __future__ import annotations

import argparse
import importlib
import sys
import typing

from .bench import BENCHES
from .checks import check_unlearn
from .config import UnlearnConfig, config_fields, load_config
from .errors import describe_error
from .options import add_arguments

def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per UnlearnConfig field (help, default and range in the field); defaults stay None so
    only the flags given override a --config YAML."""
    add_arguments(parser, UnlearnConfig, defaults=False)


def _add_debug(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback instead of one line")
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line too (its default adds the whole usage)."""

    def error(self, message: str) -> typing.NoReturn:
        if "expected one argument" in message:
            message += " (a value that starts with '-' is written --flag=VALUE)"
        self.exit(2, f"loku: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="loku", description="Make a causal LM forget specific data (LoKU).")
    sub = parser.add_subparsers(dest="command", required=True)

    unlearn = _add_debug(sub.add_parser("unlearn", help="unlearn a forget set from a model"))
    unlearn.add_argument("--config", help="YAML file of options; command-line options override it")
    unlearn.add_argument("--resume", metavar="OUT", help="continue the killed run that was writing to OUT, "
                         "from its last per-epoch checkpoint (OUT.ckpt), with its original options")
    _add_config_arguments(unlearn)

    demo = _add_debug(sub.add_parser("demo", help="plant memorized text in SmolLM2-135M, then unlearn it with "
                                                   "fila-ihl"))
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
        add_eval_arguments(_add_debug(sub.add_parser("eval", help="measure a model: tdec, ppl, reasoning, dialogue, "
                                                                  "tofu, mia")))
    convert = _add_debug(sub.add_parser(
        "convert-adapter", help="rewrite an adapter folder of an earlier loku (LoRA + residual_base.safetensors, "
                                "right only in loku) as a standard LoRA on the original base, which PEFT loads"))
    convert.add_argument("old", metavar="OLD", help="the old adapter folder (OUT/adapter of an earlier loku run)")
    convert.add_argument("new", metavar="NEW", help="the folder to write the standard adapter to")
    convert.add_argument("--model", default=None, help="the base model [default: the one OLD names]")
    convert.add_argument("--overwrite", action="store_true", help="replace NEW if it exists")
    convert.add_argument("--trust-remote-code", action="store_true",
                         help="allow custom model code from the base model folder (read it first)")
    from .finetune import add_arguments as add_finetune_arguments
    from .reveal import add_arguments as add_reveal_arguments

    add_reveal_arguments(_add_debug(sub.add_parser(
        "reveal", help="make a forget set from what the model reveals about a request (description / fragments)")))

    add_finetune_arguments(_add_debug(sub.add_parser(
        "finetune", help="fine-tune a model on question/answer or text data (TOFU's target and reference models)")))
    bench = sub.add_parser("bench", help="benchmarks: tdec (the paper's Table 1 against the never-trained model), "
                                         "tofu (its Figure 5), continual (its Figure 4: requests one after another), "
                                         "reveal (unlearning from self-generated data)")
    benches = bench.add_subparsers(dest="bench", required=True)
    for name, spec in BENCHES.items():
        importlib.import_module(spec.module).add_arguments(_add_debug(benches.add_parser(name, help=spec.help)))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except BaseException as err:  # noqa: BLE001  every error ends as one line (--debug: the traceback)
        if getattr(args, "debug", False) or isinstance(err, SystemExit):
            raise
        code, message = describe_error(err, args)
        print(f"loku: {message}", file=sys.stderr)
        return code


def run_command(args: argparse.Namespace) -> int:
    if args.command == "unlearn":
        return run_unlearn(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(data_dir=args.data_dir, out=args.out, n_sequences=args.sequences,
                        n_tokens=args.tokens, seed=args.seed)
    if args.command == "convert-adapter":
        return run_convert(args)
    if args.command == "eval":
        from .evaluate import run_eval_command

        return run_eval_command(args)
    if args.command == "reveal":
        from .reveal import run as run_reveal

        return run_reveal(args)
    if args.command == "finetune":
        from .finetune import run as run_finetune

        return run_finetune(args)
    if args.command == "bench":
        return importlib.import_module(BENCHES[args.bench].module).run(args)
    return 1


def run_unlearn(args: argparse.Namespace) -> int:
    from .run import resumed_config, unlearn_job

    overrides = {name: getattr(args, name) for name in config_fields()}
    if args.resume:
        cfg = resumed_config(args.resume, overrides)
    else:
        cfg = check_unlearn(load_config(args.config, overrides))
    return unlearn_job(cfg, resume=bool(args.resume), strategy_given=overrides.get("strategy") is not None)


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert_adapter

    done = convert_adapter(args.old, args.new, model=args.model, overwrite=args.overwrite,
                           trust_remote_code=args.trust_remote_code)
    print(f"loku: {done['old']} -> {done['new']}: a standard rank-{done['rank']} LoRA on {done['base_model']} "
          f"(largest weight difference to the old folder's model {done['max_weight_difference']:.2g}); load it with "
          f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), \"{done['new']}\")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
