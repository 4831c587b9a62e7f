"""`loku unlearn --reveal REQUEST`: Reveal-and-Release (docs/algorithms.md §9), rounds of reveal -> unlearn.

Each round asks the current model to reveal what it knows about the request (:func:`loku.reveal.reveal`,
seed ``seed + round - 1``) and unlearns what it collected as one more deletion request of a sequence
(:func:`loku.requests.unlearn_requests`): a new LoRA adapter a round, FILA computed from the round's
generated text on the model the earlier rounds left, the O-LoRA penalty between the rounds' A matrices
(``--strategy orthogonal`` unless another is given), each round its own stop rule on its own forget set,
thresholds from ``--validation`` on the model before the first round. The next round asks the model
the earlier rounds left, so it reveals what they did not remove.

Every round is anchored to the model before the first round (the sequence's original, §8): its KL retain
term (and NPO's or UNDIAL's reference) compares against that model, not against the one the earlier rounds
left, so the rounds' drift does not compound.

With ``reveal_stop_on`` ``fragments`` each round's stop rule measures the request's fragments (OUT.reveal/
fragments.jsonl) against the validation set cut to their length, not the round's generated texts: the model's
own greedy text is "memorized" (MA near 1) by any model, trained on the request or not, so bringing it to
the held-out level unlearns far past the request (the reveal bench: x7 Pile perplexity after round 2). The
loop then also ends after a round that met its stop rule: the fragments are at the held-out level.

The loop ends at ``reveal_rounds`` rounds, when a round's mean reward falls below
``reveal_stop_reward`` (the generations stopped revealing: what that round did collect is unlearned
first), or after ``reveal_patience`` rounds in a row that reveal nothing new, each with a message. A round
reveals something new when one of its collected texts has at least ``reveal_min_novelty`` of its n-grams
(the reward's n) in neither the request nor an earlier unlearned round's texts (:func:`round_news`);
confidence alone is not news. A round that reveals nothing new is not unlearned. A text collected again
verbatim in a later round is left out of that round (a sequence's requests are disjoint) and counted as
``repeated``: the model still reproducing it word for word is reported, not hidden.

The rounds' generated sets are written to OUT.reveal/ while the loop runs and moved into the output
(OUT/reveal/round-NN/forget.jsonl and reveal.json, OUT/reveal/rounds.json). ``--resume OUT`` continues a
killed run after its last finished round (each finished round's record, texts and delta are kept in
OUT.reveal/.resume/); the round it was killed in is done again from its reveal.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .checks import check_unlearn
from .config import UnlearnConfig
from .errors import ConfigError

__all__ = ["ReleaseResult", "resumable", "reveal_and_release", "reveal_settings", "run_release", "saved_config",
           "work_dir"]


@dataclass
class ReleaseResult:
    requests: Any  # loku.requests.RequestsResult of the rounds that unlearned something, or None
    rounds: list[dict[str, Any]]  # what each round revealed, collected and unlearned
    stopped: str  # why the loop ended


def work_dir(out: str | Path) -> Path:
    """Where the rounds' generated forget sets are written while the loop runs."""
    return Path(f"{out}.reveal")


def reveal_settings(cfg: UnlearnConfig, round_number: int):
    from .reveal import checked_settings
    from .reveal_options import settings_from_unlearn

    return checked_settings(settings_from_unlearn(cfg, seed=cfg.seed + round_number - 1), "--reveal-")


def _normal(text: str) -> str:
    return " ".join(text.split())


def reveal_and_release(cfg: UnlearnConfig, *, model=None, tokenizer=None, accelerator=None,
                       settings: Callable[[int], Any] | None = None,
                       say: Callable[[str], None] = print, resume: bool = False) -> ReleaseResult:
    """Rounds of reveal -> unlearn from ``cfg`` (its ``reveal`` request, ``reveal_*`` options and the
    options of every round's unlearning); ``model`` (not modified) or ``cfg.model`` is the base.
    ``settings(round)``: the round's :class:`loku.reveal.RevealSettings` (default from ``cfg``).
    ``resume``: continue the killed run that was writing to ``cfg.out`` after its last finished round."""
    import copy

    from . import distributed as dist
    from .data import load_text_set
    from .models import load_model
    from .requests import Previous, sequence_result
    from .reveal import load_request, ngrams, request_ngrams, reveal, write_revealed
    from .save import check_output_dir
    from .trainer import master_dtype

    check_unlearn(cfg)
    request = load_request(cfg.reveal)
    if cfg.reveal_stop_on == "fragments" and not request.fragments:
        raise ConfigError(f"{cfg.reveal}: --reveal-stop-on fragments measures the request's fragments, and this "
                          "request has none; add fragments, or pass --reveal-stop-on revealed")
    work = work_dir(cfg.out)
    accelerator = accelerator or dist.make_accelerator(cfg.device)
    main = accelerator.is_main_process  # the only process that writes the rounds' records
    if resume:
        saved = _saved_rounds(cfg)
    else:
        check_output_dir(cfg.out, cfg.overwrite)
        if work.exists():
            if not cfg.overwrite:
                raise ConfigError(f"{work}: a killed --reveal run left its rounds here; continue it with --resume "
                                  f"{cfg.out} or start afresh with --overwrite")
            if main:
                shutil.rmtree(work)
        if main:
            _start_rounds(cfg)
        saved = []
    if main and cfg.reveal_stop_on == "fragments":
        import json

        from .save import atomic_write_text

        atomic_write_text(cfg.round_config().stop_on, "".join(json.dumps({"text": f}, ensure_ascii=False) + "\n"
                                                              for f in request.fragments))
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=master_dtype(cfg), trust_remote_code=cfg.trust_remote_code,
                                      progress=cfg.progress)
    base = copy.deepcopy(model).eval()
    retain = load_text_set(cfg.retain, "retain").texts if cfg.retain else []
    settings = settings or (lambda r: reveal_settings(cfg, r))
    result, previous, rounds, seen, unlearned = None, None, [], set(), []

    def resumed_result():  # the model and report of the rounds the killed run finished
        return sequence_result(previous.state, previous.deltas, cfg.strategy,
                               copy.deepcopy(base).to(accelerator.device), tokenizer)

    stopped, empty = f"the round budget ({cfg.reveal_rounds}) is spent", 0
    for number in range(1, cfg.reveal_rounds + 1):
        if number <= len(saved):  # finished by the killed run: its record and sequence, not its work again
            record, fresh = saved[number - 1]["record"], saved[number - 1]["items"]
            if saved[number - 1]["state"] is not None:
                previous, result = _saved_sequence(cfg, saved[number - 1]["state"]), None
            say(f"loku: round {number}: finished before the run was killed ({record['collected']} new texts)")
        else:
            if result is None and previous is not None:  # the resumed rounds' model, rebuilt once
                result = resumed_result()
            current = result.model if result is not None else base
            round_settings = settings(number)
            n = round_settings.n  # what is not news: the request's own n-grams and every unlearned round's texts
            known = request_ngrams(tokenizer, request, n).union(*(ngrams(ids, n) for ids in unlearned))
            revealed = reveal(current, tokenizer, request, round_settings, retain_texts=retain, progress=cfg.progress)
            fresh = [item for item in revealed["items"] if _normal(item["text"]) not in seen]
            repeated = len(revealed["items"]) - len(fresh)
            revealed["items"] = fresh
            news = round_news(fresh, known, n, cfg.reveal_min_novelty)
            mean_reward = sum(q["reward"] for q in revealed["history"]) / len(revealed["history"])
            folder = write_revealed(revealed, work / f"round-{number:02d}")
            record = {"round": number, "queries": len(revealed["history"]), "collected": len(fresh),
                      "repeated": repeated, **news, "mean_reward": mean_reward, "refused": revealed["refused"],
                      "seconds_reveal": revealed["seconds"], "forget": str(folder / "forget.jsonl")}
            say(f"loku: round {number}: {len(fresh)} new texts from {record['queries']} queries (mean reward "
                f"{mean_reward:.3f}, {repeated} repeated verbatim, {news['novel']} with >= {cfg.reveal_min_novelty:g} "
                "of their n-grams new)")
            # Nothing new (no collected text with enough n-grams unseen in the request and the earlier rounds) is
            # not unlearned: its text was already a request of these rounds, and unlearning it again pushes the
            # same content further down on every round (the compounding §9 and §12 warn about).
            if news["novel"]:
                result = _unlearn_round(cfg, record, base, tokenizer, accelerator, previous)
                previous = Previous(work, result.state, result.deltas)
            if main:
                _save_round(cfg, record, fresh, result if news["novel"] else None)
        rounds.append(record)
        empty = 0 if record["novel"] else empty + 1
        if record["novel"]:
            seen |= {_normal(item["text"]) for item in fresh}
            unlearned += [item["ids"] for item in fresh]
        if cfg.reveal_stop_on == "fragments" and (record.get("outcome") == "success"
                                                  or record.get("stop_verdict") == "overshoot"):
            stopped = (f"round {number} left the request's fragments at the held-out level (its stop rule met; "
                       "--reveal-stop-on fragments)" if record["outcome"] == "success" else
                       f"round {number} took the request's fragments past the held-out level (an overshoot; "
                       "another round would push them further)")
            break
        # The stop is decided after the round's texts are unlearned, not before: a low mean reward says the
        # NEXT round would reveal little; the texts this round did collect (each new, above --min-reward) are
        # what the model was just seen to produce, and stopping first would ship a model that still produces
        # them. (Deciding before generating would need the reward of texts not generated yet.)
        if record["mean_reward"] < cfg.reveal_stop_reward:
            stopped = (f"round {number}: the generations stopped revealing (mean reward {record['mean_reward']:.3f} "
                       f"< --reveal-stop-reward {cfg.reveal_stop_reward:g})"
                       + (f"; its {record['collected']} new texts were unlearned first" if record["novel"] else ""))
            break
        if empty >= cfg.reveal_patience:
            which = f"round {number}" if empty == 1 else f"rounds {number - empty + 1}-{number}"
            stopped = (f"{which} revealed nothing new (no collected text with >= "
                       f"{cfg.reveal_min_novelty:g} of its n-grams new; --reveal-patience {empty})")
            break
    if result is None and previous is not None:  # every round was finished before the run was killed
        result = resumed_result()
    say(f"loku: --reveal ended: {stopped}")
    return ReleaseResult(result, rounds, stopped)


# --------------------------------------------------------------------------- resuming a killed run
# OUT.reveal/.resume/ holds what a killed run needs to go on after its last finished round: the run's config
# (release.json), each finished round's record and collected texts with their token ids (round-NN.json, with the
# sequence's record after it when it unlearned something) and each unlearned round's delta (requests/NAME/).
# A round killed before its record was written is done again from its reveal (same seed, same model).


RELEASE = "release.json"


def _resume_dir(out: str | Path) -> Path:
    return work_dir(out) / ".resume"


def resumable(out: str | Path) -> bool:
    """Whether OUT is the output of a killed ``--reveal`` run that ``--resume OUT`` continues."""
    return (_resume_dir(out) / RELEASE).is_file()


def saved_config(out: str | Path) -> dict[str, Any]:
    """The options the killed ``--reveal`` run writing to OUT was started with."""
    import json

    return json.loads((_resume_dir(out) / RELEASE).read_text(encoding="utf-8"))["config"]


def _start_rounds(cfg: UnlearnConfig) -> None:
    from .save import atomic_write_json

    atomic_write_json(_resume_dir(cfg.out) / RELEASE, {"config": cfg.to_dict()})


def _save_round(cfg: UnlearnConfig, record: dict[str, Any], fresh: list[dict[str, Any]], result) -> None:
    """The finished round (after its unlearning): the delta first, then the record that names it."""
    from .requests import write_delta
    from .save import atomic_dir, atomic_write_json

    folder = _resume_dir(cfg.out)
    if result is not None:
        with atomic_dir(folder / "requests" / record["request"]) as tmp:
            write_delta(tmp, result.deltas[-1])
    atomic_write_json(folder / f"round-{record['round']:02d}.json", {
        "record": record, "items": [{"text": item["text"], "ids": list(item["ids"])} for item in fresh],
        "state": result.state if result is not None else None})


def _saved_rounds(cfg: UnlearnConfig) -> list[dict[str, Any]]:
    """The killed run's finished rounds, in order; its options must be these (bar those that cannot change
    the result)."""
    import json

    from .checkpoint import RESUME_MAY_CHANGE

    if not resumable(cfg.out):
        raise ConfigError(f"{cfg.out}: no killed --reveal run to continue here ({_resume_dir(cfg.out) / RELEASE} is "
                          "missing); start it without --resume")
    old, new = saved_config(cfg.out), cfg.to_dict()
    changed = sorted(key for key in new if key not in RESUME_MAY_CHANGE and old.get(key) != new[key])
    if changed:
        raise ConfigError(f"{work_dir(cfg.out)}: the killed run was started with other options ({', '.join(changed)}); "
                          "resume with the original ones")
    saved = []
    for number in range(1, cfg.reveal_rounds + 1):
        path = _resume_dir(cfg.out) / f"round-{number:02d}.json"
        if not path.is_file():
            break
        saved.append(json.loads(path.read_text(encoding="utf-8")))
    return saved


def _saved_sequence(cfg: UnlearnConfig, state: dict[str, Any]):
    """The rounds' sequence as a finished round left it, its deltas read back from OUT.reveal/.resume/."""
    from .requests import Previous, read_delta

    folder = _resume_dir(cfg.out) / "requests"
    return Previous(work_dir(cfg.out), state, [read_delta(folder / f["name"], f) for f in state["finished"]])


def round_news(items: list[dict[str, Any]], known: set, n: int, min_novelty: float) -> dict[str, Any]:
    """What a round's collected ``items`` (each with its generated token ``ids``) reveal beyond ``known``
    (the request's and the earlier unlearned rounds' n-grams): ``novel``, the items with at least
    ``min_novelty`` of their n-grams new, and ``new_ngram_share``, the share of all their n-grams that is new
    (None without any). A round with no novel item revealed nothing new, however confident its texts."""
    from .reveal import ngrams, novelty

    grams = set().union(*(ngrams(item["ids"], n) for item in items)) if items else set()
    return {"novel": sum(novelty(item["ids"], known, n) >= min_novelty for item in items),
            "new_ngram_share": len(grams - known) / len(grams) if grams else None}


def _unlearn_round(cfg: UnlearnConfig, record: dict[str, Any], base, tokenizer, accelerator, previous):
    """One round's collected texts unlearned as the next request of the rounds' sequence; ``record`` notes it."""
    from .requests import unlearn_requests

    round_cfg = dataclasses.replace(cfg.round_config(), forget=record["forget"], overwrite=True)
    result = unlearn_requests(round_cfg, model=base, tokenizer=tokenizer, accelerator=accelerator, previous=previous)
    finished = result.state["finished"][-1]
    record.update(request=finished["name"], outcome=finished["outcome"], epochs_run=finished["epochs_run"],
                  stop_verdict=(finished["run"].get("stop") or {}).get("verdict"))
    return result


def _relocated(value: Any, old: Path, new: Path) -> Any:
    """``value`` (JSON-like) with every path at or under the work folder pointing into the output folder
    instead; other strings, even ones that merely contain the work folder's name, are left alone."""
    if isinstance(value, dict):
        return {key: _relocated(item, old, new) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relocated(item, old, new) for item in value]
    if isinstance(value, str) and (value == str(old) or value.startswith(str(old) + "/")):
        return str(new) + value[len(str(old)):]
    return value


def write_release(release: ReleaseResult, cfg: UnlearnConfig) -> Path:
    """The sequence's output folder (:func:`loku.requests.write_requests`) with the rounds' data in
    OUT/reveal/ and the rounds' record in report.json under ``reveal``."""
    from .requests import write_requests
    from .save import atomic_write_json

    work, final = work_dir(cfg.out), Path(cfg.out) / "reveal"
    result = release.requests
    rounds = _relocated(release.rounds, work, final)
    result.report = {**_relocated(result.report, work, final), "reveal": {"rounds": rounds, "stopped": release.stopped,
                                                                          "request": cfg.reveal}}
    result.state = _relocated(result.state, work, final)
    for delta in result.deltas:
        delta.forget = _relocated(delta.forget, work, final)

    def add_rounds(tmp: Path) -> None:
        shutil.copytree(work, tmp / "reveal", ignore=shutil.ignore_patterns(".resume"))
        atomic_write_json(tmp / "reveal" / "rounds.json", {"rounds": rounds, "stopped": release.stopped})

    out = write_requests(result, cfg, extra=add_rounds)
    shutil.rmtree(work, ignore_errors=True)
    return out


def run_release(cfg: UnlearnConfig, accelerator, *, resume: bool = False) -> int:
    """``loku unlearn --reveal REQUEST``: exit 0 when every round met its stop rule, 3 otherwise."""
    release = reveal_and_release(cfg, accelerator=accelerator, resume=resume)
    if not accelerator.is_main_process:
        return 0
    if release.requests is None:
        shutil.rmtree(work_dir(cfg.out), ignore_errors=True)
        print(f"loku: nothing unlearned: {release.stopped}; the model revealed nothing to unlearn from "
              f"{cfg.reveal} (try more --reveal-budget, or fragments in the request)")
        return 3
    out = write_release(release, cfg)
    failed = [r["round"] for r in release.rounds if r.get("outcome") not in (None, "success")]
    print(f"loku: {len(release.requests.deltas)} round(s) unlearned ({release.stopped}); failed rounds: "
          f"{', '.join(map(str, failed)) or 'none'}; results in {out}/report.md")
    return 0 if not failed else 3
