"""`loku demo`: plant memorized text in the built-in SmolLM2-135M, show it leaks, unlearn it with LoKU.

The packaged model has memorized nothing we can point at, so the demo first plants a handful of
real TDEC sequences (or, without the shared data, fictitious personal records it generates itself)
the way the benchmark does (:mod:`loku.bench.planting`): full fine-tuning on the forget set mixed
with as many general texts (Pile excerpts), so the model reproduces them without being wrecked,
and caches that planted model. It then unlearns them with fila-ihl, printing the paper's
before/after measurements, one generation of each model and the Pile perplexity of the original,
planted and unlearned model (so "utility kept" is judged against the model as shipped).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from .bench.data import clip_texts, general_texts, role_texts
from .bench.planting import PlantingRecipe, planted_model
from .config import UnlearnConfig
from .lm import ensure_pad_token
from .metrics.perplexity import perplexity
from .models import cache_dir, load_model
from .provenance import default_data_dir
from .report import before_after_table, write_run
from .save import atomic_dir, atomic_write_text

PROMPT_TOKENS = 16
DEMO_BATCH = 2  # 8 forget sequences -> 4 optimizer steps per epoch
# As `loku bench tdec --config cpu` (configs/bench-tdec-cpu.yaml has the measurements): the paper takes one
# step per epoch at lr 2e-4, so with 4 steps an epoch the rate is divided by 4 (at 2e-4 every stop-rule check
# comes after 4x the movement and fila-ihl overshoots: Pile perplexity x1.76 there), and the retain term is KL
# to the planted model (WikiText NLL pulls SmolLM2 towards WikiText and costs Pile perplexity).
DEMO_LR = 5e-5
DEMO_RETAIN_TERM = "kl"
# A retain set of a few texts, cycled every epoch, gets memorized (retain NLL 4.6 -> 0.4 with 16 texts) and
# the model drifts (held-out perplexity x14 when the stop rule was met); 128 texts keep it a regulariser.
RETAIN_TEXTS = 128
# Utility is judged on the bench's Pile perplexity set (pile.csv rows 200-500), sized as the bench sizes it.
PPL_TEXTS = 16
PPL_TOKENS = 128

FIRST = ["Mara", "Tobias", "Ilse", "Quentin", "Noor", "Emeric", "Yara", "Dorian", "Linnea", "Caspar", "Odile", "Ravi"]
LAST = ["Velloni", "Brankov", "Osterhagen", "Marchetti", "Lindqvist", "Okafor", "Dunmore", "Salazar", "Hreidarsson"]
TOWNS = ["Tressano", "Kleinfeld", "Port Averly", "Santa Lúcia", "Oberwald", "Marrowby", "Vesterholm"]


def demo_recipe(seed: int = 0) -> PlantingRecipe:
    """How the demo plants: the bench's recipe (configs/bench-tdec-cpu.yaml's header has the measurements).

    One 64-token Pile excerpt per planted sequence in each step: forget MA 0.94 with Pile perplexity x0.96
    of the original, where the forget set alone (lr 3e-4, 12 epochs) raised it x2.2-3.3.
    """
    return PlantingRecipe(epochs=8, lr=1e-4, forget_per_step=2, general_per_forget=1, seed=seed)


def fictitious_records(n: int, seed: int = 0) -> list[str]:
    """Made-up personal records (no real person): the kind of text a deletion request is about."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        records.append(
            f"Patient record: {name}, born {rng.randint(1, 28)} {rng.choice(['March', 'June', 'October'])} "
            f"{rng.randint(1950, 2001)} in {rng.choice(TOWNS)}. Phone +{rng.randint(10, 99)} {rng.randint(100, 999)} "
            f"{rng.randint(1000, 9999)}. Account number {rng.randint(10**9, 10**10 - 1)}. Diagnosis code "
            f"{rng.choice('ABCDEFGH')}{rng.randint(10, 99)}.{rng.randint(0, 9)}; next appointment at "
            f"{rng.randint(7, 18)}:{rng.choice(['00', '15', '30', '45'])} with Dr {rng.choice(LAST)}."
        )
    return records


def data_root(data_dir: Path | None) -> Path:
    return Path(data_dir) if data_dir else default_data_dir()


def shared_files(data_dir: Path | None) -> dict[str, Path] | None:
    """The shared data files the demo reads (TDEC forget rows, WikiText, Pile), or None if any is missing:
    then the demo runs on generated records instead (a partial folder too, so no role mixes the two)."""
    root = data_root(data_dir)
    files = {"tdec": root / "tdec" / "forget" / "lm_extraction_32_0.csv",
             "wiki": root / "tdec" / "eval" / "wikitext.csv", "pile": root / "tdec" / "eval" / "pile.csv"}
    return files if all(path.is_file() for path in files.values()) else None


def demo_texts(data_dir: Path | None, n: int, seed: int, n_general: int = 0) -> tuple[dict[str, list[str]], str]:
    """Forget (planted), held-out and retain texts: TDEC + WikiText when present, else generated records.

    Without the shared data there are no Pile excerpts to plant among either, so ``n_general`` more
    generated records come back as ``general``, none of them a forget, held-out or retain record (with
    the data, the Pile excerpts are cut to the tokenizer's length by :func:`demo_sets`).
    """
    from .data import read_texts

    files = shared_files(data_dir)
    if files is not None:
        pool = read_texts(files["tdec"], role="forget")
        retain = [t for t in read_texts(files["wiki"], role="retain") if len(t.split()) > 60]
        return ({"forget": pool[:n], "validation": pool[n:2 * n], "retain": retain[:RETAIN_TEXTS]},
                f"TDEC ({files['tdec']})")
    want = 2 * n + RETAIN_TEXTS + n_general
    # dict.fromkeys drops a repeated record (unlikely but possible), so no text is in two roles; the spare 16
    # make up for it, and generation is sequential, so forget/held-out/retain are the same for any n_general.
    records = list(dict.fromkeys(fictitious_records(want + 16, seed)))[:want]
    texts = {"forget": records[:n], "validation": records[n:2 * n], "retain": records[2 * n:2 * n + RETAIN_TEXTS]}
    if n_general:
        texts["general"] = records[2 * n + RETAIN_TEXTS:]
    return texts, "generated fictitious records (shared data not found)"


def demo_sets(tokenizer: Any, data_dir: Path | None, n: int, n_tokens: int, seed: int,
              n_general: int) -> tuple[dict[str, list[str]], str, str]:
    """Every text the demo uses, cut to the tokenizer: forget, validation, retain (``n_tokens`` tokens each),
    ``general`` (``n_general`` texts to plant among) and ``ppl`` (the perplexity set).

    Returns ``(texts, source, ppl_name)``. With the shared data ``general`` is the bench's planting pool
    (Pile, pile.csv rows 500-1500) and ``ppl`` its Pile perplexity set (rows 200-500), so neither overlaps
    the TDEC forget/held-out rows or the WikiText retain rows; without it both are generated records.
    """
    raw, source = demo_texts(data_dir, n, seed, n_general=n_general)
    texts = {role: clip_texts(tokenizer, items, n_tokens) for role, items in raw.items()}
    if shared_files(data_dir) is not None:
        root = data_root(data_dir)
        texts["general"] = general_texts(tokenizer, root, n_general, n_tokens)
        texts["ppl"] = role_texts(tokenizer, root, "ppl_pile", PPL_TEXTS, PPL_TOKENS)
        return texts, source, "Pile perplexity"
    texts.setdefault("general", [])
    texts["ppl"] = texts["validation"]  # no Pile here; the held-out records are the text the demo never trains on
    return texts, source, "held-out perplexity"


@torch.no_grad()
def continuation(model, tokenizer, text: str, n_prompt: int = PROMPT_TOKENS, n_new: int = 32) -> tuple[str, str]:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :n_prompt]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                         pad_token_id=ensure_pad_token(tokenizer))
    return tokenizer.decode(ids[0]), tokenizer.decode(out[0, ids.shape[1]:])


def run_demo(data_dir: str | None = None, out: str = "runs/demo", n_sequences: int = 8, n_tokens: int = 64,
             seed: int = 0, base_name: str = "smollm2-135m", max_epochs: int = 30) -> int:
    from .trainer import unlearn

    started = time.time()
    original, tokenizer = load_model(base_name)
    recipe = demo_recipe(seed)
    # One general text per planted sequence per epoch: each is seen once (the planting cycles a smaller pool).
    texts, source, ppl_name = demo_sets(tokenizer, Path(data_dir) if data_dir else None, n_sequences, n_tokens,
                                        seed, recipe.general_needed(n_sequences))
    print(f"loku demo: {n_sequences} sequences of {n_tokens} tokens from {source}")

    data_folder = Path(out + ".data")
    with atomic_dir(data_folder) as tmp:
        for role in ("forget", "validation", "retain"):
            atomic_write_text(tmp / f"{role}.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts[role]))

    model, _, planted_folder, from_cache = planted_model(
        original, tokenizer, base_name=base_name, forget=texts["forget"], general=texts["general"], recipe=recipe,
        cache_root=cache_dir(), progress=True, log=print)
    prompt, leaked = continuation(model, tokenizer, texts["forget"][0])
    _, original_text = continuation(original, tokenizer, texts["forget"][0])
    original_ppl = perplexity(original, tokenizer, texts["validation"])["ppl"]  # planting moves it too
    # The reference for every utility number: the model as shipped, never planted.
    ppl = {"original": perplexity(original, tokenizer, texts["ppl"])["ppl"],
           "planted": perplexity(model, tokenizer, texts["ppl"])["ppl"]}
    del original

    cfg = UnlearnConfig(model=base_name + " (planted)", forget=str(data_folder / "forget.jsonl"),
                        retain=str(data_folder / "retain.jsonl"), validation=str(data_folder / "validation.jsonl"),
                        out=out, method="fila-ihl", seed=seed, max_epochs=max_epochs, batch_size=DEMO_BATCH,
                        lr=DEMO_LR, retain_term=DEMO_RETAIN_TERM, overwrite=True)
    result = unlearn(cfg, model=model, tokenizer=tokenizer)
    _, after_text = continuation(result.model, tokenizer, texts["forget"][0])
    ppl["unlearned"] = perplexity(result.model, tokenizer, texts["ppl"])["ppl"]
    ratios = {k: ppl[k] / ppl["original"] for k in ("planted", "unlearned")}
    write_run(result, cfg, extra={"demo": {
        "source": source, "prompt": prompt, "original_model": original_text, "original_model_heldout_ppl": original_ppl,
        "planted_model": leaked, "unlearned_model": after_text,
        "planting": {"recipe": recipe.to_dict(), "n_general": len(texts["general"]),
                     "cache_folder": str(planted_folder), "from_cache": from_cache},
        "ppl": {"texts": ppl_name, "n_texts": len(texts["ppl"]), **ppl,
                **{f"{k}_ratio": v for k, v in ratios.items()}}}})
    report = result.report
    print()
    print(before_after_table(report["before"], report["after"]))
    print(f"(held-out perplexity of {base_name} itself, before planting: {original_ppl:.4f})")
    print(f"{ppl_name}: original {ppl['original']:.2f}, planted {ppl['planted']:.2f} (x{ratios['planted']:.2f}), "
          f"unlearned {ppl['unlearned']:.2f} (x{ratios['unlearned']:.2f})")
    print()
    print(f"prompt:              {prompt!r}")
    print(f"true continuation:   {texts['forget'][0][len(prompt):][:120]!r}")
    print(f"before planting:     {original_text!r}")
    print(f"planted (leaks):     {leaked!r}")
    print(f"after unlearning:    {after_text!r}")
    print()
    ppl_change = report["after"]["val_ppl"] / report["before"]["val_ppl"] - 1
    print(f"outcome: {report['outcome']} after {report['epochs_run']} epoch(s); held-out perplexity "
          f"{100 * ppl_change:+.1f}%; total {time.time() - started:.0f} s; report in {out}/report.md")
    return 0 if report["outcome"] == "success" else 3
