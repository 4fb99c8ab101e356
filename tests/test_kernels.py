"""Attention-with-scores: the reference against a naive per-query computation, and every dispatch path
against the reference, on random inputs."""

import math

import pytest
import torch

from kvcascade.kernels import attention_with_scores, reference_attention_with_scores


def naive(q, k, v, scaling, window=None, q_orig=None, k_orig=None, softcap=None):
    B, Hq, C, D = q.shape
    H, N = k.shape[1], k.shape[2]
    g = Hq // H
    out = torch.zeros(B, Hq, C, D, dtype=torch.float64)
    mass = torch.zeros(B, H, N, dtype=torch.float64)
    per_query = torch.zeros(B, H, C, N, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            h = hq // g
            for i in range(C):
                visible = N - C + i + 1
                logits = []
                for j in range(N):
                    ok = j < visible
                    if ok and window is not None:
                        ok = int(q_orig[i]) - int(k_orig[b, h, j]) < window
                    if ok:
                        s = float(q[b, hq, i].double() @ k[b, h, j].double()) * scaling
                        if softcap is not None:
                            s = math.tanh(s / softcap) * softcap
                        logits.append(s)
                    else:
                        logits.append(float("-inf"))
                p = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=0)
                out[b, hq, i] = p @ v[b, h].double()
                mass[b, h] += p
                per_query[b, h, i] += p
    return out, mass, per_query


def per_query(q, k, v, scaling, window=None, q_orig=None, k_orig=None, softcap=None):
    """Float64, one query at a time, visibility from positions: independent of the reference's einsum and
    mask builder; ``(out, mass [B, H, N], per-query probabilities [B, H, C, N])`` like :func:`naive`."""
    B, Hq, C, D = q.shape
    H, N = k.shape[1], k.shape[2]
    g = Hq // H
    out = torch.zeros(B, Hq, C, D, dtype=torch.float64)
    pq = torch.zeros(B, H, C, N, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            h = hq // g
            for i in range(C):
                s = (k[b, h].double() @ q[b, hq, i].double()) * scaling
                if softcap is not None:
                    s = torch.tanh(s / softcap) * softcap
                visible = torch.arange(N) <= N - C + i
                if window is not None:
                    visible &= (int(q_orig[i]) - k_orig[b, h]) < window
                p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=0)
                out[b, hq, i] = p @ v[b, h].double()
                pq[b, h, i] += p
    return out, pq.sum(2), pq


@pytest.mark.parametrize("B,Hq,H,C,N,window,softcap", [
    (1, 4, 2, 3, 7, None, None), (2, 4, 1, 5, 5, None, None), (1, 2, 2, 4, 9, 4, None), (1, 4, 2, 2, 6, None, 5.0),
])
def test_reference_matches_naive(B, Hq, H, C, N, window, softcap):
    g = torch.Generator().manual_seed(B * 100 + N)
    q, k, v = (torch.randn(B, Hq, C, 8, generator=g), torch.randn(B, H, N, 8, generator=g),
               torch.randn(B, H, N, 8, generator=g))
    q_orig = torch.arange(N - C, N) + 3
    k_orig = (torch.arange(N) + 3).view(1, 1, N).expand(B, H, N)
    out, mass, obs = reference_attention_with_scores(q, k, v, scaling=0.3, softcap=softcap, q_orig=q_orig,
                                                     k_orig=k_orig, window=window, obs_window=2)
    n_out, n_mass, n_pq = naive(q, k, v, 0.3, window, q_orig, k_orig, softcap)
    torch.testing.assert_close(out.double(), n_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass.double(), n_mass, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(obs.double(), n_pq[:, :, -2:].sum(2), rtol=1e-5, atol=1e-5)
    # every query's probabilities sum to one, so the mass sums to queries x group heads
    torch.testing.assert_close(mass.sum(-1), torch.full((B, H), float(C * Hq // H)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("need_mass,obs_window", [(False, 0), (False, 1), (False, 32), (True, 4)])
def test_dispatch_matches_reference(seed, need_mass, obs_window):
    g = torch.Generator().manual_seed(seed)
    B = 1 + seed % 2
    H = [1, 2, 2][seed % 3]
    Hq = H * [1, 2, 7][seed % 3]
    C = [1, 5, 40][seed % 3]
    N = C + [0, 3, 50][(seed // 2) % 3]
    window = [None, 16][seed % 2]
    softcap = [None, None, 30.0][seed % 3]
    q, k, v = (torch.randn(B, Hq, C, 16, generator=g), torch.randn(B, H, N, 16, generator=g),
               torch.randn(B, H, N, 16, generator=g))
    q_orig = torch.arange(N - C, N)
    k_orig = torch.arange(N).view(1, 1, N).expand(B, H, N)
    kw = dict(scaling=0.25, softcap=softcap, q_orig=q_orig, k_orig=k_orig, window=window, obs_window=obs_window)
    ref = reference_attention_with_scores(q, k, v, **kw)
    got = attention_with_scores(q, k, v, need_mass=need_mass, **kw)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    # the dispatch may pick the reference itself (mass on CPU): check every output against an independent loop
    n_out, n_mass, n_pq = per_query(q, k, v, 0.25, window, q_orig, k_orig, softcap)
    torch.testing.assert_close(got[0].double(), n_out, rtol=1e-5, atol=1e-5)
    if need_mass:
        torch.testing.assert_close(got[1].double(), n_mass, rtol=1e-5, atol=1e-5)
    else:
        assert got[1] is None
    if obs_window:
        torch.testing.assert_close(got[2].double(), n_pq[:, :, -min(obs_window, C):].sum(2), rtol=1e-5, atol=1e-5)
