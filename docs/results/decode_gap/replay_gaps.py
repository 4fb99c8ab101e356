"""Where a running-ahead session's step time goes on the GPU: events around every graph replay."""
import json, os, statistics, sys, time, warnings
import torch
warnings.simplefilter("always")
warnings.showwarning = lambda m, c, f, l, file=None, line=None: print("WARN", c.__name__, str(m)[:4000], flush=True)
from kvcascade import make_policy
from kvcascade.bench import random_default_model, device_name
from kvcascade.engine import Session
from kvcascade.policies import parse_policy_spec
import kvcascade.graphs as G

EV = []
_orig = torch.cuda.CUDAGraph.replay
def _replay(self):
    a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
    a.record(); _orig(self); b.record(); EV.append((a, b))
torch.cuda.CUDAGraph.replay = _replay
_q = Session._queue_token
def _queue_flush(self, logits, slot):
    out = _q(self, logits, slot)
    torch.cuda.current_stream().query()
    return out

def med(x):
    x = x[len(x) // 4:]
    return statistics.median(x) if x else float("nan")

model = random_default_model("cuda")
rows = []
CFG = [("full", 4096, 2048), ("cascade", 16384, 8192), ("streaming", 4096, 2048), ("cascade", 4096, 2048)]
if os.environ.get("ONLY"):
    CFG = [c for c in CFG if c[0] == os.environ["ONLY"]][:1]
MODES = os.environ.get("MODES", "off,on,flush,off,on,flush").split(",")
for spec, prompt, budget in CFG:
    ids = torch.randint(100, 20000, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    name, params = parse_policy_spec(spec)
    for mode in MODES:
        G._FAILED = False
        Session._queue_token = _queue_flush if mode == "flush" else _q
        s = Session(model, type("T", (), {"decode": lambda self, ids, skip_special_tokens=True: "x" * len(ids)})(), ids,
                    make_policy(name, None if name == "full" else budget, **params), max_new_tokens=256, chunk_size=4096,
                    stop_on_eos=False)
        s.pipelined = mode != "off"
        while not s.decoding:
            s.step()
        torch.cuda.synchronize()
        EV.clear()
        t = time.perf_counter()
        while not s.step():
            pass
        dt = time.perf_counter() - t
        torch.cuda.synchronize()
        dur = [a.elapsed_time(b) * 1e3 for a, b in EV]
        gap = [EV[i][1].elapsed_time(EV[i + 1][0]) * 1e3 for i in range(len(EV) - 1)]
        steps = [b - a for a, b in zip(s.marks, s.marks[1:])]
        r = dict(t=time.time(), policy=spec, prompt=prompt, budget=budget, mode=mode, tok_s=len(s.new) / dt, step_us=med(steps) * 1e6,
                 replays=len(EV), graph_us=med(dur), gap_us=med(gap), gap_mean_us=statistics.mean(gap[len(gap)//4:]) if gap else 0,
                 failed=G._FAILED, tokens=s.new[:6])
        rows.append(r)
        print(json.dumps(r), flush=True)
        s.close()
        if os.environ.get("EMPTY") == "1":  # between sessions: collect and give the allocator's free memory back
            import gc
            del s
            gc.collect()
            torch.cuda.empty_cache()
print(f"| policy | prompt/budget | mode | tok/s | median step us | replays | graph us (median) | gap us median / mean |  ({device_name()})")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['policy']} | {r['prompt']}/{r['budget']} | {r['mode']} | {r['tok_s']:.0f} | {r['step_us']:.0f} | {r['replays']} | {r['graph_us']:.0f} | {r['gap_us']:.0f} / {r['gap_mean_us']:.0f} |")
json.dump({"device": device_name(), "rows": rows}, open(os.environ.get("OUT", "/tmp") + "/diag.json", "w"), indent=1)
