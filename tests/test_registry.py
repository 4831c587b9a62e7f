"""A new loss term or initialiser is one registered function: the loop asks its traits, never its name."""
from __future__ import annotations

import pytest
import torch

from loku.checks import check_unlearn
from loku.config import UnlearnConfig
from loku.methods import METHODS, MethodSpec
from loku.initializers import INITIALIZERS, lora_layers
from loku.losses import FORGET_TERMS, inverted_hinge_loss, needs_reference
from loku.models import load_model
from loku.registry import Registry
from loku.report import write_run
from loku.trainer import unlearn
from tiny_models import VOCAB


def test_registry_traits_default_to_false_and_unknown_names_are_listed():
    reg: Registry = Registry("thing")
    reg.register("a", fast=True)(lambda: 1)
    reg.register("b")(lambda: 2)
    assert reg.trait("a", "fast") is True and reg.trait("b", "fast") is False
    assert reg.traits("a") == {"fast": True}
    with pytest.raises(ValueError, match="choose one of: a, b"):
        reg.trait("c", "fast")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(lambda: 3)


if "test-halve-base" not in INITIALIZERS:
    @INITIALIZERS.register("test-halve-base", replaces_base=True)
    def _halve_base(model, ctx):
        """Moves half of each base weight into the adapter: W_res = W/2, s*B@A = W/2 (function kept)."""
        for layer in lora_layers(model).values():
            base = layer.get_base_layer().weight
            rank, scaling = layer.r["default"], layer.scaling["default"]
            u, s, vh = torch.linalg.svd(base.detach().float() / 2, full_matrices=False)
            with torch.no_grad():
                layer.lora_B["default"].weight.copy_(u[:, :rank] * s[:rank].sqrt() / scaling ** 0.5)
                layer.lora_A["default"].weight.copy_(s[:rank, None].sqrt() * vh[:rank] / scaling ** 0.5)
                base.copy_(base - scaling * layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        return {}

if "test-needs-ref" not in FORGET_TERMS:
    @FORGET_TERMS.register("test-needs-ref", needs_reference=True)
    def _ihl_checked(x):
        assert x.ref_logits is not None, "the loop must supply the reference model's logits"
        return inverted_hinge_loss(x.logits, x.labels)


if "test-method" not in METHODS:  # a new method is one registration
    METHODS.register("test-method")(MethodSpec("lora", "test-halve-base", "ihl", "nll", 1e-3))
    METHODS.register("test-ref-method")(MethodSpec("lora", "gaussian", "test-needs-ref", "nll", 1e-3))


def test_a_new_initialiser_that_replaces_base_weights_saves_its_residual(memorized, tmp_path):
    cfg = UnlearnConfig(model=str(memorized / "base"), forget=str(memorized / "forget.txt"),
                        retain=str(memorized / "retain.txt"), validation=str(memorized / "validation.txt"),
                        out=str(tmp_path / "run"), method="test-method", rank=4, lora_alpha=8, max_epochs=1,
                        progress=False)
    result = unlearn(cfg)
    assert result.start, "replaces_base=True must keep the start (A0, B0) it moved out of the base"
    out = write_run(result, cfg)
    ids = torch.randint(3, VOCAB, (1, 10))
    with torch.no_grad():
        rebuilt, _ = load_model(cfg.model, adapter=out / "adapter")
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, result.model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_a_new_forget_term_that_needs_the_reference_gets_it(memorized, tmp_path):
    assert needs_reference(*METHODS["test-ref-method"].loss_terms())
    cfg = UnlearnConfig(model=str(memorized / "base"), forget=str(memorized / "forget.txt"),
                        retain=str(memorized / "retain.txt"), validation=str(memorized / "validation.txt"),
                        out=str(tmp_path / "run"), method="test-ref-method", rank=4, lora_alpha=8, max_epochs=1,
                        progress=False)
    report = unlearn(cfg).report
    assert report["epochs_run"] == 1 and report["flops"]["training"] > 0


def test_a_method_spec_says_what_trains_and_refuses_an_unknown_kind():
    assert METHODS["full-ga"].full_weights and METHODS["npo"].full_weights
    assert not any(METHODS[m].full_weights for m in ("lora-ihl", "fila-ihl", "vila-ihl", "fila-ihl-margin"))
    with pytest.raises(ValueError, match="'full' or 'lora'"):
        MethodSpec("qlora", "gaussian", "ihl", "nll", 1e-3)


COUNTED: list[int] = []
if "test-counted" not in FORGET_TERMS:
    @FORGET_TERMS.register("test-counted")
    def _counted(x):
        COUNTED.append(1)
        return inverted_hinge_loss(x.logits, x.labels)


def test_a_new_forget_term_is_one_registered_function(memorized, tmp_path):
    """Issue 22: a forget term registered in loku.losses runs with --forget-term under any method (the method keeps
    what trains, the start and the lr); an unknown name is refused before any work."""
    from loku.errors import ConfigError

    def cfg(**kw):
        return UnlearnConfig(model=str(memorized / "base"), forget=str(memorized / "forget.txt"),
                             retain=str(memorized / "retain.txt"), validation=str(memorized / "validation.txt"),
                             out=str(tmp_path / "run"), method="lora-ihl", rank=4, lora_alpha=8, max_epochs=1,
                             progress=False, **kw)

    COUNTED.clear()
    run_cfg = cfg(forget_term="test-counted")
    assert run_cfg.loss_terms() == ("test-counted", "nll") and cfg().loss_terms() == ("ihl", "nll")
    report = unlearn(run_cfg).report
    assert COUNTED and report["epochs_run"] == 1 and report["epochs"][0]["loss_forget"] is not None
    with pytest.raises(ConfigError, match="--forget-term must be one of .*ihl.*, got 'nope'"):
        check_unlearn(cfg(forget_term="nope"))
