"""Times launch configurations of the Triton kernels on this GPU (bf16) and prints the best per shape.

Chunk kernel: a 4096-query chunk over an 8K / 64K cache, Llama-3.1-8B (head dim 128) and Qwen2.5-0.5B
(head dim 64) attention shapes, forward alone and the mass pass alone. Decode: one query over 1M keys.
Usage (GPU): python scripts/tune_kernels.py
"""

import itertools

import torch

from kvcascade.bench import cuda_time
from kvcascade.kernels import triton_attention as ta

torch.manual_seed(0)
for (Hq, H, D), n_cached in itertools.product([(32, 8, 128), (14, 2, 64)], [8192]):
    C = 4096
    q = torch.randn(1, Hq, C, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, H, n_cached + C, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    flops = 4.0 * C * (n_cached + (C + 1) / 2) * Hq * D
    res = []
    for cfg in itertools.product([64, 128], [64, 128], [4, 8], [2, 3]):
        try:
            ms = cuda_time(lambda: ta.chunk_attention(q, k, v, scaling=D ** -0.5, need_mass=False, fwd_config=cfg), reps=5)
            res.append((flops / ms / 1e9, cfg))
        except Exception as e:  # out of shared memory etc.
            pass
    res.sort(reverse=True)
    print(f"fwd  Hq{Hq} H{H} D{D} cache {n_cached}: best {res[0][1]} {res[0][0]:.0f} TFLOP/s; current "
          f"{ta.FWD_CONFIG[D]} {dict((c, t) for t, c in res).get(ta.FWD_CONFIG[D], 0):.0f}", flush=True)
    best_fwd = res[0][1]
    mres = []
    base = cuda_time(lambda: ta.chunk_attention(q, k, v, scaling=D ** -0.5, need_mass=False, fwd_config=best_fwd), reps=5)
    for cfg in itertools.product([64, 128], [64, 128], [4, 8], [2]):
        try:
            ms = cuda_time(lambda: ta.chunk_attention(q, k, v, scaling=D ** -0.5, need_mass=True, fwd_config=best_fwd,
                                                      mass_config=cfg), reps=5) - base
            mres.append((flops / 2 / ms / 1e9, cfg))
        except Exception:
            pass
    mres.sort(reverse=True)
    print(f"mass Hq{Hq} H{H} D{D} cache {n_cached}: best {mres[0][1]} {mres[0][0]:.0f} TFLOP/s; current "
          f"{ta.MASS_CONFIG[D]} {dict((c, t) for t, c in mres).get(ta.MASS_CONFIG[D], 0):.0f}", flush=True)
for (Hq, H, D) in [(32, 8, 128)]:
    N = 1 << 20
    q = torch.randn(1, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    byt = 2 * k.numel() * 2
    res = []
    for cfg, per in itertools.product(itertools.product([64, 128], [4, 8], [3]), [4, 8, 16]):
        try:
            ms = cuda_time(lambda: ta.decode_attention(q, k, v, scaling=D ** -0.5, need_mass=False, config=cfg,
                                                       programs_per_sm=per), reps=10)
            res.append((byt / ms / 1e6, cfg, per))
        except Exception:
            pass
    res.sort(reverse=True)
    print(f"decode Hq{Hq} H{H} D{D} N 1M: best {res[0][1]} x{res[0][2]}/SM {res[0][0]:.0f} GB/s; top3 {res[:3]}", flush=True)
