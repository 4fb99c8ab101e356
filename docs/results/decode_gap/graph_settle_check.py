"""Does settle() see the switch after a model load? ORDER=model_first|settle_first|alloc_first."""
import json, os, statistics, sys, time
import torch
from kvcascade import make_policy
from kvcascade.bench import random_default_model
from kvcascade.engine import Session
from kvcascade import graphs as G
ORDER = os.environ.get("ORDER", "model_first")
x = torch.zeros(256, device="cuda"); x.add_(1); torch.cuda.synchronize()
ref = torch.cuda.CUDAGraph()
with torch.cuda.graph(ref):
    for _ in range(1000):
        x.add_(1)
def m(tag, **kw):
    print(ORDER, tag, round(G._replay_us(ref), 1), kw if kw else "", flush=True)
m("start")
EV = []
plain = torch.cuda.CUDAGraph.replay
def timed(g):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); plain(g); b.record(); EV.append((a, b))
def session(model, tag):
    ids = torch.randint(100, 20000, (4096,), generator=torch.Generator().manual_seed(0)).tolist()
    tok = type("T", (), {"decode": lambda self, ids, skip_special_tokens=True: ""})()
    s = Session(model, tok, ids, make_policy("full", None), max_new_tokens=128, chunk_size=4096, stop_on_eos=False)
    while not s.decoding:
        s.step()
    EV.clear(); torch.cuda.CUDAGraph.replay = timed
    while not s.step():
        pass
    torch.cuda.CUDAGraph.replay = plain; torch.cuda.synchronize()
    us = [a.elapsed_time(b) * 1e3 for a, b in EV][len(EV) // 4:]
    s.close()
    m(tag, graph_us=round(statistics.median(us)))
if ORDER == "alloc_first":
    keep = [torch.empty(10 * 2**20, dtype=torch.uint8, device="cuda") for _ in range(100)]
    m("1 GB allocated")
if ORDER == "model_first":
    model = random_default_model("cuda"); m("model loaded")
print(G.settle("cuda")); m("settled")
if ORDER != "model_first":
    model = random_default_model("cuda"); m("model loaded")
session(model, "session 1")
session(model, "session 2")
