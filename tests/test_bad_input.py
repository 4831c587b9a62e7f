"""Bad input, as a user sees it (issue "Robustness at scale", item 3).

Every case goes through the real entry point ``loku.cli.main`` (exit code 2, one line
``loku: error: ...`` on stderr) with the tiny memorized model of conftest as the valid baseline and
exactly one thing broken. Each message must name the file (and the line for text files) and say
what to do; cases that can be refused before heavy work are checked with guards that fail the
test if a model is loaded, the "before" evaluation starts, or training starts.

Set ``LOKU_BAD_INPUT_TABLE=/path/table.md`` to write a Markdown table of every case and the exact
message it got (recorded while the tests run).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

import loku.adapters
import loku.fisher
import loku.losses
import loku.measure
import loku.trainer
from loku.checkpoint import checkpoint_dir
from loku.cli import main
from tiny_models import WORDS

PREFIX = "loku: error: "
_RECORDED: list[tuple[str, int, str]] = []  # (case, exit code, message) in the order the cases ran


@pytest.fixture(scope="module", autouse=True)
def _message_table():
    yield
    target = os.environ.get("LOKU_BAD_INPUT_TABLE")
    if not target or not _RECORDED:
        return
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["# loku: bad input -> message", "",
             "Recorded by `LOKU_BAD_INPUT_TABLE=... pytest tests/test_bad_input.py` (the `loku: error: ` prefix of "
             "stderr removed; exit 0 rows are the cases that must run; the --truncate row shows its warning).", "",
             "| # | case | exit | message |", "|---:|---|---:|---|"]
    code_span = lambda s: f"`` {s} ``" if "`" in s else f"`{s}`"  # noqa: E731
    lines += [f"| {i} | {esc(case)} | {code} | {code_span(esc(msg))} |"
              for i, (case, code, msg) in enumerate(_RECORDED, 1)]
    Path(target).write_text("\n".join(lines) + "\n")


@pytest.fixture
def record(request):
    def _record(message: str, code: int = 2) -> None:
        _RECORDED.append((request.node.name.removeprefix("test_"), code, message))
    return _record


# ----------------------------------------------------------------------------- helpers

def argv(root: Path, out: Path, **options) -> list[str]:
    """`loku unlearn` on the memorized baseline; options override it (None drops one, True is a flag)."""
    opts: dict = {"model": root / "base", "forget": root / "forget.txt", "retain": root / "retain.txt",
                  "validation": root / "validation.txt", "method": "fila-ihl", "rank": 4, "lora_alpha": 8,
                  "lr": 1e-2, "batch_size": 4, "max_epochs": 2, "out": out}
    opts.update(options)
    args = ["unlearn", "--no-progress"]
    for name, value in opts.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None:
            args += [flag, str(value)]
    return args


def quick(root: Path, out: Path, **options) -> list[str]:
    """A run that proceeds: thresholds any model meets, so it stops after one epoch."""
    return argv(root, out, validation=None, ma_threshold=1.0, el_threshold=1.0, max_epochs=1, **options)


def refused(capsys, args: list[str], record, *parts: str) -> str:
    """Run the CLI; it must exit 2 with exactly one `loku: error:` line containing every part."""
    code = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(PREFIX), f"not one clear line:\n{err}"
    message = lines[0][len(PREFIX):]
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    record(message)
    return message


def _boom(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} before the bad input was refused")
    return fail


@pytest.fixture
def before_model(monkeypatch):
    """The input must be refused before any model is loaded."""
    monkeypatch.setattr(loku.trainer, "load_model", _boom("a model was loaded"))


@pytest.fixture
def before_eval(monkeypatch):
    """The input must be refused before the "before" evaluation (the first slow step)."""
    monkeypatch.setattr(loku.measure, "evaluate_state", _boom("the model was evaluated"))


@pytest.fixture
def before_training(monkeypatch):
    monkeypatch.setattr(loku.losses, "unlearning_loss", _boom("training started"))


def words(n: int, start: int = 3) -> str:
    """A text of n tokens of the tiny word tokenizer."""
    return " ".join(WORDS[3 + (start + i) % (len(WORDS) - 3)] for i in range(n))


def model_copy(root: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(root / "base", folder)
    return folder


# ----------------------------------------------------------------------------- data files

def test_missing_file(memorized, tmp_path, capsys, record, before_model):
    refused(capsys, argv(memorized, tmp_path / "run", forget=tmp_path / "nope.txt"), record,
            f"{tmp_path / 'nope.txt'}: forget set file not found", "check the path")


def test_empty_file(memorized, tmp_path, capsys, record, before_model):
    (tmp_path / "empty.txt").write_text("\n  \n")
    refused(capsys, argv(memorized, tmp_path / "run", forget=tmp_path / "empty.txt"), record,
            "empty.txt: forget set file is empty", "one text per line")


def test_unreadable_file(memorized, tmp_path, capsys, record, before_model, monkeypatch):
    # chmod 000 does not stop root, so the OS refusal is simulated: works for every user.
    locked = tmp_path / "locked.txt"
    shutil.copy(memorized / "retain.txt", locked)
    real = Path.read_bytes

    def read_bytes(self):
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    refused(capsys, argv(memorized, tmp_path / "run", retain=locked), record,
            f"{locked}: retain set cannot be read (permission denied)", "chmod u+r")


def test_directory_passed_as_file(memorized, tmp_path, capsys, record, before_model):
    refused(capsys, argv(memorized, tmp_path / "run", validation=tmp_path), record,
            f"{tmp_path}: validation set is a directory", "pass the path of the data file")


def test_csv_without_text_column(memorized, tmp_path, capsys, record, before_model):
    (tmp_path / "retain.csv").write_text("id,body\n1,w5 w6 w7\n")
    refused(capsys, argv(memorized, tmp_path / "run", retain=tmp_path / "retain.csv"), record,
            "retain.csv: retain set has no 'text' column (columns found: 'id', 'body')", "rename the column")


def test_csv_unclosed_quote(memorized, tmp_path, capsys, record, before_model):
    (tmp_path / "forget.csv").write_text('id,text\n1,w5 w6 w7\n2,"w8 w9\n3,w10 w11\n')
    refused(capsys, argv(memorized, tmp_path / "run", forget=tmp_path / "forget.csv"), record,
            "forget.csv: forget set is not a valid CSV in the record starting at line 3", "check the quotes")


def test_jsonl_bad_line(memorized, tmp_path, capsys, record, before_model):
    (tmp_path / "forget.jsonl").write_text('{"text": "w5 w6 w7"}\n\n{"text": "w8 w9\n{"text": "w10 w11"}\n')
    refused(capsys, argv(memorized, tmp_path / "run", forget=tmp_path / "forget.jsonl"), record,
            "forget.jsonl: forget set line 3 is not valid JSON", "one complete JSON object per line")


def test_non_utf8_bytes(memorized, tmp_path, capsys, record, before_model):
    (tmp_path / "validation.txt").write_bytes(b"w5 w6 w7\nw8 \xe9 w9\n")
    refused(capsys, argv(memorized, tmp_path / "run", validation=tmp_path / "validation.txt"), record,
            "validation.txt: validation set is not valid UTF-8", "line 2", "re-encode the file as UTF-8")


@pytest.mark.parametrize("name, content, where", [
    ("forget.csv", 'id,text\n1,w5 w6 w7\n2,"   "\n', "row 2 (line 3)"),
    ("forget.jsonl", '{"text": "w5 w6 w7"}\n{"text": " \\t "}\n', "line 2"),
    ("forget.json", '["w5 w6 w7", ""]', "item 2"),
], ids=["csv", "jsonl", "json"])
def test_empty_text(memorized, tmp_path, capsys, record, before_model, name, content, where):
    (tmp_path / name).write_text(content)
    refused(capsys, argv(memorized, tmp_path / "run", forget=tmp_path / name), record,
            f"{name}: forget set {where} has an empty or whitespace-only text", "remove it")


def test_forget_entirely_in_retain(memorized, tmp_path, capsys, record, before_model):
    retain = tmp_path / "retain.txt"
    retain.write_text((memorized / "retain.txt").read_text() + (memorized / "forget.txt").read_text())
    refused(capsys, argv(memorized, tmp_path / "run", retain=retain), record,
            f"{memorized / 'forget.txt'}: every forget text (4 of 4) also appears in the retain set {retain}",
            "use a retain set without them")


def test_no_validation_and_no_thresholds(memorized, tmp_path, capsys, record, before_model):
    refused(capsys, argv(memorized, tmp_path / "run", validation=None, ma_threshold=0.5), record,
            "pass --validation FILE", "both --ma-threshold and --el-threshold")


# ----------------------------------------------------------------------------- tokenization

def _long_forget(memorized, tmp_path) -> Path:
    """Three texts, a blank line, then one of 100 tokens (the tiny model's context is 64): row 4 is line 5."""
    texts = (memorized / "forget.txt").read_text().splitlines()[:3]
    path = tmp_path / "forget-long.txt"
    path.write_text("\n".join([*texts[:2], "", texts[2], words(100)]) + "\n")
    return path


def test_longer_than_context_is_refused(memorized, tmp_path, capsys, record, before_eval):
    refused(capsys, argv(memorized, tmp_path / "run", forget=_long_forget(memorized, tmp_path)), record,
            "forget-long.txt: row 4 (line 5) is 100 tokens long, more than the model's context of 64",
            "shorten or split it", "--truncate")


def test_longer_than_context_with_truncate_warns_and_runs(memorized, tmp_path, capsys, record):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"forget-long\.txt: 1 of 4 texts were longer than 64 tokens") as got:
        code = main(quick(memorized, out, forget=_long_forget(memorized, tmp_path), truncate=True))
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["forget"]["sequences"] == 4
    record(next(str(w.message) for w in got if "truncated" in str(w.message)), code)


def test_max_length_set_lower_than_text(memorized, tmp_path, capsys, record, before_eval):
    refused(capsys, argv(memorized, tmp_path / "run", max_length=20), record,
            "forget.txt: row 1 (line 1) is 24 tokens long, more than max length 20",
            "raise --max-length to at least 24", "--truncate")


def test_text_of_one_token(memorized, tmp_path, capsys, record, before_eval):
    path = tmp_path / "forget.txt"
    path.write_text("w5 w6 w7\nw8\n")
    refused(capsys, argv(memorized, tmp_path / "run", forget=path), record,
            "forget.txt: row 2 (line 2) ('w8') tokenizes to 1 token", "remove or lengthen it")


# ----------------------------------------------------------------------------- models and tokenizers

def _save_tokenizer(folder: Path, **special) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(folder)


def test_tokenizer_without_pad_token_pads_with_eos(memorized, tmp_path, capsys, record):
    folder = model_copy(memorized, tmp_path)
    _save_tokenizer(folder, bos_token="<bos>", eos_token="<eos>")
    out = tmp_path / "run"
    code = main(quick(memorized, out, model=folder))
    assert code == 0, capsys.readouterr().err
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    assert AutoTokenizer.from_pretrained(out / "model").pad_token == "<eos>"
    record("(runs: pads with the EOS token '<eos>')", code)


def test_tokenizer_without_pad_or_eos(memorized, tmp_path, capsys, record, before_eval):
    folder = model_copy(memorized, tmp_path)
    _save_tokenizer(folder, bos_token="<bos>")
    refused(capsys, argv(memorized, tmp_path / "run", model=folder), record,
            f"{folder}: tokenizer has neither a pad token nor an EOS token", "tokenizer_config.json")


def test_missing_model_folder(memorized, tmp_path, capsys, record, before_eval):
    refused(capsys, argv(memorized, tmp_path / "run", model=tmp_path / "no-such-model"), record,
            f"{tmp_path / 'no-such-model'}: model folder not found", "check the path")


def test_model_folder_without_config(memorized, tmp_path, capsys, record, before_eval):
    (tmp_path / "weights").mkdir()
    refused(capsys, argv(memorized, tmp_path / "run", model=tmp_path / "weights"), record,
            f"{tmp_path / 'weights'}: not a model folder (no config.json)", "give a Hugging Face model folder")


def test_custom_code_refused_without_trust_remote_code(memorized, tmp_path, capsys, record, before_eval):
    folder = model_copy(memorized, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    refused(capsys, argv(memorized, tmp_path / "run", model=folder), record,
            f"{folder / 'config.json'}: the model names custom code", "--trust-remote-code")


# ----------------------------------------------------------------------------- options

def test_unknown_method(memorized, tmp_path, capsys, record, before_model):
    refused(capsys, argv(memorized, tmp_path / "run", method="magic"), record,
            "unknown method 'magic'", "choose one of: fila-gd, fila-ihl", "full-ga")


def test_unknown_target(memorized, tmp_path, capsys, record, before_eval):
    message = refused(capsys, argv(memorized, tmp_path / "run", targets="q_proj,qkv_proj"), record,
                      "target(s) qkv_proj match no linear layer", "--targets")
    for layer in ("model.layers.N.self_attn.q_proj", "model.layers.N.self_attn.v_proj", "model.layers.N.mlp.down_proj"):
        assert layer in message
    assert str(memorized / "base") in message


@pytest.mark.parametrize("targets", ["", " , "])
def test_empty_targets(memorized, tmp_path, capsys, record, before_model, targets):
    """--targets "" used to reach PEFT after the model was loaded (exit 1, PEFT's message): bad input, exit 2."""
    refused(capsys, argv(memorized, tmp_path / "run", targets=targets), record,
            "--targets", "names no layer", "qv-ffn", "q_proj,v_proj")


def test_rank_larger_than_a_layer(memorized, tmp_path, capsys, record, before_eval):
    # qv-ffn on the tiny Llama: v_proj is 16 x 32, the smallest target, so 16 is the largest rank.
    refused(capsys, argv(memorized, tmp_path / "run", rank=1000), record,
            "--rank 1000 is larger than", "v_proj", "use --rank 16 or less")


def test_output_folder_exists(memorized, tmp_path, capsys, record, before_model):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("{}")
    refused(capsys, argv(memorized, out), record, f"{out}: output folder exists and is not empty", "--overwrite")


def test_output_folder_exists_with_overwrite(memorized, tmp_path, capsys, record):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("from an earlier run")
    code = main(quick(memorized, out, overwrite=True))
    assert code == 0, capsys.readouterr().err
    assert (out / "report.json").is_file() and not (out / "old.txt").exists()
    assert not list(tmp_path.glob(".run*"))
    record("(runs: the old folder is replaced)", code)


def test_yaml_invalid(memorized, tmp_path, capsys, record, before_model):
    path = tmp_path / "c.yaml"
    path.write_text(f"method: fila-ihl\nrank: 4\nforget: [{memorized / 'forget.txt'}\nout: x\n")
    refused(capsys, ["unlearn", "--config", str(path)], record, f"{path}: line 4 invalid YAML",
            "flow sequence on line 3", "fix the syntax")


def test_yaml_unknown_option(memorized, tmp_path, capsys, record, before_model):
    path = tmp_path / "c.yaml"
    path.write_text("method: fila-ihl\nranks: 4\n")
    refused(capsys, argv(memorized, tmp_path / "run", config=path), record,
            f"{path}: unknown option(s) ranks", "did you mean rank?")


def test_yaml_config_missing(memorized, tmp_path, capsys, record, before_model):
    path = tmp_path / "missing.yaml"
    refused(capsys, argv(memorized, tmp_path / "run", config=path), record,
            f"{path}: config file not found", "check the --config path")


def test_resume_without_checkpoint(memorized, tmp_path, capsys, record, before_model):
    out = tmp_path / "never-ran"
    refused(capsys, ["unlearn", "--resume", str(out), "--no-progress"], record,
            f"{checkpoint_dir(out)}", "no checkpoint to resume from", "run without --resume")


# ----------------------------------------------------------------------------- during the run

@pytest.mark.parametrize("bad_call, last_good", [(2, "the last good state is the checkpoint of epoch 1 in"),
                                                  (1, "no epoch had finished")], ids=["epoch2", "epoch1"])
def test_nan_loss_stops_and_keeps_last_good_epoch(memorized, tmp_path, capsys, record, monkeypatch,
                                                  bad_call, last_good):
    real = loku.losses.unlearning_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan"), parts) if calls["n"] == bad_call else (loss, parts)

    monkeypatch.setattr(loku.losses, "unlearning_loss", poisoned)
    out = tmp_path / "run"
    # 4 forget texts, batch 4: one step per epoch, so call 2 is epoch 2; thresholds 0 are never met.
    args = argv(memorized, out, validation=None, ma_threshold=0.0, el_threshold=0.0, max_epochs=3)
    refused(capsys, args, record, f"non-finite loss at epoch {bad_call}, step 1", last_good, "lower --lr")
    assert not out.exists()
    ckpt = checkpoint_dir(out)
    if bad_call == 2:
        assert str(ckpt) in _RECORDED[-1][2]
        assert [e["epoch"] for e in json.loads((ckpt / "state.json").read_text())["epochs"]] == [1]
    else:
        assert not ckpt.exists()


def test_nan_in_fisher_names_the_layer(memorized, tmp_path, capsys, record, monkeypatch, before_training):
    real = loku.fisher._forward_loss
    monkeypatch.setattr(loku.fisher, "_forward_loss", lambda model, batch: real(model, batch) * float("nan"))
    refused(capsys, argv(memorized, tmp_path / "run"), record,
            "the Fisher of model.layers.0.self_attn.q_proj (Fisher (forget)) is not finite", "--dtype float32")
    assert not (tmp_path / "run").exists()


def test_disk_full_while_saving_leaves_nothing_half_written(memorized, tmp_path, capsys, record, monkeypatch):
    def full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 64)  # the part that fitted
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(loku.adapters, "save_file", full)  # the adapter's weights
    out = tmp_path / "run"
    refused(capsys, quick(memorized, out), record, f"{out}: disk full while writing adapter_model.safetensors",
            "nothing half-written was kept", f"--resume {out}")
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    assert (checkpoint_dir(out) / "state.json").is_file()
    # Once there is space again, --resume writes the output without training again.
    monkeypatch.undo()
    assert main(["unlearn", "--resume", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    assert (out / "report.json").is_file() and not checkpoint_dir(out).exists()


# ----------------------------------------------------------------------------- an output that would destroy an input

def _intact(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_out_is_the_model_folder_with_overwrite(memorized, tmp_path, capsys, record, before_model):
    folder = model_copy(memorized, tmp_path)
    refused(capsys, argv(memorized, folder, model=folder, overwrite=True), record,
            f"--out {folder}: --out is the model folder {folder} (--model), which --overwrite would delete",
            "choose an --out folder apart from the model and the data")
    assert _intact(folder)


def test_out_contains_the_model_folder(memorized, tmp_path, capsys, record, before_model):
    runs = tmp_path / "runs"
    runs.mkdir()
    folder = model_copy(memorized, runs)
    refused(capsys, argv(memorized, runs, model=folder, overwrite=True), record,
            f"--out {runs}: --out contains the model folder {folder} (--model)", "--overwrite would delete")
    assert _intact(folder)


def test_out_inside_the_model_folder(memorized, tmp_path, capsys, record, before_model):
    folder = model_copy(memorized, tmp_path)
    refused(capsys, argv(memorized, folder / "unlearned", model=folder), record,
            f"--out {folder / 'unlearned'} lies inside the model folder {folder} (--model)",
            "written into the model", "choose an --out folder apart")
    assert not (folder / "unlearned").exists()


def test_out_is_the_data_folder_with_overwrite(memorized, tmp_path, capsys, record, before_model):
    data = tmp_path / "data"
    shutil.copytree(memorized, data, ignore=shutil.ignore_patterns("base"))
    refused(capsys, argv(memorized, data, forget=data / "forget.txt", overwrite=True), record,
            f"--out {data}: --out contains the data file {data / 'forget.txt'} (--forget), which --overwrite would "
            "delete", "choose an --out folder apart")
    assert (data / "forget.txt").is_file()


def test_out_checkpoint_folder_holds_a_data_file(memorized, tmp_path, capsys, record, before_model):
    # --overwrite removes OUT.ckpt (a stale checkpoint) as well as OUT.
    ckpt = tmp_path / "run.ckpt"
    ckpt.mkdir()
    shutil.copy(memorized / "validation.txt", ckpt / "validation.txt")
    refused(capsys, argv(memorized, tmp_path / "run", validation=ckpt / "validation.txt", overwrite=True), record,
            f"its checkpoint folder contains the data file {ckpt / 'validation.txt'} (--validation)")
    assert (ckpt / "validation.txt").is_file()


# ----------------------------------------------------------------------------- numbers out of range

@pytest.mark.parametrize("option, value, expected", [
    ("fisher_eps", -0.001, "--fisher-eps must be > 0, got -0.001"),
    ("lora_alpha", 0, "--lora-alpha must be > 0, got 0.0"),
    ("gamma", -1, "--gamma must be >= 0, got -1.0"),
    ("alpha", -0.5, "--alpha must be >= 0, got -0.5"),
    ("npo_beta", 0, "--npo-beta must be > 0, got 0.0"),
    ("weight_decay", -0.01, "--weight-decay must be >= 0, got -0.01"),
    ("max_length", 1, "--max-length must be >= 2, got 1"),
    ("ma_threshold", 1.5, "--ma-threshold must lie in [0, 1], got 1.5"),
    ("el_threshold", -0.1, "--el-threshold must lie in [0, 1], got -0.1"),
    ("eval_limit", 0, "--eval-limit must be >= 1, got 0"),
    ("fisher_batches", 0, "--fisher-batches must be >= 1, got 0"),
    ("seed", -1, "--seed must lie in [0, 4294967295], got -1"),
    ("lr", "nan", "--lr must be a finite number, got nan"),
], ids=lambda v: str(v) if isinstance(v, str) and not v.startswith("-") else None)
def test_number_out_of_range(memorized, tmp_path, capsys, record, before_model, option, value, expected):
    refused(capsys, argv(memorized, tmp_path / "run", **{option: value}), record, expected)


@pytest.mark.parametrize("flag, value, expected", [
    ("--rank", "four", "argument --rank: invalid int value: 'four'"),
    ("--fisher-eps", "-1e-5", "written --flag=VALUE"),
], ids=["not-a-number", "negative-exponent"])
def test_flag_that_does_not_parse(memorized, tmp_path, capsys, record, before_model, flag, value, expected):
    with pytest.raises(SystemExit) as exited:
        main([*argv(memorized, tmp_path / "run"), flag, value])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith(PREFIX), err
    assert expected in lines[0] and "see `loku unlearn --help`" in lines[0]
    record(lines[0][len(PREFIX):])


def test_yaml_number_of_the_wrong_kind(memorized, tmp_path, capsys, record, before_model):
    path = tmp_path / "c.yaml"
    path.write_text("el_n: ten\n")
    refused(capsys, argv(memorized, tmp_path / "run", config=path), record, "--el-n must be an integer, got 'ten'")
    path.write_text("fisher_eps: tiny\n")
    refused(capsys, argv(memorized, tmp_path / "run", config=path), record, "--fisher-eps must be a number, got 'tiny'")


def test_yaml_exponent_without_a_dot_is_a_number(memorized, tmp_path):
    from loku.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nfisher_eps: 1e-6\n")  # PyYAML reads both as strings
    cfg = load_config(path, {"forget": str(memorized / "forget.txt"), "retain": str(memorized / "retain.txt"),
                             "out": str(tmp_path / "run")}).validate()
    assert cfg.lr == 1e-3 and cfg.fisher_eps == 1e-6


def test_eval_number_out_of_range(tmp_path, capsys, record, monkeypatch):
    import loku.models

    monkeypatch.setattr(loku.models, "load_model", _boom("a model was loaded"))
    refused(capsys, ["eval", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--suite", "tdec",
                     "--ma-threshold", "1.5", "--el-threshold", "0.05"], record,
            "--ma-threshold must lie in [0, 1], got 1.5")


# ----------------------------------------------------------------------------- inputs against each other

def test_validation_is_the_forget_file(memorized, tmp_path, capsys, record, before_model):
    refused(capsys, argv(memorized, tmp_path / "run", validation=memorized / "forget.txt"), record,
            f"--validation {memorized / 'forget.txt'} is the forget set", "held-out texts")


def test_validation_has_the_forget_texts(memorized, tmp_path, capsys, record, before_eval):
    copy = tmp_path / "held_out.txt"
    copy.write_text("\n".join("  " + t for t in (memorized / "forget.txt").read_text().splitlines()) + "\n")
    refused(capsys, argv(memorized, tmp_path / "run", validation=copy), record,
            f"{copy}: every validation text (4 of 4) is also in the forget set", "held-out texts")


def test_validation_partly_forget_texts_warns_and_runs(memorized, tmp_path, capsys, record):
    mixed = tmp_path / "validation.txt"
    forget = (memorized / "forget.txt").read_text().splitlines()
    held = (memorized / "validation.txt").read_text().splitlines()
    mixed.write_text("\n".join(held[:3] + forget[:1]) + "\n")
    with pytest.warns(UserWarning, match=r"validation\.txt: 1 of 4 validation texts are also in the forget set") as got:
        code = main(argv(memorized, tmp_path / "run", validation=mixed, ma_threshold=1.0, el_threshold=1.0,
                         max_epochs=1))
    assert code == 0, capsys.readouterr().err
    record(next(str(w.message) for w in got if "validation texts" in str(w.message)), code)


def test_max_length_above_the_context(memorized, tmp_path, capsys, record, before_eval):
    refused(capsys, argv(memorized, tmp_path / "run", max_length=100), record,
            "--max-length 100 is more than the context of the model", "(64 tokens)", "use --max-length 64 or less")


# ----------------------------------------------------------------------------- damaged weights

@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_file(memorized, tmp_path, capsys, record, before_eval, damage):
    folder = model_copy(memorized, tmp_path)
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else os.urandom(4096))
    refused(capsys, argv(memorized, tmp_path / "run", model=folder), record,
            f"{weights}: the weights file is damaged or incomplete", "copy or download the model again")


@pytest.mark.parametrize("change, expected", [
    ({"hidden_size": 64, "intermediate_size": 128}, "weight(s) do not have the shapes"),
    ({"num_hidden_layers": 3}, "weight(s) of the model"),
], ids=["shapes", "missing"])
def test_weights_that_do_not_match_the_config(memorized, tmp_path, capsys, record, before_eval, change, expected):
    folder = model_copy(memorized, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    refused(capsys, argv(memorized, tmp_path / "run", model=folder), record,
            f"{folder / 'model.safetensors'}: ", expected, f"{folder / 'config.json'}",
            "come from different models", "restore its own config.json")


# ----------------------------------------------------------------------------- whatever else reaches the CLI

def _raise_in_run(monkeypatch, exc: BaseException) -> None:
    def fail(*args, **kwargs):
        raise exc
    monkeypatch.setattr(loku.measure, "evaluate_state", fail)


def _one_line(capsys, code: int, expected_code: int, *parts: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith("loku: "), f"not one clear line:\n{err}"
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0].removeprefix("loku: ")


@pytest.mark.parametrize("exc, code, parts", [
    (ValueError("unexpected value\nsecond line of detail"), 1,
     ("error: ValueError: unexpected value second line of detail", "run again with --debug")),
    (RuntimeError("expected scalar type Float but found BFloat16"), 1,
     ("error: RuntimeError: expected scalar type Float", "--dtype float32", "--debug")),
    (MemoryError(), 1, ("error: out of memory", "lower --batch-size")),
    (PermissionError(errno.EACCES, "Permission denied", "/some/file"), 2,
     ("error: /some/file: Permission denied", "check the permissions")),
    (KeyboardInterrupt(), 130, ("interrupted", "--resume")),
], ids=["ValueError", "RuntimeError", "MemoryError", "PermissionError", "KeyboardInterrupt"])
def test_unexpected_error_is_one_line(memorized, tmp_path, capsys, record, monkeypatch, exc, code, parts):
    _raise_in_run(monkeypatch, exc)
    out = tmp_path / "run"
    record(_one_line(capsys, main(argv(memorized, out)), code, *parts), code)
    assert not out.exists()


def test_debug_shows_the_traceback(memorized, tmp_path, capsys, record, monkeypatch):
    from loku.errors import ConfigError

    _raise_in_run(monkeypatch, ValueError("unexpected value"))
    with pytest.raises(ValueError, match="unexpected value"):
        main(argv(memorized, tmp_path / "run", debug=True))
    with pytest.raises(ConfigError, match="--fisher-eps must be > 0"):  # a loku error too
        main(argv(memorized, tmp_path / "run", fisher_eps=-1, debug=True))
    record("(--debug: the exception propagates with its traceback)", 1)


def test_eval_unexpected_error_is_one_line(tmp_path, capsys, record, monkeypatch):
    import loku.models

    def fail(*args, **kwargs):
        raise RuntimeError("weights on the meta device")

    monkeypatch.setattr(loku.models, "load_model", fail)
    args = ["eval", "--model", "m", "--out", str(tmp_path / "o"), "--suite", "dialogue", "--data-dir", str(tmp_path)]
    record(_one_line(capsys, main(args), 1, "error: RuntimeError: weights on the meta device", "--debug"), 1)
    with pytest.raises(RuntimeError):
        main([*args, "--debug"])


# ----------------------------------------------------------------------------- stop rule and never-seen terms (§12)

@pytest.mark.parametrize("options, expected", [
    ({"method": "fila-ihl-margin", "ihl_margin": 1.0}, "--ihl-margin must lie in (0, 1), got 1.0"),
    ({"method": "fila-ihl-margin", "ihl_margin": 0}, "--ihl-margin must lie in (0, 1), got 0.0"),
    ({"method": "fila-undial", "undial_beta": 0}, "--undial-beta must be > 0, got 0.0"),
    ({"method": "fila-undial", "undial_beta": -3}, "--undial-beta must be > 0, got -3.0"),
    ({"stop_rule": "two-sided", "stop_interval": 1}, "--stop-interval must lie in (0, 1), got 1.0"),
    ({"stop_rule": "two-sided", "check_every": 0}, "--check-every must be >= 1, got 0"),
    ({"stop_rule": "early"}, "--stop-rule must be one of paper, two-sided, got 'early'"),
    ({"check_every": 4}, "--check-every checks the stop rule between epochs' ends, which --stop-rule paper does not"),
    ({"stop_rule": "two-sided", "validation": None, "ma_threshold": 0.5, "el_threshold": 0.5},
     "--stop-rule two-sided stops at the level of held-out text"),  # and names --validation FILE
], ids=["margin-1", "margin-0", "beta-0", "beta-negative", "interval-1", "check-every-0", "unknown-rule",
        "check-every-with-paper-rule", "two-sided-without-validation"])
def test_stop_rule_and_forget_term_options(memorized, tmp_path, capsys, record, before_model, options, expected):
    refused(capsys, argv(memorized, tmp_path / "run", **options), record, expected)
