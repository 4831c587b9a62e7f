"""`loku reveal` (docs/algorithms.md §9, Reveal-and-Release): arms, rewards, bandits, and on a tiny model that
memorized known sequences, the revealed set recovers them from prefixes alone."""
from __future__ import annotations

import json
import math

import pytest
import torch

from loku.errors import ConfigError, DataError
from loku.reveal import (NeuralUCB, RandomSelector, Request, RevealSettings, UCB1, load_request, ngram_recall,
                         novelty, reveal, write_revealed)
from tiny_models import make_tiny_model, memorize, random_sequences, texts_of, word_tokenizer


def test_ngram_recall_and_novelty():
    assert ngram_recall([1, 2, 3, 4, 5], [[9, 2, 3, 4], [4, 5]], 2) == pytest.approx(3 / 4)
    assert ngram_recall([1, 2], [], 2) == 0.0
    assert novelty([1, 2, 3], {(1, 2)}, 2) == pytest.approx(0.5)


def _bandit(selector_cls, means, steps, seed):
    """A Bernoulli bandit with arm features = one-hot; the share of pulls of the best arm."""
    g = torch.Generator().manual_seed(seed)
    selector = selector_cls(torch.eye(len(means)), exploration=0.5, seed=seed)
    best = max(range(len(means)), key=means.__getitem__)
    pulls = 0
    for t in range(steps):
        arm = selector.select(t)
        pulls += arm == best
        selector.update(arm, float(torch.rand(1, generator=g) < means[arm]))
    return pulls / steps


def test_ucb_selectors_find_the_best_arm_more_often_than_random():
    """The mechanics on a clear gap, averaged over seeds (not one lucky run)."""
    means = [0.1, 0.2, 0.9, 0.3]
    shares = {cls.__name__: sum(_bandit(cls, means, 60, s) for s in range(3)) / 3
              for cls in (UCB1, NeuralUCB, RandomSelector)}
    assert shares["RandomSelector"] < 0.45
    assert shares["UCB1"] > shares["RandomSelector"] + 0.2
    assert shares["NeuralUCB"] > shares["RandomSelector"] + 0.2


def _revealing(selector_cls, seed, freshness=True, budget=16):
    """The shape of revealing (docs/algorithms.md §9): 3 templates x 8 fragments, a fragment reveals its text
    once (reward = the template's quality), then earns nothing; arm features = template one-hot, a fragment
    vector, and (when ``freshness``) whether the fragment is still unrevealed. Returns the reward collected."""
    g = torch.Generator().manual_seed(100 + seed)
    quality = [0.3, 0.9, 0.6]
    fragment_vectors = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    arms = [(t, f) for t in range(3) for f in range(8)]
    arms = [arms[i] for i in torch.randperm(len(arms), generator=g).tolist()]  # no lucky listing order
    features = torch.stack([torch.cat([torch.eye(3)[t], fragment_vectors[f], torch.ones(1)]) for t, f in arms])
    selector = selector_cls(features, exploration=1.0, seed=seed)
    fresh, total = [1.0] * 8, 0.0
    for step in range(budget):
        context = features.clone()
        if freshness:
            context[:, -1] = torch.tensor([fresh[f] for _, f in arms])
        arm = selector.select(step, context)
        template, fragment = arms[arm]
        reward = quality[template] * fresh[fragment]
        fresh[fragment] = 0.0
        selector.update(arm, reward)
        total += reward
    return total


def test_neural_ucb_uses_the_freshness_context_to_beat_random_on_a_revealing_bandit():
    """Without a feature saying a fragment is already revealed, NeuralUCB re-pulls what paid before and falls
    behind random (what the first bench run showed); with it, it collects more than random and UCB1."""
    mean = {(cls.__name__, fresh): sum(_revealing(cls, s, fresh) for s in range(5)) / 5
            for cls in (NeuralUCB, UCB1, RandomSelector) for fresh in (True, False)}
    assert mean["NeuralUCB", True] > mean["RandomSelector", True] + 1.0
    assert mean["NeuralUCB", True] > mean["UCB1", True] + 0.5
    assert mean["NeuralUCB", True] > mean["NeuralUCB", False] + 1.0


def test_neural_ucb_bonus_and_loss_on_a_hand_computed_network():
    """§9, Zhou et al. (2020) Algorithm 1: bonus nu sqrt(g^T Z^-1 g / m), Z = lambda I + sum g g^T / m (diagonal),
    loss sum (f - r)^2 / 2 + m lambda / 2 ||theta - theta_0||^2. Network m = 2, d = 2, weights set by hand:
    W = [[1, 1], [1, -1]], w = [0.5, 2], x = [1, 2]: W x = [3, -1], relu = [3, 0], f = sqrt(2) * 1.5.
    g: d f/d w = sqrt(2) [3, 0] (squares 18, 0); d f/d W = sqrt(2) [[0.5 * 1, 0.5 * 2], [0, 0]] (squares 0.5, 2)."""
    sel = NeuralUCB(torch.zeros(1, 2), exploration=2.0, hidden=2, reg=1.0, steps=0)  # steps=0: theta stays put
    sel.w1 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], requires_grad=True)
    sel.w2 = torch.tensor([0.5, 2.0], requires_grad=True)
    sel.start = [sel.w1.detach().clone(), sel.w2.detach().clone()]
    x = torch.tensor([[1.0, 2.0]])
    # Z = lambda = 1: g^T g / m = (18 + 0.5 + 2) / 2 = 10.25, bonus 2 sqrt(10.25).
    assert sel.bonus(x[0]) == pytest.approx(2 * math.sqrt(10.25), rel=1e-6)
    sel.select(0, x)
    sel.update(0, 0.0)
    # Z_i = 1 + g_i^2 / 2: 10 (for 18), 1.25 (for 0.5), 2 (for 2), 1 elsewhere (g_i = 0).
    # g^T Z^-1 g / m = (18/10 + 0.5/1.25 + 2/2) / 2 = 1.6. (Without /m in Z: 0.974, a bonus sqrt(m) smaller
    # for a large m, which is the defect this guards.)
    assert sel.bonus(x[0]) == pytest.approx(2 * math.sqrt(1.6), rel=1e-6)
    # The L2 pull: theta moved by +1 in w_1 alone: ||theta - theta_0||^2 = 1, m lambda / 2 = 1. f = sqrt(2) * 4.5,
    # reward 0: (f - 0)^2 / 2 = 20.25. Loss 21.25.
    with torch.no_grad():
        sel.w2[0] += 1.0
    assert float(sel.loss(x, torch.tensor([0.0]))) == pytest.approx(21.25, rel=1e-6)


def test_the_documented_reward_weights_are_the_code_defaults():
    """docs/algorithms.md §9 and README state the reward's weights; they once named others than the code's."""
    import re
    from pathlib import Path

    w, root = RevealSettings().weights, Path(__file__).resolve().parents[1]
    docs = " ".join((root / "docs" / "algorithms.md").read_text().split())
    assert (f"novelty x ({w['confidence']:g} confidence + {w['similarity']:g} similarity + {w['overlap']:g} overlap)"
            in docs)
    readme = " ".join((root / "README.md").read_text().split())
    assert re.search(rf"confidence in its own output \(weight {w['confidence']:g}[:)].*similarity to the request "
                     rf"\({w['similarity']:g}\) and n-gram overlap with it \({w['overlap']:g}\)", readme)


@pytest.fixture(scope="module")
def memorized_model():
    torch.manual_seed(0)
    model = make_tiny_model("llama", seed=0)
    seqs = random_sequences(4, 16, seed=3)
    memorize(model, seqs, steps=300)
    return model, word_tokenizer(), seqs


def test_reveal_recovers_memorized_text_from_prefixes(memorized_model, tmp_path):
    model, tokenizer, seqs = memorized_model
    texts = texts_of(seqs)
    request = Request("", [" ".join(t.split()[:4]) for t in texts])  # a 4-token prefix of each
    settings = RevealSettings(budget=24, selector="ucb1", templates={"continue": "{fragment}"}, max_new_tokens=12,
                              temperature=0.3, min_reward=0.0, seed=0)
    result = reveal(model, tokenizer, request, settings, retain_texts=[])
    found = [item["ids"] for item in result["items"]]
    recalls = [ngram_recall(s[4:].tolist(), found, 4) for s in seqs]
    assert sum(recalls) / len(recalls) > 0.5, recalls
    assert len(result["history"]) == 24 and result["arms"] == 4
    out = write_revealed(result, tmp_path / "revealed")
    rows = [json.loads(line) for line in (out / "forget.jsonl").read_text().splitlines()]
    assert rows and all("text" in r and "reward" in r for r in rows)
    assert json.loads((out / "reveal.json").read_text())["settings"]["seed"] == 0


def test_a_retain_text_is_never_collected(memorized_model):
    model, tokenizer, seqs = memorized_model
    texts = texts_of(seqs)
    request = Request("", [" ".join(texts[0].split()[:4])])
    settings = RevealSettings(budget=6, selector="random", templates={"continue": "{fragment}"}, max_new_tokens=12,
                              temperature=0.05, min_reward=0.0)
    # The retain text is the memorized continuation: a collected text is the fragment plus what the model
    # continues with, so it can CONTAIN the retain text but never equal it. Containing it is what is refused.
    retained = " ".join(texts[0].split()[4:])
    result = reveal(model, tokenizer, request, settings, retain_texts=[retained])
    containing = [q for q in result["history"] if retained in " ".join(q["text"].split())]
    assert containing and all(" ".join(q["text"].split()) != retained for q in containing)
    assert not any(retained in " ".join(i["text"].split()) for i in result["items"])
    assert result["refused"]["retain_verbatim"] == len(containing)


def test_bad_requests_and_settings(memorized_model, tmp_path):
    model, tokenizer, _ = memorized_model
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_request(tmp_path / "empty.txt")
    (tmp_path / "r.json").write_text(json.dumps({"description": "x", "fragments": "not a list"}))
    with pytest.raises(DataError, match="list of texts"):
        load_request(tmp_path / "r.json")
    (tmp_path / "r.txt").write_text("the licence of project y\nw5 w6 w7\n")
    request = load_request(tmp_path / "r.txt")
    assert request.description == "the licence of project y" and request.fragments == ["w5 w6 w7"]
    with pytest.raises(ConfigError, match="budget"):
        reveal(model, tokenizer, request, RevealSettings(budget=0))
    long = Request(" ".join(["w5"] * 80), [])
    with pytest.raises(DataError, match="longer than the model's context"):
        reveal(model, tokenizer, long, RevealSettings(budget=1))
    with pytest.raises(ConfigError, match="no instruction"):
        reveal(model, tokenizer, Request("", ["w5 w6"]), RevealSettings(budget=1, templates={"about": "{description}"}))
    assert math.isfinite(RevealSettings().exploration)


def test_cli_reveal_writes_a_forget_set_loku_unlearn_reads(memorized_model, tmp_path, capsys):
    from loku.cli import main
    from loku.data import load_text_set

    model, tokenizer, seqs = memorized_model
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "r.json").write_text(json.dumps({"fragments": [" ".join(texts_of(seqs)[0].split()[:4])]}))
    code = main(["reveal", "--request", str(tmp_path / "r.json"), "--model", str(tmp_path / "m"), "--out",
                 str(tmp_path / "out"), "--budget", "4", "--selector", "ucb1", "--only-templates", "continue",
                 "--max-new-tokens", "8", "--min-reward", "0", "--no-progress"])
    assert code == 0 and "generations collected" in capsys.readouterr().out
    assert load_text_set(tmp_path / "out" / "forget.jsonl", "forget").texts
    assert main(["reveal", "--request", str(tmp_path / "r.json"), "--model", str(tmp_path / "m"), "--out",
                 str(tmp_path / "o2"), "--template", "broken"]) == 2


def test_reveal_options_are_declared_once(tmp_path, capsys):
    """§9 / issue 22: `loku reveal`'s flags and `loku unlearn --reveal-*` come from RevealSettings's fields (same
    defaults, help and ranges); a bad value is refused naming the flag before any model is loaded."""
    import argparse
    import dataclasses

    from loku.cli import main
    from loku.config import UnlearnConfig
    from loku.reveal import add_arguments
    from loku.reveal_options import SHARED_WITH_UNLEARN

    args = add_arguments(argparse.ArgumentParser()).parse_args(["--request", "r", "--out", "o"])
    defaults = RevealSettings()
    for f in dataclasses.fields(RevealSettings):
        if f.metadata.get("cli", True):
            assert getattr(args, f.name) == getattr(defaults, f.name), f.name
    unlearn_fields = {f.name: f for f in dataclasses.fields(UnlearnConfig)}
    for name in SHARED_WITH_UNLEARN:
        assert unlearn_fields[f"reveal_{name}"].default == getattr(defaults, name)
        assert unlearn_fields[f"reveal_{name}"].metadata["help"].endswith(RevealSettings.__dataclass_fields__[name]
                                                                          .metadata["help"])
    (tmp_path / "r.txt").write_text("a description\nw5 w6 w7\n")
    base = ["reveal", "--request", str(tmp_path / "r.txt"), "--model", str(tmp_path / "no-model"), "--out",
            str(tmp_path / "o")]
    assert main([*base, "--top-k", "0"]) == 2 and "--top-k" in capsys.readouterr().err
    assert main([*base, "--selector", "greedy"]) == 2 and "--selector must be one of" in capsys.readouterr().err
