"""`loku demo`: plant memorized text in the built-in SmolLM2-135M, show it leaks, unlearn it with LoKU.

The packaged model has memorized nothing we can point at, so the demo first fine-tunes it on a
handful of real TDEC sequences (or, without the shared data, on fictitious personal records it
generates itself) until it reproduces them, caches that planted model, and then unlearns them
with fila-ihl, printing the paper's before/after measurements and one generation of each.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import UnlearnConfig
from .lm import ensure_pad_token
from .metrics.perplexity import perplexity
from .models import CACHE_FORMAT, cache_dir, load_model
from .provenance import default_data_dir
from .report import before_after_table, write_run
from .save import atomic_dir, atomic_write_text

PLANT_EPOCHS = 12
PLANT_LR = 3e-4
PROMPT_TOKENS = 16
DEMO_BATCH = 2  # 8 forget sequences -> 4 optimizer steps per epoch at the paper's LoRA/FILA learning rate
# A retain set of a few texts, cycled every epoch, gets memorized (retain NLL 4.6 -> 0.4 with 16 texts) and
# the model drifts (held-out perplexity x14 when the stop rule was met); 128 texts keep it a regulariser.
RETAIN_TEXTS = 128

FIRST = ["Mara", "Tobias", "Ilse", "Quentin", "Noor", "Emeric", "Yara", "Dorian", "Linnea", "Caspar", "Odile", "Ravi"]
LAST = ["Velloni", "Brankov", "Osterhagen", "Marchetti", "Lindqvist", "Okafor", "Dunmore", "Salazar", "Hreidarsson"]
TOWNS = ["Tressano", "Kleinfeld", "Port Averly", "Santa Lúcia", "Oberwald", "Marrowby", "Vesterholm"]


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


def demo_texts(data_dir: Path | None, n: int, seed: int) -> tuple[dict[str, list[str]], str]:
    """Forget (planted), held-out and retain texts: TDEC + WikiText when present, else generated records."""
    from .data import read_texts

    root = Path(data_dir) if data_dir else default_data_dir()
    tdec = root / "tdec" / "forget" / "lm_extraction_32_0.csv"
    wiki = root / "tdec" / "eval" / "wikitext.csv"
    if tdec.is_file() and wiki.is_file():
        pool = read_texts(tdec, role="forget")
        retain = [t for t in read_texts(wiki, role="retain") if len(t.split()) > 60]
        return {"forget": pool[:n], "validation": pool[n:2 * n], "retain": retain[:RETAIN_TEXTS]}, f"TDEC ({tdec})"
    records = fictitious_records(2 * n + RETAIN_TEXTS, seed)
    return ({"forget": records[:n], "validation": records[n:2 * n], "retain": records[2 * n:]},
            "generated fictitious records (shared data not found)")


def clip_texts(tokenizer, texts: list[str], n_tokens: int) -> list[str]:
    """Cut each text to its first ``n_tokens`` tokens, as text that re-tokenizes to the same ids."""
    clipped = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
        candidate = tokenizer.decode(ids)
        while tokenizer(candidate, add_special_tokens=False)["input_ids"] != ids and len(ids) > 8:
            ids = ids[:-1]  # BPE merges across the cut can change the last ids: shorten until stable
            candidate = tokenizer.decode(ids)
        clipped.append(candidate)
    return clipped


def plant(model, tokenizer, texts: list[str], seed: int, epochs: int = PLANT_EPOCHS) -> None:
    """Full fine-tuning until the model reproduces ``texts`` (in place, on a model we own)."""
    from .data import make_batches, tokenize_texts

    torch.manual_seed(seed)
    ids = tokenize_texts(tokenizer, texts, max_length=4096, source="demo forget set")
    batches = make_batches(ids, len(ids), ensure_pad_token(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=PLANT_LR, weight_decay=0.0)
    model.train()
    for _ in tqdm(range(epochs), desc="planting memorization", unit="epoch"):
        for b in batches:
            loss = model(**b).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def planted_model(base_name: str, texts: list[str], seed: int):
    """The base model fine-tuned to memorize ``texts``; cached so a second demo skips planting."""
    from transformers import AutoModelForCausalLM

    key = hashlib.sha256(json.dumps([base_name, CACHE_FORMAT, texts, seed, PLANT_EPOCHS, PLANT_LR]).encode()
                         ).hexdigest()[:16]
    folder = cache_dir() / "planted" / f"{base_name}-{key}"
    model, tokenizer = load_model(base_name)
    if (folder / "config.json").is_file():
        print(f"loku: using the cached planted model {folder}")
        return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval(), tokenizer, model
    original = model
    model = AutoModelForCausalLM.from_config(original.config)
    model.load_state_dict(original.state_dict())
    plant(model, tokenizer, texts, seed)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return model, tokenizer, original


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
    _, tokenizer = load_model(base_name)
    raw, source = demo_texts(Path(data_dir) if data_dir else None, n_sequences, seed)
    texts = {role: clip_texts(tokenizer, items, n_tokens) for role, items in raw.items()}
    print(f"loku demo: {n_sequences} sequences of {n_tokens} tokens from {source}")

    data_folder = Path(out + ".data")
    with atomic_dir(data_folder) as tmp:
        for role, items in texts.items():
            atomic_write_text(tmp / f"{role}.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in items))

    model, tokenizer, original = planted_model(base_name, texts["forget"], seed)
    prompt, leaked = continuation(model, tokenizer, texts["forget"][0])
    _, original_text = continuation(original, tokenizer, texts["forget"][0])
    original_ppl = perplexity(original, tokenizer, texts["validation"])["ppl"]  # planting moves it too
    del original

    cfg = UnlearnConfig(model=base_name + " (planted)", forget=str(data_folder / "forget.jsonl"),
                        retain=str(data_folder / "retain.jsonl"), validation=str(data_folder / "validation.jsonl"),
                        out=out, method="fila-ihl", seed=seed, max_epochs=max_epochs, batch_size=DEMO_BATCH,
                        overwrite=True)
    result = unlearn(cfg, model=model, tokenizer=tokenizer)
    _, after_text = continuation(result.model, tokenizer, texts["forget"][0])
    write_run(result, cfg, extra={"demo": {"source": source, "prompt": prompt, "original_model": original_text,
                                           "original_model_heldout_ppl": original_ppl,
                                           "planted_model": leaked, "unlearned_model": after_text}})
    report = result.report
    print()
    print(before_after_table(report["before"], report["after"]))
    print(f"(held-out perplexity of {base_name} itself, before planting: {original_ppl:.4f})")
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
