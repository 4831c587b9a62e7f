"""Continual unlearning (docs/algorithms.md §8): deletion requests unlearned one after another.

Each request is one :func:`loku.trainer.unlearn` run on the model the earlier requests left, with its
own stop rule. After each request every request so far is measured again; one that had met its stop rule
and is back above its own thresholds is a relapse, named in the report; one that never met it is "not
forgotten", named apart (it cannot relapse).

What a request leaves is a low-rank change of its target weights,

    Delta_k = s (B_k A_k - B_k^0 A_k^0)

(B^0 = 0 for a Gaussian start; FILA moves its start B^0 A^0 out of the base weight, §3). It is kept as
a LoRA adapter on the ORIGINAL base weights (factors [A_k; A_k^0] and s [B_k, -B_k^0], rank 2r for
FILA, r otherwise), so it needs no residual base and can be switched off on its own (``loku.gate``).
The model request k trains on is always built the same way, the original weights plus the earlier
deltas in request order, so a sequence resumed after a crash starts each request from the same
weights as an uninterrupted one. What a request is held to is the model before the FIRST request (the
sequence's ``original``), never the model the earlier requests left: the reference logits of every term
with the trait ``needs_reference`` (the KL retain term, NPO, UNDIAL), the two-sided rule's held-out band
and the thresholds. Anchored to the previous model, each request would keep every earlier request's drift
as its target (Pile perplexity x1.16, 1.64, 2.21, 3.36 over 4 merge requests). The original is the one
frozen copy the sequence keeps anyway (the deltas are applied to it), so the anchor costs no memory.

Strategies (registry ``STRATEGIES``; a strategy gives the extra loss term of a request, its traits
say what is kept):

- ``merge``: every request trains a fresh adapter, FILA computed on the current model (the
  earlier requests folded in): the paper's setting. The result is one merged model.
- ``stack``: the same training (a frozen adapter adds a fixed matrix to a weight, so training on the
  folded sum is the same function and gradient), but the result keeps one adapter per request,
  all active and frozen, which the gate can switch one by one. In float32 the stacked model
  reproduces the sequential one up to rounding (tests/test_requests.py); in 16-bit dtypes it differs
  by the rounding of folding the deltas into 16-bit base weights.
- ``orthogonal`` (O-LoRA): stack plus lambda * sum_{i<k} ||A_i A_k^T||_F^2 between the new adapter's
  down-projection A_k and every earlier one (A's rows span the input subspace an adapter reads).

The overlap ||A_i A_k^T||_F / (||A_i||_F ||A_k||_F) of the trained A's is reported for every pair and
layer. Only LoRA methods are supported (a full fine-tune leaves no low-rank delta to keep). On resume,
finished requests are not redone and a request interrupted mid-training continues from its last
finished epoch (the trainer's per-epoch checkpoint, which keeps the adapter's start too).

Modules: ``delta`` (a request's change, the models built from the deltas, their file), ``sequence`` (the
checks, the loop, its checkpoint and resume, continuing a finished sequence), ``output`` (relapses, the
report and the output folder).
"""
from __future__ import annotations

from ..adapters import request_delta_factors  # the math lives in loku.adapters
from ..strategies import STRATEGIES, orthogonal_penalty  # the sequence's strategies
from .delta import Delta, apply_deltas, extract_delta, overlaps, read_delta, stacked_model, subspace_overlap, write_delta
from .output import (SEQUENCE, forgetting, forgetting_lines, gate_markdown, render_requests_markdown, sequence_report,
                     write_requests)
from .sequence import (KIND, Previous, RequestsResult, check_requests, fit_request_gate, heldout_batches,
                       measure_request, previous_sequence, request_batches, request_configs, sequence_result,
                       unlearn_requests)

__all__ = ["KIND", "SEQUENCE", "STRATEGIES", "Delta", "Previous", "RequestsResult", "apply_deltas", "check_requests",
           "extract_delta", "fit_request_gate", "forgetting", "forgetting_lines", "gate_markdown", "heldout_batches",
           "measure_request", "orthogonal_penalty", "overlaps", "previous_sequence", "read_delta",
           "render_requests_markdown", "request_batches", "request_configs", "request_delta_factors",
           "sequence_report", "sequence_result", "stacked_model", "subspace_overlap", "unlearn_requests",
           "write_delta", "write_requests"]
