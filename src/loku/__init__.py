"""loku: Low-rank Knowledge Unlearning for causal language models."""
__version__ = "0.1.0"
