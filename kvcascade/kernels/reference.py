"""Plain-PyTorch attention over a compressed cache that also returns the attention mass each key received.

Runs on any device; it is the reference twin every fast kernel is tested against. Shapes:

* ``q``: ``[B, Hq, C, D]`` queries of the current chunk, already rotated;
* ``k``, ``v``: ``[B, H, N, D]`` keys (rotated) and values: the ``N - C`` cached tokens followed by the
  chunk's ``C`` tokens; ``Hq`` is a multiple of ``H`` (GQA: query head ``h`` reads KV head ``h // (Hq/H)``).

Masking: a query sees every cached key and the chunk's keys up to itself (causal inside the chunk). With
``window`` set (sliding-window layers) it also needs ``q_orig - k_orig < window`` in original positions.

Returned mass is softmax-normalised, computed in float32, and summed over the query heads that share a KV
head: ``mass[b, h, j] = sum_{queries i, heads in group h} p[i, j]`` and ``obs`` the same sum restricted to
the last ``obs_window`` queries of the chunk (SnapKV's observation window; 1 gives the newest query, TOVA).
With ``q_weights`` the mass is ``sum_i w_i p[i, j]`` instead.
"""

from __future__ import annotations

import torch


def build_mask(n_keys: int, n_queries: int, q_orig=None, k_orig=None, window: int | None = None, device=None):
    """Boolean visibility ``[B or 1, H or 1, C, N]`` (True = attend)."""
    n_cached = n_keys - n_queries
    qi = torch.arange(n_queries, device=device)[:, None]
    kj = torch.arange(n_keys, device=device)[None, :]
    mask = (kj < n_cached) | (kj - n_cached <= qi)
    mask = mask[None, None]
    if window is not None and q_orig is not None and k_orig is not None:
        # q_orig: [C]; k_orig: [B, H, N]
        dist = q_orig.view(1, 1, -1, 1) - k_orig.unsqueeze(-2)
        mask = mask & (dist < window)
    return mask


def attention_with_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    q_orig: torch.Tensor | None = None,
    k_orig: torch.Tensor | None = None,
    window: int | None = None,
    obs_window: int = 0,
    need_mass: bool = True,
    q_weights: torch.Tensor | None = None,
):
    """Return ``(out [B, Hq, C, D], mass [B, H, N] or None, obs [B, H, N] or None)``.

    ``q_weights`` (``[C]``) weights each query's probabilities in ``mass`` (the cascade's exact per-query EMA).
    """
    B, Hq, C, D = q.shape
    H, N = k.shape[1], k.shape[2]
    g = Hq // H
    qf = q.float().view(B, H, g, C, D)
    s = torch.einsum("bhgcd,bhnd->bhgcn", qf, k.float()) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    mask = build_mask(N, C, q_orig, k_orig, window, device=q.device)  # [1|B, 1|H, C, N]
    s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhgcn,bhnd->bhgcd", p, v.float()).reshape(B, Hq, C, D).to(q.dtype)
    if not need_mass:
        mass = None
    elif q_weights is None:
        mass = p.sum(dim=(2, 3))
    else:
        mass = torch.einsum("bhgcn,c->bhn", p, q_weights.float())
    obs = None
    if obs_window > 0:
        w = min(obs_window, C)
        obs = p[:, :, :, C - w :, :].sum(dim=(2, 3))
    return out, mass, obs
