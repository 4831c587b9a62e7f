"""`loku unlearn --reveal` (docs/algorithms.md §9, Reveal-and-Release): rounds of reveal -> unlearn on a tiny
Llama that memorized 4 sequences, given only a 6-token prefix of each."""
from __future__ import annotations

import json

import pytest
import torch

from loku.checks import check_unlearn
from loku.cli import main
from loku.config import UnlearnConfig
from loku.errors import ConfigError
from loku.metrics import memorization_accuracy
from loku.models import load_model
from loku.release import _relocated, reveal_and_release, round_news, work_dir, write_release
from loku.reveal import RevealSettings
from tiny_models import VOCAB, spy_first_step, texts_of


@pytest.fixture(scope="module")
def request_file(memorized):
    lines = (memorized / "forget.txt").read_text().splitlines()
    path = memorized / "request.json"
    path.write_text(json.dumps({"description": "", "fragments": [" ".join(t.split()[:6]) for t in lines]}))
    return path


def config(root, request, out, **kw) -> UnlearnConfig:
    values = dict(model=str(root / "base"), reveal=str(request), retain=str(root / "retain.txt"),
                  validation=str(root / "validation.txt"), out=str(out), method="lora-ihl", strategy="orthogonal",
                  rank=4, lora_alpha=8, lr=1e-2, batch_size=4, max_epochs=30, progress=False, seed=0,
                  reveal_rounds=2, reveal_budget=12, reveal_max_new_tokens=18, reveal_stop_reward=0.0)
    values.update(kw)
    return UnlearnConfig(**values)


def _settings(number: int) -> RevealSettings:
    return RevealSettings(budget=12, selector="ucb1", templates={"continue": "{fragment}"}, max_new_tokens=18,
                          temperature=0.3, min_reward=0.0, seed=number)


def _forget_ids(root, tokenizer):
    lines = (root / "forget.txt").read_text().splitlines()
    return torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"] for t in lines])


def test_rounds_unlearn_the_real_text_from_what_the_model_revealed(memorized, request_file, tmp_path):
    model, tokenizer = load_model(str(memorized / "base"))
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _forget_ids(memorized, tokenizer)
    ma_before = float(memorization_accuracy(model, ids).mean())
    cfg = config(memorized, request_file, tmp_path / "out")
    release = reveal_and_release(cfg, model=model, tokenizer=tokenizer, settings=_settings, say=lambda m: None)
    assert all(torch.equal(v, before_weights[k]) for k, v in model.state_dict().items())  # the input model is kept
    assert release.rounds[0]["collected"] > 0 and release.requests is not None
    unlearned = [r for r in release.rounds if "request" in r]
    assert len(release.requests.deltas) == len(unlearned) >= 1
    ma_after = float(memorization_accuracy(release.requests.model, ids).mean())
    # The real memorized text, which the rounds never saw, is forgotten from the model's own revelations.
    assert ma_before > 0.95 and ma_after < 0.5 * ma_before, (ma_before, ma_after)
    out = write_release(release, cfg)
    assert not work_dir(cfg.out).exists()
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"] == "orthogonal" and len(report["reveal"]["rounds"]) == len(release.rounds)
    first = report["reveal"]["rounds"][0]["forget"]
    assert first == str(out / "reveal" / "round-01" / "forget.jsonl") and (out / "reveal" / "round-01" / "forget.jsonl").is_file()
    assert all(r["forget"].startswith(str(out)) for r in json.loads((out / "sequence.json").read_text())["finished"])
    retain = set((memorized / "retain.txt").read_text().splitlines())
    revealed = [json.loads(line)["text"] for line in (out / "reveal" / "round-01" / "forget.jsonl").read_text().splitlines()]
    assert revealed and not any(r in t for t in revealed for r in retain)
    assert "Reveal-and-Release rounds" in (out / "report.md").read_text()


def test_relocation_moves_only_paths_under_the_work_folder(tmp_path):
    work, final = tmp_path / "out" / ".reveal-work", tmp_path / "out" / "reveal"
    value = {"forget": str(work / "round-01" / "forget.jsonl"), "rounds": [str(work), (str(work / "a"),)],
             "sibling": str(work) + "-old/x", "text": f"see {work}/round-01", "n": 3, "none": None}
    assert _relocated(value, work, final) == {
        "forget": str(final / "round-01" / "forget.jsonl"), "rounds": [str(final), [str(final / "a")]],
        "sibling": str(work) + "-old/x", "text": f"see {work}/round-01", "n": 3, "none": None}


def test_rounds_that_collect_nothing_end_the_loop_with_a_message(memorized, request_file, tmp_path):
    messages = []
    cfg = config(memorized, request_file, tmp_path / "out", reveal_rounds=5, reveal_patience=2)
    release = reveal_and_release(cfg, settings=lambda n: RevealSettings(budget=2, min_reward=5.0, seed=n),
                                 say=messages.append)
    assert release.requests is None and len(release.rounds) == 2
    assert "revealed nothing new" in release.stopped and any("--reveal ended" in m for m in messages)


def test_a_round_below_the_stop_reward_ends_the_loop_after_unlearning_what_it_revealed(memorized, request_file,
                                                                                        tmp_path):
    """§9: the stop is decided after the round's collected texts are unlearned (they were revealed; stopping
    first shipped a model that still produced them)."""
    model, tokenizer = load_model(str(memorized / "base"))
    ids = _forget_ids(memorized, tokenizer)
    cfg = config(memorized, request_file, tmp_path / "out", reveal_stop_reward=10.0)
    release = reveal_and_release(cfg, model=model, tokenizer=tokenizer, settings=_settings, say=lambda m: None)
    assert len(release.rounds) == 1 and "stopped revealing" in release.stopped
    collected = release.rounds[0]["collected"]
    assert collected > 0 and f"its {collected} new texts were unlearned first" in release.stopped
    assert release.requests is not None and [d.name for d in release.requests.deltas] == ["request-01"]
    assert release.rounds[0]["request"] == "request-01" and release.rounds[0]["epochs_run"] >= 1
    assert release.requests.deltas[0].forget == release.rounds[0]["forget"]
    ma = [float(memorization_accuracy(m, ids).mean()) for m in (model, release.requests.model)]
    assert ma[0] > 0.95 and ma[1] < 0.5 * ma[0], ma  # the real text, revealed in that one round, is forgotten


def test_round_news_counts_texts_with_enough_new_ngrams():
    """§9: news is new n-grams against the request and the earlier rounds, per collected text."""
    known = {(1, 2), (2, 3), (3, 4)}
    items = [{"ids": [1, 2, 3, 4, 5]}, {"ids": [7, 8, 9]}, {"ids": [2, 3, 4]}]  # new share 1/4, 2/2, 0/2
    assert round_news(items, known, 2, 0.25) == {"novel": 2, "new_ngram_share": 3 / 6}
    assert round_news(items, known, 2, 0.5)["novel"] == 1
    assert round_news([], known, 2, 0.5) == {"novel": 0, "new_ngram_share": None}


def _scripted_reveal(rounds: dict[int, list[str]], tokenizer):
    """A stand-in for loku.reveal.reveal: round k (its settings' seed) collects the texts ``rounds[k]``."""
    def fake(model, tok, request, settings, retain_texts=(), progress=False):
        texts = rounds[settings.seed]
        items = [{"text": t, "reward": 1.0, "ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
        return {"items": items, "history": [{"reward": 1.0}] * len(texts), "refused": {}, "seconds": 0.0}

    return fake


def test_a_round_that_reveals_nothing_new_ends_the_loop_without_unlearning(memorized, request_file, tmp_path,
                                                                           monkeypatch):
    """§9 (ALGORITHMS.md §9, §12): round 2 collects round 1's texts with one word changed: not verbatim, but
    all but one of their n-grams known. It reveals nothing new: it is not unlearned and (patience 1) ends the
    loop; confident text is not news. Genuinely new text in round 2 is unlearned as the next request."""
    import loku.reveal

    model, tokenizer = load_model(str(memorized / "base"))
    first = (memorized / "forget.txt").read_text().splitlines()[:2]
    again = [" ".join(t.split()[:-1] + ["w3" if t.split()[-1] != "w3" else "w4"]) for t in first]
    new = texts_of(torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(11)))
    cfg = config(memorized, request_file, tmp_path / "out", reveal_rounds=3, reveal_patience=1, max_epochs=2)
    monkeypatch.setattr(loku.reveal, "reveal", _scripted_reveal({1: first, 2: again, 3: new}, tokenizer))
    release = reveal_and_release(cfg, model=model, tokenizer=tokenizer, settings=lambda n: RevealSettings(seed=n),
                                 say=lambda m: None)
    assert [r.get("request") for r in release.rounds] == ["request-01", None]
    assert release.rounds[1]["collected"] == 2 and release.rounds[1]["novel"] == 0
    assert release.stopped.startswith("round 2 revealed nothing new")
    assert [d.name for d in release.requests.deltas] == ["request-01"]

    monkeypatch.setattr(loku.reveal, "reveal", _scripted_reveal({1: first, 2: new}, tokenizer))
    cfg = config(memorized, request_file, tmp_path / "new", reveal_rounds=2, reveal_patience=1, max_epochs=2)
    release = reveal_and_release(cfg, model=model, tokenizer=tokenizer, settings=lambda n: RevealSettings(seed=n),
                                 say=lambda m: None)
    assert [r.get("request") for r in release.rounds] == ["request-01", "request-02"]
    assert release.rounds[1]["novel"] == 2 and release.rounds[1]["new_ngram_share"] == 1.0


def test_every_round_is_anchored_to_the_model_before_the_first(memorized, request_file, tmp_path, monkeypatch):
    """§9 with §8: round 2's KL retain term compares against the model before round 1, not the one round 1 left."""
    import loku.reveal

    model, tokenizer = load_model(str(memorized / "base"))
    first = (memorized / "forget.txt").read_text().splitlines()[:2]
    new = texts_of(torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(11)))
    monkeypatch.setattr(loku.reveal, "reveal", _scripted_reveal({1: first, 2: new}, tokenizer))
    cfg = config(memorized, request_file, tmp_path / "out", retain_term="kl", max_epochs=3)
    seen: dict = {}
    spy_first_step(monkeypatch, str(work_dir(cfg.out) / "round-02" / "forget.jsonl"), seen)
    release = reveal_and_release(cfg, model=model, tokenizer=tokenizer, settings=lambda n: RevealSettings(seed=n),
                                 say=lambda m: None)
    assert [r.get("request") for r in release.rounds] == ["request-01", "request-02"]
    retain = seen["retain"]
    with torch.no_grad():
        before = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
        after_round_1 = seen["model_retain"]
    torch.testing.assert_close(seen["ref_retain"], before, atol=0, rtol=0)
    assert not torch.allclose(after_round_1, before, atol=1e-2), "round 1 moved the model (else this proves nothing)"
    assert seen["parts"]["retain"] > 1e-3  # KL(before || after round 1) > 0; anchored to round 1's model it is ~0


def test_rounds_stopped_on_the_requests_fragments_end_once_the_fragments_are_at_the_held_out_level(
        memorized, request_file, tmp_path, monkeypatch):
    """§9 with §12 (--reveal-stop-on fragments): each round's stop rule measures the request's fragments
    against the validation set cut to their length, not the round's own generated texts; a round that
    leaves them at the held-out level (or takes them past it) ends the loop, though rounds are left."""
    import loku.reveal

    model, tokenizer = load_model(str(memorized / "base"))
    first = (memorized / "forget.txt").read_text().splitlines()  # round 1 reveals the whole request
    new = texts_of(torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(11)))
    monkeypatch.setattr(loku.reveal, "reveal", _scripted_reveal({1: first, 2: new, 3: new}, tokenizer))
    cfg = config(memorized, request_file, tmp_path / "out", reveal_rounds=3, reveal_stop_on="fragments",
                 method="lora-ga", stop_rule="two-sided", check_every=1, max_epochs=20)
    release = reveal_and_release(cfg, model=model, tokenizer=tokenizer, settings=lambda n: RevealSettings(seed=n),
                                 say=lambda m: None)
    assert len(release.rounds) == 1 and release.rounds[0]["request"] == "request-01"
    verdict = release.rounds[0]["stop_verdict"]
    assert verdict in ("at the held-out level", "overshoot") and "fragments" in release.stopped
    run = release.requests.state["finished"][0]["run"]
    fragments = json.loads(request_file.read_text())["fragments"]
    assert run["data"]["stop_on"]["sequences"] == len(fragments) == 4  # measured: all 4 fragments, not 2 texts
    ids = torch.tensor([tokenizer(f, add_special_tokens=False)["input_ids"] for f in fragments])
    assert run["before"]["forget_ma"] == pytest.approx(float(memorization_accuracy(model, ids).double().mean()),
                                                       abs=1e-6)

    # The same rounds stopped on their own generated texts go on to round 2: the default is unchanged.
    cfg = config(memorized, request_file, tmp_path / "own", reveal_rounds=2, method="lora-ga", stop_rule="two-sided",
                 check_every=1, max_epochs=20)
    release = reveal_and_release(cfg, model=model, tokenizer=tokenizer, settings=lambda n: RevealSettings(seed=n),
                                 say=lambda m: None)
    assert len(release.rounds) == 2


def test_bad_reveal_options(memorized, request_file, tmp_path):
    (tmp_path / "no-fragments.json").write_text(json.dumps({"description": "the text about w5"}))
    with pytest.raises(ConfigError, match="has none; add fragments"):
        reveal_and_release(config(memorized, tmp_path / "no-fragments.json", tmp_path / "o",
                                  reveal_stop_on="fragments"), say=lambda m: None)
    with pytest.raises(ConfigError, match="drop --stop-on"):
        check_unlearn(config(memorized, request_file, tmp_path / "o", reveal_stop_on="fragments",
                             stop_on=str(memorized / "forget.txt")))
    with pytest.raises(ConfigError, match="not both"):
        check_unlearn(config(memorized, request_file, tmp_path / "o", forget=str(memorized / "forget.txt")))
    with pytest.raises(ConfigError, match="request file not found"):
        check_unlearn(config(memorized, tmp_path / "missing.json", tmp_path / "o"))
    with pytest.raises(ConfigError, match="reveal_budget|--reveal-budget"):
        check_unlearn(config(memorized, request_file, tmp_path / "o", reveal_budget=0))
    with pytest.raises(ConfigError, match="--reveal-selector must be one of neural-ucb, random, ucb1, got 'greedy'"):
        check_unlearn(config(memorized, request_file, tmp_path / "o", reveal_selector="greedy"))
    for bad in (0.0, 1.5):  # no novelty, or more than all of a text's n-grams, can tell news apart
        with pytest.raises(ConfigError, match=r"--reveal-min-novelty must lie in \(0, 1\]"):
            check_unlearn(config(memorized, request_file, tmp_path / "o", reveal_min_novelty=bad))
    (tmp_path / "empty.txt").write_text("\n")
    code = main(["unlearn", "--reveal", str(tmp_path / "empty.txt"), "--model", str(memorized / "base"),
                 "--retain", str(memorized / "retain.txt"), "--validation", str(memorized / "validation.txt"),
                 "--out", str(tmp_path / "o2"), "--no-progress"])
    assert code == 2 and not (tmp_path / "o2").exists()


def test_the_cli_runs_the_rounds(memorized, request_file, tmp_path, capsys):
    def cli(out, *extra):
        return main(["unlearn", "--reveal", str(request_file), "--model", str(memorized / "base"), "--method",
                     "lora-ihl", "--retain", str(memorized / "retain.txt"), "--validation",
                     str(memorized / "validation.txt"), "--out", str(out), "--rank", "4", "--lora-alpha", "8", "--lr",
                     "1e-2", "--batch-size", "4", "--max-epochs", "30", "--reveal-rounds", "1", "--reveal-budget", "8",
                     "--reveal-max-new-tokens", "18", "--reveal-stop-reward", "0", "--no-progress", *extra])

    # The validation set's bar (MA 1/92, EL 0 on this model) is out of reach in 2 epochs for the round's
    # generated texts (with 30 it took 19 on one machine and more than 30 on another): the round fails its
    # stop rule, and the run says so with exit 3.
    code = cli(tmp_path / "cli", "--max-epochs", "2")
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["strategy"] == "orthogonal"  # --reveal's default strategy
    assert report["reveal"]["rounds"][0]["queries"] == 8
    assert (tmp_path / "cli" / "adapters" / "loku_requests.json").is_file()
    assert report["reveal"]["rounds"][0]["outcome"] == "failed" and "failed rounds: 1;" in capsys.readouterr().out
    assert code == 3
    # Bars every model meets: the round succeeds in its first epoch, exit 0.
    code = cli(tmp_path / "met", "--ma-threshold", "1", "--el-threshold", "1")
    assert json.loads((tmp_path / "met" / "report.json").read_text())["reveal"]["rounds"][0]["epochs_run"] == 1
    assert "failed rounds: none;" in capsys.readouterr().out and code == 0


def test_a_killed_run_resumes_after_its_last_finished_round(memorized, request_file, tmp_path, monkeypatch, capsys):
    """`loku unlearn --resume OUT` of a --reveal run killed in round 2 keeps round 1 (not revealed or trained
    again) and ends with the adapters and rounds of the run that was never killed."""
    import loku.release as release_module
    from safetensors.torch import load_file

    def cli(*args):
        return main(["unlearn", *args, "--no-progress"])

    options = ["--reveal", str(request_file), "--model", str(memorized / "base"), "--method", "lora-ihl", "--retain",
               str(memorized / "retain.txt"), "--validation", str(memorized / "validation.txt"), "--rank", "4",
               "--lora-alpha", "8", "--lr", "1e-2", "--batch-size", "4", "--max-epochs", "3", "--reveal-rounds", "2",
               "--strategy", "stack",  # not --reveal's default: a resumed run keeps the strategy it was given
               "--reveal-budget", "8", "--reveal-max-new-tokens", "18", "--reveal-stop-reward", "0",
               "--reveal-min-novelty", "0.01", "--reveal-patience", "2"]
    assert cli(*options, "--out", str(tmp_path / "whole")) in (0, 3)
    asked = []
    real_settings = release_module.reveal_settings

    kill_in = [2]

    def counted(cfg, number):
        asked.append(number)
        if number in kill_in:
            raise KeyboardInterrupt
        return real_settings(cfg, number)

    monkeypatch.setattr(release_module, "reveal_settings", counted)
    killed = tmp_path / "killed"
    assert cli(*options, "--out", str(killed)) != 0 and not killed.exists()
    assert asked == [1, 2] and release_module.resumable(killed)
    asked.clear()
    kill_in.clear()
    assert cli("--resume", str(killed)) in (0, 3)
    assert asked == [2]  # round 1 was neither revealed nor unlearned again
    assert not work_dir(killed).exists()
    whole, resumed = (json.loads((tmp_path / name / "report.json").read_text())["reveal"]["rounds"]
                      for name in ("whole", "killed"))

    def comparable(rounds, out):
        return [{k: str(v).replace(str(out), "OUT") for k, v in r.items() if k != "seconds_reveal"} for r in rounds]

    assert comparable(resumed, killed) == comparable(whole, tmp_path / "whole")
    assert [r.get("request") for r in whole] == ["request-01", "request-02"]  # both rounds unlearned something
    for name in ("request-01", "request-02"):
        a, b = (load_file(str(tmp_path / out / "requests" / name / "delta.safetensors")) for out in ("whole", "killed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
