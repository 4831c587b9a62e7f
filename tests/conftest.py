"""Shared fixtures: tiny random-weight causal LMs built in the test, and the shared data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tiny_models import VOCAB, make_tiny_model, memorize, texts_of, word_tokenizer

SHARED = Path(os.environ.get("LOKU_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED}")
    return SHARED


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def memorized(tmp_path_factory):
    """A tiny Llama that reproduces 4 forget sequences, saved as a model folder, plus the data files."""
    from loku.metrics import memorization_accuracy

    root = tmp_path_factory.mktemp("memorized")
    g = torch.Generator().manual_seed(3)
    seqs = torch.randint(3, VOCAB, (16, 24), generator=g)
    forget, validation, retain = seqs[:4], seqs[4:8], seqs[8:]
    model = make_tiny_model("llama")
    memorize(model, torch.cat([forget, retain]), steps=300)
    assert memorization_accuracy(model, forget).min() > 0.95
    model.save_pretrained(root / "base")
    word_tokenizer().save_pretrained(root / "base")
    for name, ids in (("forget", forget), ("validation", validation), ("retain", retain)):
        (root / f"{name}.txt").write_text("\n".join(texts_of(ids)) + "\n")
    return root
