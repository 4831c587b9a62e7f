"""Chat templates: question/answer items and conversations in the format an instruct model is served in.

``--template`` (``loku unlearn``, ``finetune``, ``eval --tofu-template``, ``reveal``) chooses how an item
with a prompt part and an answer part becomes tokens:

* ``chat`` (the default when the tokenizer has a chat template): ``tokenizer.apply_chat_template``. The
  trained (unlearned, scored) tokens are those the template renders for the last assistant turn: the
  conversation without it, rendered with ``add_generation_prompt=True``, must be a token prefix of the full
  rendering, and everything after that prefix is the answer (the reply, the template's end-of-turn token and
  whatever the template writes after it). A template that rewrites earlier turns once an answer follows, or
  drops the assistant turn, has no such prefix: one error naming the item and the fix.
* ``tofu`` (the default without a chat template): TOFU's hand-written strings, picked per model as
  :func:`choose_template` always did; ``chatml``, ``llama2``, ``phi``, ``generic`` pin one.
* ``none``: the prompt and the answer as given, concatenated (TRL's plain prompt/completion).

Conversations (``messages`` in a JSONL line, OpenAI/HF chat format) are kept as :class:`Conversation`; the
TOFU strings and ``none`` take only one user turn followed by one assistant turn.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

from .errors import ConfigError, DataError

__all__ = ["ChatTemplate", "Conversation", "FORMATS", "QATemplate", "TEMPLATES", "as_pair", "chat_template_of",
           "check_template", "choose_template", "has_chat_template", "qa_token_pair", "render", "template_names"]

#: The values of ``--template`` besides the TOFU template names (:data:`TEMPLATES`).
FORMATS = ("chat", "tofu", "none")

_FIX = "pass --template tofu (TOFU's strings) or --template none (prompt and answer as given)"


class Conversation(tuple):
    """A chat as ``((role, content), ...)``; the last turn is the assistant reply that is trained on.

    A tuple, so it hashes, compares and serialises (as JSON lists) like the question/answer pairs it
    travels with in :attr:`loku.data.TextSet.qa`.
    """

    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self]

    def text(self) -> str:
        """A readable rendering (overlap checks, messages): ``role: content`` lines."""
        return "\n".join(f"{role}: {content}" for role, content in self)


Item = Union[tuple[str, str], Conversation]  # (question, answer) or a conversation


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def as_pair(item: Item, template: str) -> tuple[str, str]:
    """``(prompt, answer)`` of a pair, or of a conversation of one user turn then one assistant turn: what a
    template without turns (TOFU's strings, ``none``) can format."""
    if not isinstance(item, Conversation):
        return item
    if [role for role, _ in item] != ["user", "assistant"]:
        raise DataError(f"a conversation with turns {', '.join(role for role, _ in item)} cannot be written with "
                        f"the {template!r} template (it takes one user turn then one assistant turn); pass "
                        "--template chat with a tokenizer that has a chat template")
    return item[0][1], item[1][1]


def render(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, generation_prompt: bool) -> str:
    """The chat template's text of ``messages`` (not tokenized: the caller tokenizes without adding special
    tokens, as ``apply_chat_template`` does, since the template writes its own BOS)."""
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja's TemplateError, or the template's own raise_exception(...)
        raise DataError(f"the tokenizer's chat template cannot render this conversation ({err}); fix the "
                        f"conversation or {_FIX}") from None


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's own chat template, as a :class:`QATemplate` is used: a token split of
    each item into prompt (masked) and answer (trained, scored), and the prompt that asks a question."""

    name: str = "chat"

    def token_pair(self, tokenizer: Any, item: Item) -> tuple[list[int], list[int]]:
        """``(prompt_ids, answer_ids)``: the rendering without the last (assistant) turn plus the generation
        prompt, and the rest of the full rendering. No EOS is appended: the template ends the turn itself."""
        from .lm import encode

        turns = item.messages() if isinstance(item, Conversation) else [
            {"role": "user", "content": item[0]}, {"role": "assistant", "content": item[1]}]
        if turns[-1]["role"] != "assistant":
            raise DataError(f"the conversation ends with a {turns[-1]['role']!r} turn; end it with the assistant "
                            "reply to unlearn")
        full = encode(tokenizer, render(tokenizer, turns, generation_prompt=False), special=False)
        prompt = encode(tokenizer, render(tokenizer, turns[:-1], generation_prompt=True), special=False)
        if full[:len(prompt)] != prompt or len(full) == len(prompt):
            raise DataError("the tokenizer's chat template does not render this conversation as its prompt (with "
                            "the generation prompt) followed by the assistant reply (it drops the assistant turn or "
                            f"rewrites earlier turns), so the reply's tokens cannot be told apart; {_FIX}")
        return prompt, full[len(prompt):]

    def prompt_ids(self, tokenizer: Any, question: str) -> list[int]:
        """The tokens that ask ``question``: one user turn and the generation prompt."""
        from .lm import encode

        return encode(tokenizer, render(tokenizer, [{"role": "user", "content": question}], generation_prompt=True),
                      special=False)


CHAT = ChatTemplate()


def template_names() -> tuple[str, ...]:
    """Every value ``--template`` takes: :data:`FORMATS` and the TOFU template names."""
    return (*FORMATS, *(n for n in TEMPLATES if n not in FORMATS))


def check_template(name: str | None) -> None:
    """Refuse an unknown ``--template`` before any model is loaded."""
    if name is not None and name not in template_names():
        raise ConfigError(f"--template must be one of {', '.join(template_names())}, got {name!r}")


def chat_template_of(tokenizer: Any) -> ChatTemplate:
    """:data:`CHAT`, or an error when the tokenizer has no chat template to apply."""
    if not has_chat_template(tokenizer):
        raise ConfigError("--template chat: the tokenizer has no chat template (tokenizer.chat_template is empty); "
                          f"{_FIX}")
    return CHAT


# --------------------------------------------------------------------------- TOFU's question/answer strings
# (locuslab/tofu's ``convert_raw_data_to_model_format``; docs/algorithms.md §7): scoring (loku.metrics.tofu)
# and training on QA data (loku.data) split the tokens the same way.


@dataclass(frozen=True)
class QATemplate:
    """How a question/answer pair becomes one text, with locuslab/tofu's three tags.

    As in TOFU's ``convert_raw_data_to_model_format``: the prompt is
    ``question_start + question + question_end``, the answer part ``answer_tag + answer``, the full
    text their concatenation with nothing in between. The prompt (its tokens including any BOS
    the tokenizer adds) is context; the answer part, then EOS, are the scored / trained tokens.
    """

    name: str
    question_start: str
    question_end: str
    answer_tag: str

    def format_prompt(self, question: str) -> str:
        return self.question_start + question + self.question_end

    def format_answer(self, answer: str) -> str:
        return self.answer_tag + answer

    def format_full(self, question: str, answer: str) -> str:
        return self.format_prompt(question) + self.format_answer(answer)

    def token_pair(self, tokenizer: Any, item: Any) -> tuple[list[int], list[int]]:
        """:func:`qa_token_pair` of a (question, answer) pair or a one-exchange :class:`loku.chat.Conversation`."""
        return _tofu_token_pair(tokenizer, self, *as_pair(item, self.name))

    def prompt_ids(self, tokenizer: Any, question: str) -> list[int]:
        """The prompt text encoded on its own, with special tokens (TOFU's ``run_generation``)."""
        from .lm import encode

        return encode(tokenizer, self.format_prompt(question), special=True)


TEMPLATES = {
    # locuslab/tofu config/model_config.yaml, llama2-7b: "[INST] {q} [/INST]{a}" (no space before the answer)
    "llama2": QATemplate("llama2", "[INST] ", " [/INST]", ""),
    # locuslab/tofu config/model_config.yaml, phi (also stablelm, pythia-1.4): "Question: {q}\nAnswer: {a}";
    # "Answer: " belongs to the answer part, so it is scored and trained as in TOFU
    "phi": QATemplate("phi", "Question: ", "\n", "Answer: "),
    # loku's own choice for chat models with ChatML (SmolLM2, Qwen): TOFU had no such model
    "chatml": QATemplate("chatml", "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", ""),
    # any other model: TOFU's tags for its non-Llama families (phi, stablelm, pythia)
    "generic": QATemplate("generic", "Question: ", "\n", "Answer: "),
    # --template none: question (prompt) and answer (completion) as given, concatenated
    "none": QATemplate("none", "", "", ""),
}


def choose_template(model: Any, tokenizer: Any, name: str | None = None) -> "QATemplate | ChatTemplate":
    """How question/answer items become tokens: ``--template`` ``name`` (:mod:`loku.chat`).

    ``None`` -> ``chat`` when the tokenizer has a chat template, else ``tofu``. ``chat`` -> the tokenizer's
    chat template (:class:`loku.chat.ChatTemplate`); a name in :data:`TEMPLATES` -> that one; ``tofu`` -> one of
    TOFU's strings by tokenizer chat template, then model type: ``<|im_start|>`` in the chat template (or
    vocabulary) -> chatml (SmolLM2, Qwen); ``[INST]`` -> llama2; model type ``phi`` -> phi; model type
    ``llama`` without a chat template -> llama2 (the TOFU Llama-2 fine-tunes); anything else -> generic
    (``Question: ...\\nAnswer: ...``).
    """
    check_template(name)
    if name is None:
        name = "chat" if has_chat_template(tokenizer) else "tofu"
    if name == "chat":
        return chat_template_of(tokenizer)
    if name != "tofu":
        return TEMPLATES[name]
    chat = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(chat, str):
        chat = json.dumps(chat)
    vocab = getattr(tokenizer, "get_vocab", lambda: {})()
    if "<|im_start|>" in chat or "<|im_start|>" in vocab:
        return TEMPLATES["chatml"]
    if "[INST]" in chat:
        return TEMPLATES["llama2"]
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type in ("phi", "phi3"):
        return TEMPLATES["phi"]
    if model_type == "llama" and not chat:
        return TEMPLATES["llama2"]
    return TEMPLATES["generic"]


def qa_token_pair(tokenizer: Any, template: "QATemplate | ChatTemplate", question: str,
                  answer: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)`` of a QA example in ``template`` (its ``token_pair``): for TOFU's strings
    :func:`_tofu_token_pair`, for the chat template :meth:`loku.chat.ChatTemplate.token_pair`."""
    return template.token_pair(tokenizer, (question, answer))


def _tofu_token_pair(tokenizer: Any, template: QATemplate, question: str, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)`` exactly as locuslab/tofu builds a QA example.

    The full text is tokenised once with the tokenizer's special tokens (BOS where it adds one);
    the first ``len(tokenize(prompt, add_special_tokens=True))`` tokens are the prompt, the rest
    the answer, followed by ``tokenizer.eos_token_id`` (TOFU labels that EOS too) when the
    tokenizer has one. Training on QA data (:func:`loku.data.tokenize_set`) and TOFU scoring both
    use this, so they see the same token sequence.
    """
    from .lm import encode

    n_prompt = len(encode(tokenizer, template.format_prompt(question), special=True))
    full = encode(tokenizer, template.format_full(question, answer), special=True)
    answer_ids = full[n_prompt:]
    if not answer_ids:
        raise DataError(f"answer {answer[:40]!r} to question {question[:40]!r} adds no tokens after the prompt; "
                        f"give a non-empty answer")
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        answer_ids = answer_ids + [eos]
    return full[:n_prompt], answer_ids
