"""Plant a forget set into a model the way pre-training would: mixed into general text.

Small offline models have memorized nothing we can point at, so a benchmark first fine-tunes them
on the forget set (docs/algorithms.md §10). Fine-tuning on the forget set ALONE also wrecks the model
(SmolLM2-135M: held-out Pile perplexity x2.2), and then every "utility kept" number is measured
against a broken model. Here each optimizer step holds ``forget_per_step`` forget sequences and
``general_per_forget`` times as many general texts (Pile / WikiText excerpts, drawn in order
from a pool so each is seen about once), trained with one token-weighted LM loss: the forget set
is repeated ``epochs`` times inside a stream of fresh general text, as a duplicated document
would be in pre-training.

:func:`plant` trains a copy (the input model is never modified); :func:`measure_planting` gives
the original and planted numbers (forget and held-out MA / EL_n, held-out perplexity) that show
the planting worked: forget MA/EL far above held-out, perplexity within ``ppl_tolerance``;
:func:`planted_model` caches the planted model on disk, keyed by the base model's fingerprint,
the data's sha256 and the recipe, and refuses a cache folder made from anything else.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError
from ..lm import IGNORE_INDEX, ensure_pad_token, token_nll

__all__ = ["CACHE_VERSION", "PlantedCacheMismatch", "PlantingRecipe", "cache_key", "load_planted", "measure_planting",
           "plant", "planted_model", "planting_meta", "save_planted"]

CACHE_VERSION = 1  # bump when planting changes in a way the recipe does not record
META = "planting.json"


class PlantedCacheMismatch(ConfigError):
    """A planted-model cache folder made from another model, data or recipe."""


@dataclass(frozen=True)
class PlantingRecipe:
    """How the forget set is planted (every field is part of the cache key).

    Defaults: the recipe measured on SmolLM2-135M (``configs/bench-tdec-cpu.yaml`` has the numbers):
    full fine-tuning, AdamW, constant learning rate 1e-4, 8 epochs, each step 2 forget sequences and 2
    general texts.
    """

    epochs: int = 8  # passes over the forget set
    lr: float = 1e-4
    forget_per_step: int = 2  # forget sequences per optimizer step
    general_per_forget: int = 1  # general texts per forget sequence in each step (mixing ratio)
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up, then constant
    decay: str = "constant"  # "constant" or "linear" (to 0 over the run)
    max_grad_norm: float | None = 1.0
    seed: int = 0

    def validate(self) -> "PlantingRecipe":
        positive = {"epochs": self.epochs, "forget_per_step": self.forget_per_step}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"planting.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.general_per_forget, int) or self.general_per_forget < 0:
            raise ConfigError(f"planting.general_per_forget must be an integer >= 0, got {self.general_per_forget!r}")
        if not self.lr > 0:
            raise ConfigError(f"planting.lr must be > 0, got {self.lr!r}")
        if self.decay not in ("constant", "linear"):
            raise ConfigError(f"planting.decay must be 'constant' or 'linear', got {self.decay!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("planting.warmup_steps and planting.weight_decay must be >= 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "PlantingRecipe":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown planting option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values).validate()

    def general_needed(self, n_forget: int) -> int:
        """General texts one planting reads (each is used once if the pool is at least this big)."""
        steps = math.ceil(n_forget / self.forget_per_step) * self.epochs
        return steps * self.forget_per_step * self.general_per_forget


# --------------------------------------------------------------------------- training


def _schedule(recipe: PlantingRecipe, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / recipe.warmup_steps) if recipe.warmup_steps else 1.0
        if recipe.decay == "linear":
            return warm * max(0.0, 1.0 - step / max(total, 1))
        return warm

    return factor


def plant(model, tokenizer, forget: list[str], general: list[str], recipe: PlantingRecipe, *,
          progress: bool = False, on_epoch: Callable[[int, Any], dict] | None = None):
    """A fully fine-tuned COPY of ``model`` that has seen ``forget`` ``recipe.epochs`` times, each
    forget batch mixed with ``general_per_forget`` times as many ``general`` texts.

    Returns ``(planted model in eval mode, log)``; ``log`` has per-epoch mean losses and, when
    ``on_epoch(epoch, model)`` is given, what it returns (e.g. forget MA) per epoch.
    """
    from tqdm.auto import tqdm

    from ..data import make_batches, tokenize_texts
    from ..optim import train_steps

    recipe.validate()
    if not forget:
        raise ConfigError("planting needs at least one forget text")
    if recipe.general_per_forget and not general:
        raise ConfigError("planting with general_per_forget > 0 needs general texts")
    pad = ensure_pad_token(tokenizer)
    planted = copy.deepcopy(model).float()
    planted.train()
    for p in planted.parameters():
        p.requires_grad_(True)
    forget_ids = tokenize_texts(tokenizer, forget, max_length=1 << 20, source="planting forget set")
    general_ids = tokenize_texts(tokenizer, general, max_length=1 << 20, source="planting general texts") \
        if general else []
    rng = random.Random(recipe.seed)
    general_order = list(range(len(general_ids)))
    rng.shuffle(general_order)
    steps_per_epoch = math.ceil(len(forget_ids) / recipe.forget_per_step)
    total = steps_per_epoch * recipe.epochs
    optimizer = torch.optim.AdamW(planted.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = _schedule(recipe, total)
    torch.manual_seed(recipe.seed)
    log: dict[str, Any] = {"epochs": [], "steps": total, "general_used": 0, "general_pool": len(general_ids),
                           "forget_tokens_per_epoch": sum(len(s) for s in forget_ids)}
    cursor = 0
    started = time.time()
    device = next(planted.parameters()).device
    bar = tqdm(range(1, recipe.epochs + 1), desc="planting", unit="epoch", disable=not progress)
    step = 0

    def batches(order: list[int]):
        """Each step's rows: ``forget_per_step`` forget texts, then ``general_per_forget`` general texts each."""
        nonlocal cursor
        for start in range(0, len(order), recipe.forget_per_step):
            rows = [forget_ids[i] for i in order[start:start + recipe.forget_per_step]]
            n_forget_rows = len(rows)
            for _ in range(n_forget_rows * recipe.general_per_forget):
                rows.append(general_ids[general_order[cursor % len(general_order)]])
                cursor += 1
            yield {k: v.to(device) for k, v in make_batches(rows, len(rows), pad)[0].items()}, n_forget_rows

    def loss_of(item):
        batch, n_forget_rows = item
        logits = planted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = token_nll(logits, batch["labels"])  # [B, T-1], 0 where masked
        scored = (batch["labels"][:, 1:] != IGNORE_INDEX).float()
        # one token-weighted LM loss over the mixed batch
        return nll.sum() / scored.sum().clamp(min=1), (nll.detach(), scored, n_forget_rows)

    for epoch in bar:
        order = list(range(len(forget_ids)))
        rng.shuffle(order)
        losses = {"forget": 0.0, "general": 0.0}
        counts = {"forget": 0, "general": 0}

        def tally(_step, _loss, parts) -> None:
            nll, scored, n_forget_rows = parts
            for side, rows in (("forget", slice(None, n_forget_rows)), ("general", slice(n_forget_rows, None))):
                losses[side] += float(nll[rows].sum())
                counts[side] += int(scored[rows].sum())

        step = train_steps(planted, optimizer, batches(order), loss_of, lr_at=lambda k: recipe.lr * schedule(k),
                           first_step=step, max_grad_norm=recipe.max_grad_norm, on_step=tally)
        record = {"epoch": epoch, "seconds": time.time() - started,
                  **{f"loss_{k}": losses[k] / counts[k] for k in losses if counts[k]}}
        if on_epoch is not None:
            planted.eval()
            record.update(on_epoch(epoch, planted))
            planted.train()
        log["epochs"].append(record)
        bar.set_postfix(forget=f"{record.get('loss_forget', 0):.3f}", general=f"{record.get('loss_general', 0):.3f}")
    log["general_used"] = cursor
    log["seconds"] = time.time() - started
    planted.eval()
    for p in planted.parameters():
        p.requires_grad_(False)
    return planted, log


# --------------------------------------------------------------------------- measuring


def measure_planting(original, planted, tokenizer, forget: list[str], heldout: list[str], ppl_texts: list[str], *,
                     el_n: int = 10, batch_size: int = 8, original_numbers: dict | None = None) -> dict[str, Any]:
    """Forget / held-out MA and EL_n and held-out perplexity of the original and the planted model.

    ``original_numbers`` (a previous result's ``"original"``) skips measuring the original again.
    ``checks``: forget MA and EL above the held-out ones (the planting worked) and the planted
    perplexity's ratio to the original's.
    """
    from ..metrics.perplexity import perplexity
    from ..metrics.relearn import memorization_of_texts

    def numbers(model):
        return {"forget": memorization_of_texts(model, tokenizer, forget, el_n=el_n, batch_size=batch_size),
                "heldout": memorization_of_texts(model, tokenizer, heldout, el_n=el_n, batch_size=batch_size),
                "ppl": perplexity(model, tokenizer, ppl_texts, batch_size=batch_size)["ppl"]}

    before = original_numbers if original_numbers is not None else numbers(original)
    after = numbers(planted)
    key = f"el_{el_n}"
    return {
        "original": before,
        "planted": after,
        "checks": {
            "ppl_ratio": after["ppl"] / before["ppl"],
            "forget_ma_minus_heldout": after["forget"]["ma"] - after["heldout"]["ma"],
            f"forget_{key}_minus_heldout": after["forget"][key] - after["heldout"][key],
        },
        "n": {"forget": len(forget), "heldout": len(heldout), "ppl_texts": len(ppl_texts)},
    }


# --------------------------------------------------------------------------- the cache


def cache_key(base_fingerprint: str, data_sha256: str, recipe: PlantingRecipe) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "base": base_fingerprint, "data": data_sha256,
                       "recipe": recipe.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def planting_meta(base_name: str, base_fingerprint: str, data_sha256: str, recipe: PlantingRecipe) -> dict[str, Any]:
    """What a cache folder must have been made from to be used: the identity half of planting.json."""
    return {"cache_version": CACHE_VERSION, "base_model": base_name, "base_fingerprint": base_fingerprint,
            "data_sha256": data_sha256, "recipe": recipe.to_dict(),
            "key": cache_key(base_fingerprint, data_sha256, recipe)}


def _differences(found: dict, expected: dict) -> list[str]:
    out = []
    for name in ("cache_version", "base_fingerprint", "data_sha256", "recipe"):
        if found.get(name) != expected.get(name):
            if name == "base_fingerprint":
                out.append(f"it was planted into another model ({found.get('base_model')!r}, "
                           f"fingerprint {str(found.get(name))[:40]}...) than {expected.get('base_model')!r}")
            elif name == "recipe":
                changed = sorted(k for k in {**(found.get(name) or {}), **expected[name]}
                                 if (found.get(name) or {}).get(k) != expected[name].get(k))
                out.append(f"another planting recipe (differs in {', '.join(changed)})")
            elif name == "data_sha256":
                out.append("other texts (data sha256 differs)")
            else:
                out.append(f"cache format {found.get(name)} (this loku writes {expected.get(name)})")
    return out


def load_planted(folder: str | Path, expected: dict[str, Any]):
    """The planted model cached in ``folder`` and its planting.json, after checking it was made from
    ``expected`` (:func:`planting_meta`) and that its weights are the ones saved.

    Raises :class:`PlantedCacheMismatch` naming what differs; returns None when ``folder`` holds no
    finished cache.
    """
    from transformers import AutoModelForCausalLM

    from ..provenance import fingerprints_match

    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.is_file() or not (folder / "config.json").is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise PlantedCacheMismatch(f"{meta_path}: unreadable planted-model record ({err}); delete {folder} to plant "
                                   "again") from None
    problems = _differences(meta, expected)
    if problems:
        raise PlantedCacheMismatch(f"{folder}: this planted-model cache was made from {'; '.join(problems)}, so it is "
                                   f"not the planting asked for; delete the folder (or choose another cache folder) "
                                   "to plant again")
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, dtype=torch.float32).eval()
    from ..devices import default_placement, place

    place(model, default_placement()[0])  # the bench's --device, where the original is
    if meta.get("planted_fingerprint") and not fingerprints_match(meta["planted_fingerprint"], model):
        raise PlantedCacheMismatch(f"{folder}: the weights are not the ones this cache saved (fingerprint differs); "
                                   "delete the folder to plant again")
    return model, meta


def save_planted(folder: str | Path, model, meta: dict[str, Any], tokenizer=None) -> Path:
    """Write the planted model (with ``tokenizer``: a complete model folder, usable as ``--model``) and
    planting.json under a temporary name, then rename into place."""
    from ..provenance import model_fingerprint
    from ..save import atomic_dir, atomic_write_json

    meta = {**meta, "planted_fingerprint": model_fingerprint(model)}
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / META, meta)
    return Path(folder)


def cache_folder(root: str | Path, base_name: str, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(base_name))[-60:]
    return Path(root) / "planted" / f"{safe}-{key[:16]}"


def planted_model(original, tokenizer, *, base_name: str, forget: list[str], general: list[str],
                  recipe: PlantingRecipe, cache_root: str | Path | None, measure: Callable | None = None,
                  progress: bool = False, log: Callable[[str], None] = print):
    """The planted model for (``original``, texts, ``recipe``): from the cache when there, else planted and
    cached. Returns ``(planted model, planting.json contents, cache folder or None, from_cache)``.

    ``measure(original, planted)`` (optional) adds the planting's numbers to planting.json (they are
    read back from the cache on later runs). A folder with this key holding another planting is
    refused (:class:`PlantedCacheMismatch`).
    """
    from ..provenance import model_fingerprint

    fingerprint = model_fingerprint(original)
    data_sha = hashlib.sha256(json.dumps({"forget": forget, "general": general}, ensure_ascii=False).encode()
                              ).hexdigest()
    expected = planting_meta(base_name, fingerprint, data_sha, recipe.validate())
    folder = cache_folder(cache_root, base_name, expected["key"]) if cache_root is not None else None
    if folder is not None:
        loaded = load_planted(folder, expected)
        if loaded is not None:
            log(f"loku: using the cached planted model {folder}")
            return loaded[0], loaded[1], folder, True
    log(f"loku: planting {len(forget)} sequences into {base_name} ({recipe.epochs} epochs, lr {recipe.lr:g}, "
        f"{recipe.general_per_forget} general texts per planted one)")
    planted, train_log = plant(original, tokenizer, forget, general, recipe, progress=progress)
    meta = {**expected, "training": train_log, "n_forget": len(forget), "n_general": len(general)}
    if measure is not None:
        meta["measurements"] = measure(original, planted)
    if folder is not None:
        save_planted(folder, planted, meta, tokenizer)
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    return planted, meta, folder, False
