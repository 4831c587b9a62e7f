"""Stop rules (docs/algorithms.md §6, §12): the two-sided rule stops at the held-out level, reports an
overshoot, keeps the check closest to the level (not the last one), resumes exactly; the paper's rule
is unchanged."""
from __future__ import annotations

import json
import signal
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import loku.stop as stop
from loku.config import UnlearnConfig
from loku.stop import Band, TwoSidedRule, bootstrap_band, place, sequence_scores
from loku.trainer import unlearn
from test_resume import cli_args, comparable, run

# Held-out level: MA 0.30 in [0.25, 0.40], NLL 3.0 in [2.5, 3.2] (bands need not be symmetric).
BANDS = {"forget_ma": Band(0.30, 0.25, 0.40, +1), "forget_nll": Band(3.0, 2.5, 3.2, -1)}


class Scripted:
    """A run whose forget-set measurement at optimizer step s is script[s - 1] (MA, NLL), and whose one
    trainable weight holds s: the weight left in the model tells which step's state was kept."""

    def __init__(self, script: list[tuple[float, float]], check_every: int | None = 1, max_epochs: int = 99):
        self.script = script
        self.model = torch.nn.Linear(1, 1, bias=False)
        self.cfg = SimpleNamespace(check_every=check_every, max_epochs=max_epochs, stop_interval=0.9, seed=0)
        self.rule = TwoSidedRule(self.cfg)
        self.rule.bands = dict(BANDS)
        self.run = SimpleNamespace(model=self.model, accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                                   on_main=lambda fn: fn(), log=lambda msg: None, epochs=[], optimizer_steps=0,
                                   eval_batches={"forget": []})

    def scores(self, model, batches):
        ma, nll = self.script[self.run.optimizer_steps - 1]
        return torch.tensor([ma]), torch.tensor([nll], dtype=torch.float64)

    def train(self, steps_per_epoch: int = 2) -> list[dict]:
        """Steps until the rule stops (within an epoch or at its end) or the script ends."""
        while self.run.optimizer_steps < len(self.script):
            epoch = len(self.run.epochs) + 1
            for _ in range(steps_per_epoch):
                self.run.optimizer_steps += 1
                with torch.no_grad():
                    self.model.weight.fill_(self.run.optimizer_steps)
                if self.rule.after_step(self.run) or self.run.optimizer_steps == len(self.script):
                    break
            record = {"epoch": epoch}
            self.rule.after_epoch(self.run, record)
            self.run.epochs.append(record)
            if record["stopped"]:
                break
        self.rule.keep_best(self.run)
        return self.run.epochs


@pytest.fixture
def scripted(monkeypatch):
    def make(script, **kw) -> Scripted:
        s = Scripted(script, **kw)
        monkeypatch.setattr(stop, "sequence_scores", s.scores)
        return s
    return make


def kept_step(s: Scripted) -> int:
    return int(s.model.weight.item())


def test_the_closest_check_is_kept_not_the_last_one(scripted):
    """Memorized -> in the band (closer, closer) -> still in the band but farther: stop there, keep step 4."""
    s = scripted([(0.9, 0.5), (0.5, 2.0), (0.36, 2.8), (0.31, 2.95), (0.27, 3.1), (0.26, 3.15)])
    epochs = s.train()
    report = s.rule.report()
    assert report["chosen"]["step"] == 4 and kept_step(s) == 4, "the closest check's weights must be kept"
    assert [c["step"] for e in epochs for c in e["checks"]] == [1, 2, 3, 4, 5], "stops once the level is passed"
    assert epochs[-1]["stopped"] and epochs[-1]["success"] and report["verdict"] == "at the held-out level"
    assert [c["side"] for e in epochs for c in e["checks"]] == ["under", "under", "in", "in", "in"]


def test_an_overshoot_is_reported_and_the_closest_state_kept(scripted):
    """From memorized straight past the band (NLL far above the held-out NLL): a failure, not a success."""
    s = scripted([(0.9, 0.5), (0.5, 2.0), (0.20, 4.0), (0.1, 6.0)])
    epochs = s.train()
    report = s.rule.report()
    assert epochs[-1]["stopped"] and not epochs[-1]["success"]
    assert report["verdict"] == "overshoot" and report["overshoot_seen"]
    # Step 2 is 2 half-widths short of the band (MA (0.5-0.3)/0.1, NLL (3-2)/0.5); step 3 is past it by
    # 5 (NLL (4-3)/0.2): step 2 is the closest state.
    assert report["chosen"]["step"] == 2 and kept_step(s) == 2
    assert report["chosen"]["distance"] == pytest.approx(2.0)


def test_forget_ma_far_below_held_out_is_an_overshoot_too(scripted):
    s = scripted([(0.9, 0.5), (0.05, 2.9)])
    s.train()
    assert s.rule.checks[-1].side == "over" and s.rule.report()["verdict"] == "overshoot"


def test_checks_only_at_epoch_ends_without_check_every_and_the_last_epoch_ends_the_run(scripted):
    s = scripted([(0.9, 0.5), (0.5, 2.0), (0.36, 2.8), (0.32, 2.9)], check_every=None, max_epochs=2)
    epochs = s.train()
    assert [c["step"] for e in epochs for c in e["checks"]] == [2, 4]
    # The last epoch with a check in the band: a success though the level was not yet passed.
    assert epochs[-1]["stopped"] and epochs[-1]["success"] and kept_step(s) == 4


def test_never_reaching_the_band_is_a_failure_that_a_longer_run_may_continue(scripted):
    s = scripted([(0.9, 0.5), (0.8, 0.7)], max_epochs=1)
    epochs = s.train()
    assert not epochs[-1]["success"] and not epochs[-1]["stopped"]
    assert s.rule.report()["verdict"] == "not reached"


def test_band_position_and_place():
    ma = BANDS["forget_ma"]
    assert ma.position(0.40) == pytest.approx(1.0) and ma.position(0.25) == pytest.approx(-1.0)
    assert ma.position(0.50) == pytest.approx(2.0) and ma.position(0.20) == pytest.approx(-2.0)
    nll = BANDS["forget_nll"]
    assert nll.position(2.5) == pytest.approx(1.0) and nll.position(3.4) == pytest.approx(-2.0)
    assert place(BANDS, {"forget_ma": 0.35, "forget_nll": 3.1}) == (pytest.approx(0.5), "in")
    assert place(BANDS, {"forget_ma": 0.8, "forget_nll": 4.0})[1] == "over"  # past on one side: overshoot


def test_bootstrap_band_is_seeded_holds_the_mean_and_narrows_with_more_draws():
    values = torch.rand(200, generator=torch.Generator().manual_seed(0))
    a, b = bootstrap_band(values, 8, 0.9, seed=5, memorized=1), bootstrap_band(values, 8, 0.9, seed=5, memorized=1)
    assert a == b and a.lo < a.center < a.hi and a.center == pytest.approx(float(values.double().mean()))
    wide, narrow = bootstrap_band(values, 4, 0.9, 1, 1), bootstrap_band(values, 64, 0.9, 1, 1)
    assert narrow.hi - narrow.lo < wide.hi - wide.lo
    # A mean of 8 uniform draws has sd 0.289/sqrt(8) = 0.102: the 90% interval is about +-1.645 sd.
    assert (a.hi - a.lo) / 2 == pytest.approx(1.645 * 0.2887 / 8 ** 0.5, rel=0.15)


# --------------------------------------------------------------------------- end to end, tiny model


def config(root, out, **kw) -> UnlearnConfig:
    base = dict(model=str(root / "base"), forget=str(root / "forget.txt"), retain=str(root / "retain.txt"),
                validation=str(root / "validation.txt"), out=str(out), method="lora-ga", rank=4, lora_alpha=8,
                lr=1e-2, batch_size=2, max_epochs=12, progress=False, seed=0, stop_rule="two-sided", check_every=1)
    base.update(kw)
    return UnlearnConfig(**base)


def test_two_sided_run_keeps_the_chosen_steps_state(memorized, tmp_path):
    """Gradient ascent passes the held-out level between two checks; the model returned is the one of
    the closest check (its forget MA and NLL, measured again, are the check's), not the last step's."""
    result = unlearn(config(memorized, tmp_path / "run"))
    report = result.report
    chosen, checks = report["stop"]["chosen"], [c for e in report["epochs"] for c in e["checks"]]
    assert checks[-1]["step"] > chosen["step"], "the case must stop after the chosen check"
    assert report["stop"]["overshoot_seen"]
    ma, nll = sequence_scores(result.model, _forget_batches(result, memorized))
    assert float(ma.double().mean()) == pytest.approx(chosen["forget_ma"], abs=1e-9)
    assert float(nll.mean()) == pytest.approx(chosen["forget_nll"], rel=1e-9)
    assert float(nll.mean()) != pytest.approx(checks[-1]["forget_nll"], rel=1e-3)
    assert report["after"]["forget_ma"] == pytest.approx(chosen["forget_ma"])
    assert report["outcome"] == ("success" if report["stop"]["verdict"] == "at the held-out level" else "failed")


def _forget_batches(result, root):
    from loku import data as data_mod

    texts = data_mod.load_text_set(str(root / "forget.txt"), "forget")
    ids = data_mod.tokenize_set(result.tokenizer, texts, max_length=64)
    return data_mod.make_batches(ids, 4, result.tokenizer.pad_token_id)


def test_paper_rule_records_are_unchanged_by_the_rule_machinery(memorized, tmp_path):
    """--stop-rule paper: no checks, no stop block, the paper's success test on each epoch."""
    report = unlearn(config(memorized, tmp_path / "run", method="fila-ihl", stop_rule="paper", check_every=None,
                            batch_size=4, max_epochs=40)).report
    assert "stop" not in report and all("checks" not in e and "stopped" not in e for e in report["epochs"])
    last = report["epochs"][-1]
    assert report["outcome"] == "success" and last["forget_ma"] <= report["thresholds"]["ma"]


def test_two_sided_sigkill_mid_epoch_then_resume_equals_uninterrupted(memorized, tmp_path):
    """The checks, the best state so far (checkpoint's best.safetensors) and the stop resume exactly."""
    extra = ("--method", "lora-ga", "--lr", "1e-2", "--max-epochs", "12", "--stop-rule", "two-sided",
             "--check-every", "1")
    killed = tmp_path / "killed"
    crash = run(cli_args(memorized, killed, *extra), LOKU_FAILPOINT="step:9")
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-2000:]
    from loku.checkpoint import BEST, checkpoint_dir
    assert (checkpoint_dir(killed) / BEST).is_file()
    resumed = run([sys.executable, "-m", "loku.cli", "unlearn", "--resume", str(killed), "--no-progress"])
    straight = tmp_path / "straight"
    done = run(cli_args(memorized, straight, *extra))
    assert resumed.returncode == done.returncode, resumed.stderr[-2000:]
    a = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (killed, straight))
    assert comparable(ra) == comparable(rb) and ra["stop"] == rb["stop"]


def test_stop_on_measures_its_own_texts_against_validation_cut_to_their_length(memorized, tmp_path):
    """§12 with --stop-on: the rule measures the given texts (here the forget texts' first 8 words, as a
    request's fragments), and the held-out level is the validation set's first 8 tokens, not its whole
    sequences: every check, the band and the "before" numbers are of those, measured again here."""
    from loku import data as data_mod
    from loku.models import load_model

    fragments = tmp_path / "fragments.txt"
    fragments.write_text("\n".join(" ".join(t.split()[:8]) for t in (memorized / "forget.txt").read_text().splitlines()))
    cfg = config(memorized, tmp_path / "run", stop_on=str(fragments), max_epochs=2)
    result = unlearn(cfg)
    report = result.report
    assert report["data"]["stop_on"]["sequences"] == 4 and report["data"]["forget"]["sequences"] == 4

    model, tokenizer = load_model(str(memorized / "base"))
    pad = tokenizer.pad_token_id

    def batches(path, cut=None):
        ids = data_mod.tokenize_set(tokenizer, data_mod.load_text_set(str(path), "x"), max_length=64).ids
        return data_mod.make_batches([i[:cut] for i in ids], 8, pad)

    frag_ma, _ = sequence_scores(model, batches(fragments))
    held_ma, _ = sequence_scores(model, batches(memorized / "validation.txt", cut=8))
    whole_ma, _ = sequence_scores(model, batches(memorized / "validation.txt"))
    assert report["before"]["forget_ma"] == pytest.approx(float(frag_ma.double().mean()), abs=1e-6)
    assert report["before"]["val_ma"] == pytest.approx(float(held_ma.double().mean()), abs=1e-6)
    assert float(held_ma.mean()) != pytest.approx(float(whole_ma.mean()), abs=1e-3)  # the cut matters here
    assert report["stop"]["bands"]["forget_ma"]["center"] == pytest.approx(float(held_ma.double().mean()), abs=1e-6)
    frag_after, _ = sequence_scores(result.model, batches(fragments))
    assert report["after"]["forget_ma"] == pytest.approx(float(frag_after.double().mean()), abs=1e-6)


def test_stop_on_needs_a_validation_set(memorized, tmp_path):
    from loku.checks import check_unlearn
    from loku.errors import ConfigError

    with pytest.raises(ConfigError, match="--stop-on .* --validation"):
        check_unlearn(config(memorized, tmp_path / "o", stop_on=str(memorized / "forget.txt"), validation=None,
                             stop_rule="paper", check_every=None, ma_threshold=0.1, el_threshold=0.1))
