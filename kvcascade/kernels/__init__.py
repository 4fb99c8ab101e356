"""Attention kernels over a compressed cache, returning output plus per-key attention mass.

``reference.py`` is the definition of correct (plain PyTorch, every device, materialises all
probabilities). ``attention_with_scores`` dispatches to the cheapest implementation that returns what the
policy asked for:

* no scores needed: ``torch.nn.functional.scaled_dot_product_attention`` for the output (fused, no
  ``[C, N]`` probability tensor kept), plus, where ``obs_window`` is set, the probabilities of the last
  ``obs_window`` queries only (SnapKV, TOVA);
* per-key mass of every query needed (H2O, the cascade's EMA): the reference.

On CUDA (with triton installed, fp16/bf16, no logit softcap, head dim 16..128 a power of two) everything goes to the
Triton kernels of :mod:`kvcascade.kernels.triton_attention` instead: ``chunk_attention`` for prompt chunks,
``decode_attention`` (split-K) for up to ``DECODE_MAX_QUERIES`` queries. ``KVCASCADE_KERNELS=reference``
forces the PyTorch paths (``triton`` forces Triton and fails loudly where it cannot run).

Tests compare every path with the reference on random inputs.
"""

from __future__ import annotations

import functools
import importlib.util
import os

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


DECODE_MAX_QUERIES = 16


@functools.lru_cache(maxsize=1)
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


#: head dims the Triton kernels run. 256 (Gemma3) was left out for one session on a wrong diagnosis: Gemma-3-270M's
#: perplexity of 578 on an H200 came from its tokenizer (transformers 5.17 converts it wrongly; kvcascade.models now
#: refuses that), not from the kernels: converted under 5.18, the Triton path gives 7.047 / 8.004 at 8K / 32K where
#: the reference gives 7.028 / 7.992 on the same GPU (docs/results, "A wrong result, found"), and tests/test_triton.py
#: passes at 256 there.
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def backend_for(q, softcap=None) -> str:
    """``"triton"`` or ``"reference"``: what :func:`attention_with_scores` will run for these inputs."""
    choice = os.environ.get("KVCASCADE_KERNELS", "auto")
    if choice not in ("auto", "reference", "triton"):
        from ..errors import KVCascadeError

        raise KVCascadeError(f"KVCASCADE_KERNELS must be auto, reference or triton, got '{choice}'")
    if choice == "reference":
        return "reference"
    runnable = (q.is_cuda and _have_triton() and softcap is None and q.shape[-1] in TRITON_HEAD_DIMS
                and q.dtype in (torch.float16, torch.bfloat16))  # fp32 stays exact on the reference path
    if choice == "triton":
        if not runnable:
            from ..errors import KVCascadeError

            raise KVCascadeError("KVCASCADE_KERNELS=triton needs CUDA tensors, triton, no softcap and a power-of-two "
                                 "head dim")
        return "triton"
    return "triton" if runnable else "reference"


def attention_with_scores(q, k, v, *, scaling, softcap=None, q_orig=None, k_orig=None, window=None,
                          obs_window: int = 0, need_mass: bool = True, q_weights=None):
    """Dispatch to the cheapest implementation that returns what was asked (see module docstring)."""
    if backend_for(q, softcap) == "triton":
        from . import triton_attention as ta

        fn = ta.decode_attention if q.shape[2] <= DECODE_MAX_QUERIES else ta.chunk_attention
        return fn(q, k, v, scaling=scaling, q_orig=q_orig, k_orig=k_orig, window=window, obs_window=obs_window,
                  need_mass=need_mass, q_weights=q_weights)
    if need_mass:
        return reference_attention_with_scores(q, k, v, scaling=scaling, softcap=softcap, q_orig=q_orig,
                                               k_orig=k_orig, window=window, obs_window=obs_window,
                                               q_weights=q_weights)
    return _obs_only(q, k, v, scaling=scaling, softcap=softcap, q_orig=q_orig, k_orig=k_orig, window=window,
                     obs_window=obs_window)


__all__ = ["attention_with_scores", "reference_attention_with_scores", "build_mask", "backend_for"]
