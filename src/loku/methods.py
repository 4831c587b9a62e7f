"""The unlearning methods: each a :class:`MethodSpec` registered in :data:`METHODS` (what trains, how the
adapter starts, the forget term, the default retain term and the paper's learning rate). A new method is
one registration; callers ask the spec (``spec.full_weights``, ``spec.loss_terms(...)``), never compare
names. The terms themselves are functions registered in loku.losses (``FORGET_TERMS``, ``RETAIN_TERMS``);
no feature module is imported here."""
from __future__ import annotations

from dataclasses import dataclass

from .registry import Registry

__all__ = ["METHODS", "MethodSpec", "NO_RETAIN"]

NO_RETAIN = "none"  # the retain term of plain gradient ascent: no retain batches at all


@dataclass(frozen=True)
class MethodSpec:
    """One row of the paper's Table 1: which parameters train, how the adapter starts, which loss terms."""

    adapter: str  # "full" (every weight trains) or "lora" (an adapter trains, the base is frozen)
    init: str | None  # initialiser name for LoRA (loku.initializers.INITIALIZERS)
    forget: str  # forget term (loku.losses.FORGET_TERMS), weighted by gamma
    retain: str  # default retain term (loku.losses.RETAIN_TERMS, or "none"), weighted by alpha
    lr: float  # the paper's learning rate for this kind of run (§6)

    def __post_init__(self) -> None:
        if self.adapter not in ("full", "lora"):
            raise ValueError(f"MethodSpec.adapter must be 'full' or 'lora', got {self.adapter!r}")

    @property
    def full_weights(self) -> bool:
        """Every weight of the model trains (no adapter): float32 master weights, no LoRA options."""
        return self.adapter == "full"

    def loss_terms(self, retain_term: str | None = None, forget_term: str | None = None) -> tuple[str, str]:
        """(forget term, retain term): ``forget_term`` / ``retain_term`` (--forget-term, --retain-term) replace
        the method's."""
        return (forget_term if forget_term is not None else self.forget,
                retain_term if retain_term is not None else self.retain)


METHODS: Registry[MethodSpec] = Registry("method")
for _name, _spec in {
    "full-ga": MethodSpec("full", None, "ga", NO_RETAIN, 5e-5),
    "full-gd": MethodSpec("full", None, "ga", "nll", 5e-5),
    "lora-ga": MethodSpec("lora", "gaussian", "ga", NO_RETAIN, 2e-4),  # TOFU's Figure 5: every loss at each rank
    "lora-gd": MethodSpec("lora", "gaussian", "ga", "nll", 2e-4),
    "lora-ihl": MethodSpec("lora", "gaussian", "ihl", "nll", 2e-4),
    "fila-gd": MethodSpec("lora", "fila", "ga", "nll", 2e-4),
    "fila-ihl": MethodSpec("lora", "fila", "ihl", "nll", 2e-4),  # LoKU
    "vila-ihl": MethodSpec("lora", "vila", "ihl", "nll", 2e-4),
    "npo": MethodSpec("full", None, "npo", "nll", 5e-5),
    "lora-npo": MethodSpec("lora", "gaussian", "npo", "nll", 2e-4),
    # Forget terms with a finite optimum at "never seen" (docs/algorithms.md §12); not the paper's.
    "fila-ihl-margin": MethodSpec("lora", "fila", "ihl_margin", "nll", 2e-4),
    "fila-undial": MethodSpec("lora", "fila", "undial", "nll", 2e-4),
    "fila-me": MethodSpec("lora", "fila", "me", "nll", 2e-4),
    "lora-ihl-margin": MethodSpec("lora", "gaussian", "ihl_margin", "nll", 2e-4),
    "lora-undial": MethodSpec("lora", "gaussian", "undial", "nll", 2e-4),
    "lora-me": MethodSpec("lora", "gaussian", "me", "nll", 2e-4),
}.items():
    METHODS.register(_name)(_spec)
