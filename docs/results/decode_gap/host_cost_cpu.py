import sys, time, statistics, contextlib, cProfile, pstats
import torch
import kvcascade.graphs as G
from kvcascade import make_policy
from kvcascade.bench import random_default_model
from kvcascade.engine import Session

class FakeGraph:
    def replay(self): pass
torch.cuda.CUDAGraph = FakeGraph
torch.cuda.graph = lambda g: contextlib.nullcontext()
torch.cuda.synchronize = lambda *a, **k: None
G.graphs_enabled = lambda d: True

class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + int(i) % 26) for i in ids)

pol = sys.argv[1] if len(sys.argv) > 1 else "cascade"
torch.manual_seed(0)
from transformers import Qwen2Config, Qwen2ForCausalLM
budget = int(sys.argv[2]) if len(sys.argv) > 2 else 256
cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
model = Qwen2ForCausalLM(cfg).eval()
ids = torch.randint(100, 900, (budget * 2 + 300,)).tolist()
s = Session(model, _Tok(), ids, make_policy(pol, None if pol == "full" else budget), max_new_tokens=600, chunk_size=1024, stop_on_eos=False)
while not s.decoding: s.step()
for _ in range(150): s.step()   # captures done
g = s.graphs
print("replays", g.replays, "captures", g.captures, "eager", g.eager)
# time graphs.step alone (fake replay)
_im = torch.inference_mode(); _im.__enter__()
meds = []
for _ in range(7):
    ts = []
    for _ in range(100):
        t = time.perf_counter(); g.step(5); ts.append(time.perf_counter() - t)
    meds.append(statistics.median(ts) * 1e6)
print("graphs.step host us: min of medians", round(min(meds)), "all", [round(m) for m in meds])
