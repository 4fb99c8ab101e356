"""Later-session slowdown: does a fixed reference graph (captured at start) slow down too? Are graphs leaked?"""
import gc, json, os, statistics, time
import torch
from kvcascade import make_policy
from kvcascade.bench import random_default_model, device_name
from kvcascade.engine import Session

EV = []
_orig = torch.cuda.CUDAGraph.replay
def _replay(self):
    a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
    a.record(); _orig(self); b.record(); EV.append((a, b))

x = torch.zeros(256, device="cuda")
ref = torch.cuda.CUDAGraph()
for _ in range(3):
    x.add_(1)
torch.cuda.synchronize()
with torch.cuda.graph(ref):
    for _ in range(2000):
        x.add_(1)
def ref_us():
    ts = []
    for _ in range(20):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); ref.replay(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts[5:])

model = random_default_model("cuda")
POL = os.environ.get("POL", "full")
ids = torch.randint(100, 20000, (4096,), generator=torch.Generator().manual_seed(0)).tolist()
Tok = type("T", (), {"decode": lambda self, ids, skip_special_tokens=True: "x" * len(ids)})
rows = []
print("ref graph us at start", ref_us(), flush=True)
for i in range(1, int(os.environ.get("N", "7")) + 1):
    s = Session(model, Tok(), ids, make_policy(POL, None if POL == "full" else 2048), max_new_tokens=256, chunk_size=4096, stop_on_eos=False)
    while not s.decoding:
        s.step()
    torch.cuda.synchronize()
    r_before = ref_us()
    torch.cuda.CUDAGraph.replay = _replay
    EV.clear()
    while not s.step():
        pass
    torch.cuda.synchronize()
    torch.cuda.CUDAGraph.replay = _orig
    dur = [a.elapsed_time(b) * 1e3 for a, b in EV][len(EV) // 4:]
    r_during = ref_us()
    k = s.cache.layers[0]._k
    row = dict(session=i, graph_us=statistics.median(dur), replays=len(EV), ref_before=r_before, ref_after=r_during,
               k_ptr=hex(k.data_ptr()), alloc_mb=torch.cuda.memory_allocated() / 2**20,
               reserved_mb=torch.cuda.memory_reserved() / 2**20)
    s.close(); del s
    gc.collect()
    row["graphs_alive"] = sum(isinstance(o, torch.cuda.CUDAGraph) for o in gc.get_objects())
    rows.append(row)
    print(json.dumps(row), flush=True)
json.dump({"device": device_name(), "policy": POL, "rows": rows}, open(os.environ.get("OUT", "/tmp") + f"/drift2_{POL}.json", "w"), indent=1)
