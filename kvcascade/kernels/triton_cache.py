"""Triton kernels (CUDA) that edit the cache's preallocated buffers: dropping one token per row and KV head.

At its budget a decode step of H2O, TOVA, Locret, StreamingLLM, SnapKV or a window drops exactly one token per layer
and KV head: the lowest score outside the protected newest tokens, or a fixed slot. In PyTorch that is a dozen small
kernels per layer (mask, argmin, index arithmetic, one gather and one copy back per buffer, a fill), which is what a
decode step of a 0.5B model is made of (``scripts/profile_decode.py``). Here it is two: ``_shift_kernel`` finds the
victim (every program of a row scans the row's scores, a few KB) and writes the buffers, shifted over the victim,
into a scratch copy; ``_copy_back_kernel`` copies them back and marks the freed slot empty. (In place in one kernel
would race: a slot is read by one thread and rewritten by another.)

The plain-PyTorch twin is :meth:`kvcascade.cache.LayerCache.drop_one`'s reference path (``keep_indices`` +
``compact``); tests compare them, ties included (the first of equal lowest scores goes, as ``torch.argmin``).
"""

from __future__ import annotations

import triton
import triton.language as tl

BIG = tl.constexpr(1 << 30)  # a jit function reads only constexpr globals


@triton.jit(do_not_specialize=["n", "lo", "hi", "victim"])
def _shift_kernel(SC, K, V, P, S, KS, VS, PS, SS,
                  scb, sch, skb, skh, skn, svb, svh, svn, spb, sph,
                  H, n, lo, hi, victim,
                  FIXED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr,
                  DV: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    b = row // H
    h = row % H
    if FIXED:
        vic = victim
    else:  # the first of the lowest scores in [lo, hi)
        sc = SC + b * scb + h * sch
        best = tl.full([BLOCK_S], float("inf"), tl.float32)
        for start in range(lo, hi, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            best = tl.minimum(best, tl.load(sc + offs, mask=offs < hi, other=float("inf")))
        low = tl.min(best, 0)
        first = tl.full([BLOCK_S], BIG, tl.int32)
        for start in range(lo, hi, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            s = tl.load(sc + offs, mask=offs < hi, other=float("inf"))
            first = tl.minimum(first, tl.where((s == low) & (offs < hi), offs, BIG))
        vic = tl.min(first, 0)
        vic = tl.where(vic >= BIG, lo, vic)  # nothing to choose from: the first candidate (as argmin over +inf)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n - 1
    src = offs + (offs >= vic).to(tl.int32)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    k = tl.load(K + b * skb + h * skh + src[:, None] * skn + d[None, :], mask=keep[:, None], other=0.0)
    tl.store(KS + b * skb + h * skh + offs[:, None] * skn + d[None, :], k, mask=keep[:, None])
    v = tl.load(V + b * svb + h * svh + src[:, None] * svn + dv[None, :], mask=keep[:, None], other=0.0)
    tl.store(VS + b * svb + h * svh + offs[:, None] * svn + dv[None, :], v, mask=keep[:, None])
    p = tl.load(P + b * spb + h * sph + src, mask=keep, other=0)
    tl.store(PS + b * spb + h * sph + offs, p, mask=keep)
    s2 = tl.load(S + b * spb + h * sph + src, mask=keep, other=0.0)
    tl.store(SS + b * spb + h * sph + offs, s2, mask=keep)


@triton.jit(do_not_specialize=["n"])
def _copy_back_kernel(K, V, P, S, KS, VS, PS, SS, skb, skh, skn, svb, svh, svn, spb, sph, H, n, empty,
                      BLOCK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    b = row // H
    h = row % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n - 1
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    kp = b * skb + h * skh + offs[:, None] * skn + d[None, :]
    tl.store(K + kp, tl.load(KS + kp, mask=keep[:, None]), mask=keep[:, None])
    vp = b * svb + h * svh + offs[:, None] * svn + dv[None, :]
    tl.store(V + vp, tl.load(VS + vp, mask=keep[:, None]), mask=keep[:, None])
    pp = b * spb + h * sph + offs
    p = tl.load(PS + pp, mask=keep)
    p = tl.where(offs == n - 1, empty, p)  # the freed slot holds no token
    tl.store(P + pp, p, mask=offs < n)
    tl.store(S + pp, tl.load(SS + pp, mask=keep), mask=keep)


def drop_one(k, v, pos, score, scratch, n: int, *, select=None, lo: int = 0, hi: int | None = None,
             victim: int | None = None, empty: int, block: int = 128):
    """Drop one token of the first ``n`` slots in every row and KV head of the buffers ``k``, ``v`` ``[B, H, cap,
    D]`` and ``pos``, ``score`` ``[B, H, cap]``, in place (the other slots keep their order; slot ``n - 1`` becomes
    empty, its position ``empty``): the first of the lowest ``select`` ``[B, H | 1, >= hi]`` scores in slots ``[lo,
    hi)``, or slot ``victim``. ``scratch``: four buffers shaped like ``k``, ``v``, ``pos``, ``score``."""
    B, H, cap, D = k.shape
    DV = v.shape[-1]
    ks, vs, ps, ss = scratch
    fixed = victim is not None
    if fixed:
        sc, scb, sch = score, 0, 0
    else:
        sc = select if select.stride(-1) == 1 else select.contiguous()
        scb, sch = sc.stride(0), (sc.stride(1) if sc.shape[1] > 1 else 0)
    hi = n if hi is None else hi
    grid = (triton.cdiv(n, block), B * H)
    for a, b in ((k, ks), (v, vs), (pos, ps), (score, ss)):
        assert a.shape == b.shape and a.stride() == b.stride(), "scratch must match the buffers"
    _shift_kernel[grid](sc, k, v, pos, score, ks, vs, ps, ss,
                        scb, sch, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                        pos.stride(0), pos.stride(1), H, n, lo, hi, victim if fixed else 0,
                        FIXED=fixed, BLOCK=block, BLOCK_S=256, D=D, DV=DV)
    _copy_back_kernel[grid](k, v, pos, score, ks, vs, ps, ss, k.stride(0), k.stride(1), k.stride(2),
                            v.stride(0), v.stride(1), v.stride(2), pos.stride(0), pos.stride(1), H, n, empty,
                            BLOCK=block, D=D, DV=DV)
