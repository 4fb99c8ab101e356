"""Attention kernels over a compressed cache, returning output plus per-key attention mass.

``reference.py`` is the definition of correct (plain PyTorch, every device, materialises all
probabilities). ``attention_with_scores`` dispatches to the cheapest implementation that returns what the
policy asked for:

* no scores needed: ``torch.nn.functional.scaled_dot_product_attention`` for the output (fused, no
  ``[C, N]`` probability tensor kept), plus, where ``obs_window`` is set, the probabilities of the last
  ``obs_window`` queries only (SnapKV, TOVA);
* per-key mass of every query needed (H2O, the cascade's EMA): the reference.

Tests compare every path with the reference on random inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import attention_with_scores as reference_attention_with_scores
from .reference import build_mask


def _obs_only(q, k, v, *, scaling, softcap, q_orig, k_orig, window, obs_window):
    B, Hq, C, D = q.shape
    H, N = k.shape[1], k.shape[2]
    mask = build_mask(N, C, q_orig, k_orig, window, device=q.device)  # [1|B, 1|H, C, N]
    if softcap is None:
        rep = Hq // H
        kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        m = mask.repeat_interleave(rep, dim=1) if mask.shape[1] > 1 else mask
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=m, scale=scaling)
    else:
        out = None
    obs = None
    if obs_window > 0 or out is None:
        w = C if out is None else min(obs_window, C)
        sub_q = q[:, :, C - w:]
        sub_mask = mask[:, :, C - w:]
        g = Hq // H
        s = torch.einsum("bhgcd,bhnd->bhgcn", sub_q.float().view(B, H, g, w, D), k.float()) * scaling
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        p = torch.softmax(s.masked_fill(~sub_mask.unsqueeze(2), float("-inf")), dim=-1)
        if out is None:  # softcap models: full reference path
            out = torch.einsum("bhgcn,bhnd->bhgcd", p, v.float()).reshape(B, Hq, C, D).to(q.dtype)
        if obs_window > 0:
            obs = p[:, :, :, -min(obs_window, C):].sum(dim=(2, 3))
    return out, None, obs


def attention_with_scores(q, k, v, *, scaling, softcap=None, q_orig=None, k_orig=None, window=None,
                          obs_window: int = 0, need_mass: bool = True, q_weights=None):
    """Dispatch to the cheapest implementation that returns what was asked (see module docstring)."""
    if need_mass:
        return reference_attention_with_scores(q, k, v, scaling=scaling, softcap=softcap, q_orig=q_orig,
                                               k_orig=k_orig, window=window, obs_window=obs_window,
                                               q_weights=q_weights)
    return _obs_only(q, k, v, scaling=scaling, softcap=softcap, q_orig=q_orig, k_orig=k_orig, window=window,
                     obs_window=obs_window)


__all__ = ["attention_with_scores", "reference_attention_with_scores", "build_mask"]
