"""The demo's data: planted (forget), held-out and retain texts, from TDEC + WikiText or generated records."""
from __future__ import annotations

from loku.demo import RETAIN_TEXTS, demo_texts, fictitious_records


def test_demo_uses_tdec_and_a_large_retain_set(shared_data):
    texts, source = demo_texts(shared_data, 8, seed=0)
    assert "TDEC" in source and len(texts["forget"]) == len(texts["validation"]) == 8
    assert not set(texts["forget"]) & set(texts["validation"]), "held-out texts are never planted or unlearned"
    # A few retain texts cycled every epoch get memorized and the model drifts: the retain set must be large.
    assert len(texts["retain"]) == RETAIN_TEXTS >= 100


def test_demo_without_shared_data_generates_records(tmp_path):
    texts, source = demo_texts(tmp_path, 4, seed=1)
    assert "fictitious" in source and len(texts["forget"]) == 4 and len(texts["retain"]) == RETAIN_TEXTS
    assert texts["forget"][0].startswith("Patient record:") and fictitious_records(3, 1) == fictitious_records(3, 1)
    assert len(set(texts["forget"] + texts["validation"])) == 8
