"""Sets from the ``datasets`` library: a folder written by ``save_to_disk``, a parquet file, and
``hf:NAME[:CONFIG]:SPLIT[:COLUMN]`` (here NAME is a local data folder, which ``load_dataset`` reads
without the hub); the data files written by ``datasets`` itself in tmp_path. The unreachable hub is
checked in a subprocess with HF_HUB_OFFLINE=1 (no network needed), through the CLI: exit 2, one line,
before any model is loaded."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from loku import data
from loku.errors import DataError
from loku.metrics import tofu as T

datasets = pytest.importorskip("datasets")

ROWS = {"text": [" alpha beta gamma", "delta epsilon", "zeta eta theta"], "source": ["a", "b", "c"]}
SRC = Path(__file__).resolve().parents[1] / "src"


def test_saved_folder_and_parquet_read_like_jsonl(tmp_path):
    ds = datasets.Dataset.from_dict(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "forget.parquet"))
    datasets.Dataset.from_dict({"question": ["Who?"], "answer": ["Her."]}).save_to_disk(str(tmp_path / "qa"))
    saved = data.load_text_set(tmp_path / "saved", "forget")
    parquet = data.load_text_set(tmp_path / "forget.parquet", "forget")
    assert saved.texts == parquet.texts == ROWS["text"] and saved.qa is None  # verbatim, leading space kept
    qa = data.load_text_set(tmp_path / "qa", "forget")
    assert qa.qa == [("Who?", "Her.")] and qa.texts == ["Question: Who?\nAnswer: Her."]
    # digests: a parquet file's bytes; a saved folder's content (the same data saved again: the same digest)
    assert parquet.sha256 == data.source_sha256(tmp_path / "forget.parquet") and len(parquet.sha256) == 64
    ds.save_to_disk(str(tmp_path / "again"))
    assert data.load_text_set(tmp_path / "again", "forget").sha256 == saved.sha256
    datasets.Dataset.from_dict({"text": ["other"]}).save_to_disk(str(tmp_path / "other"))
    assert data.source_sha256(tmp_path / "other") != saved.sha256


def test_chat_datasets_read_like_jsonl(tmp_path):
    """prompt/completion and messages rows of a dataset become pairs / conversations, as in JSONL."""
    datasets.Dataset.from_dict({"prompt": ["Who?"], "completion": ["Her."]}).to_parquet(str(tmp_path / "pc.parquet"))
    chat = [[{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Her."}]]
    datasets.Dataset.from_dict({"messages": chat}).to_parquet(str(tmp_path / "chat.parquet"))
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "Who?"}, '
                                         '{"role": "assistant", "content": "Her."}]}\n')
    assert data.load_text_set(tmp_path / "pc.parquet", "forget").qa == [("Who?", "Her.")]
    from_parquet = data.load_text_set(tmp_path / "chat.parquet", "forget")
    from_jsonl = data.load_text_set(tmp_path / "chat.jsonl", "forget")
    assert from_parquet.qa == from_jsonl.qa and from_parquet.texts == from_jsonl.texts


def test_hub_syntax_with_config_split_and_column(tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    datasets.Dataset.from_dict(ROWS).to_parquet(str(folder / "train.parquet"))
    assert data.read_texts(f"hf:{folder}::train:source") == ["a", "b", "c"]
    assert data.read_texts(f"hf:{folder}::train[:2]") == ROWS["text"][:2]  # a slice's colon is not a field
    spec = data.HubSpec.parse("hf:locuslab/TOFU:forget10:train:question")
    assert (spec.name, spec.config, spec.split, spec.column) == ("locuslab/TOFU", "forget10", "train", "question")
    assert data.HubSpec.parse("hf:imdb:test") == data.HubSpec("imdb", None, "test", None)


def test_bad_dataset_inputs_say_what_to_do(tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    datasets.Dataset.from_dict(ROWS).to_parquet(str(folder / "train.parquet"))
    with pytest.raises(DataError, match=r"has no column 'body' \(columns: text, source\)"):
        data.read_texts(f"hf:{folder}::train:body", role="forget")
    datasets.Dataset.from_dict({"body": ["x"], "id": [1]}).to_parquet(str(tmp_path / "nobody.parquet"))
    with pytest.raises(DataError, match=r"nobody\.parquet: forget set has no 'text' column nor 'question' and "
                                        r"'answer', 'prompt' and 'completion' or 'messages' \(columns: body, id\)"):
        data.read_texts(tmp_path / "nobody.parquet", role="forget")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"holds several splits \(train\); pass one of them, e.g. .*dd/train"):
        data.read_texts(tmp_path / "dd")
    with pytest.raises(DataError, match=r"hf:imdb: not a hub dataset; write hf:NAME\[:CONFIG\]:SPLIT"):
        data.read_texts("hf:imdb")


def _cli(tmp_path, *argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(SRC),
           "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "loku.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


def test_unreachable_hub_dataset_fails_before_the_model_loads(tmp_path):
    (tmp_path / "val.txt").write_text("held out text\n")
    missing_model = str(tmp_path / "no-such-model")  # were the model loaded first, the error would name it
    run = _cli(tmp_path, "unlearn", "--model", missing_model, "--forget", "hf:locuslab/TOFU:forget10:train",
               "--validation", "val.txt", "--retain", "val.txt", "--out", "out")
    assert run.returncode == 2, run.stderr
    err = run.stderr.strip().splitlines()[-1]
    assert err.startswith("loku: error: hf:locuslab/TOFU:forget10:train: forget set cannot be loaded: the Hugging "
                          "Face hub cannot be reached"), err
    assert "save_to_disk" in err and "HF_HUB_OFFLINE=1" in err and "no-such-model" not in err
    run = _cli(tmp_path, "eval", "--model", missing_model, "--suite", "tdec", "--forget",
               "hf:locuslab/TOFU::train:question", "--out", "o")
    assert run.returncode == 2 and "the Hugging Face hub cannot be reached" in run.stderr, run.stderr
    assert "no-such-model" not in run.stderr


def test_tofu_loads_from_the_hub_when_the_data_folder_lacks_it(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda path, name, split: calls.append((path, name, split)) or [
        {"question": "q", "answer": "a"}]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert T.load_tofu("forget01", data_dir=tmp_path) == [{"question": "q", "answer": "a"}]
    assert calls == [("locuslab/TOFU", "forget01", "train")]
