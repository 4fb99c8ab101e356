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
        run("A step(int) back to back", lambda s: g.step(5))
        run("B step_device(const) back to back", lambda s: g.step_device(tokbuf))
        def c(s):
            s["a"] = g.step_device(s["a"])[0].argmax(-1, keepdim=True)
        run("C argmax chained, no reads", c)
        def d(s):
            a = g.step_device(s["a"])[0].argmax(-1, keepdim=True)
            pinned.copy_(a, non_blocking=True); ev.record(); s["a"] = a
        run("D + pinned copy + event", d)
        def e(s):
            a = g.step_device(s["a"])[0].argmax(-1, keepdim=True)
            pinned.copy_(a, non_blocking=True); ev.record()
            if "prev" in s:
                s["prev"].synchronize()
            s["prev"] = ev; s["a"] = a
        # (E waits on the event of the previous step: one step ahead, like Session)
        evs = [torch.cuda.Event(), torch.cuda.Event()]
        def e2(s):
            i = s.get("i", 0); s["i"] = i + 1
            a = g.step_device(s["a"])[0].argmax(-1, keepdim=True)
            pinned.copy_(a, non_blocking=True); evs[i % 2].record()
            if i:
                evs[(i - 1) % 2].synchronize()
            s["a"] = a
        run("E one ahead, waits on previous", e2)
        def f(s):
            lo = g.step(5); int(lo.argmax())
        run("F step(int) + item (step by step)", f)
    del cache, g
    torch.cuda.empty_cache()
