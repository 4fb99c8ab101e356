"""Triton kernels (CUDA) for attention over a compressed cache, with exact per-key attention mass.

Layout, as everywhere in kvcascade: ``q`` ``[B, Hq, C, D]`` (a chunk of ``C`` queries), ``k``/``v``
``[B, H, N, D]`` with the chunk's own keys as the last ``C`` of ``N`` (``n_cached = N - C`` cached keys
before them). Query ``i`` sees every cached key and chunk keys ``<= i`` (and, with ``window``, only keys
whose original position is less than ``window`` behind its own). GQA: query head ``hq`` reads KV head
``hq // (Hq // H)``.

* :func:`chunk_attention` (prefill): pass 1 is a FlashAttention-style forward (online softmax, fp32
  accumulation) that also writes each query row's log-sum-exp; pass 2 recomputes ``k q^T`` (a key per row)
  one key block per program and sums ``exp(s - lse)`` over the chunk's queries and the group's query heads
  (split over programs, each slice's partial sums added after in a fixed order), so the mass is exactly
  softmax-normalised (optionally weighted per query; the cascade's EMA weights) and no atomics are needed.
  Both passes run the tiles that need no mask (every query sees every key) without one. Work: 1.5x the
  forward's FLOPs when mass is asked for, 1x otherwise.
* :func:`decode_attention` (one or a few queries over a long cache): split-K: each program reads one slice
  of the cache for all query heads of a KV head, writes a partial (max, sum, accumulator) and, when mass is
  asked for, its raw logits; a small combine step merges the slices and turns logits into mass.

The plain-PyTorch twin is :func:`kvcascade.kernels.reference.attention_with_scores`; tests compare them.
"""

from __future__ import annotations

import functools
import json
import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _visible(offs_m, offs_n, N, n_cached, qpos0, window, kpos_ptr, HAS_WINDOW: tl.constexpr):
    ok = (offs_n[None, :] < N) & ((offs_n[None, :] < n_cached) | ((offs_n[None, :] - n_cached) <= offs_m[:, None]))
    if HAS_WINDOW:
        kp = tl.load(kpos_ptr + offs_n, mask=offs_n < N, other=0)
        ok = ok & ((qpos0 + offs_m[:, None] - kp[None, :]) < window)
    return ok


# Lengths change every chunk and every decoded token: without do_not_specialize Triton compiles a new variant
# whenever one of them changes its divisibility by 16 (seconds of compiling inside the decode loop).
# (Strides stay specialised: their divisibility lets Triton vectorise loads; for contiguous tensors it never
# changes, since every stride is a multiple of the head dim.)
_VARYING = ["C", "N", "n_cached", "window", "Cq", "split", "n_splits", "obs_start", "rows_valid"]


def _jit(fn):
    import inspect

    names = [n for n in inspect.signature(fn).parameters if n in _VARYING]
    return triton.jit(do_not_specialize=names)(fn)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc):
    """One key block of the online softmax (log2 domain, masked logits ``s`` = -inf): new ``(m_i, l_i, acc)``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _softmax_state(ROWS: tl.constexpr, D: tl.constexpr):
    """An online softmax's empty state for ``ROWS`` query rows: running max, running sum, output accumulator."""
    return tl.full([ROWS], float("-inf"), tl.float32), tl.zeros([ROWS], tl.float32), tl.zeros([ROWS, D], tl.float32)


@triton.jit
def _normalised(acc, l_i):
    """The accumulator over its softmax sum (rows that saw no key stay 0)."""
    return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]


@triton.jit
def _query_rows(Hq, group, BLOCK_M: tl.constexpr, D: tl.constexpr):
    """A forward program's batch row, query head, KV head, query offsets and dim offsets (grid: query blocks x
    batch * query heads)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    hq = bh % Hq
    return pid_m, bh // Hq, hq, hq // group, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, D)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KPOS,
                sqb, sqh, sqc, skb, skh, skn, svb, svh, svn, sob, soh, soc, slb, slh, skpb, skph,
                Hq, C, N, n_cached, group, scale_log2, QP, window,
                HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    qpos0 = 0
    if HAS_WINDOW:
        qpos0 = tl.load(QP)  # the first query's original position, read on the device
    pid_m, b, hq, h, offs_m, offs_d = _query_rows(Hq, group, BLOCK_M, D)
    q = tl.load(Q + b * sqb + hq * sqh + offs_m[:, None] * sqc + offs_d[None, :], mask=offs_m[:, None] < C, other=0.0)
    kbase = K + b * skb + h * skh
    vbase = V + b * svb + h * svh
    kpos = KPOS + b * skpb + h * skph
    m_i, l_i, acc = _softmax_state(BLOCK_M, D)
    # whole key blocks that every query of this block sees (cached keys and chunk keys before the block) run
    # without masks; the blocks after them (the diagonal, and with a window every block) run masked
    bulk = 0
    if not HAS_WINDOW:
        bulk = (n_cached + pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
    hi = n_cached + (pid_m + 1) * BLOCK_M  # may pass N on the last block: loads and masks stop at N
    for start in range(0, bulk, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = tl.load(kbase + offs_n[:, None] * skn + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k))
        v = tl.load(vbase + offs_n[:, None] * svn + offs_d[None, :])
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)  # finite: no logit here is masked
        p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # (accumulates in place)
        m_i = m_new
    for start in range(bulk, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = tl.load(kbase + offs_n[:, None] * skn + offs_d[None, :], mask=offs_n[:, None] < N, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where(_visible(offs_m, offs_n, N, n_cached, qpos0, window, kpos, HAS_WINDOW), s, float("-inf"))
        v = tl.load(vbase + offs_n[:, None] * svn + offs_d[None, :], mask=offs_n[:, None] < N, other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)
    tl.store(O + b * sob + hq * soh + offs_m[:, None] * soc + offs_d[None, :], _normalised(acc, l_i).to(O.dtype.element_ty),
             mask=offs_m[:, None] < C)
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))  # log2 domain
    tl.store(LSE + b * slb + hq * slh + offs_m, lse, mask=offs_m < C)


@triton.jit
def _mass_block(qbase, sqc, lbase, WQ, k, offs_n, ms, mass, obs, C, N, n_cached, scale_log2, qpos0, window, kpos,
                obs_start, MASKED: tl.constexpr, HAS_W: tl.constexpr, HAS_MASS: tl.constexpr, HAS_OBS: tl.constexpr,
                HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr):
    """Queries ``ms .. ms + BLOCK_M`` against the program's keys ``k`` ``[BLOCK_N, D]``, transposed (a key per row,
    so a sum over queries is a row sum, as in the forward): new ``(mass, obs)``. ``MASKED``: rows past ``C`` and
    keys a query cannot see are left out; unmasked blocks are ones where every query sees every key."""
    offs_m = ms + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    if MASKED:
        q = tl.load(qbase + offs_m[:, None] * sqc + offs_d[None, :], mask=offs_m[:, None] < C, other=0.0)
        lse = tl.load(lbase + offs_m, mask=offs_m < C, other=float("inf"))
    else:
        q = tl.load(qbase + offs_m[:, None] * sqc + offs_d[None, :])
        lse = tl.load(lbase + offs_m)
    s = tl.dot(k, tl.trans(q)) * scale_log2  # [BLOCK_N, BLOCK_M]
    p = tl.math.exp2(s - lse[None, :])
    if MASKED:
        ok = (offs_m[None, :] < C) & ((offs_n[:, None] < n_cached) | ((offs_n[:, None] - n_cached) <= offs_m[None, :]))
        if HAS_WINDOW:
            kp = tl.load(kpos + offs_n, mask=offs_n < N, other=0)
            ok = ok & ((qpos0 + offs_m[None, :] - kp[:, None]) < window)
        p = tl.where(ok, p, 0.0)
    if HAS_MASS:
        if HAS_W:
            if MASKED:
                w = tl.load(WQ + offs_m, mask=offs_m < C, other=0.0)
            else:
                w = tl.load(WQ + offs_m)
            mass += tl.sum(p * w[None, :], 1)
        else:
            mass += tl.sum(p, 1)
    if HAS_OBS:
        obs += tl.sum(tl.where(offs_m[None, :] >= obs_start, p, 0.0), 1)
    return mass, obs


@triton.jit
def _mass_kernel(Q, K, LSE, WQ, MASS, OBS, KPOS,
                 sqb, sqh, sqc, skb, skh, skn, slb, slh, smg, smb, smh, skpb, skph,
                 H, C, N, n_cached, group, heads_per, scale_log2, QP, window, obs_start,
                 HAS_W: tl.constexpr, HAS_MASS: tl.constexpr, HAS_OBS: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Grid: key blocks x batch * KV heads x slices of the group's query heads (``heads_per`` each; with more than
    one slice each writes its own partial sums, at ``smg`` apart, added after)."""
    qpos0 = 0
    if HAS_WINDOW:
        qpos0 = tl.load(QP)
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    pid_g = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=offs_n[:, None] < N, other=0.0)
    kpos = KPOS + b * skpb + h * skph
    mass = tl.zeros([BLOCK_N], tl.float32)
    obs = tl.zeros([BLOCK_N], tl.float32)
    # queries before the block's first chunk key cannot see it; from m_full on every query sees all of its keys
    m_lo = pid_n * BLOCK_N - n_cached
    if m_lo < 0:
        m_lo = 0
    if HAS_OBS and not HAS_MASS:
        if m_lo < obs_start:
            m_lo = obs_start
    m_lo = m_lo // BLOCK_M * BLOCK_M
    m_full = pid_n * BLOCK_N + BLOCK_N - 1 - n_cached  # the block's last key, as a chunk index
    if m_full < 0:
        m_full = 0
    m_full = (m_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    if m_full < m_lo:
        m_full = m_lo
    c_full = C // BLOCK_M * BLOCK_M
    if HAS_WINDOW:  # a window can hide any key from any query: every block masked
        c_full = m_full
    if c_full < m_full:
        c_full = m_full
    g_lo = pid_g * heads_per
    g_hi = g_lo + heads_per
    if g_hi > group:
        g_hi = group
    for g in range(g_lo, g_hi):
        hq = h * group + g
        qbase = Q + b * sqb + hq * sqh
        lbase = LSE + b * slb + hq * slh
        for ms in range(m_lo, m_full, BLOCK_M):
            mass, obs = _mass_block(qbase, sqc, lbase, WQ, k, offs_n, ms, mass, obs, C, N, n_cached, scale_log2,
                                    qpos0, window, kpos, obs_start, True, HAS_W, HAS_MASS, HAS_OBS, HAS_WINDOW,
                                    BLOCK_M, D)
        for ms in range(m_full, c_full, BLOCK_M):
            mass, obs = _mass_block(qbase, sqc, lbase, WQ, k, offs_n, ms, mass, obs, C, N, n_cached, scale_log2,
                                    qpos0, window, kpos, obs_start, False, HAS_W, HAS_MASS, HAS_OBS, HAS_WINDOW,
                                    BLOCK_M, D)
        for ms in range(c_full, C, BLOCK_M):
            mass, obs = _mass_block(qbase, sqc, lbase, WQ, k, offs_n, ms, mass, obs, C, N, n_cached, scale_log2,
                                    qpos0, window, kpos, obs_start, True, HAS_W, HAS_MASS, HAS_OBS, HAS_WINDOW,
                                    BLOCK_M, D)
    out = b * smb + h * smh + pid_g * smg + offs_n
    if HAS_MASS:
        tl.store(MASS + out, mass, mask=offs_n < N)
    if HAS_OBS:
        tl.store(OBS + out, obs, mask=offs_n < N)


@_jit
def _decode_kernel(Q, K, V, KPOS, OP, MP, LP, SC,
                   sqb, sqh, sqc, skb, skh, skn, svb, svh, svn, skpb, skph,
                   H, Cq, N, n_cached, group, scale_log2, QP, window, split, n_splits,
                   NEED_S: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    qpos0 = 0
    if HAS_WINDOW:
        qpos0 = tl.load(QP)
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BLOCK_G)  # row r: query head h*group + r // Cq, query r % Cq
    g = rows // Cq
    c = rows % Cq
    row_ok = rows < group * Cq
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + (h * group + g[:, None]) * sqh + c[:, None] * sqc + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    kbase = K + b * skb + h * skh
    vbase = V + b * svb + h * svh
    kpos = KPOS + b * skpb + h * skph
    m_i, l_i, acc = _softmax_state(BLOCK_G, D)
    lo = pid_s * split
    up = lo + split
    for start in range(lo, up, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = (offs_n < up) & (offs_n < N)
        k = tl.load(kbase + offs_n[:, None] * skn + offs_d[None, :], mask=nmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        ok = nmask[None, :] & _visible(c, offs_n, N, n_cached, qpos0, window, kpos, HAS_WINDOW) & row_ok[:, None]
        s = tl.where(ok, s, float("-inf"))
        if NEED_S:
            sc_ptr = SC + ((bh * BLOCK_G + rows[:, None]) * N + offs_n[None, :])
            tl.store(sc_ptr, s, mask=row_ok[:, None] & nmask[None, :])
        v = tl.load(vbase + offs_n[:, None] * svn + offs_d[None, :], mask=nmask[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)
    part = (bh * BLOCK_G + rows) * n_splits + pid_s
    tl.store(MP + part, m_i)
    tl.store(LP + part, l_i)
    tl.store(OP + part[:, None] * D + offs_d[None, :], acc)


@_jit
def _combine_kernel(OP, MP, LP, O, LSE, sob, soh, soc, H, group, Cq, BG, rows_valid, n_splits,
                    BLOCK_S: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)  # one (batch, KV head, query row)
    bh = pid // rows_valid
    r = pid % rows_valid
    base = (bh * BG + r) * n_splits
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    smask = offs_s < n_splits
    m = tl.load(MP + base + offs_s, mask=smask, other=float("-inf"))
    l = tl.load(LP + base + offs_s, mask=smask, other=0.0)
    mmax = tl.max(m, 0)
    msafe = tl.where(mmax == float("-inf"), 0.0, mmax)
    w = tl.where(smask, tl.math.exp2(m - msafe), 0.0)
    total = tl.sum(l * w, 0)
    acc = tl.load(OP + (base + offs_s)[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.maximum(total, 1e-30)
    b = bh // H
    h = bh % H
    hq = h * group + r // Cq
    tl.store(O + b * sob + hq * soh + (r % Cq) * soc + offs_d, o.to(O.dtype.element_ty))
    tl.store(LSE + bh * BG + r, msafe + tl.math.log2(tl.maximum(total, 1e-30)))


@_jit
def _decode_mass_kernel(SC, LSE, WQ, MASS, OBS, N, BG, rows_valid, Cq, obs_start,
                        HAS_W: tl.constexpr, HAS_MASS: tl.constexpr, HAS_OBS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_R)
    ok = (rows[:, None] < rows_valid) & (offs_n[None, :] < N)
    s = tl.load(SC + (bh * BG + rows[:, None]) * N + offs_n[None, :], mask=ok, other=float("-inf"))
    lse = tl.load(LSE + bh * BG + rows, mask=rows < rows_valid, other=float("inf"))
    p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)
    c = rows % Cq
    if HAS_MASS:
        if HAS_W:
            w = tl.load(WQ + c, mask=rows < rows_valid, other=0.0)
            mass = tl.sum(p * w[:, None], 0)
        else:
            mass = tl.sum(p, 0)
        tl.store(MASS + bh * N + offs_n, mass, mask=offs_n < N)
    if HAS_OBS:
        obs = tl.sum(tl.where(c[:, None] >= obs_start, p, 0.0), 0)
        tl.store(OBS + bh * N + offs_n, obs, mask=offs_n < N)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(x) - 1).bit_length())


def _kpos(k_orig, B, H, N, device):
    if k_orig is None:
        return torch.zeros(1, 1, 1, dtype=torch.int32, device=device), False
    kp = k_orig.to(torch.int32).expand(B, H, N)
    return kp, True


def _qpos(q_orig, window, dummy):
    """The first query's original position as a device tensor the kernels load (no host read: a decode step stays
    capturable as a CUDA graph); ``dummy`` where no window is used."""
    if window and q_orig is not None:
        return q_orig.reshape(-1)[:1].to(torch.int32)
    return dummy


def _check(q, k, v):
    if not (q.is_cuda or _interpreting()):
        raise ValueError("triton kernels need CUDA tensors")
    B, Hq, C, D = q.shape
    _, H, N, _ = k.shape
    if Hq % H or N < C or D not in (16, 32, 64, 128, 256):
        raise ValueError(f"unsupported shapes q {tuple(q.shape)} k {tuple(k.shape)}")
    return B, Hq, C, D, H, N


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last axis is contiguous (the kernels take the other strides), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Launch configurations (H100); scripts/tune_kernels.py measures the alternatives. Keys: head dim.
FWD_CONFIG = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3)}  # BLOCK_M, BLOCK_N, num_warps, num_stages
MASS_CONFIG = {64: (128, 64, 4, 2), 128: (128, 64, 4, 2)}
DECODE_CONFIG = {64: (128, 4, 3), 128: (128, 4, 3)}  # BLOCK_N, num_warps, num_stages
DECODE_PROGRAMS_PER_SM = 8


def load_configs(path: str) -> None:
    """Puts the chunk kernels' launch configurations written by ``scripts/tune_kernels.py --out`` (best forward and
    mass configuration per head dim, measured on the GPU at hand) over the defaults above. Read at import from the
    file named by ``KVCASCADE_KERNEL_CONFIG``, where set."""
    from ..errors import KVCascadeError

    try:
        with open(path) as f:
            data = json.load(f)
        tables = []
        for name, table in (("fwd", FWD_CONFIG), ("mass", MASS_CONFIG)):
            for d, cfg in data.get(name, {}).items():
                cfg = tuple(int(x) for x in cfg)
                if len(cfg) != 4 or int(d) not in (16, 32, 64, 128, 256) or min(cfg) < 1:
                    raise ValueError(f"{name} {d}: {list(cfg)} is not [BLOCK_M, BLOCK_N, num_warps, num_stages] for a "
                                     "head dim the kernels run")
                tables.append((table, int(d), cfg))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise KVCascadeError(f"KVCASCADE_KERNEL_CONFIG={path}: not launch configurations from "
                             f"scripts/tune_kernels.py --out ({e})") from None
    for table, d, cfg in tables:
        table[d] = cfg


if os.environ.get("KVCASCADE_KERNEL_CONFIG"):
    load_configs(os.environ["KVCASCADE_KERNEL_CONFIG"])


def chunk_attention(q, k, v, *, scaling, q_orig=None, k_orig=None, window=None, obs_window: int = 0,
                    need_mass: bool = True, q_weights=None, block_m: int | None = None, block_n: int | None = None,
                    fwd_config=None, mass_config=None):
    """``(out [B, Hq, C, D], mass [B, H, N] fp32 or None, obs [B, H, N] fp32 or None)``; see the module doc."""
    B, Hq, C, D, H, N = _check(q, k, v)
    group = Hq // H
    q, k, v = _rows(q), _rows(k), _rows(v)  # strided views of the cache's buffers are read in place
    n_cached = N - C
    kp, has_window = _kpos(k_orig if window else None, B, H, N, q.device)
    qp = _qpos(q_orig, window, kp)
    win = int(window) if window else 0
    interp = _interpreting()
    fbm, fbn, fw, fs = fwd_config or FWD_CONFIG.get(D, (64, 64, 4, 3))
    BM = block_m or (16 if interp else fbm)
    BN = block_n or (16 if interp else fbn)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, C, dtype=torch.float32, device=q.device)
    scale_log2 = float(scaling) * LOG2E
    grid = (triton.cdiv(C, BM), B * Hq)
    _fwd_kernel[grid](q, k, v, out, lse, kp,
                      q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                      v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                      lse.stride(0), lse.stride(1), kp.stride(0), kp.stride(1),
                      Hq, C, N, n_cached, group, scale_log2, qp, win,
                      HAS_WINDOW=has_window, BLOCK_M=BM, BLOCK_N=BN, D=D,
                      **({} if interp else {"num_warps": fw, "num_stages": fs}))
    obs_w = min(int(obs_window), C) if obs_window else 0
    if not need_mass and not obs_w:
        return out, None, None
    mbm, mbn, mw, ms_ = mass_config or MASS_CONFIG.get(D, (64, 64, 4, 2))
    BM2 = 16 if interp else mbm
    BN2 = 16 if interp else mbn
    # the group's query heads split over programs when key blocks alone would leave SMs idle (each slice writes
    # partial sums, added in a fixed order: no atomics, the same result every run)
    if interp:  # (the CPU tests: two slices, the second one shorter when the group is odd)
        heads_per = triton.cdiv(group, 2)
    else:
        want = triton.cdiv(8 * _sm_count(q.device.index or 0), triton.cdiv(N, BN2) * B * H)
        heads_per = triton.cdiv(group, min(group, want))
    slices = triton.cdiv(group, heads_per)
    mass = torch.empty(slices, B, H, N, dtype=torch.float32, device=q.device) if need_mass else None
    obs = torch.empty(slices, B, H, N, dtype=torch.float32, device=q.device) if obs_w else None
    wq = q_weights.float().contiguous() if (need_mass and q_weights is not None) else lse  # dummy when unused
    ref = mass if mass is not None else obs
    grid2 = (triton.cdiv(N, BN2), B * H, slices)
    _mass_kernel[grid2](q, k, lse, wq, mass if mass is not None else ref, obs if obs is not None else ref, kp,
                        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                        lse.stride(0), lse.stride(1), ref.stride(0), ref.stride(1), ref.stride(2),
                        kp.stride(0), kp.stride(1),
                        H, C, N, n_cached, group, heads_per, scale_log2, qp, win, C - obs_w,
                        HAS_W=need_mass and q_weights is not None, HAS_MASS=need_mass, HAS_OBS=bool(obs_w),
                        HAS_WINDOW=has_window, BLOCK_M=BM2, BLOCK_N=BN2, D=D,
                        **({} if interp else {"num_warps": mw, "num_stages": ms_}))
    mass = None if mass is None else (mass[0] if slices == 1 else mass.sum(0))
    obs = None if obs is None else (obs[0] if slices == 1 else obs.sum(0))
    return out, mass, obs


def _num_splits(N: int, programs: int, block_n: int, device, per_sm: int = 4) -> int:
    if _interpreting():
        target = 4
    else:
        target = per_sm * _sm_count(torch.device(device).index or 0)
    per = max(1, math.ceil(target / programs))
    split = max(block_n, triton.cdiv(triton.cdiv(N, per), block_n) * block_n)
    return split


def decode_attention(q, k, v, *, scaling, q_orig=None, k_orig=None, window=None, obs_window: int = 0,
                     need_mass: bool = True, q_weights=None, block_n: int | None = None, config=None,
                     programs_per_sm: int | None = None):
    """Split-K attention for a few queries (``C`` small) over a long cache; same contract as
    :func:`chunk_attention`."""
    B, Hq, C, D, H, N = _check(q, k, v)
    group = Hq // H
    q, k, v = _rows(q), _rows(k), _rows(v)  # strided views of the cache's buffers are read in place
    interp = _interpreting()
    dbn, dw, ds = config or DECODE_CONFIG.get(D, (64, 4, 3))
    BN = block_n or (16 if interp else dbn)
    BG = _pow2(group * C)
    n_cached = N - C
    kp, has_window = _kpos(k_orig if window else None, B, H, N, q.device)
    qp = _qpos(q_orig, window, kp)
    split = _num_splits(N, B * H, BN, q.device, programs_per_sm or DECODE_PROGRAMS_PER_SM)
    n_splits = triton.cdiv(N, split)
    need_s = need_mass or bool(obs_window)
    op = torch.empty(B * H * BG * n_splits, D, dtype=torch.float32, device=q.device)
    mp = torch.empty(B * H * BG * n_splits, dtype=torch.float32, device=q.device)
    lp = torch.empty_like(mp)
    sc = torch.empty(B * H * BG, N, dtype=torch.float32, device=q.device) if need_s else mp
    scale_log2 = float(scaling) * LOG2E
    _decode_kernel[(n_splits, B * H)](q, k, v, kp, op, mp, lp, sc,
                                      q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                      v.stride(0), v.stride(1), v.stride(2), kp.stride(0), kp.stride(1),
                                      H, C, N, n_cached, group, scale_log2, qp, int(window or 0), split, n_splits,
                                      NEED_S=need_s, HAS_WINDOW=has_window, BLOCK_G=BG, BLOCK_N=BN, D=D,
                                      **({} if interp else {"num_warps": dw, "num_stages": ds}))
    rows = group * C
    out = torch.empty_like(q)
    lse = torch.empty(B * H * BG, dtype=torch.float32, device=q.device)
    _combine_kernel[(B * H * rows,)](op, mp, lp, out, lse, out.stride(0), out.stride(1), out.stride(2), H, group, C,
                                     BG, rows, n_splits, BLOCK_S=_pow2(n_splits, 2), D=D)
    if not need_s:
        return out, None, None
    mass = torch.empty(B, H, N, dtype=torch.float32, device=q.device) if need_mass else None
    obs_w = min(int(obs_window), C) if obs_window else 0
    obs = torch.empty(B, H, N, dtype=torch.float32, device=q.device) if obs_w else None
    ref = mass if mass is not None else obs
    wq = q_weights.float().contiguous() if (need_mass and q_weights is not None) else lse
    BN2 = 16 if interp else 256
    _decode_mass_kernel[(triton.cdiv(N, BN2), B * H)](sc, lse, wq, ref if mass is None else mass,
                                                      ref if obs is None else obs, N, BG, rows, C, C - obs_w,
                                                      HAS_W=need_mass and q_weights is not None,
                                                      HAS_MASS=need_mass, HAS_OBS=bool(obs_w), BLOCK_N=BN2,
                                                      BLOCK_R=BG)
    return out, mass, obs


@_jit
def _shared_fwd_kernel(Q, QB, K, KB, V, O, QPOS, KPOS,
                       sqb, sqh, sqc, sdb, sdh, sdc, skb, skh, skn, sbb, sbh, sbn, svb, svh, svn, sob, soh, soc,
                       spb, sph, spn,
                       Hq, C, N, n_cached, group, scale_log2, n_sink, n_recent,
                       SCORES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    pid_m, b, hq, h, offs_m, offs_d = _query_rows(Hq, group, BLOCK_M, D)
    rmask = offs_m[:, None] < C
    q = tl.load(Q + b * sqb + hq * sqh + offs_m[:, None] * sqc + offs_d[None, :], mask=rmask, other=0.0)
    if SCORES:  # v1: distant logits are the base layer's own (its queries, its keys)
        qd = tl.load(QB + b * sdb + hq * sdh + offs_m[:, None] * sdc + offs_d[None, :], mask=rmask, other=0.0)
    else:  # v2: this layer's queries with the base layer's keys
        qd = q
    qpos = tl.load(QPOS + offs_m, mask=offs_m < C, other=-1)
    kbase = K + b * skb + h * skh
    bbase = KB + b * sbb + h * sbh
    vbase = V + b * svb + h * svh
    pbase = KPOS + b * spb + h * sph
    m_i, l_i, acc = _softmax_state(BLOCK_M, D)
    hi = tl.minimum(N, n_cached + (pid_m + 1) * BLOCK_M)  # the chunk's keys are the last C: none later is seen
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        kp = tl.load(pbase + offs_n * spn, mask=nmask, other=1 << 30)
        dist = qpos[:, None] - kp[None, :]
        seen = (dist >= 0) & nmask[None, :]  # causal, by original position
        prox = (kp[None, :] < n_sink) | (dist < n_recent)
        own_ok = seen & prox
        far_ok = seen & (~prox)
        s = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
        if tl.max(tl.max(far_ok.to(tl.int32), 1), 0) > 0:  # distant keys in this tile: the base layer's
            kb = tl.load(bbase + offs_n[:, None] * sbn + offs_d[None, :], mask=nmask[:, None], other=0.0)
            s = tl.where(far_ok, tl.dot(qd, tl.trans(kb)) * scale_log2, s)
        if tl.max(tl.max(own_ok.to(tl.int32), 1), 0) > 0:  # proximal keys: the layer's own
            k = tl.load(kbase + offs_n[:, None] * skn + offs_d[None, :], mask=nmask[:, None], other=0.0)
            s = tl.where(own_ok, tl.dot(q, tl.trans(k)) * scale_log2, s)
        v = tl.load(vbase + offs_n[:, None] * svn + offs_d[None, :], mask=nmask[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)
    tl.store(O + b * sob + hq * soh + offs_m[:, None] * soc + offs_d[None, :], _normalised(acc, l_i).to(O.dtype.element_ty),
             mask=rmask)


SHARED_CONFIG = {64: (64, 64, 4, 2), 128: (64, 64, 4, 2)}  # BLOCK_M, BLOCK_N, num_warps, num_stages


def shared_attention(q, k, v, *, scaling, q_pos, k_pos, n_sink: int, n_recent: int, k_base, q_base=None,
                     share: str = "scores", block_m: int | None = None, block_n: int | None = None, config=None):
    """Inter-layer shared attention (PoD), the Triton twin of :func:`kvcascade.interlayer.attention.shared_attention`:
    one exact softmax over proximal keys (this layer's ``k``) and distant ones (``q_base . k_base`` with
    ``share="scores"``, ``q . k_base`` with ``"keys"``), always this layer's values. ``k_base`` holds the same tokens
    as ``k`` at the same indices; ``q_pos`` ``[C]`` and ``k_pos`` (``[N]`` or ``[B, H, N]``) original positions,
    causality by position; the chunk's keys are the last ``C``. A tile of keys that no query of the tile's rows
    sees as distant (or as proximal) skips that product, so the work is about one forward's, not two."""
    B, Hq, C, D, H, N = _check(q, k, v)
    group = Hq // H
    scores = share == "scores"
    q, k, v, kb = _rows(q), _rows(k), _rows(v), _rows(k_base)
    qb = _rows(q_base) if scores else q
    if kb.shape != k.shape or (scores and qb.shape != q.shape):
        raise ValueError(f"base keys {tuple(kb.shape)} / queries {tuple(qb.shape)} do not match {tuple(k.shape)} / "
                         f"{tuple(q.shape)}")
    qp = q_pos.reshape(-1).contiguous()
    kp = k_pos.view(1, 1, -1).expand(B, H, N) if k_pos.dim() == 1 else k_pos.expand(B, H, N)
    interp = _interpreting()
    cbm, cbn, cw, cs = config or SHARED_CONFIG.get(D, (32, 32, 4, 2))
    BM = block_m or (16 if interp else (16 if C <= 16 else cbm))
    BN = block_n or (16 if interp else cbn)
    out = torch.empty_like(q)
    grid = (triton.cdiv(C, BM), B * Hq)
    _shared_fwd_kernel[grid](q, qb, k, kb, v, out, qp, kp,
                             q.stride(0), q.stride(1), q.stride(2), qb.stride(0), qb.stride(1), qb.stride(2),
                             k.stride(0), k.stride(1), k.stride(2), kb.stride(0), kb.stride(1), kb.stride(2),
                             v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                             kp.stride(0), kp.stride(1), kp.stride(2),
                             Hq, C, N, N - C, group, float(scaling) * LOG2E, int(n_sink), int(n_recent),
                             SCORES=scores, BLOCK_M=BM, BLOCK_N=BN, D=D,
                             **({} if interp else {"num_warps": cw, "num_stages": cs}))
    return out
