"""Cost of one unlearning step, of FILA's Fisher pass and of its SVD, at real model shapes (random weights).

For each model (random weights at the shapes of GPT-Neo 125M / 1.3B / 2.7B and Llama-2-7B, built
here, nothing downloaded) and method (default ``lora-gd``, ``fila-ihl``, ``full-gd``):

* ``step``: forward + backward of one forget batch and one retain batch through loku's own loss
  (``loku.losses.unlearning_loss``) and one AdamW step, as ``loku.trainer.unlearn`` does it; the
  model is wrapped by ``loku.trainer.adapt_model`` (the same PEFT LoRA config and targets).
  Reported: seconds per step (after warm-up steps), peak memory, achieved TFLOP/s and MFU with
  6*N*tokens FLOPs per step for full fine-tuning and 4*N*tokens when the base weights are frozen
  (N = all parameters of the base model, tokens = forget + retain tokens; attention FLOPs are not
  counted, as in loku's own ``estimate_flops``).
* FILA methods only: ``fisher_per_sample`` and ``fisher_batch`` (``loku.fisher.empirical_fisher`` of
  every target weight on the forget and the retain batches) and ``fila_svd`` (``loku.initializers.fila_factors``
  over all target layers, from the per-sample relative Fisher). The adapter of the step phase is
  then attached without re-running the initialiser: a step costs the same whatever the adapter's
  starting values.

A model/method that runs out of memory is recorded as ``"oom"`` (with the phase) and the next one
runs. MFU needs the accelerator's peak: 989 TFLOP/s (H100/H200 SXM, dense bf16) is assumed when the
device name says H100 or H200, else pass ``--peak-tflops``.

    python benchmarks/gpu_step.py                      # CUDA, bf16 -> benchmarks/results/gpu_step_cuda.json
    python benchmarks/gpu_step.py --models gpt-neo-125m --methods fila-ihl --batch-size 4 --seq-len 256
    python benchmarks/gpu_step.py --smoke              # tiny models on CPU, float32, seconds (used by the tests)
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import traceback
from pathlib import Path

import torch

import common

MODELS = {
    "gpt-neo-125m": lambda: common.gpt_neo_config("125m"),
    "gpt-neo-1.3b": lambda: common.gpt_neo_config("1.3b"),
    "gpt-neo-2.7b": lambda: common.gpt_neo_config("2.7b"),
    "llama-2-7b": common.llama2_7b_config,
    "tiny-llama": common.tiny_llama_config,
    "tiny-gpt-neo": common.tiny_gpt_neo_config,
}
DEFAULTS = {  # normal run / --smoke
    "models": ("gpt-neo-125m,gpt-neo-1.3b,gpt-neo-2.7b,llama-2-7b", "tiny-llama,tiny-gpt-neo"),
    "batch_size": (8, 2),
    "seq_len": (512, 16),
    "steps": (10, 2),
    "warmup": (2, 1),
    "rank": (16, 4),
    "device": (common.default_device(), "cpu"),
    "dtype": ("bfloat16", "float32"),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM parts


def parse_args(argv=None):
    from loku.config import METHODS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help=f"comma-separated, from {', '.join(MODELS)} (default: the four real shapes)")
    p.add_argument("--methods", default="lora-gd,fila-ihl,full-gd", help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--batch-size", type=int, help="sequences per forget batch and per retain batch (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 512)")
    p.add_argument("--steps", type=int, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2)")
    p.add_argument("--fisher-batches", type=int, default=1, help="batches per set in the Fisher pass (default 1)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 16, the paper's)")
    p.add_argument("--targets", default="qv-ffn", help="LoRA targets (default qv-ffn, the paper's)")
    p.add_argument("--svd", default="exact", choices=("exact", "exact64", "lowrank"), help="FILA's SVD (default exact)")
    p.add_argument("--device", help="default cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), help="default bfloat16 (float32 with --smoke)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default 989 on H100/H200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU in float32: runs in seconds")
    p.add_argument("--out", default=str(common.RESULTS), help="folder for gpu_step_<device>.json")
    args = p.parse_args(argv)
    for key, (normal, smoke) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else normal)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if bad := [m for m in args.models if m not in MODELS]:
        p.error(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(MODELS)}")
    if bad := [m for m in args.methods if m not in METHODS]:
        p.error(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    return args


# --------------------------------------------------------------------------- helpers


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def reset_peak(device) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device):
    """Peak allocated accelerator memory since the last reset (None on CPU: no per-phase counter)."""
    return int(torch.cuda.max_memory_allocated()) if is_cuda(device) else None


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def random_batch(vocab: int, args, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator).to(args.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def peak_tflops(args) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if is_cuda(args.device):
        name = torch.cuda.get_device_name(torch.device(args.device))
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value, f"{key} SXM dense bf16 (assumed from the device name {name!r})"
    return None, "unknown: pass --peak-tflops"


# --------------------------------------------------------------------------- phases


def fisher_phase(model, targets, forget, retain, mode: str, args, keep: bool):
    """Time loku's empirical Fisher of every target weight on the forget and the retain batches."""
    from loku.fisher import empirical_fisher

    modules = dict(model.named_modules())
    weights = {t: modules[t].weight for t in targets}
    reset_peak(args.device)

    def both():
        return (empirical_fisher(model, forget, weights, mode=mode),
                empirical_fisher(model, retain, weights, mode=mode))

    (f_forget, f_retain), seconds = common.timed(both, args.device)
    tokens = sum(int(b["attention_mask"].sum()) for b in [*forget, *retain])
    result = {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
              "backward_passes": sum(b["input_ids"].shape[0] for b in [*forget, *retain]) if mode == "per_sample"
              else len(forget) + len(retain),
              "peak_memory_bytes": peak_bytes(args.device)}
    if not keep:
        del f_forget, f_retain
        return result, None
    return result, (f_forget, f_retain)


def svd_phase(model, targets, fishers, cfg, args) -> dict:
    """Time loku.initializers.fila_factors over every target layer (relative Fisher built outside the timing)."""
    from loku.fisher import relative_fisher
    from loku.initializers import fila_factors

    f_forget, f_retain = fishers
    modules = dict(model.named_modules())
    scaling = cfg.lora_alpha / cfg.rank
    reset_peak(args.device)
    seconds = 0.0
    for name in targets:
        rel, _ = relative_fisher(f_forget.pop(name), f_retain.pop(name), cfg.fisher_eps)
        weight = modules[name].weight.detach()  # nn.Linear: [out, in], as fila_factors expects
        factors, took = common.timed(lambda w=weight, r=rel: fila_factors(w, r, cfg.rank, scaling, svd=args.svd),
                                     args.device)
        seconds += took
        del rel, factors
    return {"seconds": seconds, "layers": len(targets), "svd": args.svd, "peak_memory_bytes": peak_bytes(args.device)}


def step_phase(model, method, forget, retain, reference, cfg, args) -> dict:
    """Time the unlearning step of loku.trainer.unlearn: two forwards, loku's loss, backward, AdamW step."""
    from loku.losses import uses_retain
    from loku.trainer import batch_loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=method.lr, weight_decay=0.0)
    use_retain = uses_retain(cfg.loss_terms()[1])
    fb, rb = forget[0], retain[0]
    model.eval()  # no dropout while unlearning, as the trainer does

    def step():
        loss, _ = batch_loss(model, reference, fb, rb if use_retain else None, cfg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    reset_peak(args.device)
    for _ in range(args.warmup):
        step()
    times, losses = [], []
    for _ in range(args.steps):
        loss, seconds = common.timed(step, args.device)
        times.append(seconds)
        losses.append(loss)
    tokens = int(fb["attention_mask"].sum()) + (int(rb["attention_mask"].sum()) if use_retain else 0)
    return {"seconds": times, "mean_seconds": statistics.fmean(times), "median_seconds": statistics.median(times),
            "min_seconds": min(times), "tokens_per_step": tokens, "losses": losses,
            "loss_finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
            "peak_memory_bytes": peak_bytes(args.device)}


# --------------------------------------------------------------------------- one model x method


def run_one(model_name: str, method_name: str, args, record: dict) -> None:
    """Fill ``record`` phase by phase (so a later out-of-memory keeps what was measured before it)."""
    import copy

    from loku.config import METHODS, UnlearnConfig
    from loku.losses import needs_reference
    from loku.models import resolve_targets
    from loku.trainer import adapt_model

    method = METHODS[method_name]
    dtype = common.DTYPES[args.dtype]
    record["phase"] = "build"
    model, build_seconds = common.timed(
        lambda: common.random_model(MODELS[model_name](), args.device, dtype, args.seed), args.device)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.get_output_embeddings().weight.shape[0]
    record.update(parameters=n_params, build_seconds=build_seconds,
                  attn_implementation=getattr(model.config, "_attn_implementation", None))
    g = torch.Generator().manual_seed(args.seed)
    forget = [random_batch(vocab, args, g) for _ in range(max(args.fisher_batches, 1))]
    retain = [random_batch(vocab, args, g) for _ in range(max(args.fisher_batches, 1))]
    cfg = UnlearnConfig(model=model_name, method=method_name, rank=args.rank, targets=args.targets,
                        fisher_mode="per_sample", svd=args.svd, dtype=args.dtype, progress=False)
    targets = resolve_targets(model, cfg.targets) if not method.full_weights else []
    record["target_layers"] = len(targets)

    if method.init == "fila":
        model.requires_grad_(False)  # as inside adapt_model: the Fisher pass enables its targets itself
        record["phase"] = "fisher_per_sample"
        record["fisher_per_sample"], fishers = fisher_phase(model, targets, forget, retain, "per_sample", args, keep=True)
        record["phase"] = "fila_svd"
        record["fila_svd"] = svd_phase(model, targets, fishers, cfg, args)
        del fishers
        record["phase"] = "fisher_batch"
        record["fisher_batch"], _ = fisher_phase(model, targets, forget, retain, "batch", args, keep=False)

    record["phase"] = "adapt"
    reference = copy.deepcopy(model).eval().requires_grad_(False) if needs_reference(*cfg.loss_terms()) else None
    reset_peak(args.device)
    # FILA's initialiser was timed above; the step does not depend on the adapter's starting values.
    run_init = method.init != "fila"
    (model, _, init_stats, _), seconds = common.timed(
        lambda: adapt_model(model, cfg, forget[: args.fisher_batches], retain[: args.fisher_batches],
                            run_initializer=run_init), args.device)
    record["adapt"] = {"seconds": seconds, "initializer": method.init if run_init else f"{method.init} (timed above)",
                       "peak_memory_bytes": peak_bytes(args.device)}
    if method.init == "vila":
        record["adapt"]["init_seconds"] = init_stats.get("seconds")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record.update(trainable_parameters=trainable, trainable_share=trainable / n_params)

    record["phase"] = "step"
    record["step"] = step = step_phase(model, method, forget, retain, reference, cfg, args)
    per_token = (6 if method.full_weights else 4) * n_params + (2 * n_params if reference is not None else 0)
    record["flops_per_step"] = float(per_token * step["tokens_per_step"])
    record["achieved_tflops"] = record["flops_per_step"] / step["median_seconds"] / 1e12
    peak, _ = peak_tflops(args)
    record["mfu"] = record["achieved_tflops"] / peak if peak else None
    record["peak_memory_bytes"] = max((record[k]["peak_memory_bytes"] or 0 for k in
                                       ("fisher_per_sample", "fila_svd", "fisher_batch", "adapt", "step")
                                       if k in record), default=0) or None
    record["phase"] = "done"


def run_all(args) -> list[dict]:
    results = []
    for model_name in args.models:
        for method_name in args.methods:
            print(f"[gpu_step] {model_name} / {method_name} ...", file=sys.stderr, flush=True)
            record = {"model": model_name, "method": method_name, "status": "ok"}
            try:
                run_one(model_name, method_name, args, record)
            except Exception as err:  # noqa: BLE001 - recorded; the next model/method still runs
                if is_oom(err):
                    record.update(status="oom", oom_phase=record.get("phase"), error=str(err).splitlines()[0][:500])
                else:
                    record.update(status="error", error_phase=record.get("phase"),
                                  error=f"{type(err).__name__}: {err}"[:2000], traceback=traceback.format_exc())
            record.pop("phase", None)
            results.append(record)
            gc.collect()  # the failed run's tensors went with its frames; give the memory back
            if is_cuda(args.device):
                torch.cuda.empty_cache()
    return results


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    env = common.environment(args.device, args.dtype)  # before the run: the commit that is measured
    results = run_all(args)
    peak, peak_source = peak_tflops(args)
    report = {
        "benchmark": "gpu_step",
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "flops_formula": "6*N*tokens (full fine-tuning) or 4*N*tokens (frozen base), +2*N*tokens for a reference "
                         "model; N = all base-model parameters; tokens = forget + retain tokens per step",
        "results": results,
    }
    device_kind = str(args.device).split(":")[0]
    path = common.write_json_atomic(Path(args.out) / f"gpu_step_{device_kind}.json", report)

    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["model"], r["method"], f"{r['status']} ({r.get('oom_phase') or r.get('error_phase')})",
                         "", "", "", "", "", ""])
            continue
        fisher = lambda k: f"{r[k]['seconds']:.3f}" if k in r else "-"  # noqa: E731
        rows.append([r["model"], r["method"], f"{r['step']['median_seconds']:.4f}",
                     f"{r['achieved_tflops']:.2f}", "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                     gib(r["peak_memory_bytes"]), fisher("fisher_per_sample"), fisher("fisher_batch"),
                     fisher("fila_svd")])
    common.print_table(["model", "method", "step s", "TFLOP/s", "MFU", "peak GiB", "Fisher/sample s",
                        "Fisher/batch s", "SVD s"], rows)
    print(f"wrote {path}")
    return 0 if all(r["status"] in ("ok", "oom") for r in results) else 1  # out of memory is a result


if __name__ == "__main__":
    sys.exit(main())
