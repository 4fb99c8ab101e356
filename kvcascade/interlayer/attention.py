"""Attention with inter-layer sharing for distant tokens (PoD; the reference twin, plain PyTorch).

Tokens are *proximal* to query ``i`` (the first ``n_sink`` tokens and the ``n_recent`` newest up to ``i``
itself) or *distant* (every other causal token). A layer that is the base of its block attends as usual. Any
other layer of the block uses its own keys on proximal tokens, and on distant ones the block base's:

* ``share="scores"`` (v1, the seed paper's figure; the default): distant logits ``q_base . k_base`` (the base
  layer's own scores, so the base's queries of the current tokens are needed too);
* ``share="keys"`` (v2): distant logits ``q_own . k_base``.

Values are always the layer's own. The two parts are merged as **one exact softmax** over proximal and distant
tokens (the paper's gate ``g = sum_P e^a / (sum_P e^a + sum_D e^a)`` is exactly that). Training-free: the paper
adapts the model with post-training; this is the version without it (ours).

Shapes: ``q`` ``[B, Hq, C, D]``; ``k``, ``v`` ``[B, H, N, D]``; ``k_base`` ``[B, H, N, D]`` (only its distant
columns are read); ``q_base`` ``[B, Hq, C, D]`` for ``share="scores"``; ``q_pos`` ``[C]``, ``k_pos`` ``[N]``
original positions. Keys and queries are rotated at these positions already.

:func:`attend_shared` runs the Triton twin (:func:`kvcascade.kernels.triton_attention.shared_attention`) on CUDA,
this reference elsewhere; tests compare them.
"""

from __future__ import annotations

import torch

from ..errors import KVCascadeError

SHARES = ("scores", "keys")


def proximal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, n_sink: int, n_recent: int) -> torch.Tensor:
    """True where key ``j`` is proximal to query ``i`` (a sink, or among the ``n_recent`` newest up to ``i``);
    causality is not part of it. ``q_pos`` ``[C]``; ``k_pos`` ``[N]`` (gives ``[C, N]``) or ``[..., N]`` (gives
    ``[..., C, N]``)."""
    kp = k_pos.unsqueeze(-2)  # [..., 1, N]
    dist = q_pos.view(-1, 1) - kp
    return (kp < n_sink) | ((dist >= 0) & (dist < n_recent))


def shared_attention(q, k, v, *, scaling: float, q_pos, k_pos, n_sink: int, n_recent: int, k_base=None,
                     q_base=None, share: str = "scores"):
    """Output ``[B, Hq, C, D]`` (see the module docstring); ``k_base=None``: a base layer, plain attention.
    ``k_pos``: ``[N]``, or ``[B, H, N]`` where rows or heads hold different tokens."""
    if share not in SHARES:
        raise KVCascadeError(f"share must be one of {', '.join(SHARES)}, got '{share}'")
    B, Hq, C, D = q.shape
    H = k.shape[1]
    g = Hq // H
    rep = lambda t: t.float().repeat_interleave(g, dim=1)  # noqa: E731  [B, H, N, D] -> [B, Hq, N, D]
    kp = k_pos if k_pos.dim() == 1 else k_pos.expand(B, H, -1).repeat_interleave(g, dim=1)  # [N] | [B, Hq, N]
    causal = kp.unsqueeze(-2) <= q_pos.view(-1, 1)  # [C, N] | [B, Hq, C, N]
    own = torch.einsum("bhcd,bhnd->bhcn", q.float(), rep(k)) * scaling
    if k_base is None:
        logits = own
    else:
        if share == "scores":
            if q_base is None:
                raise KVCascadeError("share=scores needs the base layer's queries (q_base)")
            dist = torch.einsum("bhcd,bhnd->bhcn", q_base.float(), rep(k_base)) * scaling
        else:
            dist = torch.einsum("bhcd,bhnd->bhcn", q.float(), rep(k_base)) * scaling
        prox = proximal_mask(q_pos, kp, n_sink, n_recent)
        logits = torch.where(prox, own, dist)
    logits = logits.masked_fill(~causal, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("bhcn,bhnd->bhcd", p, rep(v)).to(q.dtype)


def attend_shared(q, k, v, *, scaling: float, q_pos, k_pos, n_sink: int, n_recent: int, k_base, q_base=None,
                  share: str = "scores"):
    """:func:`shared_attention` on the cheapest path: the Triton kernel on CUDA (half precision, no softcap; as
    :func:`kvcascade.kernels.backend_for` decides, ``KVCASCADE_KERNELS=reference`` forcing this module's
    reference), else the reference. ``k_base`` holds the same tokens as ``k`` at the same indices, the chunk's
    queries' keys last."""
    from ..kernels import backend_for

    if share not in SHARES:
        raise KVCascadeError(f"share must be one of {', '.join(SHARES)}, got '{share}'")
    if backend_for(q) == "triton":
        from ..kernels import triton_attention as ta

        return ta.shared_attention(q, k, v, scaling=scaling, q_pos=q_pos, k_pos=k_pos, n_sink=n_sink,
                                   n_recent=n_recent, k_base=k_base, q_base=q_base, share=share)
    return shared_attention(q, k, v, scaling=scaling, q_pos=q_pos, k_pos=k_pos, n_sink=n_sink, n_recent=n_recent,
                            k_base=k_base, q_base=q_base, share=share)


def storage_bytes(groups: list[list[list[int]]], n_layers: int, tokens: int, n_sink: int, n_recent: int,
                  head_dim: int, element_size: int) -> dict:
    """Exact K/V bytes held after ``tokens`` tokens: every layer keeps its values; a KV head keeps keys for all
    tokens in its block's base layer and only for its proximal tokens (sinks + newest ``n_recent``) in the others.

    Returns ``{"full": bytes of a full cache, "kept": bytes kept, "saved": share saved}``."""
    per = head_dim * element_size
    n_kv = len(groups)
    prox = min(tokens, n_sink + max(0, min(n_recent, tokens - n_sink)))
    full = 2 * n_layers * n_kv * tokens * per
    kept = n_layers * n_kv * tokens * per  # values
    for blocks in groups:
        for block in blocks:
            kept += tokens * per + (len(block) - 1) * prox * per  # base keys, then proximal keys of the others
    return {"full": full, "kept": kept, "saved": 1.0 - kept / full if full else 0.0}
