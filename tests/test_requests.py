"""Continual unlearning (docs/algorithms.md §8): deletion requests one after another on a tiny Llama
that memorized 4 sequences, split into two requests of 2; strategies merge, stack and orthogonal."""
from __future__ import annotations

import json

import pytest
import torch

from loku.checks import check_unlearn
from loku.cli import build_parser, main
from loku.config import UnlearnConfig, load_config
from loku.errors import ConfigError, DataError, ModelError
from loku.metrics import extraction_likelihood_plain, memorization_accuracy
from loku.models import load_model
from loku.requests import (apply_deltas, forgetting, orthogonal_penalty, request_delta_factors, subspace_overlap,
                           unlearn_requests, write_requests)
from tiny_models import VOCAB, spy_first_step, texts_of

# --------------------------------------------------------------------------- the math


def test_orthogonal_penalty_value_and_gradient_match_the_closed_form():
    # O-LoRA (§8): lambda * sum_i ||A_i A_k^T||_F^2; d/dA_k = 2 A_k E^T E with E the earlier A's stacked.
    g = torch.Generator().manual_seed(0)
    earlier = [torch.randn(3, 10, generator=g, dtype=torch.float64) for _ in range(2)]
    a_k = torch.randn(4, 10, generator=g, dtype=torch.float64, requires_grad=True)
    stacked = torch.cat(earlier)
    value = orthogonal_penalty(stacked, a_k)
    expected = sum(torch.linalg.norm(a_i @ a_k.T) ** 2 for a_i in earlier)
    torch.testing.assert_close(value, expected)
    value.backward()
    torch.testing.assert_close(a_k.grad, 2 * a_k.detach() @ stacked.T @ stacked)


def test_subspace_overlap_is_zero_for_orthogonal_reads_and_scale_free():
    eye = torch.eye(6)
    assert subspace_overlap(eye[:2], eye[2:5]) == 0.0
    a, b = torch.randn(2, 6), torch.randn(3, 6)
    assert subspace_overlap(a, b) == pytest.approx(subspace_overlap(10 * a, 0.1 * b))
    assert subspace_overlap(eye[:1], 3 * eye[:1]) == pytest.approx(1.0)
    assert 0 <= subspace_overlap(a, b) <= 1


def test_delta_factors_give_the_change_of_the_weight():
    # FILA moved s*B0@A0 out of the base (§3): the request's change is s (B A - B0 A0), rank 2r.
    a, b, a0, b0 = torch.randn(2, 5), torch.randn(4, 2), torch.randn(2, 5), torch.randn(4, 2)
    fa, fb = request_delta_factors(a, b, 2.0, a0, b0)
    assert fa.shape == (4, 5) and fb.shape == (4, 4)
    torch.testing.assert_close(fb @ fa, 2.0 * (b @ a - b0 @ a0))
    fa, fb = request_delta_factors(a, b, 2.0)  # Gaussian start: B0 = 0, rank r
    torch.testing.assert_close(fb @ fa, 2.0 * b @ a)


def test_a_relapse_is_a_forgotten_request_back_above_and_a_never_forgotten_one_is_reported_apart():
    """§8: a relapse is an earlier request that HAD met its stop rule and is back above its thresholds; one
    that never met it is "not forgotten" (once, with its last measurement), however often it stays above."""
    bar = {"ma": 0.5, "el": 0.1}
    requests = [{"name": n, "outcome": o, "thresholds": bar}
                for n, o in [("r1", "failed"), ("r2", "success"), ("r3", "failed"), ("r4", "success")]]

    def row(after, **measured):
        return {"after": after, "measured": {n: {"ma": v[0], "el": v[1]} for n, v in measured.items()}}

    matrix = [row("before", r1=(1, 1), r2=(1, 1), r3=(1, 1), r4=(1, 1)),
              row("r1", r1=(0.8, 0.3)),  # r1 fails its own stop rule ...
              row("r2", r1=(0.7, 0.2), r2=(0.4, 0.0)),  # ... and stays above it: never a relapse
              row("r3", r1=(0.6, 0.2), r2=(0.6, 0.0), r3=(0.9, 0.5)),  # r2 (forgotten) back above on MA
              row("r4", r1=(0.55, 0.2), r2=(0.3, 0.0), r3=(0.45, 0.05), r4=(0.2, 0.0)),  # failed r3 now below
              row("r5", r1=(0.52, 0.12), r2=(0.3, 0.0), r3=(0.4, 0.2))]  # r3 back above on EL; r4's file gone
    found = forgetting(matrix, requests)
    assert [(r["request"], r["after"], r["ma"], r["el"]) for r in found["relapses"]] == [
        ("r2", "r3", 0.6, 0.0), ("r3", "r5", 0.4, 0.2)]
    assert found["not_forgotten"] == [{"after": "r5", "request": "r1", "ma": 0.52, "el": 0.12,
                                       "ma_threshold": 0.5, "el_threshold": 0.1}]
    # A request's own row is its outcome, not a relapse, even when it succeeded and rounding put it above.
    assert forgetting(matrix[:2], [{**requests[0], "outcome": "success"}])["relapses"] == []


# --------------------------------------------------------------------------- sequences on the tiny model


@pytest.fixture(scope="module")
def requests_root(memorized):
    """Two requests: the first 2 and the last 2 memorized forget sequences."""
    lines = (memorized / "forget.txt").read_text().splitlines()
    (memorized / "a.txt").write_text("\n".join(lines[:2]) + "\n")
    (memorized / "b.txt").write_text("\n".join(lines[2:]) + "\n")
    return memorized


def config(root, out, **kw) -> UnlearnConfig:
    base = dict(model=str(root / "base"), forget=[str(root / "a.txt"), str(root / "b.txt")],
                retain=str(root / "retain.txt"), validation=str(root / "validation.txt"), out=str(out),
                method="fila-ihl", rank=4, lora_alpha=8, lr=1e-2, batch_size=2, max_epochs=40, progress=False, seed=0)
    base.update(kw)
    return UnlearnConfig(**base)


@pytest.fixture(scope="module")
def stacked(requests_root, tmp_path_factory):
    """A stack sequence, with the trained model of each request's own run (the sequential model)."""
    import loku.trainer as trainer

    runs, finish = [], trainer.finish

    def keep(run):
        result = finish(run)
        runs.append(result)
        return result

    trainer.finish = keep
    try:
        result = unlearn_requests(config(requests_root, tmp_path_factory.mktemp("stack") / "out", strategy="stack"))
    finally:
        trainer.finish = finish
    return result, runs


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_stack_reproduces_the_sequential_model_and_every_request_stays_forgotten_or_is_named(stacked, requests_root):
    result, runs = stacked
    report = result.report
    ids = torch.randint(3, VOCAB, (3, 16), generator=torch.Generator().manual_seed(7))
    # The last request's own run trained on the earlier request folded in: the stacked adapters on the
    # original base reproduce it, and so does the model built from the deltas.
    # (Folding the deltas into float32 weights, W_res = W - s B0 A0 included, rounds differently from adding
    # them as adapters: logits of this memorizing model are of order 10, so differences of a few 1e-5 are
    # rounding; a missing or misplaced adapter moves them by order 1.)
    torch.testing.assert_close(logits(result.model, ids), logits(runs[-1].model, ids), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits(apply_deltas(result.original, result.deltas), ids), logits(result.model, ids),
                               atol=1e-4, rtol=1e-5)
    assert list(result.model.peft_config) == ["request-01", "request-02"]
    assert result.model.base_model.active_adapters == ["request-01", "request-02"]
    assert not any(p.requires_grad for p in result.model.parameters()), "earlier adapters are frozen"
    # Switching one adapter off is exactly the other request's change alone.
    with torch.no_grad():
        result.model.base_model.set_adapter(["request-01"], inference_mode=True)
        only_first = logits(result.model, ids)
        result.model.base_model.set_adapter(["request-01", "request-02"], inference_mode=True)
    torch.testing.assert_close(only_first, logits(apply_deltas(result.original, result.deltas[:1]), ids),
                               atol=1e-4, rtol=1e-5)

    assert [r["name"] for r in report["requests"]] == ["request-01", "request-02"]
    assert report["matrix"][0]["after"] == "before"
    assert all(v["ma"] > 0.95 for v in report["matrix"][0]["measured"].values())
    thresholds = {r["name"]: r["thresholds"] for r in report["requests"]}
    assert [set(row["measured"]) for row in report["matrix"][1:]] == [{"request-01"}, {"request-01", "request-02"}]
    # Request 1 after request 2, measured here with the reference metrics on the folded model (§6, §8): both
    # requests met their stop rule, so request 1 above either threshold is a relapse, and nothing is "not
    # forgotten". (With this seed it is: MA 1/23 against the validation set's 1/92.)
    lines = (requests_root / "a.txt").read_text().splitlines()
    ids = torch.tensor([result.tokenizer(t, add_special_tokens=False)["input_ids"] for t in lines])
    folded = apply_deltas(result.original, result.deltas)
    ma, el = (float(memorization_accuracy(folded, ids).mean()), float(extraction_likelihood_plain(folded, ids).mean()))
    assert report["matrix"][2]["measured"]["request-01"] == pytest.approx({"ma": ma, "el": el}, abs=1e-6)
    assert [r["outcome"] for r in report["requests"]] == ["success", "success"] and report["not_forgotten"] == []
    above = ma > thresholds["request-01"]["ma"] or el > thresholds["request-01"]["el"]
    assert [(r["after"], r["request"]) for r in report["relapses"]] == ([("request-02", "request-01")] if above else [])
    # Thresholds come from the model before the first request, for every request (§8).
    assert thresholds["request-01"]["ma"] == thresholds["request-02"]["ma"] == runs[0].report["before"]["val_ma"]
    # The matrix's own entry is the request's result.
    assert report["matrix"][1]["measured"]["request-01"]["ma"] == pytest.approx(runs[0].report["after"]["forget_ma"])
    # The overlap of the two A's, from the trained A's themselves: mean over layers of ||A1 A2^T|| / (||A1|| ||A2||).
    first, second = (d.reads for d in result.deltas)
    by_hand = [float(torch.linalg.norm(first[k].double() @ second[k].double().T)
                     / (torch.linalg.norm(first[k].double()) * torch.linalg.norm(second[k].double()))) for k in first]
    assert report["overlaps"][0]["earlier"] == "request-01"
    assert report["overlaps"][0]["mean"] == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-9)


def test_merge_trains_what_stack_trains_and_keeps_one_model(stacked, requests_root, tmp_path):
    result, _ = stacked
    merged = unlearn_requests(config(requests_root, tmp_path / "out", strategy="merge"))
    assert not hasattr(merged.model, "peft_config"), "merge folds every request into the weights"
    assert merged.report["matrix"] == result.report["matrix"]
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(logits(merged.model, ids), logits(result.model, ids), atol=1e-4, rtol=1e-5)


def test_orthogonal_penalty_lowers_the_overlap_of_the_adapters(requests_root, tmp_path):
    # Gaussian starts: both strategies begin from the same A's; only the penalty differs. One config per
    # request (its own options): a short first request, a longer second one for the penalty to act in.
    # Adam bounds each step, so how far A_2 turns away depends on the steps it gets more than on lambda.
    def requests(strategy):
        common = dict(method="lora-ihl", ma_threshold=0.0, el_threshold=0.0, strategy=strategy)
        return [config(requests_root, tmp_path / strategy, forget=str(requests_root / "a.txt"), max_epochs=5, **common),
                config(requests_root, tmp_path / strategy, forget=str(requests_root / "b.txt"), max_epochs=30,
                       **common)]

    stack = unlearn_requests(requests("stack"))
    ortho = unlearn_requests(requests("orthogonal"))
    assert [len(r["epochs"]) for r in ortho.runs] == [5, 30]
    assert ortho.report["mean_overlap"] < 0.5 * stack.report["mean_overlap"], (ortho.report["mean_overlap"],
                                                                               stack.report["mean_overlap"])
    # The penalty is in the loss of the second request only (the first has nothing to be orthogonal to).
    assert "loss_extra" not in ortho.runs[0]["epochs"][0] and "loss_extra" not in stack.runs[1]["epochs"][0]
    assert all(e["loss_extra"] > 0 for e in ortho.runs[1]["epochs"])
    penalties = [e["loss_extra"] for e in ortho.runs[1]["epochs"]]
    assert penalties[-1] < penalties[0]


def test_a_killed_sequence_resumes_without_redoing_finished_requests(stacked, requests_root, tmp_path, monkeypatch):
    import loku.trainer as trainer

    out = tmp_path / "out"
    calls = []
    original = trainer.train_until_stop

    def crash_on_second(run):
        calls.append(run.cfg.forget)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(run)

    monkeypatch.setattr(trainer, "train_until_stop", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        unlearn_requests(config(requests_root, out, strategy="stack"))
    state = json.loads((out.parent / "out.ckpt" / "state.json").read_text())
    assert [f["name"] for f in state["finished"]] == ["request-01"]

    calls.clear()
    monkeypatch.setattr(trainer, "train_until_stop", original)
    counted = []
    monkeypatch.setattr(trainer, "train_until_stop", lambda run: counted.append(run.cfg.forget) or original(run))
    with pytest.raises(ConfigError, match="other requests or settings"):
        unlearn_requests(config(requests_root, out, strategy="stack", rank=2), resume=True)
    resumed = unlearn_requests(config(requests_root, out, strategy="stack"), resume=True)
    assert counted == [str(requests_root / "b.txt")], "request 1 is not trained again"
    assert resumed.report["resumed"] is True
    assert resumed.report["matrix"] == stacked[0].report["matrix"]
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(logits(resumed.model, ids), logits(stacked[0].model, ids), atol=0, rtol=0)


def test_a_request_killed_mid_training_continues_from_its_last_epoch(stacked, requests_root, tmp_path, monkeypatch):
    import loku.trainer as trainer

    out, b = tmp_path / "out", str(requests_root / "b.txt")
    seen = []
    original = trainer.train_epoch

    def crash_in_second_epoch_of_second_request(run, epoch):
        if run.cfg.forget == b:
            seen.append(epoch)
            if epoch == 2 and not run.resumed:
                raise KeyboardInterrupt
        return original(run, epoch)

    assert stacked[0].runs[1]["epochs_run"] >= 2, "the second request must train past one epoch for this test"
    monkeypatch.setattr(trainer, "train_epoch", crash_in_second_epoch_of_second_request)
    with pytest.raises(KeyboardInterrupt):
        unlearn_requests(config(requests_root, out, strategy="stack"))
    from loku.checkpoint import START, STATE, checkpoint_dir

    kept = checkpoint_dir(out.parent / "out.ckpt" / "request-02")  # the trainer's, with the adapter's start
    assert (kept / STATE).is_file() and (kept / START).is_file()
    seen.clear()
    resumed = unlearn_requests(config(requests_root, out, strategy="stack"), resume=True)
    assert seen[0] == 2, "epoch 1 of the second request is not trained again"
    assert resumed.report["matrix"] == stacked[0].report["matrix"]
    assert resumed.runs[1]["epochs_run"] == stacked[0].runs[1]["epochs_run"]
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(logits(resumed.model, ids), logits(stacked[0].model, ids), atol=0, rtol=0)


def test_saved_output_keeps_one_adapter_per_request(stacked, requests_root, tmp_path):
    from peft import PeftModel

    result, _ = stacked
    cfg = config(requests_root, tmp_path / "saved", strategy="stack")
    out = write_requests(result, cfg)
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"] == "stack" and report["config"]["forget"] == cfg.forget
    md = (out / "report.md").read_text()
    for line in ("Relapses", "Not forgotten"):  # each entry named with its numbers, "none" when there is none
        entries = report["relapses"] if line == "Relapses" else report["not_forgotten"]
        expected = "; ".join(f"{r['request']} after {r['after']} (MA {r['ma']:.3f}, EL {r['el']:.3f})"
                             for r in entries) or "none"
        assert any(row.startswith(line) and row.rstrip().endswith(expected) for row in md.splitlines()), line
    base, _ = load_model(cfg.model)
    model = PeftModel.from_pretrained(base, str(out / "adapters" / "request-01"), adapter_name="request-01")
    model.load_adapter(str(out / "adapters" / "request-02"), adapter_name="request-02")
    model.base_model.set_adapter(["request-01", "request-02"], inference_mode=True)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(logits(model, ids), logits(result.model, ids), atol=1e-6, rtol=1e-6)
    merged = type(base).from_pretrained(out / "model")
    torch.testing.assert_close(logits(merged, ids), logits(result.model, ids), atol=1e-4, rtol=1e-5)
    # The model card names each request's forget file with its SHA-256 and outcome, and the base model.
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.base_model == cfg.model and card.data.library_name == "transformers"
    for request, run in zip(report["requests"], result.runs):
        assert f"`{run['data']['forget']['sha256']}`" in card.text
        assert f"| {request['name']} | {request['outcome']} | {request['epochs_run']} |" in card.text
    assert "## Gate" not in card.text


def _hand_kl(ref_logits, logits, labels) -> float:
    """KL(p_ref || p) per unmasked next-token position, averaged, written out from the definition."""
    ref_logits, logits, labels = ref_logits[:, :-1].double(), logits[:, :-1].double(), labels[:, 1:]
    keep = labels != -100
    log_ref, log_p = ref_logits[keep].log_softmax(-1), logits[keep].log_softmax(-1)
    return float((log_ref.exp() * (log_ref - log_p)).sum() / keep.sum())


@pytest.mark.parametrize("how", ["sequence", "continued"])
def test_a_later_request_is_anchored_to_the_model_before_the_first(requests_root, tmp_path, monkeypatch, how):
    """§8/§12 (ALGORITHMS.md §8, §12): request 2's reference is the model before request 1, not the model
    request 1 left: its KL retain term at its first step is KL(original || model) computed by hand (> 0: request
    1 moved the model; anchored to the previous model it is ~0, FILA's start being the previous model), UNDIAL's
    z_0 are the original's logits, and the two-sided rule's band is the original's held-out level. The same for
    a request continuing a finished sequence (`--model OUT --forget next`)."""
    a, b = str(requests_root / "a.txt"), str(requests_root / "b.txt")
    options = dict(method="fila-undial", retain_term="kl", stop_rule="two-sided", max_epochs=3, strategy="stack")
    seen: dict = {}
    spy_first_step(monkeypatch, b, seen)
    if how == "sequence":
        result = unlearn_requests(config(requests_root, tmp_path / "out", **options))
    else:
        first_cfg = config(requests_root, tmp_path / "one", forget=[a], **options)
        prev = write_requests(unlearn_requests(first_cfg), first_cfg)
        result = unlearn_requests(config(requests_root, tmp_path / "two", model=str(prev), forget=[b], **options))
    original, _ = load_model(str(requests_root / "base"))
    with torch.no_grad():
        on_original = {side: original(input_ids=seen[side]["input_ids"],
                                      attention_mask=seen[side]["attention_mask"]).logits for side in ("forget", "retain")}
    for side, expected in on_original.items():
        torch.testing.assert_close(seen[f"ref_{side}"], expected, atol=0, rtol=0)
    by_hand = _hand_kl(on_original["retain"], seen["model_retain"], seen["retain"]["labels"])
    assert by_hand > 1e-3, "request 1 moved the model on retain text (else the check below proves nothing)"
    assert seen["parts"]["retain"] == pytest.approx(by_hand, rel=1e-4)
    runs = result.runs
    assert runs[1]["stop"]["bands"] == runs[0]["stop"]["bands"]  # same held-out set and size: the same level
    assert seen["reference"] is result.original  # the sequence's one frozen copy: no copy more


# --------------------------------------------------------------------------- bad input, command line


def test_the_same_file_twice_or_overlapping_requests_are_refused_naming_the_files(requests_root, tmp_path, capsys):
    a, b = str(requests_root / "a.txt"), str(requests_root / "b.txt")
    with pytest.raises(ConfigError, match=r"a\.txt is given twice \(requests 1 and 3\).*remove the repeated"):
        check_unlearn(config(requests_root, tmp_path / "x", forget=[a, b, a]))
    overlapping = tmp_path / "c.txt"
    first_of_a = (requests_root / "a.txt").read_text().splitlines()[0]
    overlapping.write_text(texts_of(torch.randint(3, VOCAB, (1, 24)))[0] + "\n" + first_of_a + "\n")
    with pytest.raises(DataError, match=r"c\.txt: 1 of 2 forget texts of request 3 are already in request 1 "
                                        r"\(.*a\.txt\).*item 2.*must be disjoint"):
        unlearn_requests(config(requests_root, tmp_path / "y", forget=[a, b, str(overlapping)]))
    with pytest.raises(ConfigError, match="LoRA method"):
        unlearn_requests(config(requests_root, tmp_path / "z", method="full-ga"))
    with pytest.raises(ConfigError, match="--strategy must be one of merge, orthogonal, stack"):
        check_unlearn(config(requests_root, tmp_path / "w", strategy="nope"))
    from loku.trainer import unlearn

    with pytest.raises(ConfigError, match="sequence of deletion requests"):
        unlearn(config(requests_root, tmp_path / "v"))
    assert main(["unlearn", "--model", str(requests_root / "base"), "--forget", a, "--forget", a,
                 "--out", str(tmp_path / "cli")]) == 2
    assert "given twice" in capsys.readouterr().err


def test_one_forget_flag_is_a_single_run_as_before(requests_root, tmp_path):
    args = build_parser().parse_args(["unlearn", "--forget", "x.txt", "--out", "o"])
    assert args.forget == ["x.txt"]
    cfg = load_config(None, {"forget": args.forget, "out": "o"})
    assert cfg.forget == "x.txt" and cfg.forget_files() == ["x.txt"]
    assert load_config(None, {"forget": ["x.txt", "y.txt"]}).forget == ["x.txt", "y.txt"]


def test_cli_runs_a_sequence_and_writes_adapters(requests_root, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["unlearn", "--model", str(requests_root / "base"), "--forget", str(requests_root / "a.txt"),
                 "--forget", str(requests_root / "b.txt"), "--retain", str(requests_root / "retain.txt"),
                 "--validation", str(requests_root / "validation.txt"), "--strategy", "orthogonal", "--rank", "4",
                 "--lora-alpha", "8", "--lr", "1e-2", "--batch-size", "2", "--max-epochs", "8", "--no-progress",
                 "--ma-threshold", "0.5", "--el-threshold", "0.5", "--gate-fpr", "0.5", "--out", str(out)])
    printed = capsys.readouterr().out
    # Bars of 0.5 that this model's forget sets fall under within 8 epochs at lr 1e-2 (request 1 took 3 with
    # transformers 5, 4 with 4.56): both requests meet them and stay under (exit 0; a failed or relapsed
    # request would be exit 3).
    assert "2 requests (orthogonal); failed: none; relapsed: none; not forgotten: none" in printed
    assert code == 0
    assert (out / "adapters" / "request-01").is_dir() and (out / "adapters" / "request-02").is_dir()
    assert not (tmp_path / "cli.ckpt").exists(), "the finished output supersedes the checkpoint"
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"] == "orthogonal" and len(report["matrix"]) == 3
    gate = report["gate"]  # calibrated on validation rows 1 and 3, reported on rows 2 and 4
    assert (gate["calibrated_on"], gate["reported_on"]) == (2, 2)
    assert gate == {**gate, **_gate_rates_recomputed(out, requests_root)}
    assert "Gate (target false-positive rate 0.5" in (out / "report.md").read_text()
    with pytest.raises(ConfigError, match="--gate-fpr .* use --strategy stack or orthogonal"):
        check_unlearn(config(requests_root, tmp_path / "g", strategy="merge", gate_fpr=0.1))


def _gate_rates_recomputed(out, root) -> dict:
    """The honest rates of the gate saved in ``out`` (§8, ALGORITHMS.md §8), recomputed here from its texts:
    thresholds calibrated on validation rows 1 and 3 (its saved Gaussians are the forget texts'), the
    false-positive rate of the saved gate on rows 2 and 4, each request's true-positive rate with each of its
    texts held out of a gate fitted on the rest (whole text, and its first window alone)."""
    from loku.data import load_text_set
    from loku.gate import GatedModel, calibrate_threshold, fit_gate, text_features
    from loku.lm import ensure_pad_token
    from loku.requests import request_batches

    gated = GatedModel.from_pretrained(out)
    gate, base = gated.gate, gated.get_base_model()
    _, tokenizer = load_model(str(root / "base"))
    cfg, pad = config(root, out), ensure_pad_token(tokenizer)

    def features(path, role):
        batches = request_batches(cfg, tokenizer, base, load_text_set(str(path), role), pad)
        return text_features(gated.model, batches, window=gate.window, stride=gate.stride)

    forget = {"request-01": features(root / "a.txt", "forget"), "request-02": features(root / "b.txt", "forget")}
    heldout = features(root / "validation.txt", "validation")
    calibration, others = heldout[0::2], heldout[1::2]
    fit = dict(fpr=gate.fpr, shrinkage=gate.shrinkage, window=gate.window, stride=gate.stride)
    refit = fit_gate(forget, calibration, **fit)
    torch.testing.assert_close(gate.means, refit.means, atol=1e-10, rtol=1e-10)
    scores = gate.scores(calibration)
    torch.testing.assert_close(gate.thresholds, torch.tensor([calibrate_threshold(scores[:, k], gate.fpr)
                                                              for k in range(len(gate.names))], dtype=torch.float64))
    on = gate.decide(others).double()
    found = {"false_positive_rate": {**{n: float(on[:, k].mean()) for k, n in enumerate(gate.names)},
                                     "any": float(on.amax(dim=1).mean())},
             "true_positive_rate": {}, "true_positive_rate_prompts": {}}
    for k, name in enumerate(gate.names):
        texts = forget[name]
        whole = first = 0
        for held in range(len(texts)):  # 2 texts: each its own fold
            fitted = fit_gate({**forget, name: [t for i, t in enumerate(texts) if i != held]}, calibration, **fit)
            whole += bool(fitted.decide([texts[held]])[0, k])
            first += bool(fitted.decide([texts[held][:1]])[0, k])
        found["true_positive_rate"][name] = whole / len(texts)
        found["true_positive_rate_prompts"][name] = first / len(texts)
    return found


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stacked_adapters_add_exactly_the_folded_deltas(arch):
    # GPT-2's Conv1D stores [in, out]: the deltas are [out, in] and are transposed where folded in.
    from loku.lm import is_conv1d
    from loku.requests import Delta, stacked_model
    from tiny_models import make_tiny_model

    base = make_tiny_model(arch)
    g = torch.Generator().manual_seed(0)
    layers = {n: m for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj", "c_attn", "c_fc"))}
    conv = any(is_conv1d(m) for m in layers.values())

    def shape(m):  # (out, in)
        return tuple(reversed(m.weight.shape)) if is_conv1d(m) else tuple(m.weight.shape)

    deltas = [Delta(f"request-0{k}", "f.txt", a={n: torch.randn(3, shape(m)[1], generator=g) for n, m in layers.items()},
                    b={n: 0.3 * torch.randn(shape(m)[0], 3, generator=g) for n, m in layers.items()},
                    reads={}, fan_in_fan_out=conv) for k in (1, 2)]
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    folded = logits(apply_deltas(base, deltas), ids)
    torch.testing.assert_close(logits(stacked_model(base, deltas), ids), folded, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(base, ids), folded, atol=1e-3)


def test_one_forget_with_stack_and_a_gate_is_a_sequence_of_one_request(requests_root, tmp_path, capsys):
    """--strategy stack / --gate-fpr with a single --forget keep its adapter and fit the gate (§8), not ignored."""
    out = tmp_path / "one"
    code = main(["unlearn", "--model", str(requests_root / "base"), "--forget", str(requests_root / "a.txt"),
                 "--retain", str(requests_root / "retain.txt"), "--validation", str(requests_root / "validation.txt"),
                 "--strategy", "stack", "--rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--batch-size", "2",
                 "--max-epochs", "2", "--no-progress", "--ma-threshold", "0.5", "--el-threshold", "0.5",
                 "--gate-fpr", "0.5", "--out", str(out)])
    # 2 epochs are too few for this request (it needs 3 or more at lr 1e-2): it fails its stop rule, is
    # reported as not forgotten (never as a relapse) and the run exits 3.
    assert "1 request (stack); failed: request-01; relapsed: none; not forgotten: request-01" in capsys.readouterr().out
    assert code == 3
    assert (out / "adapters" / "request-01").is_dir()
    assert set(json.loads((out / "report.json").read_text())["gate"]["true_positive_rate"]) == {"request-01"}
    assert "## Gate" in (out / "model" / "README.md").read_text()  # the model card says a gate was fitted


def test_a_later_request_continues_a_finished_sequence_as_if_it_had_been_in_it(stacked, requests_root, tmp_path):
    """`--model OUT --forget next` (§8): request 2 after a saved sequence of request 1 is request 2 of the
    two-request sequence: same delta, request 1 measured again, thresholds of the original model."""
    result, _ = stacked
    a, b = str(requests_root / "a.txt"), str(requests_root / "b.txt")
    first = unlearn_requests(config(requests_root, tmp_path / "one", forget=[a], strategy="stack"))
    prev = write_requests(first, config(requests_root, tmp_path / "one", forget=[a], strategy="stack"))
    later = unlearn_requests(config(requests_root, tmp_path / "two", model=str(prev), forget=[b], strategy="stack"))
    assert [d.name for d in later.deltas] == ["request-01", "request-02"]
    for mine, theirs in zip(later.deltas, result.deltas):
        for layer in theirs.a:
            torch.testing.assert_close(mine.b[layer] @ mine.a[layer], theirs.b[layer] @ theirs.a[layer],
                                       atol=1e-5, rtol=1e-4)
    assert [row["after"] for row in later.report["matrix"]] == ["before", "request-01", "request-02"]
    assert set(later.report["matrix"][-1]["measured"]) == {"request-01", "request-02"}
    assert later.report["requests"][1]["thresholds"] == result.report["requests"][1]["thresholds"]
    assert later.state["continues"] == str(prev)

    # Bad input: the same file again, another strategy, another base, the earlier folder as --out.
    with pytest.raises(ConfigError, match="given twice"):
        unlearn_requests(config(requests_root, tmp_path / "x", model=str(prev), forget=[a], strategy="stack"))
    with pytest.raises(ConfigError, match="--strategy stack"):
        unlearn_requests(config(requests_root, tmp_path / "y", model=str(prev), forget=[b], strategy="orthogonal"))
    with pytest.raises(ConfigError, match="--out .* is the model folder"):
        unlearn_requests(config(requests_root, prev, model=str(prev), forget=[b], strategy="stack"))
    record = json.loads((prev / "sequence.json").read_text())
    record["base_fingerprint"] = "0" * 64
    (prev / "sequence.json").write_text(json.dumps(record))
    with pytest.raises(ModelError, match="another base model"):
        unlearn_requests(config(requests_root, tmp_path / "z", model=str(prev), forget=[b], strategy="stack"))


def test_a_sequence_continues_after_an_earlier_forget_file_was_deleted(requests_root, tmp_path):
    """§8 / README: an earlier request whose forget file is gone is warned about and no longer measured; the
    new request still trains, is measured, and the sequence finishes (it used to end in KeyError)."""
    gone = tmp_path / "gone.txt"
    gone.write_text((requests_root / "a.txt").read_text())
    first_cfg = config(requests_root, tmp_path / "one", forget=[str(gone)], strategy="stack", max_epochs=3)
    prev = write_requests(unlearn_requests(first_cfg), first_cfg)
    gone.unlink()
    with pytest.warns(UserWarning, match=r"gone\.txt: the forget file of an earlier request is gone"):
        later = unlearn_requests(config(requests_root, tmp_path / "two", model=str(prev),
                                        forget=[str(requests_root / "b.txt")], strategy="stack", max_epochs=3))
    assert [d.name for d in later.deltas] == ["request-01", "request-02"]
    assert set(later.report["matrix"][-1]["measured"]) == {"request-02"}, "request-01 is no longer measured"
    out = write_requests(later, config(requests_root, tmp_path / "two", strategy="stack"))
    assert "request-02" in (out / "report.md").read_text()
