"""Relearning check (docs/algorithms.md §11, beyond the paper): does forgotten text come back?

Knowledge that unlearning only suppressed returns after a few fine-tuning steps on RELATED data,
faster than in a model that never had it. The check fine-tunes a copy of the unlearned model for
k steps on the first half of the forget set and measures MA and EL_n on the second half after
each checkpoint step; the control is the original (never planted) model given the very same
fine-tune. Both curves are returned, with the learning rate and optimiser that made them. The
models passed in are never modified (a merged copy is trained).

Settings (:class:`RelearnSettings`): checkpoint steps (default 5, 10, 20), AdamW at lr 5e-5,
``batch_size`` training texts per step taken in a fixed order that cycles through the half, full
fine-tuning in float32, the model in eval mode (no dropout). EL_n at every checkpoint, or
(``el_every_step=False``, cheaper: EL costs generation) at step 0 and the last step only.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import torch

from loku.errors import ConfigError, DataError
from loku.lm import ensure_pad_token

__all__ = ["RelearnSettings", "memorization_of_texts", "relearn_curve", "relearn_suite", "relearning_check",
           "split_halves", "trainable_copy"]


@dataclass(frozen=True)
class RelearnSettings:
    steps: tuple[int, ...] = (5, 10, 20)  # checkpoints (optimizer steps) at which MA/EL are measured
    lr: float = 5e-5
    optimizer: str = "adamw"  # AdamW, betas (0.9, 0.999)
    weight_decay: float = 0.0
    batch_size: int = 4  # training texts per step
    el_n: int = 10
    el_every_step: bool = True  # False: EL_n at step 0 and the last step only (MA at every checkpoint)
    seed: int = 0
    eval_batch_size: int = 8
    extra: dict[str, Any] = field(default_factory=dict)  # recorded as is (e.g. where the texts came from)

    def validate(self) -> "RelearnSettings":
        steps = list(self.steps)
        if not steps or any(not isinstance(s, int) or s < 1 for s in steps) or steps != sorted(set(steps)):
            raise ConfigError(f"relearn steps must be increasing positive integers, got {self.steps!r}")
        if not self.lr > 0:
            raise ConfigError(f"relearn lr must be > 0, got {self.lr!r}")
        if self.optimizer != "adamw":
            raise ConfigError(f"relearn optimizer must be 'adamw', got {self.optimizer!r}")
        if self.batch_size < 1 or self.el_n < 1 or self.eval_batch_size < 1:
            raise ConfigError("relearn batch_size, el_n and eval_batch_size must be >= 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["steps"] = list(self.steps)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "RelearnSettings":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown relearn option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "steps" in values:
            values["steps"] = tuple(int(s) for s in values["steps"])
        return cls(**values).validate()


def split_halves(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(first half: fine-tuned on, second half: measured); the second half gets the odd one out."""
    texts = list(texts)
    if len(texts) < 2:
        raise DataError(f"the relearning check needs at least 2 forget texts (one to train on, one to measure), "
                        f"got {len(texts)}")
    half = len(texts) // 2
    return texts[:half], texts[half:]


def memorization_of_texts(model: Any, tokenizer: Any, texts: Sequence[str], *, el_n: int = 10, batch_size: int = 8,
                          with_el: bool = True) -> dict[str, float]:
    """Mean MA and EL_n of ``model`` on ``texts`` (each text whole, no special tokens)."""
    from loku.data import make_batches, tokenize_texts
    from loku.lm import per_sequence
    from loku.metrics.memorization import extraction_likelihood, memorization_accuracy

    ids = tokenize_texts(tokenizer, list(texts), max_length=1 << 20, source="memorization texts")
    batches = make_batches(ids, batch_size, ensure_pad_token(tokenizer))
    out = {"ma": float(per_sequence(memorization_accuracy, model, batches).mean())}
    if with_el:
        out[f"el_{el_n}"] = float(per_sequence(extraction_likelihood, model, batches, n=el_n).mean())
    return out


def trainable_copy(model: Any) -> torch.nn.Module:
    """A float32 copy of ``model`` with every adapter merged in and every weight trainable."""
    from peft import PeftModel

    clone = copy.deepcopy(model)
    if isinstance(clone, PeftModel):
        clone = clone.merge_and_unload()
    clone = clone.float()
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def relearn_curve(model: Any, tokenizer: Any, train_texts: Sequence[str], test_texts: Sequence[str],
                  settings: RelearnSettings | None = None) -> dict[str, Any]:
    """Fine-tune a copy of ``model`` on ``train_texts``; MA and EL_n on ``test_texts`` at step 0 and at
    each checkpoint step. Returns ``{"steps", "ma", "el_<n>", "train_loss", "seconds"}`` (lists by step)."""
    from loku.data import make_batches, tokenize_texts
    from loku.optim import train_steps

    settings = (settings or RelearnSettings()).validate()
    if not train_texts or not test_texts:
        raise DataError("the relearning check needs texts to train on and texts to measure")
    started = time.time()
    pad = ensure_pad_token(tokenizer)
    ids = tokenize_texts(tokenizer, list(train_texts), max_length=1 << 20, source="relearning texts")
    order = list(range(len(ids)))
    random.Random(settings.seed).shuffle(order)
    clone = trainable_copy(model)
    device = next(clone.parameters()).device
    optimizer = torch.optim.AdamW(clone.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    key = f"el_{settings.el_n}"
    curve: dict[str, Any] = {"steps": [], "ma": [], key: [], "train_loss": []}

    def checkpoint(step: int, loss: float | None) -> None:
        clone.eval()
        with_el = settings.el_every_step or step in (0, settings.steps[-1])
        numbers = memorization_of_texts(clone, tokenizer, test_texts, el_n=settings.el_n,
                                        batch_size=settings.eval_batch_size, with_el=with_el)
        curve["steps"].append(step)
        curve["ma"].append(numbers["ma"])
        curve[key].append(numbers.get(key))
        curve["train_loss"].append(loss)

    def batches():
        for step in range(settings.steps[-1]):
            start = step * settings.batch_size
            rows = [ids[order[(start + k) % len(order)]] for k in range(settings.batch_size)]
            yield {k: v.to(device) for k, v in make_batches(rows, len(rows), pad)[0].items()}

    def measured(step: int, loss, _) -> None:
        if step in settings.steps:
            checkpoint(step, float(loss.detach()))

    torch.manual_seed(settings.seed)
    checkpoint(0, None)  # leaves the clone in eval mode: no dropout while relearning, as in unlearning
    train_steps(clone, optimizer, batches(), lambda batch: (clone(**batch).loss, None), on_step=measured)
    del clone, optimizer
    curve["seconds"] = time.time() - started
    return curve


def relearning_check(model: Any, tokenizer: Any, forget_texts: Sequence[str], *, original: Any = None,
                     control: dict[str, Any] | None = None, settings: RelearnSettings | None = None) -> dict[str, Any]:
    """The relearning curves of ``model`` and of the control (``original`` given the same fine-tune).

    ``control`` (a previous result's ``"control"`` for the same texts and settings) saves fine-tuning
    the original again. ``gap`` is unlearned minus control at every step: knowledge only suppressed
    shows as a positive gap that grows with the steps.
    """
    settings = (settings or RelearnSettings()).validate()
    train, test = split_halves(forget_texts)
    if control is None:
        if original is None:
            raise ConfigError("the relearning check needs the original model (or a control curve) as control")
        control = relearn_curve(original, tokenizer, train, test, settings)
    elif control.get("settings") not in (None, settings.to_dict()):
        raise ConfigError("the control curve was made with other relearning settings; compute it again")
    control = {**control, "settings": settings.to_dict()}
    curve = relearn_curve(model, tokenizer, train, test, settings)
    key = f"el_{settings.el_n}"
    if control["steps"] != curve["steps"]:
        raise ConfigError("the control curve has other checkpoint steps; compute it again")
    gap = {"ma": [a - b for a, b in zip(curve["ma"], control["ma"])],
           key: [None if a is None or b is None else a - b for a, b in zip(curve[key], control[key])]}
    return {"settings": settings.to_dict(), "n_train": len(train), "n_test": len(test), "unlearned": curve,
            "control": control, "gap": gap,
            "final": {"ma": curve["ma"][-1], key: curve[key][-1], "control_ma": control["ma"][-1],
                      f"control_{key}": control[key][-1]}}


def relearn_suite(model: Any, tokenizer: Any, opts: Any, *, original: Any = None,
                  settings: RelearnSettings | None = None, max_tokens: int = 200) -> dict[str, Any]:
    """``loku eval --relearn`` (with ``--reference ORIGINAL`` for the control): the relearning check on the
    forget file of the tdec suite (``--forget``, its first ``--limit`` rows), texts cut to ``max_tokens``
    tokens. Without ``original`` only the evaluated model's curve is returned (``"control": None``).
    ``opts`` is the suites' :class:`loku.eval_options.EvalOptions`."""
    from pathlib import Path

    from loku.bench.data import clip_texts
    from loku.data import read_texts
    from loku.eval_options import DEFAULT_FORGET
    from loku.provenance import jsonable

    settings = (settings or RelearnSettings(seed=opts.seed, eval_batch_size=opts.batch_size,
                                            el_n=opts.el_n)).validate()
    forget_path = Path(opts.forget_path or opts.data_dir / DEFAULT_FORGET)
    opts.use(forget_path, "forget")
    forget = clip_texts(tokenizer, opts.take(read_texts(forget_path, role="forget")), max_tokens)
    if original is not None:
        out = relearning_check(model, tokenizer, forget, original=original, settings=settings)
    else:
        train, test = split_halves(forget)
        out = {"settings": settings.to_dict(), "n_train": len(train), "n_test": len(test),
               "unlearned": relearn_curve(model, tokenizer, train, test, settings), "control": None, "gap": None,
               "note": "no control curve: pass --reference ORIGINAL_MODEL to fine-tune the original the same way"}
    out["forget_file"] = str(forget_path)
    return jsonable(out)
