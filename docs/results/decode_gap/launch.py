import os, sys, time
import torch
from kvcascade import make_policy
from kvcascade.bench import random_default_model
from kvcascade.cache import CompressedCache
from kvcascade.engine import prefill
from kvcascade.graphs import DecodeGraphs

torch.manual_seed(0)
model = random_default_model("cuda")
ids = torch.randint(100, 20000, (4096,), generator=torch.Generator().manual_seed(0)).tolist()

def med(xs): return sorted(xs)[len(xs) // 2]

for spec in sys.argv[1:]:
    pol = make_policy(spec, None if spec == "full" else 2048)
    with torch.inference_mode():
        cache = CompressedCache(model, pol)
        cache.reserve(pol.max_tokens(4096, 2000, 4096, cache.num_layers), 4096)
        prefill(model, cache, ids, 4096)
        cache.phase, cache.final_chunk, cache.remaining = "decode", True, 0
        g = DecodeGraphs(cache, model)
        for _ in range(100):
            g.step(5)
        torch.cuda.synchronize()
        print(spec, "graphs", len(g.graphs), "captures", g.captures, "replays", g.replays, flush=True)
        entry = max(g.graphs.values(), key=lambda e: 0)
        if spec == "full":
            # step() path only (padded graph must not be replayed raw)
            continue
        gr = entry.graph
        for label, pre in (("after sync", lambda: None), ("after sync+sleep 5ms", lambda: time.sleep(0.005))):
            L, G = [], []
            for _ in range(30):
                torch.cuda.synchronize(); pre()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                t = time.perf_counter(); gr.replay(); L.append(time.perf_counter() - t)
                b.record(); torch.cuda.synchronize(); G.append(a.elapsed_time(b))
            print(f"{spec} {label}: launch {med(L)*1e6:.0f} us (min {min(L)*1e6:.0f} max {max(L)*1e6:.0f}), gpu {med(G):.3f} ms", flush=True)
        # back to back: second launch while first runs
        L = []
        for _ in range(30):
            torch.cuda.synchronize(); gr.replay()
            t = time.perf_counter(); gr.replay(); L.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        print(f"{spec} while busy: launch {med(L)*1e6:.0f} us", flush=True)
        L, H, F = [], [], []
        class TG:
            def __init__(s2, g): s2.g = g
            def replay(s2):
                t = time.perf_counter(); s2.g.replay(); L.append(time.perf_counter() - t)
        entry.graph = TG(gr)
        orig_fill = g._fill
        def tfill(toks):
            t = time.perf_counter(); r = orig_fill(toks); F.append(time.perf_counter() - t); return r
        g._fill = tfill
        for _ in range(30):
            torch.cuda.synchronize()
            t = time.perf_counter(); g.step(5); H.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        print(f"{spec} via step(): host {med(H)*1e6:.0f} us, fill {med(F)*1e6:.0f} us, launch {med(L)*1e6:.0f} us (min {min(L)*1e6:.0f})", flush=True)
        L.clear(); H.clear(); F.clear()
        for _ in range(30):
            torch.cuda.synchronize()
            t = time.perf_counter(); g.step(5); H.append(time.perf_counter() - t)
            time.sleep(0.003)
        torch.cuda.synchronize()
        print(f"{spec} via step() +sleep: host {med(H)*1e6:.0f} us, fill {med(F)*1e6:.0f} us, launch {med(L)*1e6:.0f} us", flush=True)
        # graph launched via a fresh instantiate of the same capture? recapture as plain graph of 1 layer attention etc skipped
    del cache, g
    torch.cuda.empty_cache()
