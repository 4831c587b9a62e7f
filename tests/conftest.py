"""Shared fixtures: tiny random-weight causal LMs built in the test, and the shared data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tiny_models import make_tiny_model, memorize  # noqa: F401  (re-exported for tests)

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
