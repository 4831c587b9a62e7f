"""The options of revealing (docs/algorithms.md §9), declared once: :class:`RevealSettings` holds them with
their help and range, `loku reveal` builds its flags from its fields, and `loku unlearn --reveal`'s
``--reveal-*`` options are the same fields (:func:`reveal_field`). No feature module is imported here
(loku.config reads it); the registries the names are checked against (selectors, rewards) live in
:mod:`loku.reveal`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["BUILTIN_TEMPLATES", "PROMPT_FORMATS", "RevealSettings", "reveal_field"]

BUILTIN_TEMPLATES = {
    "continue": "{fragment}",
    "recite": "Recite the text that begins with: {fragment}\n{fragment}",
    "complete": "Complete the following text exactly.\n{fragment}",
    "about": "Here is what is known about {description}:\n",
    "document": "{description}\n\n{fragment}",
}

PROMPT_FORMATS = ("chat", "none")  # how instructions reach the model (loku.chat: no TOFU strings here)


@dataclass
class RevealSettings:
    """How the model is asked (one round of revealing). ``cli: False``: set by code, not a flag."""

    budget: int = field(default=64, metadata={"help": "queries (one sampled generation each)", "range": ">= 1"})
    selector: str = field(default="neural-ucb", metadata={
        "help": "instruction selection (a loku.reveal.SELECTORS name: neural-ucb, ucb1 or random)"})
    templates: dict[str, str] = field(default_factory=lambda: dict(BUILTIN_TEMPLATES), metadata={"cli": False})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens a generation", "range": ">= 1"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature", "range": "> 0"})
    top_k: int = field(default=40, metadata={"help": "sample among this many most likely tokens", "range": ">= 1"})
    n: int = field(default=4, metadata={"help": "n of the n-gram rewards and novelty", "range": ">= 1",
                                        "flag": "--ngram"})
    # confidence leads: on the planted SmolLM2 memorized continuations score ~0.8 and sampled junk 0.1-0.2,
    # while the mean-hidden-state cosine is ~0.8 for both (hidden states are anisotropic) and overlap with
    # a fragment mostly rewards echoing it back
    weights: dict[str, float] = field(default_factory=lambda: {"overlap": 0.1, "confidence": 0.6, "similarity": 0.3},
                                      metadata={"cli": False})
    min_reward: float = field(default=0.05, metadata={"help": "generations below this reward are not collected",
                                                      "range": ">= 0"})
    exploration: float = field(default=1.0, metadata={"help": "UCB's nu (neural-ucb) or c (ucb1)", "range": ">= 0"})
    seed: int = field(default=0, metadata={"help": "seed of sampling and selection"})
    # "chat": each instruction a user turn of the chat template; "none": raw text (`loku reveal --template`)
    prompt_format: str = field(default="none", metadata={"cli": False})

    def prompt_ids(self, tokenizer: Any, instruction: str) -> list[int]:
        """The tokens the model is asked with: the instruction as a chat turn, or as raw text."""
        from .chat import chat_template_of
        from .lm import encode

        if self.prompt_format == "chat":
            return chat_template_of(tokenizer).prompt_ids(tokenizer, instruction)
        return encode(tokenizer, instruction, special=True)

    def validate(self, flags: str = "--") -> "RevealSettings":
        """The options together (the selector's and rewards' names: :func:`loku.reveal.checked_settings`);
        ``flags``: how the options are spelled where they came from (``--reveal-`` for `loku unlearn --reveal`)."""
        if self.budget < 1:
            raise ConfigError(f"{flags}budget must be at least 1 query, got {self.budget}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"--template must be {' or '.join(PROMPT_FORMATS)} (or NAME=TEXT, an instruction), "
                              f"got {self.prompt_format!r}")
        if self.max_new_tokens < self.n or self.temperature <= 0 or self.top_k < 1:
            raise ConfigError("max_new_tokens must be >= n, temperature > 0, top_k >= 1")
        return self


SHARED_WITH_UNLEARN = ("budget", "selector", "max_new_tokens")  # `loku unlearn --reveal-NAME`


def reveal_field(name: str) -> Any:
    """The :class:`RevealSettings` field ``name`` as an option of `loku unlearn --reveal` (``reveal_NAME``):
    the same default, help and range."""
    source = RevealSettings.__dataclass_fields__[name]
    return field(default=source.default, metadata={**source.metadata, "help": "--reveal: " + source.metadata["help"]})


def settings_from_unlearn(cfg: Any, **overrides: Any) -> RevealSettings:
    """The :class:`RevealSettings` of `loku unlearn --reveal` options ``cfg`` (its ``reveal_*`` fields)."""
    return RevealSettings(**{name: getattr(cfg, f"reveal_{name}") for name in SHARED_WITH_UNLEARN}, **overrides)

