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
  :func:`loku.metrics.tofu.choose_template` always did; ``chatml``, ``llama2``, ``phi``, ``generic`` pin one.
* ``none``: the prompt and the answer as given, concatenated (TRL's plain prompt/completion).

Conversations (``messages`` in a JSONL line, OpenAI/HF chat format) are kept as :class:`Conversation`; the
TOFU strings and ``none`` take only one user turn followed by one assistant turn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

from .errors import ConfigError, DataError

__all__ = ["ChatTemplate", "Conversation", "FORMATS", "as_pair", "chat_template_of", "check_template",
           "has_chat_template", "render", "template_names"]

#: The values of ``--template`` besides the TOFU template names (:data:`loku.metrics.tofu.TEMPLATES`).
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
    """The tokenizer's own chat template, as a :class:`loku.metrics.tofu.QATemplate` is used: a token split of
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
    from .metrics.tofu import TEMPLATES

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
