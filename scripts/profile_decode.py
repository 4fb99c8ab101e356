"""Where a decode step's time goes, per policy (CUDA only): ms per token eager and replayed as a CUDA graph, and
a torch.profiler count of the step's kernels with their GPU time, grouped by operator (the top ones printed).
``--chunk C`` does the same for a prompt chunk of ``C`` tokens at the budget (a long prompt's prefill).

A graph replay removes the host's launch time, so its step time is close to the sum of the step's kernel times:
the table says which kernels to remove or fuse next. Replays back to back hide the host's work between steps (the
next replay is queued while one runs); a generation loop cannot (it reads each token before the next step), so the
step is also timed *synced* (each replay waited for, as ``Session.step`` does), with the host's time per call and,
of it, the time ``CUDAGraph.replay()`` takes to launch the graph (GPU idle before each call). Same model and prompt for every policy (the default model,
``--prompt`` random token ids, ``--budget``), the cache in its steady state (at the budget: a token arrives and
one leaves) unless the prompt is shorter. Usage:
python scripts/profile_decode.py [--prompt 4096] [--budget 2048] [--chunk 0] [--top 8] [--random] [--out F.json] POLICY ...
(``--random``: random weights in the default model's shape, no model files; speed only)
"""

import argparse
import json
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import kvcascade
from kvcascade import make_policy
from kvcascade.bench import device_name, random_default_model
from kvcascade.cache import CompressedCache
from kvcascade.engine import prefill
from kvcascade.graphs import SEEN_KEYS, DecodeGraphs, settle
from kvcascade.policies import parse_policy_spec


def _ms_per_step(fn, steps: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1000


class _TimedGraph:
    """A captured graph whose ``replay()`` records the host's time to launch it."""

    def __init__(self, graph, times: list):
        self.graph, self.times = graph, times

    def replay(self):
        t = time.perf_counter()
        self.graph.replay()
        self.times.append(time.perf_counter() - t)


def _synced(fn, graphs, steps: int) -> tuple[float, float, float]:
    """ms per step when each is waited for before the next (a generation loop), and the host's microseconds per call
    (GPU idle at the start) and per ``replay()`` launch within it."""
    launches: list = []
    for entry in graphs.graphs.values():
        entry.graph = _TimedGraph(getattr(entry.graph, "graph", entry.graph), launches)
    host = []
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        a = time.perf_counter()
        fn()
        host.append(time.perf_counter() - a)
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / steps * 1000
    per_launch = sum(launches) / len(launches) * 1e6 if launches else float("nan")
    return ms, sum(host) / steps * 1e6, per_launch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("policies", nargs="+")
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=0, help="profile prompt chunks of this many tokens, not decode steps")
    ap.add_argument("--out", default=None)
    ap.add_argument("--random", action="store_true", help="random weights in the default model's shape (speed only)")
    args = ap.parse_args()
    if args.random:
        torch.manual_seed(0)
        model = random_default_model("cuda")
    else:
        model, _ = kvcascade.load_model(device="cuda", progress=False)
    settle("cuda")  # timed in a long-lived process's graph state (kvcascade.graphs.settle)
    ids = torch.randint(100, 20000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for spec in args.policies:
        name, params = parse_policy_spec(spec)
        pol = make_policy(name, None if name in ("full", "interlayer") else args.budget, **params)
        with torch.inference_mode():
            cache = CompressedCache(model, pol)
            cache.reserve(pol.max_tokens(args.prompt, 400 + 2 * args.steps + 16, max(4096, args.chunk), cache.num_layers),
                          max(4096, args.chunk))
            prefill(model, cache, ids, 4096)
            graphs = DecodeGraphs(cache, model)
            if args.chunk:  # more prompt: chunks of one size at the budget (their key repeats), never the last
                cache.phase, cache.final_chunk, cache.remaining = "prefill", False, 1 << 30
                chunk = torch.randint(100, 20000, (1, args.chunk), device="cuda")
                one = lambda: graphs.chunk(chunk)  # noqa: E731
            else:
                cache.phase, cache.final_chunk, cache.remaining = "decode", True, 0
                one = lambda: graphs.step(5)  # noqa: E731
            graphs.enabled = False
            eager = _ms_per_step(one, args.steps)
            graphs.enabled = True
            quiet = 0  # warm up until no step captured a graph for a while: a policy whose step cycles through
            for _ in range(400):  # several keys (the cascade) captures one per key of its cycle, each on its second sight
                captures, chunks = graphs.captures, graphs.chunk_replays
                one()
                ok = graphs.chunk_replays > chunks if args.chunk else graphs.captures == captures  # (a chunk: replayed)
                quiet = quiet + 1 if ok else 0
                if quiet >= (16 if args.chunk else 2 * SEEN_KEYS):
                    break
            captures = graphs.captures
            replayed = graphs.replays + graphs.chunk_replays
            graphed = _ms_per_step(one, args.steps)
            # (a capture also replays once)
            replayed = graphs.replays + graphs.chunk_replays - replayed - (graphs.captures - captures)
            synced, host_us, launch_us = _synced(one, graphs, args.steps)
            graphs.enabled = False
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                one()
                torch.cuda.synchronize()
        by_op = defaultdict(lambda: [0, 0.0])
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                by_op[ev.name][0] += 1
                by_op[ev.name][1] += ev.time_range.elapsed_us()
        kernels = sum(c for c, _ in by_op.values())
        gpu_us = sum(t for _, t in by_op.values())
        top = sorted(by_op.items(), key=lambda kv: -kv[1][1])[:args.top]
        rows.append({"policy": spec, "eager_ms": eager, "graph_ms": graphed, "graph_tok_s": 1000 / graphed,
                     "synced_ms": synced, "host_us": host_us, "launch_us": launch_us,
                     "replayed": f"{replayed} of {args.steps}", "kernels": kernels, "kernel_ms": gpu_us / 1000,
                     "top": [{"kernel": k[:90], "count": c, "us": t} for k, (c, t) in top]})
        print(f"{spec}: eager {eager:.2f} ms, graphs {graphed:.2f} ms ({replayed}/{args.steps} replayed), synced "
              f"{synced:.2f} ms (host {host_us:.0f} us per call, graph launch {launch_us:.0f} us), {kernels} kernels, "
              f"{gpu_us / 1000:.2f} ms of kernel time", flush=True)
        for k, (c, t) in top:
            print(f"    {t / 1000:7.3f} ms  {c:5d} x  {k[:90]}")
        cache = graphs = None  # freed before the next policy
        torch.cuda.empty_cache()
    dev = device_name()
    what = f"chunks of {args.chunk}" if args.chunk else "decode steps"
    weights = ", random weights" if args.random else ""
    print(f"\n| policy | eager ms | graph ms (tok/s) | synced ms | host us (launch) | kernels per step | kernel ms per "
          f"step |  ({dev}{weights}, prompt {args.prompt}, budget {args.budget}, {what})\n|---|---|---|---|---|---|---|")
    per = max(1, args.chunk)
    for r in rows:
        print(f"| {r['policy']} | {r['eager_ms']:.2f} | {r['graph_ms']:.2f} ({r['graph_tok_s'] * per:.0f}) | "
              f"{r['synced_ms']:.2f} | {r['host_us']:.0f} ({r['launch_us']:.0f}) | {r['kernels']} | {r['kernel_ms']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev, "random_weights": args.random, "prompt": args.prompt, "budget": args.budget,
                       "chunk": args.chunk, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
