import os, sys, time
import torch
_Base = torch.cuda.CUDAGraph
class DebugGraph(_Base):
    def __init__(self, *a, **k):
        k.setdefault("keep_graph", True)
        super().__init__(*a, **k)
        self.enable_debug_mode()
torch.cuda.CUDAGraph = DebugGraph
from kvcascade import make_policy
from kvcascade.bench import random_default_model
from kvcascade.engine import Session

class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + int(i) % 26) for i in ids)

out = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
model = random_default_model("cuda")
ids = torch.randint(100, 20000, (4096,), generator=torch.Generator().manual_seed(0)).tolist()
for pol in sys.argv[1:]:
    s = Session(model, _Tok(), ids, make_policy(pol, None if pol == "full" else 2048), max_new_tokens=64, chunk_size=4096, stop_on_eos=False)
    while not s.step():
        pass
    for i, (key, e) in enumerate(s.graphs.graphs.items()):
        print(pol, i, str(key)[:80], e.grow, flush=True)
        e.graph.debug_dump(f"{out}/{pol}_{i}.dot")
    s.close()
