"""Is the later slowdown of graph replays a device-wide drift over time? A fixed graph of 2000 tiny kernels,
timed at start, after idling, under 60 s of back-to-back replays, after idling again; a matmul beside it."""
import json, os, statistics, sys, time
import torch
x = torch.zeros(256, device="cuda")
a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
ref = torch.cuda.CUDAGraph()
for _ in range(3):
    x.add_(1); a @ a
torch.cuda.synchronize()
with torch.cuda.graph(ref):
    for _ in range(2000):
        x.add_(1)
T0 = time.time()
rows = []
def meas(tag, n=20):
    ts, ms = [], []
    for _ in range(n):
        e0 = torch.cuda.Event(enable_timing=True); e1 = torch.cuda.Event(enable_timing=True); e2 = torch.cuda.Event(enable_timing=True)
        e0.record(); ref.replay(); e1.record(); a @ a; e2.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3); ms.append(e1.elapsed_time(e2) * 1e3)
    r = dict(t=round(time.time() - T0, 1), tag=tag, ref_us=statistics.median(ts[3:]), mm_us=statistics.median(ms[3:]))
    rows.append(r); print(json.dumps(r), flush=True)
meas("start")
time.sleep(float(os.environ.get("IDLE1", "30")))
meas("after idle")
end = time.time() + float(os.environ.get("BUSY", "60"))
while time.time() < end:
    t1 = time.time() + 2
    while time.time() < t1:
        ref.replay()
    torch.cuda.synchronize()
    meas("busy")
time.sleep(20)
meas("after idle 2")
json.dump(rows, open(os.environ.get("OUT", "/tmp") + "/clock.json", "w"), indent=1)
