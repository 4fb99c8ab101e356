"""After how many CUDA graphs does every replay get slower? ref: 2000 tiny kernels captured first. Then NG graphs of
NK kernels, kept (KEEP=1) or destroyed after use; ref timed after each. Also a new graph's own time, eager 2000."""
import json, os, statistics, sys, time
import torch
KEEP, NK, NG = os.environ.get("KEEP", "0") == "1", int(os.environ.get("NK", "1100")), int(os.environ.get("NG", "6"))
POOL = os.environ.get("POOL", "0") == "1"
x = torch.zeros(256, device="cuda")
for _ in range(3):
    x.add_(1)
torch.cuda.synchronize()
ref = torch.cuda.CUDAGraph()
with torch.cuda.graph(ref):
    for _ in range(2000):
        x.add_(1)
pool = ref.pool() if POOL else None
def t(fn, n=12):
    ts = []
    for _ in range(n):
        e0 = torch.cuda.Event(enable_timing=True); e1 = torch.cuda.Event(enable_timing=True)
        e0.record(); fn(); e1.record(); torch.cuda.synchronize(); ts.append(e0.elapsed_time(e1) * 1e3)
    return round(statistics.median(ts[3:]), 1)
def eager():
    for _ in range(2000):
        x.add_(1)
out = [("start", t(ref.replay), t(eager))]
kept = []
for i in range(1, NG + 1):
    y = torch.zeros(256, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        for _ in range(NK):
            y.add_(1)
    gt = t(g.replay)
    if KEEP:
        kept.append((g, y))
    del g, y
    out.append((f"g{i}", t(ref.replay), gt))
print(os.environ.get("TAG", ""), f"KEEP={int(KEEP)} NK={NK} POOL={int(POOL)}", " ".join(f"{a}:{b}/{c}" for a, b, c in out), flush=True)
