"""The unlearning methods: each a :class:`MethodSpec` (what trains, how the adapter starts, the forget loss
and the paper's learning rate). A new method is one entry of :data:`METHODS`; callers ask the spec
(``spec.full_weights``), never compare names. No feature module is imported here."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["METHODS", "MethodSpec"]


@dataclass(frozen=True)
class MethodSpec:
    """One row of the paper's Table 1: which parameters train, how the adapter starts, which loss."""

    adapter: str  # "full" (every weight trains) or "lora" (an adapter trains, the base is frozen)
    init: str | None  # initialiser name for LoRA (loku.initializers.INITIALIZERS)
    loss: str  # loku.losses.LOSSES
    lr: float  # the paper's learning rate for this kind of run (§6)

    def __post_init__(self) -> None:
        if self.adapter not in ("full", "lora"):
            raise ValueError(f"MethodSpec.adapter must be 'full' or 'lora', got {self.adapter!r}")

    @property
    def full_weights(self) -> bool:
        """Every weight of the model trains (no adapter): float32 master weights, no LoRA options."""
        return self.adapter == "full"


METHODS: dict[str, MethodSpec] = {
    "full-ga": MethodSpec("full", None, "ga", 5e-5),
    "full-gd": MethodSpec("full", None, "gd", 5e-5),
    "lora-ga": MethodSpec("lora", "gaussian", "ga", 2e-4),  # TOFU's Figure 5 runs every loss at each LoRA rank
    "lora-gd": MethodSpec("lora", "gaussian", "gd", 2e-4),
    "lora-ihl": MethodSpec("lora", "gaussian", "ihl", 2e-4),
    "fila-gd": MethodSpec("lora", "fila", "gd", 2e-4),
    "fila-ihl": MethodSpec("lora", "fila", "ihl", 2e-4),  # LoKU
    "vila-ihl": MethodSpec("lora", "vila", "ihl", 2e-4),
    "npo": MethodSpec("full", None, "npo", 5e-5),
    "lora-npo": MethodSpec("lora", "gaussian", "npo", 2e-4),
    # Forget terms with a finite optimum at "never seen" (docs/algorithms.md §12); not the paper's.
    "fila-ihl-margin": MethodSpec("lora", "fila", "ihl-margin", 2e-4),
    "fila-undial": MethodSpec("lora", "fila", "undial", 2e-4),
    "fila-me": MethodSpec("lora", "fila", "me", 2e-4),
    "lora-ihl-margin": MethodSpec("lora", "gaussian", "ihl-margin", 2e-4),
    "lora-undial": MethodSpec("lora", "gaussian", "undial", 2e-4),
    "lora-me": MethodSpec("lora", "gaussian", "me", 2e-4),
}
