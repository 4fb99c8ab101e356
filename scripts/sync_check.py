"""Counts host synchronisations during one prefill chunk and one decode step per policy (CUDA only).

Uses torch.cuda.set_sync_debug_mode("warn") on a tiny random-weight Qwen2 model built from the real
config shape (speed/sync behaviour does not depend on weights). Prints one line per policy.
"""

import warnings

import torch

from kvcascade.bench import random_default_model
from kvcascade.cache import CompressedCache
from kvcascade.policies import make_policy

model = random_default_model("cuda", vocab=1000)
print("| policy | host syncs in 1 prefill chunk (24 layers) | in 1 decode step |")
print("|---|---|---|")
for name in ["full", "window", "streaming", "h2o", "tova", "snapkv", "pyramidkv", "cascade", "cascade:block=16"]:
    pname, *opts = name.split(":")
    args = dict(o.split("=") for o in opts)
    pol = make_policy(pname, None if pname == "full" else 1024, **args)
    cache = CompressedCache(model, pol)
    cache.phase = "prefill"
    counts = []
    with torch.inference_mode():
        for step, n in enumerate([512, 512, 512, 512, 1]):
            ids = torch.randint(0, 1000, (1, n), device="cuda")
            cache.final_chunk = n == 1
            if n == 1:
                cache.phase = "decode"
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                cache.forward(model, ids, logits_to_keep=1)
                torch.cuda.set_sync_debug_mode("default")
            syncs = [x for x in w if "synchroniz" in str(x.message).lower()]
            if step >= 3:
                counts.append(len(syncs))
    print(f"| {name} | {counts[0]} | {counts[1]} |")
