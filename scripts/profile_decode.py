"""Decode-step wall time per policy after a 16K-token prefill, and a torch.profiler table of the cascade's
step (kernel launches, CPU vs CUDA time). CUDA only. Usage: python scripts/profile_decode.py"""

import time

import torch
from torch.profiler import ProfilerActivity, profile

import kvcascade
from kvcascade.cache import CompressedCache
from kvcascade.engine import prefill
from kvcascade.policies import make_policy

model, tok = kvcascade.load_model(device="cuda", progress=False)
ids = torch.randint(0, 10000, (16384,)).tolist()
for pol in ["full", "streaming", "cascade"]:
    cache = CompressedCache(model, make_policy(pol, None if pol == "full" else 8192))
    prefill(model, cache, ids, 4096)
    cache.phase = "decode"
    inp = torch.tensor([[5]], device="cuda")

    def step():
        return cache.forward(model, inp, logits_to_keep=1)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    print(f"{pol}: decode step {(time.perf_counter() - t) / 20 * 1000:.1f} ms")
    if pol == "cascade":
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=40))
