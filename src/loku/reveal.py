"""`loku reveal`: a forget set the model generates itself (docs/algorithms.md §9, Reveal-and-Release).

A deletion request rarely comes with the exact memorized text: the requester has a description and
maybe fragments. Here the model is asked, with instructions filled from the request, to reveal what it
knows; what it reveals becomes the forget set.

* **Arms**: every (template, fragment) pair: built-in templates (continue a fragment, recite the text
  that starts with it, complete it, tell what is known about the description, ...) filled from the
  request, plus the user's own templates (``{fragment}`` and ``{description}`` are filled).
* **A query** samples one continuation of the arm's prompt (temperature sampling, seeded), so pulling
  an arm again can reveal something else.
* **Reward** (registry :data:`REWARDS`, the weights are options): ``overlap`` (share of the
  generation's n-grams found in the request's fragments or description), ``confidence`` (exp of minus
  the model's mean NLL of its own generation: memorized text comes out confidently), ``similarity``
  (cosine of the mean last hidden states of generation and request), all measurable without the hidden
  text; the weighted sum is multiplied by ``novelty`` (share of the generation's n-grams neither in the
  request nor collected yet), so echoing the request or repeating what is already there earns nothing.
* **Selection** (registry :data:`SELECTORS`): ``neural-ucb`` (Zhou et al. 2020: a one-hidden-layer
  network on the arm's features predicts the reward; UCB bonus nu sqrt(g^T Z^-1 g / m) with g the
  network's gradient and Z = lambda I + sum g g^T / m kept diagonal, as the paper's experiments do),
  ``ucb1`` and ``random`` to compare. Arm features (the context of each query): the template
  (one-hot), the normalised mean hidden state of the filled prompt, and two *freshness* values: the
  novelty, against what is known by now, of the latest generation of the arm itself and of any arm with
  the same fragment (1 before the first). The reward's novelty makes the bandit non-stationary: an arm
  whose text has been revealed earns nothing more, and without a feature saying so the network keeps
  predicting its old reward and re-pulls it (the first bench run: NeuralUCB below random). The arm's own
  value keeps a fragment open to other templates when one template only echoed it. Freshness is known
  before the query, so it is a context in NeuralUCB's sense (x_{t,a} may change with t).

Instruct models are asked as they are served (``chat``, the command's default when the tokenizer has a
chat template): each filled instruction is one user turn of the chat template, generation prompt added,
and the revealed text is the reply. ``none`` sends the instruction as raw text (base models; the library's
default, which the benches use).

The collected generations (reward above ``min_reward``, new, never a retain text verbatim) are the
forget set, written as JSONL with their scores and the query history; seeds and settings recorded. The
text of an item whose prompt ends with its fragment is the fragment and its continuation (the memorized
text as the model reproduces it); rewards and novelty look at the generated tokens only.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .errors import ConfigError, DataError
from .registry import Registry
from .reveal_options import BUILTIN_TEMPLATES, PROMPT_FORMATS, RevealSettings

__all__ = ["BUILTIN_TEMPLATES", "NeuralUCB", "REWARDS", "RevealSettings", "Request", "SELECTORS", "UCB1",
           "add_arguments", "checked_settings", "load_request", "ngram_recall", "novelty", "request_ngrams", "reveal", "run",
           "write_revealed"]


@dataclass
class Request:
    """What the requester knows: a description and/or fragments of the text to forget."""

    description: str = ""
    fragments: list[str] = field(default_factory=list)
    source: str = "request"

    def texts(self) -> list[str]:
        return [t for t in [self.description, *self.fragments] if t.strip()]


def checked_settings(settings: RevealSettings | None = None, flags: str = "--") -> RevealSettings:
    """``settings`` (default: the defaults) checked: the options (:meth:`RevealSettings.validate`) and the
    names of the selector and the rewards against their registries."""
    settings = (settings or RevealSettings()).validate(flags)
    if settings.selector not in SELECTORS:
        raise ConfigError(f"{flags}selector must be one of {', '.join(SELECTORS.names())}, got {settings.selector!r}")
    unknown = sorted(set(settings.weights) - set(REWARDS.names()))
    if unknown or not settings.weights:
        raise ConfigError(f"unknown reward(s) {', '.join(unknown) or '(none)'}; choose from "
                          f"{', '.join(REWARDS.names())}")
    return settings


def load_request(path: str | Path) -> Request:
    """A request file: JSON/YAML ``{description, fragments}``, or text (first line the description,
    each further non-empty line a fragment)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: request file not found")
    raw = path.read_text(encoding="utf-8")
    if path.suffix in (".json", ".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(raw) or {}
        except yaml.YAMLError as err:
            raise DataError(f"{path}: invalid {path.suffix[1:].upper()} ({' '.join(str(err).split())})") from None
        if not isinstance(values, dict) or set(values) - {"description", "fragments"}:
            raise DataError(f"{path}: a request is a mapping with `description` and/or `fragments` (a list)")
        fragments = values.get("fragments") or []
        if isinstance(fragments, str) or not all(isinstance(f, str) for f in fragments):
            raise DataError(f"{path}: `fragments` must be a list of texts")
        request = Request(str(values.get("description") or ""), list(fragments), str(path))
    else:
        lines = [line.strip() for line in raw.splitlines()]
        request = Request(lines[0] if lines else "", [line for line in lines[1:] if line], str(path))
    if not request.texts():
        raise DataError(f"{path}: the request is empty; give a description or at least one fragment")
    return request


# --------------------------------------------------------------------------- rewards (pure, registry)


def ngrams(ids: Sequence[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


def ngram_recall(truth: Sequence[int], found: Sequence[Sequence[int]], n: int) -> float:
    """Share of ``truth``'s n-grams that occur in any of ``found`` (how much of a hidden text was revealed)."""
    want = ngrams(truth, n)
    have = set().union(*(ngrams(f, n) for f in found)) if found else set()
    return len(want & have) / len(want) if want else 0.0


@dataclass
class Generation:
    ids: list[int]  # the generated tokens
    mean_nll: float  # the model's mean NLL of its own generation
    hidden: Tensor  # mean last hidden state of the generation [H]


@dataclass
class RewardInputs:
    generation: Generation
    request_ngrams: set  # n-grams of the request's fragments and description
    request_hidden: Tensor  # mean last hidden state of the request's texts [H]
    n: int


REWARDS: Registry[Callable[[RewardInputs], float]] = Registry("reward")


@REWARDS.register("overlap")
def _overlap(x: RewardInputs) -> float:
    grams = [tuple(x.generation.ids[i:i + x.n]) for i in range(len(x.generation.ids) - x.n + 1)]
    return sum(g in x.request_ngrams for g in grams) / len(grams) if grams else 0.0


@REWARDS.register("confidence")
def _confidence(x: RewardInputs) -> float:
    return math.exp(-x.generation.mean_nll)


@REWARDS.register("similarity")
def _similarity(x: RewardInputs) -> float:
    return max(0.0, float(torch.nn.functional.cosine_similarity(x.generation.hidden, x.request_hidden, dim=0)))


def novelty(ids: Sequence[int], collected: set, n: int) -> float:
    grams = ngrams(ids, n)
    return len(grams - collected) / len(grams) if grams else 0.0


def request_ngrams(tokenizer, request: Request, n: int) -> set:
    """The n-grams of the request's own texts (description, fragments): echoing them reveals nothing."""
    from .lm import encode

    return set().union(*(ngrams(encode(tokenizer, t, special=False), n) for t in request.texts()))


# --------------------------------------------------------------------------- instruction selection (registry)


class UCB1:
    """Auer et al.: pull every arm once, then the one with the largest mean + c sqrt(2 ln t / n_a).
    Context-free: the per-query ``context`` of :meth:`select` is ignored."""

    def __init__(self, features: Tensor, exploration: float = 1.0, seed: int = 0) -> None:
        self.counts = [0] * len(features)
        self.sums = [0.0] * len(features)
        self.c = exploration

    def select(self, t: int, context: Tensor | None = None) -> int:
        for arm, count in enumerate(self.counts):
            if count == 0:
                return arm
        return max(range(len(self.counts)), key=lambda a: self.sums[a] / self.counts[a]
                   + self.c * math.sqrt(2 * math.log(t + 1) / self.counts[a]))

    def update(self, arm: int, reward: float) -> None:
        self.counts[arm] += 1
        self.sums[arm] += reward


class RandomSelector(UCB1):
    """Uniformly random arms (the baseline)."""

    def __init__(self, features: Tensor, exploration: float = 1.0, seed: int = 0) -> None:
        super().__init__(features, exploration, seed)
        self.rng = random.Random(seed)

    def select(self, t: int, context: Tensor | None = None) -> int:
        return self.rng.randrange(len(self.counts))


class NeuralUCB:
    """Zhou, Li & Gu (2020), Algorithm 1, with the diagonal Z of their experiments and code.

    f(x; theta) = sqrt(m) w^T relu(W x) (m hidden units, theta = (W, w)); g = grad_theta f(x; theta).
    Score of an arm: f(x) + nu sqrt(g^T Z^-1 g / m), with Z = lambda I + sum over the pulled arms of
    g g^T / m, kept diagonal: Z_i = lambda + sum g_i^2 / m (the 1/m in BOTH places, as the paper has it; an
    earlier version left it out of Z, which made the bonus sqrt(m) too small). After every observation the
    network is refitted by a few Adam steps on every (features, reward) seen, minimising
    sum (f(x_i) - r_i)^2 / 2 + m lambda / 2 ||theta - theta_0||^2 (the paper's loss, the same lambda).
    ``select`` takes this query's features of every arm (default: the ones given at construction); the
    pulled arm's row is what ``update`` learns from."""

    def __init__(self, features: Tensor, exploration: float = 1.0, seed: int = 0, hidden: int = 32,
                 reg: float = 1.0, steps: int = 20, lr: float = 1e-2) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = features.float()
        d = self.x.shape[1]
        self.m, self.nu, self.reg, self.steps, self.lr = hidden, exploration, reg, steps, lr
        self.w1 = (torch.randn(hidden, d, generator=g) * math.sqrt(2.0 / d)).requires_grad_()
        self.w2 = (torch.randn(hidden, generator=g) / hidden).requires_grad_()
        self.start = [self.w1.detach().clone(), self.w2.detach().clone()]
        self.z = [torch.full_like(self.w1, reg), torch.full_like(self.w2, reg)]  # diagonal of Z
        self.context = self.x
        self.seen: list[tuple[Tensor, float]] = []

    def _f(self, x: Tensor) -> Tensor:
        return (torch.relu(x @ self.w1.T) @ self.w2) * math.sqrt(self.m)

    def _grads(self, x: Tensor) -> list[Tensor]:
        return list(torch.autograd.grad(self._f(x), [self.w1, self.w2]))

    def bonus(self, x: Tensor) -> float:
        """nu sqrt(g^T Z^-1 g / m) of features ``x`` [d] (Z diagonal)."""
        quad = sum(float((gr.pow(2) / z).sum()) for gr, z in zip(self._grads(x), self.z))
        return self.nu * math.sqrt(quad / self.m)

    def loss(self, xs: Tensor, rewards: Tensor) -> Tensor:
        """sum (f(x_i) - r_i)^2 / 2 + m lambda / 2 ||theta - theta_0||^2: what the refit minimises."""
        pull = sum((p - p0).pow(2).sum() for p, p0 in zip((self.w1, self.w2), self.start))
        return (self._f(xs) - rewards).pow(2).sum() / 2 + self.m * self.reg / 2 * pull

    def select(self, t: int, context: Tensor | None = None) -> int:
        self.context = (self.x if context is None else context).float().clone()  # the caller reuses its tensor
        with torch.no_grad():
            predicted = self._f(self.context)
        scores = [float(predicted[arm]) + self.bonus(self.context[arm]) for arm in range(len(self.context))]
        return max(range(len(scores)), key=scores.__getitem__)

    def update(self, arm: int, reward: float) -> None:
        x = self.context[arm]
        for z, gr in zip(self.z, self._grads(x)):
            z += gr.pow(2) / self.m
        self.seen.append((x, reward))
        xs = torch.stack([x for x, _ in self.seen])
        rewards = torch.tensor([r for _, r in self.seen])
        opt = torch.optim.Adam([self.w1, self.w2], lr=self.lr)
        for _ in range(self.steps):
            loss = self.loss(xs, rewards)
            opt.zero_grad()
            loss.backward()
            opt.step()


SELECTORS: Registry[type] = Registry("selector")
SELECTORS.register("neural-ucb")(NeuralUCB)
SELECTORS.register("ucb1")(UCB1)
SELECTORS.register("random")(RandomSelector)


# --------------------------------------------------------------------------- the model's side


@torch.no_grad()
def _mean_hidden(model, ids: list[int]) -> Tensor:
    out = model(input_ids=torch.tensor([ids], device=next(model.parameters()).device), output_hidden_states=True)
    return out.hidden_states[-1][0].float().mean(0).cpu()


@torch.no_grad()
def _sample(model, prompt: list[int], settings: RevealSettings, generator: torch.Generator,
            eos: set[int]) -> Generation:
    """One temperature / top-k sample of ``max_new_tokens`` tokens (stops at EOS), with its mean NLL under
    the model (at temperature 1) and its mean hidden state. Sampling uses a private seeded generator;
    the prompt's keys and values are cached, so each new token costs one token's forward pass."""
    from .metrics.memorization import cache_keyword, returned_cache

    device, keyword = next(model.parameters()).device, cache_keyword(model)
    new, nll, past = [], [], None
    step = torch.tensor([prompt], device=device)
    for _ in range(settings.max_new_tokens):
        out = model(input_ids=step, use_cache=True, **({keyword: past} if past is not None else {}))
        past, logits = returned_cache(out), out.logits[0, -1].float().cpu()
        logp = torch.log_softmax(logits, -1)
        top = torch.topk(logits / settings.temperature, settings.top_k)
        choice = int(top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)])
        if choice in eos:
            break
        nll.append(-float(logp[choice]))
        new.append(choice)
        step = torch.tensor([[choice]], device=device)
    hidden = _mean_hidden(model, new) if new else torch.zeros(1)
    return Generation(new, sum(nll) / len(nll) if nll else math.inf, hidden)


def _arms(request: Request, templates: dict[str, str]) -> list[tuple[str, str, str]]:
    """(template name, fragment, filled prompt) of every template and fragment it can be filled with."""
    arms = []
    for name, template in templates.items():
        needs_fragment, needs_description = "{fragment}" in template, "{description}" in template
        if needs_description and not request.description:
            continue
        for fragment in (request.fragments if needs_fragment else [""]):
            arms.append((name, fragment, template.replace("{fragment}", fragment).replace(
                "{description}", request.description)))
    if not arms:
        raise ConfigError("no instruction can be filled from this request (templates need a {fragment} or a "
                          "{description} the request has)")
    return arms


def reveal(model, tokenizer, request: Request, settings: RevealSettings | None = None, *,
           retain_texts: Sequence[str] = (), progress: bool = False) -> dict[str, Any]:
    """Query the model ``settings.budget`` times, arms chosen by the selector; returns the collected
    forget set (``items``), every query (``history``) and what was refused (retain texts, repeats)."""
    from .lm import context_length, encode, eos_token_ids, progress_bar

    settings = checked_settings(settings)
    model.eval()
    ctx = context_length(model)
    for text in request.texts():
        if len(encode(tokenizer, text, special=True)) + settings.max_new_tokens > ctx:
            raise DataError(f"{request.source}: a description or fragment of "
                            f"{len(encode(tokenizer, text, special=True))} tokens plus {settings.max_new_tokens} "
                            f"new tokens is longer than the model's context ({ctx}); shorten it")
    arms = _arms(request, settings.templates)
    prompts = [settings.prompt_ids(tokenizer, prompt) for _, _, prompt in arms]
    names = list(settings.templates)
    onehot = torch.eye(len(names))[[names.index(name) for name, _, _ in arms]]
    hidden = torch.stack([_mean_hidden(model, p) for p in prompts])
    features = torch.cat([onehot, torch.nn.functional.normalize(hidden, dim=1), torch.ones(len(arms), 2)], dim=1)
    # arms sharing a fragment reveal the same memorized text; a description-only arm is its own group
    groups = [fragment or f"arm {i}" for i, (_, fragment, _) in enumerate(arms)]
    latest: dict[Any, list[int]] = {}  # arm index and group -> its latest generation
    selector = SELECTORS.get(settings.selector)(features, exploration=settings.exploration, seed=settings.seed)
    request_ids = [encode(tokenizer, t, special=False) for t in request.texts()]
    asked = request_ngrams(tokenizer, request, settings.n)
    request_hidden = torch.stack([_mean_hidden(model, ids) for ids in request_ids if ids]).mean(0)
    retain = {" ".join(t.split()) for t in retain_texts if t.strip()}
    eos = set(eos_token_ids(model, tokenizer))
    generator = torch.Generator().manual_seed(settings.seed)
    known = set(asked)  # the request's own text and what is collected: echoing either reveals nothing
    items, history, refused = [], [], {"retain_verbatim": 0, "below_min_reward": 0, "empty": 0}
    started = time.time()
    for t in progress_bar(range(settings.budget), total=settings.budget, desc="revealing", enabled=progress):
        features[:, -2:] = torch.tensor([[novelty(latest[key], known, settings.n) if key in latest else 1.0
                                          for key in (a, groups[a])] for a in range(len(arms))])
        arm = selector.select(t, features)
        gen = _sample(model, prompts[arm], settings, generator, eos)
        latest[arm] = latest[groups[arm]] = gen.ids
        x = RewardInputs(gen, asked, request_hidden, settings.n)
        parts = {name: REWARDS.get(name)(x) for name in settings.weights} if gen.ids else {}
        new = novelty(gen.ids, known, settings.n)
        reward = new * sum(settings.weights[k] * v for k, v in parts.items()) if gen.ids else 0.0
        selector.update(arm, reward)
        template, fragment, prompt = arms[arm]
        generated = tokenizer.decode(gen.ids, skip_special_tokens=True)
        # A prompt that ends with the fragment is answered by the text after it: the revealed text is the
        # fragment and its continuation, as the model would reproduce the memorized text (what EL/MA test).
        # A chat reply starts a new turn: it is the revealed text on its own.
        continues = fragment and prompt.endswith(fragment) and settings.prompt_format == "none"
        text = (fragment + generated if continues else generated).strip()
        record = {"query": t, "arm": arm, "template": template, "fragment": fragment, "reward": reward,
                  "novelty": new, **parts, "text": text}
        history.append(record)
        if not gen.ids or not generated.strip():
            refused["empty"] += 1
        elif any(r in " ".join(text.split()) for r in retain):  # a retain text inside it, verbatim
            refused["retain_verbatim"] += 1
        elif reward < settings.min_reward:
            refused["below_min_reward"] += 1
        else:
            items.append({**record, "ids": gen.ids})
            known |= ngrams(gen.ids, settings.n)
    return {"items": items, "history": history, "refused": refused, "arms": len(arms),
            "settings": asdict(settings), "request": asdict(request), "seconds": time.time() - started}


def write_revealed(result: dict[str, Any], out: str | Path) -> Path:
    """OUT/forget.jsonl (one ``{"text", ...scores}`` per collected item: ready for ``loku unlearn --forget``)
    and OUT/reveal.json (settings, request, every query, refusals, versions), atomically."""
    from .provenance import library_versions
    from .save import atomic_dir, atomic_write_json, atomic_write_text

    out = Path(out)
    with atomic_dir(out) as tmp:
        atomic_write_text(tmp / "forget.jsonl", "".join(
            json.dumps({k: v for k, v in item.items() if k != "ids"}, ensure_ascii=False) + "\n"
            for item in result["items"]))
        atomic_write_json(tmp / "reveal.json", {**{k: v for k, v in result.items() if k != "items"},
                                                "collected": len(result["items"]), "versions": library_versions()})
    return out


# --------------------------------------------------------------------------- command line


def add_arguments(parser) -> Any:
    from .options import add_arguments as add_arguments_of

    parser.add_argument("--request", required=True, help="the request: JSON/YAML {description, fragments} or text "
                                                          "(first line the description, then one fragment a line)")
    parser.add_argument("--model", default="smollm2-135m", help="the model to ask [default: smollm2-135m]")
    parser.add_argument("--out", required=True, help="output folder: forget.jsonl (for loku unlearn) and reveal.json")
    parser.add_argument("--template", action="append", default=[], metavar="NAME=TEXT",
                        help="an instruction of your own ({fragment} and {description} are filled); repeatable. "
                             "--template chat or none: ask with the tokenizer's chat template (the instruction a "
                             "user turn; default when the tokenizer has one) or raw text")
    parser.add_argument("--only-templates", default=None, help="keep only these templates (comma-separated names)")
    parser.add_argument("--retain", default=None, help="texts never to collect verbatim (any loku data file)")
    add_arguments_of(parser, RevealSettings)  # --budget, --selector, --max-new-tokens, --temperature, ...
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off: safe)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    from .eval_options import DTYPES

    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="dtype the model is loaded in; auto: bfloat16 on a CUDA GPU, float32 elsewhere")
    from .devices import add_device_arguments

    return add_device_arguments(parser, device_map=True)


def run(args) -> int:
    from .data import load_text_set
    from .models import load_model
    from .save import check_output_dir

    from .devices import resolve_dtype, use_device

    device = use_device(args.device, args.device_map)
    request = load_request(args.request)
    templates = dict(BUILTIN_TEMPLATES)
    formats = [given for given in args.template if given in PROMPT_FORMATS]
    for given in (g for g in args.template if g not in PROMPT_FORMATS):
        name, sep, text = given.partition("=")
        if not sep or not name or not text:
            raise ConfigError(f"--template {given!r}: write it NAME=TEXT, e.g. --template 'cite=As written in "
                              "{description}:', or give chat or none (how the model is asked)")
        templates[name] = text
    if args.only_templates:
        keep = [n.strip() for n in args.only_templates.split(",") if n.strip()]
        unknown = [n for n in keep if n not in templates]
        if unknown:
            raise ConfigError(f"--only-templates: unknown template(s) {', '.join(unknown)}; have {', '.join(templates)}")
        templates = {n: templates[n] for n in keep}
    if len(set(formats)) > 1:
        raise ConfigError("--template chat and --template none: give one of them")
    from .options import check_fields, values_from

    settings = RevealSettings(**values_from(RevealSettings, args), templates=templates,
                              prompt_format=formats[0] if formats else "none")
    check_fields(settings)  # each flag's range, named
    checked_settings(settings)
    retain = load_text_set(args.retain, "retain").texts if args.retain else []
    check_output_dir(args.out, False)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code, progress=args.progress,
                                  dtype=resolve_dtype(args.dtype, device))
    if not formats:  # instruct models are asked as they are served
        from .chat import has_chat_template

        settings.prompt_format = "chat" if has_chat_template(tokenizer) else "none"
    result = reveal(model, tokenizer, request, settings, retain_texts=retain, progress=args.progress)
    out = write_revealed(result, args.out)
    print(f"loku: {len(result['items'])} generations collected from {settings.budget} queries over "
          f"{result['arms']} instructions; forget set in {out / 'forget.jsonl'}")
    return 0 if result["items"] else 3
