"""What FILA's initialisation costs next to one unlearning epoch, on the demo's setting.

Setting (the demo's, ``loku demo``): the built-in SmolLM2-135M (float32), 8 TDEC forget texts and 128
WikiText retain texts (``tdec/forget/lm_extraction_32_0.csv``, ``tdec/eval/wikitext.csv`` under
``--data-dir``), each cut to 64 tokens, training batch 2. Speed does not depend on the planting, so
the base model is used.

Measured, in one run:

* the Fisher of the trainer's default sets (the forget set and a seeded retain sample of the same
  size, ``--fisher-retain-sequences``), by the one-pass per-sample Fisher (``mode="per_sample"``:
  layer inputs x output gradients, hooked, one forward/backward per batch of ``--fisher-batch-size``)
  and by the per-sequence autograd reference (``mode="per_sample_loop"``, what the old code did):
  the ratio new/old and their max relative difference;
* FILA's initialisation as the trainer runs it (``adapt_model``: both Fishers + the exact SVD), and
  the same from all 128 retain texts (the old default), with how much the two starting adapters
  agree (subspace overlaps of A's rows and B's columns, relative difference of B@A);
* the exact start (the same Fisher, ``--svd exact64``: all eigenvectors of the float64 Gram matrices,
  the previous default) and how much the default start agrees with it (subspace overlaps, target >= 0.99);
* one training epoch (IHL on forget + NLL on retain, AdamW, LoRA rank 16 on QV+FFN, as the trainer),
  so FILA init / epoch can be read off (issue 24's target: at most 1).

Load: the 1-minute load average is read before the run, every 2 s during it and after it. The run
is marked ``busy`` (and its ratios ``valid: false``, printed as NOT VALID) when the load before it
exceeds 0.5 (someone else was running: the benchmark's own threads have not started yet), or when
the load during or after it exceeds the benchmark's own torch threads + 0.5 (others joined in; the
1-minute average of a run that has the machine to itself tends to its thread count). CPU seconds of
the process are recorded beside wall seconds; their ratio is less disturbed by other processes, but
only an idle machine gives the figure to quote.

Also measured: the share of relative-Fisher entries where eps = 1e-5 dominates (F_retain < eps) on
two layers, for the paper's per-sequence SUM loss and the old per-sequence MEAN loss, on the first
``--share-sequences`` (6) forget and retain texts.

    OMP_NUM_THREADS=2 python benchmarks/fisher_speed.py --threads 2 --skip-full-retain  # -> results/...cpu.json
    python benchmarks/fisher_speed.py --smoke                          # tiny random Llama, seconds
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
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
    p.add_argument("--fisher-batch-size", type=int, default=16,
                   help="batch size of the one-pass Fisher (default 16; the old loop does one sequence at a time)")
    p.add_argument("--skip-full-retain", action="store_true",
                   help="skip FILA init from the whole retain set (its cost and its agreement with the sample)")
    p.add_argument("--skip-exact", action="store_true",
                   help="skip the exact (--svd exact64) start and the overlap of the default start with it")
    p.add_argument("--idle-load", type=float, default=0.5,
                   help="1-minute load average above which (before the run; during/after: above the run's own "
                        "threads plus this) the run is marked busy and its ratios not valid (default 0.5)")
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


def config(args, svd: str = "exact"):
    from loku.config import UnlearnConfig

    return UnlearnConfig(forget="benchmark", retain="benchmark", out="benchmark", method="fila-ihl", rank=args.rank,
                         lora_alpha=2.0 * args.rank, targets="qv-ffn", batch_size=args.batch_size,
                         fisher_eps=args.eps, seed=args.seed, progress=False, svd=svd)


# --------------------------------------------------------------------------- machine load


class LoadMonitor:
    """The 1-minute load average before, during (sampled every ``every`` s) and after the run."""

    def __init__(self, every: float = 2.0):
        self.before = os.getloadavg()[0]
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every,), daemon=True)
        self._thread.start()

    def _sample(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def finish(self, own_threads: int, idle: float) -> dict:
        """The record; busy when others ran before (load > idle) or joined in (load > own_threads + idle)."""
        self._stop.set()
        self._thread.join()
        after = os.getloadavg()[0]
        peak = max([*self.samples, after])
        reasons = []
        if self.before > idle:
            reasons.append(f"load {self.before:.2f} before the run > {idle}")
        if peak > own_threads + idle:
            reasons.append(f"load up to {peak:.2f} during/after the run > its {own_threads} thread(s) + {idle}")
        return {"before": self.before, "after": after, "max_during": peak, "samples": len(self.samples),
                "own_threads": own_threads, "idle_threshold": idle, "busy": bool(reasons), "busy_reasons": reasons}


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
            loss, _ = batch_loss(model, None, fb, rb, cfg)  # cfg: fila-ihl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """||Q_a^T Q_b||_F^2 / r for orthonormal bases of the column spaces of a and b [n, r]: 1 same, ~r/n random."""
    qa, qb = torch.linalg.qr(a.double())[0], torch.linalg.qr(b.double())[0]
    return float((qa.T @ qb).square().sum() / a.shape[1])


def adapters(model) -> dict:
    from loku.initializers import ADAPTER, lora_layers

    return {name: (layer.lora_A[ADAPTER].weight.detach().clone(), layer.lora_B[ADAPTER].weight.detach().clone())
            for name, layer in lora_layers(model).items()}


def agreement(sampled: dict, full: dict) -> dict:
    """How close FILA's start from the sampled retain Fisher is to the start from the whole retain set."""
    rows = {}
    for name, (a_s, b_s) in sampled.items():
        a_f, b_f = full[name]
        delta_s, delta_f = b_s @ a_s, b_f @ a_f
        rows[name] = {"input_subspace_overlap": subspace_overlap(a_s.T, a_f.T),
                      "output_subspace_overlap": subspace_overlap(b_s, b_f),
                      "relative_difference_of_BA": float(torch.linalg.norm(delta_s - delta_f)
                                                         / torch.linalg.norm(delta_f).clamp(min=1e-30)),
                      "random_overlap": a_s.shape[0] / a_s.shape[1]}
    summary = {key: {"mean": statistics.mean(r[key] for r in rows.values()),
                     "min": min(r[key] for r in rows.values()), "max": max(r[key] for r in rows.values())}
               for key in ("input_subspace_overlap", "output_subspace_overlap", "relative_difference_of_BA")}
    return {"summary": summary, "per_layer": rows}


def memory_plan_llama2_7b(gpu_bytes: int = 80 * 10**9) -> dict:
    """FILA's Fisher buffers for Llama-2-7B's QV+FFN targets and the chunks ``fisher_chunks`` makes on one
    80 GB GPU (shapes only, meta device: nothing is allocated). The trainer's budget is half of the free
    memory once the bf16 model is loaded (``fisher_memory_budget``)."""
    from transformers import AutoModelForCausalLM

    from loku.fisher import fisher_bytes, fisher_chunks
    from loku.models import resolve_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(common.llama2_7b_config(), dtype=torch.bfloat16)
    modules = dict(model.named_modules())
    params = {t: modules[t].weight for t in resolve_targets(model, "qv-ffn")}
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = (gpu_bytes - model_bytes) // 2
    chunks = fisher_chunks(params, budget)
    return {"targets": len(params), "target_parameters": sum(p.numel() for p in params.values()),
            "fisher_bytes_forget_plus_retain": fisher_bytes(params), "model_bytes_bf16": model_bytes,
            "gpu_bytes": gpu_bytes, "budget_bytes": budget, "passes": len(chunks),
            "largest_chunk_bytes": max(fisher_bytes(c) for c in chunks)}


def run(args) -> dict:
    import copy
    import time

    from loku.data import TokenizedSet, make_batches
    from loku.models import resolve_targets
    from loku.trainer import adapt_model, fisher_retain_sample

    monitor = LoadMonitor()
    model, forget_ids, retain_ids, pad, source = load(args)
    cfg = config(args)
    targets = resolve_targets(model, cfg.targets)
    modules = dict(model.named_modules())
    weights = {t: modules[t].weight for t in targets}
    model.requires_grad_(False)  # as inside adapt_model: the Fisher pass enables what it needs
    # The trainer's default Fisher sets: the forget set and a seeded retain sample of the same size.
    sample = fisher_retain_sample(TokenizedSet(retain_ids, [0] * len(retain_ids)), len(forget_ids), cfg).ids
    fisher_batch = args.fisher_batch_size or args.batch_size
    forget = make_batches(forget_ids, fisher_batch, pad)
    retain = make_batches(sample, fisher_batch, pad)
    record: dict = {"model": "tiny-llama-random" if args.smoke else "smollm2-135m", "text_source": source,
                    "parameters": sum(p.numel() for p in model.parameters()), "targets": len(targets),
                    "target_parameters": sum(w.numel() for w in weights.values()),
                    "sequences": {"forget": len(forget_ids), "retain_set": len(retain_ids),
                                  "retain_fisher_sample": len(sample)},
                    "fisher_batch_size": fisher_batch}

    print("[fisher_speed] eps-dominated shares ...", file=sys.stderr, flush=True)
    record["eps_share"] = eps_shares(model, forget_ids[: args.share_sequences], retain_ids[: args.share_sequences],
                                     args.share_layers, pad, args.eps)
    print("[fisher_speed] old per-sequence Fisher (default Fisher sets) ...", file=sys.stderr, flush=True)
    old, old_seconds = common.timed(lambda: fisher_both(model, weights, forget, retain, "per_sample_loop"), "cpu")
    print("[fisher_speed] new one-pass Fisher (default Fisher sets) ...", file=sys.stderr, flush=True)
    new, new_seconds = common.timed(lambda: fisher_both(model, weights, forget, retain, "per_sample"), "cpu")
    record["fisher_old_per_sequence"] = {"seconds": old_seconds, "backward_passes": len(forget_ids) + len(sample)}
    record["fisher_new_one_pass"] = {"seconds": new_seconds, "backward_passes": len(forget) + len(retain)}
    record["max_relative_difference_new_vs_old"] = {"forget": max_relative_difference(new[0], old[0]),
                                                    "retain": max_relative_difference(new[1], old[1])}
    del new, old

    print("[fisher_speed] FILA init, default (retain sample) ...", file=sys.stderr, flush=True)
    cpu = time.process_time()
    sampled_model, _, stats, _ = adapt_model(copy.deepcopy(model), cfg, forget, retain)
    record["fila_init"] = {"fisher_seconds": stats["seconds"]["fisher"], "svd_seconds": stats["seconds"]["svd"],
                           "cpu_seconds": time.process_time() - cpu, "svd": cfg.svd,
                           "eps_dominated_share": stats["eps_dominated_share"], "rank": args.rank}
    if not args.skip_exact:
        print("[fisher_speed] FILA init, exact start (--svd exact64) ...", file=sys.stderr, flush=True)
        exact_model, _, exact_stats, _ = adapt_model(copy.deepcopy(model), config(args, "exact64"), forget, retain)
        record["fila_init_exact"] = {"fisher_seconds": exact_stats["seconds"]["fisher"],
                                     "svd_seconds": exact_stats["seconds"]["svd"], "svd": "exact64"}
        # The condition: the default start's adapter subspaces overlap the exact start's by >= 0.99.
        record["agreement_default_vs_exact"] = agreement(adapters(sampled_model), adapters(exact_model))
        del exact_model
    if not args.skip_full_retain:
        print(f"[fisher_speed] FILA init with all {len(retain_ids)} retain texts (agreement) ...", file=sys.stderr,
              flush=True)
        full_model, _, full_stats, _ = adapt_model(copy.deepcopy(model), cfg, forget,
                                                   make_batches(retain_ids, fisher_batch, pad))
        record["fila_init_full_retain"] = {"fisher_seconds": full_stats["seconds"]["fisher"],
                                           "svd_seconds": full_stats["seconds"]["svd"],
                                           "eps_dominated_share": full_stats["eps_dominated_share"]}
        record["agreement_sample_vs_full_retain"] = agreement(adapters(sampled_model), adapters(full_model))
        del full_model
    print("[fisher_speed] SVD alternatives on the weights ...", file=sys.stderr, flush=True)
    mats = [w.detach().float() for w in weights.values()]
    start = time.perf_counter()
    for m in mats:
        torch.linalg.svd(m, full_matrices=False)
    record["svd_seconds_lapack_float32_all_targets"] = time.perf_counter() - start
    record["memory_plan_llama2_7b"] = memory_plan_llama2_7b()
    print("[fisher_speed] training epochs ...", file=sys.stderr, flush=True)
    cpu = time.process_time()
    epochs = train_epochs(sampled_model, cfg, forget_ids, retain_ids, pad, args.epochs)
    record["epoch"] = {"seconds": epochs, "mean_seconds": statistics.mean(epochs),
                       "mean_cpu_seconds": (time.process_time() - cpu) / len(epochs),
                       "optimizer_steps": -(-len(forget_ids) // args.batch_size)}

    epoch = record["epoch"]["mean_seconds"]
    init = record["fila_init"]["fisher_seconds"] + record["fila_init"]["svd_seconds"]
    record["ratios"] = {"new_over_old": new_seconds / old_seconds, "fila_init_over_epoch": init / epoch,
                        "fila_init_over_epoch_cpu": record["fila_init"]["cpu_seconds"]
                        / record["epoch"]["mean_cpu_seconds"]}
    if "fila_init_full_retain" in record:
        full = record["fila_init_full_retain"]
        record["ratios"]["fila_init_full_retain_over_epoch"] = (full["fisher_seconds"] + full["svd_seconds"]) / epoch
    # Other processes on the machine slow every phase unevenly: a ratio from a busy machine is not a result.
    record["load_average_1min"] = monitor.finish(torch.get_num_threads(), args.idle_load)
    record["busy"] = record["load_average_1min"]["busy"]
    record["ratios"]["valid"] = not record["busy"]
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
            [f"Fisher, new: one pass (batch {r['fisher_batch_size']})", f"{r['fisher_new_one_pass']['seconds']:.2f}",
             r["fisher_new_one_pass"]["backward_passes"]],
            ["FILA init: Fisher (new, in adapt_model)", f"{r['fila_init']['fisher_seconds']:.2f}", ""],
            [f"FILA init: solve ({r['fila_init']['svd']})", f"{r['fila_init']['svd_seconds']:.2f}", ""],
            ["one fila-ihl epoch (mean)", f"{r['epoch']['mean_seconds']:.2f}", r["epoch"]["optimizer_steps"]]]
    if "fila_init_exact" in r:
        rows.insert(4, ["FILA init, exact start: solve (exact64)", f"{r['fila_init_exact']['svd_seconds']:.2f}", ""])
    if "fila_init_full_retain" in r:
        full = r["fila_init_full_retain"]
        rows.insert(4, [f"FILA init, all {r['sequences']['retain_set']} retain texts: Fisher + SVD",
                        f"{full['fisher_seconds'] + full['svd_seconds']:.2f}", ""])
    common.print_table(["phase", "seconds", "backward passes"], rows)
    ratios, load = r["ratios"], r["load_average_1min"]
    if r["busy"]:
        print("NOT VALID: the machine was busy (" + "; ".join(load["busy_reasons"]) + "): the ratios below are "
              "recorded with valid=false; rerun on an idle machine")
    print(f"new/old: {ratios['new_over_old']:.3f}; FILA init / epoch: {ratios['fila_init_over_epoch']:.2f}"
          f" (CPU seconds: {ratios['fila_init_over_epoch_cpu']:.2f})"
          + (f" (all retain texts: {ratios['fila_init_full_retain_over_epoch']:.1f})"
             if "fila_init_full_retain_over_epoch" in ratios else "")
          + (" [NOT VALID: busy machine]" if r["busy"] else ""))
    if "agreement_default_vs_exact" in r:
        agree = r["agreement_default_vs_exact"]["summary"]
        print("default vs exact start: " + ", ".join(f"{k} mean {v['mean']:.6f} (min {v['min']:.6f})"
                                                     for k, v in agree.items()))
    print("max relative difference new vs old: " + ", ".join(
        f"{k} {v['max']:.2e}" for k, v in r["max_relative_difference_new_vs_old"].items()))
    if "agreement_sample_vs_full_retain" in r:
        agree = r["agreement_sample_vs_full_retain"]["summary"]
        print("sampled vs full retain Fisher: " + ", ".join(f"{k} mean {v['mean']:.3f} (min {v['min']:.3f})"
                                                           for k, v in agree.items()))
    plan = r["memory_plan_llama2_7b"]
    print(f"Llama-2-7B QV+FFN: Fisher buffers {plan['fisher_bytes_forget_plus_retain'] / 1e9:.1f} GB; on an 80 GB GPU "
          f"(bf16 model {plan['model_bytes_bf16'] / 1e9:.1f} GB) in {plan['passes']} pass(es) of at most "
          f"{plan['largest_chunk_bytes'] / 1e9:.1f} GB")
    print(f"1-minute load average: {load['before']:.2f} before, up to {load['max_during']:.2f} during, "
          f"{load['after']:.2f} after ({load['own_threads']} own thread(s)): "
          + ("BUSY" if r["busy"] else "idle"))
    for loss, shares in r["eps_share"]["relative_fisher_eps_dominated_share"].items():
        print(f"eps={args.eps:g} dominates ({loss}): " + ", ".join(f"{n} {s:.1%}" for n, s in shares.items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
