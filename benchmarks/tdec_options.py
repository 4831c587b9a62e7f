"""Which unlearning options let fila-ihl forget a planted TDEC split without hurting the model?

One run per invocation: the bench's ``cpu`` configuration (``configs/bench-tdec-cpu.yaml``: SmolLM2-135M,
8 TDEC sequences of 32 tokens planted among Pile text, 16 unplanted TDEC rows as the held-out set),
its ``unlearn`` options overridden by ``key=value`` arguments, unlearned with the trainer's phases
(``loku.bench.tdec.unlearn_from``, as the bench does). Recorded: epochs to the stop rule, forget MA and
EL_10, Pile perplexity relative to the original (never planted) model, the repetition rate of
continuations of the forget prompts, the forget-NLL gap, KL and MIA AUC against the original
(``loku.metrics.reference``), per-epoch forget MA and held-out perplexity. Each run is appended to
``benchmarks/results/tdec_options_cpu.json``; the table in the cpu config's header comes from it.

    LOKU_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python benchmarks/tdec_options.py kl-lr5 retain_term=kl lr=5e-5
    python benchmarks/tdec_options.py base split=1 method=lora-ihl      # another split or method

The planted model comes from the bench's cache (planted on first use, ~2 min); the original model's
reference statistics and the planted model's pre-unlearning measurement are cached in ``--work``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="a name for this run")
    p.add_argument("options", nargs="*", help="unlearn options as key=value (YAML values); also split= and method=")
    p.add_argument("--work", default="/tmp/loku-tdec-options", help="scratch folder (data files, caches, runs)")
    p.add_argument("--out", default=str(common.RESULTS / "tdec_options_cpu.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    from loku.bench import data as bench_data
    from loku.bench.planting import planted_model
    from loku.bench.tdec import _reference_kwargs, load_bench_config, unlearn_from
    from loku.metrics.perplexity import perplexity
    from loku.metrics.reference import reference_distances, reference_stats
    from loku.models import cache_dir, load_model
    from loku.save import merged_copy

    args = parse_args(argv)
    options = {}
    for item in args.options:
        key, _, value = item.partition("=")
        options[key] = yaml.safe_load(value)
    split, method = str(options.pop("split", "0")), options.pop("method", "fila-ihl")
    cfg = load_bench_config("cpu")
    cfg.unlearn.update(options)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = common.environment("cpu", "float32")

    original, tokenizer = load_model(cfg.models[0])
    original.eval()
    texts = bench_data.bench_texts(tokenizer, cfg.data_root(), split, cfg.sizes, pool=cfg.pool,
                                   heldout=cfg.heldout).texts
    files = {name: str(bench_data.write_jsonl(work / f"s{split}-{name}.jsonl", texts[role]))
             for role, name in (("forget", "forget"), ("retain", "retain"), ("heldout", "validation"))}
    planted, _, _, _ = planted_model(original, tokenizer, base_name=cfg.models[0], forget=texts["forget"],
                                     general=texts["general"], recipe=cfg.planting, cache_root=cache_dir(),
                                     log=lambda message: print(message, file=sys.stderr))
    cache_path = work / f"s{split}-cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if "reference" not in cache:
        cache["reference"] = reference_stats(original, tokenizer, texts["forget"], texts["heldout"],
                                             **_reference_kwargs(cfg))
        cache["ppl_original"] = perplexity(original, tokenizer, texts["ppl_pile"], batch_size=8)["ppl"]
        cache_path.write_text(json.dumps(cache))

    out = work / f"run-{args.name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}.ckpt", ignore_errors=True)
    ucfg = cfg.unlearn_config(method, files["forget"], files["retain"], files["validation"], str(out),
                              model="planted")
    ucfg.progress = False
    started = time.time()
    result, before = unlearn_from(ucfg, planted, tokenizer, before=cache.get("before"), resume=False)
    if "before" not in cache:
        cache["before"] = before
        cache_path.write_text(json.dumps(cache))
    model = merged_copy(result.model).eval()
    ppl = perplexity(model, tokenizer, texts["ppl_pile"], batch_size=8)["ppl"]
    ref = reference_distances(model, tokenizer, texts["forget"], texts["heldout"], original=original,
                              original_stats=cache["reference"], kl_texts=texts["heldout"], **_reference_kwargs(cfg))
    report = result.report
    row = {"name": args.name, "options": options, "method": method, "split": split, "command": sys.argv,
           "outcome": report["outcome"], "epochs": report["epochs_run"], "thresholds": report["thresholds"],
           "forget_ma": report["after"]["forget_ma"], "forget_el": report["after"]["forget_el"],
           "ppl_pile_ratio": ppl / cache["ppl_original"],
           "repetition_rate": ref["generation"]["repetition_rate"]["model"],
           "repetition_rate_original": ref["generation"]["repetition_rate"]["original"],
           "forget_nll_gap": ref["forget_nll"]["gap"], "heldout_kl": ref["heldout_kl"]["model"],
           "mia_auc_loss": ref["mia_auc"]["loss"],
           "per_epoch": [{"forget_ma": e["forget_ma"], "forget_el": e.get("forget_el"), "val_ppl": e["val_ppl"]}
                         for e in report["epochs"]],
           "seconds": time.time() - started, "environment": env, "torch_threads": torch.get_num_threads()}
    runs = json.loads(Path(args.out).read_text())["runs"] if Path(args.out).is_file() else []
    runs = [r for r in runs if r["name"] != args.name] + [row]
    common.write_json_atomic(Path(args.out), {"benchmark": "tdec_options", "runs": runs})
    print(json.dumps({k: v for k, v in row.items() if k not in ("per_epoch", "environment", "command")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
