import sys, time
import torch
from kvcascade import make_policy
from kvcascade.bench import random_default_model
from kvcascade.cache import CompressedCache
from kvcascade.engine import prefill
from kvcascade.graphs import DecodeGraphs

torch.manual_seed(0)
model = random_default_model("cuda")
ids = torch.randint(100, 20000, (4096,), generator=torch.Generator().manual_seed(0)).tolist()
N = 64
for spec in sys.argv[1:]:
    pol = make_policy(spec, None if spec == "full" else 2048)
    with torch.inference_mode():
        cache = CompressedCache(model, pol)
        cache.reserve(pol.max_tokens(4096, 8 * N + 300, 4096, cache.num_layers), 4096)
        prefill(model, cache, ids, 4096)
        cache.phase, cache.final_chunk, cache.remaining = "decode", True, 0
        g = DecodeGraphs(cache, model)
        for _ in range(150):
            g.step(5)
        tokbuf = torch.full((1,), 5, dtype=torch.long, device="cuda")
        pinned = torch.empty(1, dtype=torch.long, pin_memory=True)
        ev = torch.cuda.Event()
        def run(name, body):
            torch.cuda.synchronize(); t = time.perf_counter()
            state = {"a": tokbuf}
            for _ in range(N):
                body(state)
            torch.cuda.synchronize()
            print(f"{spec} {name}: {(time.perf_counter() - t) / N * 1000:.3f} ms/step", flush=True)
        evs = [torch.cuda.Event(), torch.cuda.Event()]
        def spin(us):
            t = time.perf_counter()
            while time.perf_counter() - t < us * 1e-6:
                pass
        def mk(after_wait=0, before_wait=0, query=False):
            def e2(s):
                i = s.get("i", 0); s["i"] = i + 1
                a = g.step_device(s["a"])[0].argmax(-1, keepdim=True)
                pinned.copy_(a, non_blocking=True); evs[i % 2].record()
                if query:
                    torch.cuda.current_stream().query()
                spin(before_wait)
                if i:
                    evs[(i - 1) % 2].synchronize()
                spin(after_wait)
                s["a"] = a
            return e2
        run("A step(int) back to back", lambda s: g.step(5))
        run("E0 one ahead", mk())
        run("E1 + 500us host after wait", mk(after_wait=500))
        run("E2 + 500us host before wait", mk(before_wait=500))
        run("E3 E1 + stream query after launch", mk(after_wait=500, query=True))
    del cache, g
    torch.cuda.empty_cache()
