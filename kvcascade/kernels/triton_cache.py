"""Triton kernels (CUDA) that edit the cache's preallocated buffers: dropping one token (or one span of consecutive
tokens) per row and KV head; rotating the keys of a step with in-cache positions (:func:`rope_keys`).

At its budget a decode step of H2O, TOVA, Locret, StreamingLLM, SnapKV or a window drops exactly one token per layer
and KV head: the lowest score outside the protected newest tokens, or a fixed slot. In PyTorch that is a dozen small
kernels per layer (mask, argmin, index arithmetic, one gather and one copy back per buffer, a fill), which is what a
decode step of a 0.5B model is made of (``scripts/profile_decode.py``). Here it is two: ``_shift_kernel`` finds the
victim (every program of a row scans the row's scores, a few KB) and writes the buffers, shifted over the victim,
into a scratch copy; ``_copy_back_kernel`` copies them back and marks the freed slot empty. (In place in one kernel
would race: a slot is read by one thread and rewritten by another.) The cascade's decode step drops a whole unit
(``width`` consecutive slots) that lost a competition between two candidates: the same two kernels, the candidates'
scores given apart from the slots (candidate ``j`` spans slots ``base + j * width`` onwards).

The plain-PyTorch twin is :meth:`kvcascade.cache.LayerCache.drop_one`'s reference path (``keep_indices`` +
``compact``); tests compare them, ties included (the first of equal lowest scores goes, as ``torch.argmin``).
"""

from __future__ import annotations

import triton
import triton.language as tl

BIG = tl.constexpr(1 << 30)  # a jit function reads only constexpr globals


@triton.jit(do_not_specialize=["n", "lo", "hi", "victim", "base", "width"])
def _shift_kernel(SC, K, V, P, S, KS, VS, PS, SS, SCHED,
                  scb, sch, skb, skh, skn, svb, svh, svn, spb, sph,
                  H, n, lo, hi, victim, base, width,
                  FIXED: tl.constexpr, DEV_SCHED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_U: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    b = row // H
    h = row % H
    if DEV_SCHED:  # (start, fixed) on the device: a fixed unit, or the lower of the units at start, start + width
        start = tl.load(SCHED).to(tl.int32)
        u = tl.arange(0, BLOCK_U)
        sc = SC + b * scb + h * sch
        inc = tl.max(tl.load(sc + start + u, mask=u < width, other=float("-inf")), 0)
        off = tl.max(tl.load(sc + start + width + u, mask=u < width, other=float("-inf")), 0)
        vic = tl.where((tl.load(SCHED + 1) != 0) | (inc <= off), start, start + width)  # the offer wins ties
    elif FIXED:
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
        vic = base + vic * width
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n - width
    src = offs + (offs >= vic).to(tl.int32) * width
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


@triton.jit(do_not_specialize=["n", "width"])
def _copy_back_kernel(K, V, P, S, KS, VS, PS, SS, skb, skh, skn, svb, svh, svn, spb, sph, H, n, width, empty,
                      BLOCK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    b = row // H
    h = row % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n - width
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    kp = b * skb + h * skh + offs[:, None] * skn + d[None, :]
    tl.store(K + kp, tl.load(KS + kp, mask=keep[:, None]), mask=keep[:, None])
    vp = b * svb + h * svh + offs[:, None] * svn + dv[None, :]
    tl.store(V + vp, tl.load(VS + vp, mask=keep[:, None]), mask=keep[:, None])
    pp = b * spb + h * sph + offs
    p = tl.load(PS + pp, mask=keep)
    p = tl.where(offs >= n - width, empty, p)  # the freed slots hold no token
    tl.store(P + pp, p, mask=offs < n)
    tl.store(S + pp, tl.load(SS + pp, mask=keep), mask=keep)


def drop_one(k, v, pos, score, scratch, n: int, *, select=None, lo: int = 0, hi: int | None = None,
             victim: int | None = None, empty: int, base: int = 0, width: int = 1, sched=None, block: int = 128):
    """Drop one token of the first ``n`` slots in every row and KV head of the buffers ``k``, ``v`` ``[B, H, cap,
    D]`` and ``pos``, ``score`` ``[B, H, cap]``, in place (the other slots keep their order; slot ``n - 1`` becomes
    empty, its position ``empty``): the first of the lowest ``select`` ``[B, H | 1, >= hi]`` scores in slots ``[lo,
    hi)``, or slot ``victim``. ``scratch``: four buffers shaped like ``k``, ``v``, ``pos``, ``score``.

    ``width > 1`` drops ``width`` consecutive slots: those from ``victim``, or from ``base + j * width`` for the first
    lowest ``select[..., j]`` with ``j`` in ``[lo, hi)`` (the ``width`` last slots become empty).

    ``sched`` (a device tensor ``[start, fixed]``, the cascade's decode step as a CUDA graph replays it): the
    ``width`` slots from ``start`` if ``fixed``, else the unit (``width`` slots) with the lower largest ``select``
    score of the two from ``start`` and ``start + width``, the first on a tie."""
    B, H, cap, D = k.shape
    DV = v.shape[-1]
    ks, vs, ps, ss = scratch
    fixed = victim is not None
    if fixed and sched is None:
        sc, scb, sch = score, 0, 0
    else:
        sc = select if select.stride(-1) == 1 else select.contiguous()
        scb, sch = sc.stride(0), (sc.stride(1) if sc.shape[1] > 1 else 0)
    hi = n if hi is None else hi
    grid = (triton.cdiv(n, block), B * H)
    for a, b in ((k, ks), (v, vs), (pos, ps), (score, ss)):
        assert a.shape == b.shape and a.stride() == b.stride(), "scratch must match the buffers"
    _shift_kernel[grid](sc, k, v, pos, score, ks, vs, ps, ss, sched if sched is not None else pos,
                        scb, sch, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                        pos.stride(0), pos.stride(1), H, n, lo, hi, victim if fixed else 0, base, width,
                        FIXED=fixed, DEV_SCHED=sched is not None, BLOCK=block, BLOCK_S=256,
                        BLOCK_U=max(2, triton.next_power_of_2(width)), D=D, DV=DV)
    _copy_back_kernel[grid](k, v, pos, score, ks, vs, ps, ss, k.stride(0), k.stride(1), k.stride(2),
                            v.stride(0), v.stride(1), v.stride(2), pos.stride(0), pos.stride(1), H, n, width, empty,
                            BLOCK=block, D=D, DV=DV)


@triton.jit
def _rn(x, ty: tl.constexpr):
    """``x`` rounded to ``ty`` to nearest even, as PyTorch rounds (Triton's default for bfloat16 is toward zero)."""
    return x.to(ty, fp_downcast_rounding="rtne")


@triton.jit(do_not_specialize=["n", "first", "C"])
def _rope_keys_kernel(K, NEW, COS, SIN, OUT, SLOT, V, VNEW, P, ORIG, S,
                      skb, skh, skn, snb, snh, snc, scn, ssn, sob, soh, son,
                      svb, svh, svn, swb, swh, swc, spb, sph, sorb,
                      H, n, first, C,
                      DEV_SLOT: tl.constexpr, STORE: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr,
                      DV: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    b = row // H
    h = row % H
    if DEV_SLOT:
        first = tl.load(SLOT)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    new = (offs >= first) & (offs < first + C)
    old = inside & ~new
    d = tl.arange(0, HALF)
    c1 = tl.load(COS + offs[:, None] * scn + d[None, :], mask=inside[:, None], other=1.0).to(tl.float32)
    c2 = tl.load(COS + offs[:, None] * scn + HALF + d[None, :], mask=inside[:, None], other=1.0).to(tl.float32)
    s1 = tl.load(SIN + offs[:, None] * ssn + d[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
    s2 = tl.load(SIN + offs[:, None] * ssn + HALF + d[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
    kp = K + b * skb + h * skh + offs[:, None] * skn
    op = OUT + b * sob + h * soh + offs[:, None] * son
    # stored keys, rotated at their slot: x * cos + rotate_half(x) * sin, each product rounded to the storage dtype
    # before the sum, as the PyTorch twin computes it in that dtype (equal to it within one rounding)
    x1 = tl.load(kp + d[None, :], mask=old[:, None], other=0.0)
    x2 = tl.load(kp + HALF + d[None, :], mask=old[:, None], other=0.0)
    ty = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    r1 = _rn(_rn(f1 * c1, ty).to(tl.float32) + _rn(-f2 * s1, ty).to(tl.float32), ty)
    r2 = _rn(_rn(f2 * c2, ty).to(tl.float32) + _rn(f1 * s2, ty).to(tl.float32), ty)
    tl.store(op + d[None, :], r1, mask=old[:, None])
    tl.store(op + HALF + d[None, :], r2, mask=old[:, None])
    # new keys (rotated as they came): attended as they are, stored un-rotated (in float32, as unapply_rope)
    npos = NEW + b * snb + h * snh + (offs - first)[:, None] * snc
    y1 = tl.load(npos + d[None, :], mask=new[:, None], other=0.0)
    y2 = tl.load(npos + HALF + d[None, :], mask=new[:, None], other=0.0)
    tl.store(op + d[None, :], y1, mask=new[:, None])
    tl.store(op + HALF + d[None, :], y2, mask=new[:, None])
    g1, g2 = y1.to(tl.float32), y2.to(tl.float32)
    u1 = (g1 * c1 + g2 * s1) / (c1 * c1 + s1 * s1)
    u2 = (g2 * c2 - g1 * s2) / (c2 * c2 + s2 * s2)
    tl.store(kp + d[None, :], _rn(u1, ty), mask=new[:, None])
    tl.store(kp + HALF + d[None, :], _rn(u2, ty), mask=new[:, None])
    if STORE:  # the rest of an append: the new tokens' values, original positions, and scores (zero)
        dv = tl.arange(0, DV)
        j = offs - first
        val = tl.load(VNEW + b * swb + h * swh + j[:, None] * swc + dv[None, :], mask=new[:, None], other=0.0)
        tl.store(V + b * svb + h * svh + offs[:, None] * svn + dv[None, :], val, mask=new[:, None])
        tl.store(P + b * spb + h * sph + offs, tl.load(ORIG + b * sorb + j, mask=new, other=0), mask=new)
        tl.store(S + b * spb + h * sph + offs, tl.zeros([BLOCK], tl.float32), mask=new)


def rope_keys(k, key_new, cos, sin, n: int, first=0, *, store=None, block: int = 64):
    """The keys a step of in-cache positions attends to, in one kernel: ``[B, H, n, D]`` with slot ``j`` of the
    un-rotated buffer ``k`` ``[B, H, cap, D]`` rotated by ``cos[..., j, :]``, ``sin[..., j, :]`` (``[1, >= n, D]``),
    except slots ``first .. first + C - 1``, which hold ``key_new`` ``[B, H, C, D]`` as it came (rotated); those
    slots of ``k`` get ``key_new`` un-rotated, in place. ``first``: an int, or a one-element device tensor (a padded
    decode step's slot). ``store=(v, value_new, pos, orig, score)`` also writes the new tokens' values into ``v``,
    their original positions ``orig`` (``[1 | B, C]``) into ``pos`` and zero into ``score`` (``[B, H, cap]`` both),
    the rest of an append. The twin of :func:`kvcascade.cache.apply_rope` / :func:`~kvcascade.cache.unapply_rope`
    (and :meth:`kvcascade.cache.LayerCache.append`)."""
    import torch

    B, H, _, D = k.shape
    C = key_new.shape[2]
    if key_new.stride(-1) != 1:
        key_new = key_new.contiguous()
    out = torch.empty(B, H, n, D, dtype=k.dtype, device=k.device)
    dev_slot = isinstance(first, torch.Tensor)
    cos2, sin2 = cos.reshape(-1, D), sin.reshape(-1, D)
    if store is None:
        v = vnew = pos = orig = score = k
        vs = ws = ps = (0, 0, 0)
        sorb, DV = 0, 16
    else:
        v, vnew, pos, orig, score = store
        if vnew.stride(-1) != 1:
            vnew = vnew.contiguous()
        orig = orig.reshape(-1, C)
        if orig.stride(-1) != 1:
            orig = orig.contiguous()
        assert pos.stride() == score.stride() and pos.stride(-1) == 1, "pos and score must share one layout"
        vs, ws, ps = v.stride()[:3], vnew.stride()[:3], (pos.stride(0), pos.stride(1), 0)
        sorb, DV = (orig.stride(0) if orig.shape[0] > 1 else 0), v.shape[-1]
    grid = (triton.cdiv(n, block), B * H)
    _rope_keys_kernel[grid](k, key_new, cos2, sin2, out, first if dev_slot else k, v, vnew, pos, orig, score,
                            k.stride(0), k.stride(1), k.stride(2), key_new.stride(0), key_new.stride(1),
                            key_new.stride(2), cos2.stride(0), sin2.stride(0), out.stride(0), out.stride(1),
                            out.stride(2), *vs, *ws, ps[0], ps[1], sorb, H, n, 0 if dev_slot else int(first), C,
                            DEV_SLOT=dev_slot, STORE=store is not None, BLOCK=block, HALF=D // 2, DV=DV)
    return out
