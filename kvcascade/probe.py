"""Observe a model's attention: one forward with an attention function of ours that sees every layer's queries
and keys exactly as the model attends with them (rotated, normed), then runs the model's plain SDPA.

Used by Locret's training labels and by the inter-layer calibration. The model's attention implementation is
switched for that one forward and switched back afterwards; the observer's state is per thread.
"""

from __future__ import annotations

import threading

import torch

_ctx = threading.local()


def current_state() -> dict | None:
    """The state of the forward running in this thread under :func:`observe` (None outside one)."""
    return getattr(_ctx, "state", None)


def _register(name: str, fn) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, fn)
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)  # the causal mask SDPA gets


def sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The model's own SDPA attention (what an observer returns after looking)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


@torch.no_grad()
def observe(model, ids: torch.Tensor, name: str, fn, state: dict) -> dict:
    """Run ``model`` on ``ids`` with attention function ``fn`` (registered as ``name``; it reads
    :func:`current_state`), then give the model its attention implementation back; return ``state``."""
    _register(name, fn)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    _ctx.state = state
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        _ctx.state = None
        model.set_attn_implementation(previous)
    return state
