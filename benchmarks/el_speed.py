"""Speed of the exact fast extraction likelihood EL_n against the plain reference (docs/algorithms.md §6).

``loku.metrics.memorization.extraction_likelihood`` (fast) generates greedy continuations only for
the prefixes where the model's teacher-forced argmax misses the text, batched from one forward
pass's KV cache; ``extraction_likelihood_plain`` runs one greedy generation per prefix. Both must
give identical numbers; this script checks that (``torch.equal``) on every case it times.

Cases, per model (T tokens per sequence):

* ``memorized``: a short real prompt (the first ``--prompt-tokens`` tokens of TDEC texts, default 1)
  extended with the model's own greedy continuation up to T tokens, so the model reproduces it:
  MA = 1 and EL = 1 when the prompt is one token (up to rounding between the teacher-forced pass
  and generation), and the fast path needs no generation at all. A longer prompt is more like real
  memorized text: its own tokens are not predicted (MA ~ 1 - prompt/T) and each of them is a
  continuation the fast path must generate.
* ``partly_memorized``: the same sequences with ``--replace`` tokens replaced at random positions.
* ``unmemorized``: the real TDEC text cut to T tokens.

Models: ``smollm2-135m`` (the built-in model), ``gpt-neo-125m-random`` / ``gpt-neo-1.3b-random``
(random weights at the real GPT-Neo shapes, GPT-2 tokenizer from the shared data; meant for a
GPU), and ``tiny-llama-random`` (a 2-layer random Llama, random token ids instead of text; for the
smoke test). The speed target of the issue: >= 10x on the memorized case, never slower than plain.

    python benchmarks/el_speed.py                      # CPU defaults -> benchmarks/results/el_speed_cpu.json
    python benchmarks/el_speed.py --device cuda --models smollm2-135m,gpt-neo-125m-random,gpt-neo-1.3b-random
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import traceback
from pathlib import Path

import torch

import common

MODELS = ("smollm2-135m", "gpt-neo-125m-random", "gpt-neo-1.3b-random", "tiny-llama-random")
CASES = ("memorized", "partly_memorized", "unmemorized")
MEMORIZED_TARGET = 10.0  # plain/fast on the memorized case, from the issue


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma-separated, from {', '.join(MODELS)} (default: smollm2-135m on CPU, "
                        "smollm2-135m,gpt-neo-125m-random,gpt-neo-1.3b-random on CUDA; tiny-llama-random is for tests)")
    p.add_argument("--sequences", type=int, default=4, help="sequences per case (default 4)")
    p.add_argument("--tokens", type=int, default=48, help="tokens per sequence T (default 48)")
    p.add_argument("--n", type=int, default=10, help="n-gram size of EL_n (default 10)")
    p.add_argument("--prompt-tokens", type=int, default=1,
                   help="real prompt length of the memorized case (default 1: MA = EL = 1; 8 is closer to real text)")
    p.add_argument("--replace", type=int, default=3, help="tokens replaced in the partly memorized case (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the fast EL after one warm-up; best is kept")
    p.add_argument("--plain-repeats", type=int, default=1, help="timed runs of the plain EL (default 1: it is slow)")
    p.add_argument("--rows-per-batch", type=int, default=64, help="extraction_likelihood's rows_per_batch (default 64)")
    p.add_argument("--device", default=common.default_device())
    p.add_argument("--dtype", default="float32", choices=sorted(common.DTYPES),
                   help="dtype the model is loaded in (default float32); MA and EL measure in float32 whatever it is")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=str(common.REPO.parent / "shared" / "data"),
                   help="shared data folder with tdec/ and tokenizers/ (default ../shared/data)")
    p.add_argument("--forget-file", default="tdec/forget/lm_extraction_32_0.csv", help="TDEC CSV under --data-dir")
    p.add_argument("--out", default=str(common.RESULTS), help="folder for el_speed_<device>.json")
    args = p.parse_args(argv)
    if args.models is None:
        args.models = "smollm2-135m" if args.device == "cpu" else "smollm2-135m,gpt-neo-125m-random,gpt-neo-1.3b-random"
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.tokens <= args.n or args.prompt_tokens >= args.tokens:
        p.error("need --prompt-tokens < --tokens and --n < --tokens")
    return args


# --------------------------------------------------------------------------- models and sequences


def load(name: str, args):
    """(model, tokenizer or None) on the requested device and dtype."""
    dtype = common.DTYPES[args.dtype]
    if name == "smollm2-135m":
        from loku.models import load_model

        return load_model("smollm2-135m", dtype=args.dtype, device=args.device)
    if name.startswith("gpt-neo-"):
        size = name.removeprefix("gpt-neo-").removesuffix("-random")
        return common.random_model(common.gpt_neo_config(size), args.device, dtype, args.seed), \
            common.gpt2_tokenizer(Path(args.data_dir))
    if name == "tiny-llama-random":
        return common.random_model(common.tiny_llama_config(), args.device, dtype, args.seed), None
    raise ValueError(name)


def real_token_ids(tokenizer, vocab: int, args) -> tuple[list[list[int]], str]:
    """``--sequences`` token-id lists of at least T tokens: TDEC texts, or random ids without a tokenizer."""
    path = Path(args.data_dir) / args.forget_file
    if tokenizer is not None and path.is_file():
        with path.open(newline="", encoding="utf-8") as handle:
            texts = [row["text"] for row in csv.DictReader(handle)]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        ids = [i[: args.tokens] for i in ids if len(i) >= args.tokens][: args.sequences]
        if len(ids) == args.sequences:
            return ids, f"TDEC text ({args.forget_file})"
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(3, vocab, (args.sequences, args.tokens), generator=g).tolist(), "random token ids"


@torch.no_grad()
def greedy_extend(model, prompts: torch.Tensor, length: int) -> torch.Tensor:
    """Append the model's argmax token, one teacher-forced forward of the whole batch at a time."""
    ids = prompts
    while ids.shape[1] < length:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids


def make_cases(model, tokenizer, args) -> tuple[dict[str, torch.Tensor], str]:
    vocab = model.get_output_embeddings().weight.shape[0]
    real, source = real_token_ids(tokenizer, vocab, args)
    real = torch.tensor(real, device=args.device)
    memorized = greedy_extend(model, real[:, : args.prompt_tokens], args.tokens)
    partly = memorized.clone()
    g = torch.Generator().manual_seed(args.seed + 1)
    for row in range(partly.shape[0]):
        positions = torch.randperm(args.tokens - 1, generator=g)[: args.replace] + 1  # never the first token
        for pos in positions.tolist():
            old = int(partly[row, pos])
            new = int(torch.randint(3, vocab - 1, (1,), generator=g))
            partly[row, pos] = new if new != old else new + 1
    return {"memorized": memorized, "partly_memorized": partly, "unmemorized": real}, source


# --------------------------------------------------------------------------- measuring


def count_generation(run):
    """Run ``run()`` while counting the continuations the fast EL generates (rows) and its decode steps."""
    from loku.metrics import memorization as mem

    original, counts = mem._generate_from_cache, {"rows": 0, "decode_forward_calls": 0, "row_tokens": 0}

    def counting(model, cache_layers, rows, first_tokens, steps, device):
        counts["rows"] += len(rows)
        counts["decode_forward_calls"] += max(steps) - 1
        counts["row_tokens"] += len(rows) * max(steps)
        return original(model, cache_layers, rows, first_tokens, steps, device)

    mem._generate_from_cache = counting
    try:
        return run(), counts
    finally:
        mem._generate_from_cache = original


def measure_case(model, ids: torch.Tensor, args) -> dict:
    from loku.metrics import extraction_likelihood, extraction_likelihood_plain, memorization_accuracy

    fast = lambda: extraction_likelihood(model, ids, n=args.n, rows_per_batch=args.rows_per_batch)  # noqa: E731
    plain = lambda: extraction_likelihood_plain(model, ids, n=args.n)  # noqa: E731
    T, n = ids.shape[1], args.n

    warm_values, counts = count_generation(fast)  # warm-up, not timed
    fast_values, fast_times = [], []
    for _ in range(args.repeats):
        values, seconds = common.timed(fast, args.device)
        fast_values.append(values)
        fast_times.append(seconds)
    # plain: no separate warm-up (the model is already warm from the fast runs; plain is slow)
    plain_values, plain_times = [], []
    for _ in range(args.plain_repeats):
        values, seconds = common.timed(plain, args.device)
        plain_values.append(values)
        plain_times.append(seconds)

    identical = all(torch.equal(v, plain_values[0]) for v in [warm_values, *fast_values, *plain_values])
    fast_best, plain_best = min(fast_times), min(plain_times)
    ma = memorization_accuracy(model, ids).float().cpu()
    return {
        "sequences": int(ids.shape[0]),
        "tokens": int(T),
        "identical": bool(identical),
        "el_fast": fast_values[0].tolist(),
        "el_plain": plain_values[0].tolist(),
        "el_mean": float(plain_values[0].mean()),
        "ma": ma.tolist(),
        "ma_mean": float(ma.mean()),
        "fast_seconds": fast_times,
        "plain_seconds": plain_times,
        "fast_best_seconds": fast_best,
        "plain_best_seconds": plain_best,
        "ratio": plain_best / fast_best,
        "ratio_median": statistics.median(plain_times) / statistics.median(fast_times),
        "never_slower": plain_best >= fast_best,
        # what each method generates: plain one continuation per prefix L = 1..T-n (T-L decode calls each);
        # fast one row per prefix whose teacher-forced argmax misses, decoded together in batches
        "plain_prefixes": int(ids.shape[0] * (T - n)),
        "plain_decode_forward_calls": int(ids.shape[0] * sum(T - L for L in range(1, T - n + 1))),
        "fast_generated_rows": counts["rows"],
        "fast_decode_forward_calls": counts["decode_forward_calls"] + 1,  # +1: the one teacher-forced pass
        "fast_padded_row_tokens": counts["row_tokens"],
    }


def run_model(name: str, args) -> dict:
    record: dict = {"model": name}
    try:
        model, tokenizer = load(name, args)
        record["parameters"] = sum(p.numel() for p in model.parameters())
        cases, record["text_source"] = make_cases(model, tokenizer, args)
        record["cases"] = {}
        for case in CASES:
            print(f"[el_speed] {name} / {case} ...", file=sys.stderr, flush=True)
            record["cases"][case] = measure_case(model, cases[case], args)
        mem = record["cases"]["memorized"]
        record["memorized_ratio"] = mem["ratio"]
        record["memorized_target_met"] = mem["ratio"] >= MEMORIZED_TARGET
        record["never_slower_met"] = all(c["never_slower"] for c in record["cases"].values())
        record["all_identical"] = all(c["identical"] for c in record["cases"].values())
        record["status"] = "ok"
    except torch.cuda.OutOfMemoryError as err:
        record.update(status="oom", error=str(err).splitlines()[0])
    except Exception as err:  # noqa: BLE001 - recorded, the next model still runs
        record.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    finally:
        if str(args.device).startswith("cuda"):
            torch.cuda.empty_cache()
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = common.environment(args.device, args.dtype)  # before the run: the commit that is measured
    results = [run_model(name, args) for name in args.models]
    ok = [r for r in results if r["status"] == "ok"]
    report = {
        "benchmark": "el_speed",
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "targets": {"memorized_min_ratio": MEMORIZED_TARGET, "never_slower": True},
        "results": results,
        "summary": {
            "all_identical": bool(ok) and all(r["all_identical"] for r in ok),
            "memorized_target_met": bool(ok) and all(r["memorized_target_met"] for r in ok),
            "never_slower_met": bool(ok) and all(r["never_slower_met"] for r in ok),
            "models_failed": [r["model"] for r in results if r["status"] != "ok"],
        },
    }
    device_kind = str(args.device).split(":")[0]
    path = common.write_json_atomic(Path(args.out) / f"el_speed_{device_kind}.json", report)

    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["model"], "-", r["status"], "", "", "", "", "", ""])
            continue
        for case, c in r["cases"].items():
            rows.append([r["model"], case, f"{c['ma_mean']:.3f}", f"{c['el_mean']:.3f}",
                         f"{c['fast_generated_rows']}/{c['plain_prefixes']}", f"{c['fast_best_seconds']:.3f}",
                         f"{c['plain_best_seconds']:.2f}", f"{c['ratio']:.1f}x", "yes" if c["identical"] else "NO"])
    common.print_table(["model", "case", "MA", "EL", "rows/prefixes", "fast s", "plain s", "plain/fast", "identical"],
                       rows)
    s = report["summary"]
    print(f"targets: memorized >= {MEMORIZED_TARGET:g}x: {'met' if s['memorized_target_met'] else 'NOT met'}; "
          f"never slower: {'met' if s['never_slower_met'] else 'NOT met'}; "
          f"identical: {'all' if s['all_identical'] else 'NOT all'}")
    print(f"wrote {path}")
    return 0 if not s["models_failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
