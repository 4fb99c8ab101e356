"""Times launch configurations of the Triton kernels on this GPU (bf16) and prints the best per shape.

Chunk kernel: a 4096-query chunk over an 8K cache, Qwen2.5-0.5B (head dim 64, the default model) and
Llama-3.1-8B (head dim 128) attention shapes, forward alone and the mass pass alone. Decode: one query over 1M keys.
``--out F.json`` writes the best forward and mass configurations per head dim (the form of
``triton_attention.FWD_CONFIG`` / ``MASS_CONFIG``) beside every timing; ``--decode`` adds the decode sweep.
Usage (GPU): python scripts/tune_kernels.py [--out tune.json] [--decode]
"""

import argparse
import itertools
import json

import torch

from kvcascade.bench import LLAMA8B, QWEN05B, cuda_time, device_name
from kvcascade.kernels import triton_attention as ta


def _sweep(run, configs, flops):
    res = []
    for cfg in configs:
        try:
            res.append((flops / run(cfg) / 1e9, cfg))
        except Exception:  # out of shared memory, registers etc.
            pass
    return sorted(res, reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--decode", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    report = {"device": device_name(), "fwd": {}, "mass": {}, "timings": []}
    for shape, n_cached in itertools.product([QWEN05B, LLAMA8B], [8192]):
        Hq, H, D = shape["Hq"], shape["H"], shape["D"]
        C = 4096
        q = torch.randn(1, Hq, C, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, H, n_cached + C, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flops = 4.0 * C * (n_cached + (C + 1) / 2) * Hq * D
        fwd = _sweep(lambda cfg: cuda_time(lambda: ta.chunk_attention(q, k, v, scaling=D ** -0.5, need_mass=False,
                                                                      fwd_config=cfg), reps=5),
                     itertools.product([64, 128], [64, 128], [4, 8], [2, 3, 4]), flops)
        cur = dict((c, t) for t, c in fwd).get(ta.FWD_CONFIG[D], 0)
        print(f"fwd  Hq{Hq} H{H} D{D} cache {n_cached}: best {fwd[0][1]} {fwd[0][0]:.0f} TFLOP/s; current "
              f"{ta.FWD_CONFIG[D]} {cur:.0f}; next {[(c, round(t)) for t, c in fwd[1:4]]}", flush=True)
        best_fwd = fwd[0][1]
        base = cuda_time(lambda: ta.chunk_attention(q, k, v, scaling=D ** -0.5, need_mass=False, fwd_config=best_fwd),
                         reps=5)
        mass = _sweep(lambda cfg: cuda_time(lambda: ta.chunk_attention(q, k, v, scaling=D ** -0.5, need_mass=True,
                                                                       q_weights=torch.ones(C, device="cuda"),
                                                                       fwd_config=best_fwd, mass_config=cfg),
                                            reps=5) - base,
                      itertools.product([64, 128], [64, 128], [4, 8], [2, 3]), flops / 2)  # BLOCK_M queries, _N keys
        cur = dict((c, t) for t, c in mass).get(ta.MASS_CONFIG[D], 0)
        print(f"mass Hq{Hq} H{H} D{D} cache {n_cached}: best {mass[0][1]} {mass[0][0]:.0f} TFLOP/s; current "
              f"{ta.MASS_CONFIG[D]} {cur:.0f}; next {[(c, round(t)) for t, c in mass[1:4]]}", flush=True)
        report["fwd"][D], report["mass"][D] = list(best_fwd), list(mass[0][1])
        report["timings"].append({"Hq": Hq, "H": H, "D": D, "n_cached": n_cached, "chunk": C,
                                  "fwd_tflops": [[list(c), t] for t, c in fwd],
                                  "mass_tflops": [[list(c), t] for t, c in mass]})
    if args.decode:
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
            print(f"decode Hq{Hq} H{H} D{D} N 1M: best {res[0][1]} x{res[0][2]}/SM {res[0][0]:.0f} GB/s; top3 {res[:3]}",
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
