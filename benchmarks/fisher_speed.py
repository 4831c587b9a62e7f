"""Speed of FILA's per-sample Fisher pass: one forward/backward per batch against one per sequence.

``loku.fisher.empirical_fisher(mode="per_sample")`` gets every sequence's squared gradient of the
QV+FFN weights from ONE forward and backward per batch (layer inputs x output gradients, hooked);
``mode="per_sample_loop"`` is the per-sequence autograd reference, which is what the old code did
(one ``autograd.grad`` per sequence). Both are timed on the demo's setting, their results compared
(max relative difference), and put next to the rest of a fila-ihl run's cost: the FILA SVD (through
``loku.trainer.adapt_model``) and one training epoch (IHL on forget + NLL on retain, AdamW, LoRA
rank 16 on QV+FFN, as the trainer's loop).

Setting (the demo's, ``loku demo``): the built-in SmolLM2-135M (float32), 8 TDEC forget texts and 128
WikiText retain texts (``tdec/forget/lm_extraction_32_0.csv``, ``tdec/eval/wikitext.csv`` under
``--data-dir``), each cut to 64 tokens, batch 2. The demo plants the forget texts first; speed does
not depend on that, so the base model is used.

Also measured: the share of relative-Fisher entries where eps = 1e-5 dominates (F_retain < eps) on
two layers, for the paper's per-sequence SUM loss and the old per-sequence MEAN loss, on the first
``--share-sequences`` (6) forget and retain texts.

    OMP_NUM_THREADS=2 python benchmarks/fisher_speed.py --threads 2   # -> benchmarks/results/fisher_speed_cpu.json
    python benchmarks/fisher_speed.py --smoke                          # tiny random Llama, seconds
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

import common

SHARE_LAYERS = "model.layers.0.self_attn.q_proj,model.layers.20.mlp.down_proj"
SMOKE_SHARE_LAYERS = "model.layers.0.self_attn.q_proj,model.layers.1.mlp.down_proj"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a tiny random Llama and random token ids: seconds")
    p.add_argument("--forget-sequences", type=int, default=8)
    p.add_argument("--retain-sequences", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64, help="tokens per text (cut), default 64")
    p.add_argument("--batch-size", type=int, default=2, help="training batch size, also the Fisher's (default 2)")
    p.add_argument("--fisher-batch-size", type=int, default=None,
                   help="also time the one-pass Fisher with this batch size (default: not timed)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2, help="timed training epochs (mean reported; default 2)")
    p.add_argument("--share-sequences", type=int, default=6)
    p.add_argument("--share-layers", default=None, help=f"comma-separated module names (default {SHARE_LAYERS})")
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=str(common.REPO.parent / "shared" / "data"),
                   help="shared data folder with tdec/ (default ../shared/data)")
    p.add_argument("--out", default=str(common.RESULTS), help="folder for fisher_speed_cpu.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.forget_sequences, args.retain_sequences, args.tokens = 4, 6, 12
        args.fisher_batch_size, args.rank, args.epochs, args.share_sequences = 4, 4, 1, 3
    if args.share_layers is None:
        args.share_layers = SMOKE_SHARE_LAYERS if args.smoke else SHARE_LAYERS
    args.share_layers = [s.strip() for s in args.share_layers.split(",") if s.strip()]
    return args


# --------------------------------------------------------------------------- model and data


def load(args):
    """(model, forget ids, retain ids, pad id, text source)."""
    if args.smoke:
        model = common.random_model(common.tiny_llama_config(), "cpu", torch.float32, args.seed)
        g = torch.Generator().manual_seed(args.seed)
        lengths = [args.tokens - (i % 4) for i in range(args.forget_sequences + args.retain_sequences)]  # padding
        ids = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
        return model, ids[: args.forget_sequences], ids[args.forget_sequences:], 0, "random token ids"
    from loku.data import ensure_pad_token, tokenize_texts
    from loku.demo import clip_texts, demo_texts
    from loku.models import load_model

    model, tokenizer = load_model("smollm2-135m", dtype="float32", device="cpu")
    ensure_pad_token(tokenizer)
    # demo_texts: 8 TDEC texts as the forget set, the first 128 WikiText texts of over 60 words as the retain set
    texts, source = demo_texts(Path(args.data_dir), args.forget_sequences, args.seed)
    if not source.startswith("TDEC"):
        raise SystemExit(f"shared data not found under {args.data_dir}: {source}")
    retain = texts["retain"][: args.retain_sequences]
    if len(retain) < args.retain_sequences:
        raise SystemExit(f"only {len(retain)} WikiText texts of over 60 words, asked for {args.retain_sequences}")
    ids = {role: tokenize_texts(tokenizer, clip_texts(tokenizer, items, args.tokens), max_length=args.tokens,
                                source=f"benchmark {role} set")
           for role, items in (("forget", texts["forget"]), ("retain", retain))}
    return model.eval(), ids["forget"], ids["retain"], tokenizer.pad_token_id, source


def config(args):
    from loku.config import UnlearnConfig

    return UnlearnConfig(forget="benchmark", retain="benchmark", out="benchmark", method="fila-ihl", rank=args.rank,
                         lora_alpha=2.0 * args.rank, targets="qv-ffn", batch_size=args.batch_size,
                         fisher_eps=args.eps, seed=args.seed, progress=False)


# --------------------------------------------------------------------------- phases


def fisher_both(model, weights, forget, retain, mode: str):
    from loku.fisher import empirical_fisher

    return (empirical_fisher(model, forget, weights, mode=mode), empirical_fisher(model, retain, weights, mode=mode))


def max_relative_difference(new: dict, old: dict) -> dict:
    """Per tensor max|new - old| / max|old| (entries near 0 only carry rounding), worst layer first."""
    diffs = {k: float((new[k] - old[k]).abs().max() / old[k].abs().max().clamp(min=1e-30)) for k in old}
    worst = max(diffs, key=diffs.get)
    return {"max": diffs[worst], "worst_layer": worst}


def eps_shares(model, forget_ids, retain_ids, layers: list[str], pad: int, eps: float) -> dict:
    """Share of entries with F < eps, per layer, for the per-sequence SUM loss and the old MEAN loss.

    One Fisher per sequence (a batch of one): g_i^2 for the sum loss L(x_i); the mean loss is
    L(x_i) / n_i (n_i predicted tokens), so its squared gradient is g_i^2 / n_i^2.
    """
    from loku.data import make_batches
    from loku.fisher import empirical_fisher

    modules = dict(model.named_modules())
    params = {name: modules[name].weight for name in layers}
    result = {}
    for role, ids in (("forget", forget_ids), ("retain", retain_ids)):
        batches = make_batches(ids, 1, pad)
        per_sequence = [empirical_fisher(model, [b], params) for b in batches]
        counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
        fisher = {"sum_loss": {n: sum(f[n] for f in per_sequence) / len(per_sequence) for n in layers},
                  "mean_loss": {n: sum(f[n] / c ** 2 for f, c in zip(per_sequence, counts)) / len(per_sequence)
                                for n in layers}}
        result[role] = {loss: {n: {"share_below_eps": float((values[n] < eps).float().mean()),
                                   "median": float(values[n].median()), "max": float(values[n].max())}
                               for n in layers}
                        for loss, values in fisher.items()}
    # relative_fisher's eps-dominated share is the retain Fisher's share below eps
    result["relative_fisher_eps_dominated_share"] = {
        loss: {n: result["retain"][loss][n]["share_below_eps"] for n in layers} for loss in ("mean_loss", "sum_loss")}
    result["sequences"] = {"forget": len(forget_ids), "retain": len(retain_ids)}
    return result


def train_epochs(model, cfg, forget_ids, retain_ids, pad: int, epochs: int) -> list[float]:
    """The trainer's epoch: shuffled forget batches paired with retain batches, IHL + NLL, one AdamW step each."""
    import time

    from loku import data as data_mod
    from loku.trainer import batch_loss

    params = [p for p in model.parameters() if p.requires_grad]  # the LoRA adapter
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate(), weight_decay=cfg.weight_decay)
    model.eval()  # no dropout while unlearning, as the trainer
    seconds = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        forget = data_mod.make_batches(forget_ids, cfg.batch_size, pad, shuffle=True, seed=cfg.seed + epoch)
        retain = data_mod.make_batches(retain_ids, cfg.batch_size, pad, shuffle=True, seed=cfg.seed + 10_000 + epoch)
        for fb, rb in data_mod.pair_batches(forget, retain):
            loss, _ = batch_loss(model, None, "ihl", fb, rb, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def run(args) -> dict:
    from loku.data import make_batches
    from loku.models import resolve_targets
    from loku.trainer import adapt_model

    load_before = os.getloadavg()[0]
    model, forget_ids, retain_ids, pad, source = load(args)
    cfg = config(args)
    targets = resolve_targets(model, cfg.targets)
    modules = dict(model.named_modules())
    weights = {t: modules[t].weight for t in targets}
    model.requires_grad_(False)  # as inside adapt_model: the Fisher pass enables what it needs
    forget = make_batches(forget_ids, args.batch_size, pad)
    retain = make_batches(retain_ids, args.batch_size, pad)
    sequences = len(forget_ids) + len(retain_ids)
    record: dict = {"model": "tiny-llama-random" if args.smoke else "smollm2-135m", "text_source": source,
                    "parameters": sum(p.numel() for p in model.parameters()), "targets": len(targets),
                    "target_parameters": sum(w.numel() for w in weights.values()),
                    "sequences": {"forget": len(forget_ids), "retain": len(retain_ids)},
                    "tokens": sum(len(s) for s in forget_ids + retain_ids)}

    print("[fisher_speed] eps-dominated shares ...", file=sys.stderr, flush=True)
    record["eps_share"] = eps_shares(model, forget_ids[: args.share_sequences], retain_ids[: args.share_sequences],
                                     args.share_layers, pad, args.eps)
    print("[fisher_speed] old per-sequence Fisher ...", file=sys.stderr, flush=True)
    old, old_seconds = common.timed(lambda: fisher_both(model, weights, forget, retain, "per_sample_loop"), "cpu")
    record["fisher_old_per_sequence"] = {"seconds": old_seconds, "batch_size": args.batch_size,
                                         "backward_passes": sequences}
    print("[fisher_speed] new one-pass Fisher ...", file=sys.stderr, flush=True)
    new, new_seconds = common.timed(lambda: fisher_both(model, weights, forget, retain, "per_sample"), "cpu")
    record["fisher_new_one_pass"] = {"seconds": new_seconds, "batch_size": args.batch_size,
                                     "backward_passes": len(forget) + len(retain)}
    record["max_relative_difference_new_vs_old"] = {"forget": max_relative_difference(new[0], old[0]),
                                                    "retain": max_relative_difference(new[1], old[1])}
    del new
    big_seconds = None
    if args.fisher_batch_size:
        print(f"[fisher_speed] new one-pass Fisher, batch {args.fisher_batch_size} ...", file=sys.stderr, flush=True)
        big = tuple(make_batches(ids, args.fisher_batch_size, pad) for ids in (forget_ids, retain_ids))
        new_big, big_seconds = common.timed(lambda: fisher_both(model, weights, *big, "per_sample"), "cpu")
        record["fisher_new_one_pass_big_batch"] = {"seconds": big_seconds, "batch_size": args.fisher_batch_size,
                                                   "backward_passes": len(big[0]) + len(big[1])}
        record["max_relative_difference_new_vs_old"].update(
            forget_big_batch=max_relative_difference(new_big[0], old[0]),
            retain_big_batch=max_relative_difference(new_big[1], old[1]))
        del new_big
    del old

    print("[fisher_speed] FILA init (new Fisher + SVD) ...", file=sys.stderr, flush=True)
    model, _, stats, _ = adapt_model(model, cfg, forget, retain)
    record["fila_init"] = {"fisher_seconds": stats["seconds"]["fisher"], "svd_seconds": stats["seconds"]["svd"],
                           "eps_dominated_share": stats["eps_dominated_share"], "rank": args.rank}
    print("[fisher_speed] training epochs ...", file=sys.stderr, flush=True)
    epochs = train_epochs(model, cfg, forget_ids, retain_ids, pad, args.epochs)
    record["epoch"] = {"seconds": epochs, "mean_seconds": statistics.mean(epochs),
                       "optimizer_steps": -(-len(forget_ids) // args.batch_size)}

    epoch = record["epoch"]["mean_seconds"]
    svd = record["fila_init"]["svd_seconds"]
    record["ratios"] = {
        "new_over_old": new_seconds / old_seconds,
        "fisher_plus_svd_over_epoch_new": (record["fila_init"]["fisher_seconds"] + svd) / epoch,
        "fisher_plus_svd_over_epoch_old": (old_seconds + svd) / epoch,
    }
    if big_seconds is not None:
        record["ratios"]["new_big_batch_over_old"] = big_seconds / old_seconds
    # Other processes on the machine slow every phase unevenly: the 1-minute load average, before and after.
    record["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    env = common.environment("cpu", "float32")  # before the run: the commit that is measured
    record = run(args)
    report = {
        "benchmark": "fisher_speed",
        "command": [Path(sys.executable).name, *sys.argv],
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "result": record,
    }
    path = common.write_json_atomic(Path(args.out) / "fisher_speed_cpu.json", report)

    r = record
    rows = [["Fisher, old: per sequence", f"{r['fisher_old_per_sequence']['seconds']:.2f}",
             r["fisher_old_per_sequence"]["backward_passes"]],
            [f"Fisher, new: one pass (batch {args.batch_size})", f"{r['fisher_new_one_pass']['seconds']:.2f}",
             r["fisher_new_one_pass"]["backward_passes"]]]
    if "fisher_new_one_pass_big_batch" in r:
        big = r["fisher_new_one_pass_big_batch"]
        rows.append([f"Fisher, new: one pass (batch {big['batch_size']})", f"{big['seconds']:.2f}",
                     big["backward_passes"]])
    rows += [["FILA init: Fisher (new, in adapt_model)", f"{r['fila_init']['fisher_seconds']:.2f}", ""],
             ["FILA init: SVD", f"{r['fila_init']['svd_seconds']:.2f}", ""],
             ["one fila-ihl epoch (mean)", f"{r['epoch']['mean_seconds']:.2f}", r["epoch"]["optimizer_steps"]]]
    common.print_table(["phase", "seconds", "backward passes"], rows)
    ratios = r["ratios"]
    print(f"new/old: {ratios['new_over_old']:.3f}; (Fisher+SVD)/epoch: "
          f"new {ratios['fisher_plus_svd_over_epoch_new']:.1f}, old {ratios['fisher_plus_svd_over_epoch_old']:.1f}")
    print("max relative difference new vs old: " + ", ".join(
        f"{k} {v['max']:.2e}" for k, v in r["max_relative_difference_new_vs_old"].items()))
    print(f"1-minute load average: {r['load_average_1min']['before']:.2f} before, "
          f"{r['load_average_1min']['after']:.2f} after (other processes slow the timings)")
    for loss, shares in r["eps_share"]["relative_fisher_eps_dominated_share"].items():
        print(f"eps={args.eps:g} dominates ({loss}): " + ", ".join(f"{n} {s:.1%}" for n, s in shares.items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
