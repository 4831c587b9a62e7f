"""Metrics: MA and EL_n (§6), perplexity, membership inference, reasoning, dialogue, TOFU (§7)."""
from .memorization import extraction_likelihood, extraction_likelihood_plain, memorization_accuracy

__all__ = ["extraction_likelihood", "extraction_likelihood_plain", "memorization_accuracy"]
