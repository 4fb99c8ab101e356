import sys, time, statistics
import torch
from kvcascade import make_policy
from kvcascade.bench import random_default_model
from kvcascade.engine import Session
pc = time.perf_counter
class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + int(i) % 26) for i in ids)
torch.manual_seed(0)
model = random_default_model("cuda")
ids = torch.randint(100, 20000, (4096,), generator=torch.Generator().manual_seed(0)).tolist()
med = lambda xs: statistics.median(xs) * 1e6
for spec in sys.argv[1:]:
    for ahead in (False, True, False, True):
        s = Session(model, _Tok(), ids, make_policy(spec, None if spec == "full" else 2048), max_new_tokens=200, chunk_size=4096, stop_on_eos=False)
        s.pipelined = ahead
        while not s.decoding: s.step()
        T = {k: [] for k in ("step", "sd", "gs", "wait", "take", "sample")}
        for name, key in (("step_device", "sd"), ("step", "gs")):
            orig = getattr(s.graphs, name)
            def w(t, orig=orig, key=key):
                a = pc(); r = orig(t); T[key].append(pc() - a); return r
            setattr(s.graphs, name, w)
        ot = s._take
        def take(tok=None):
            a = pc(); r = ot(tok); T["take"].append(pc() - a); return r
        s._take = take
        class EvW:
            def __init__(self, e): self.e = e
            def record(self): self.e.record()
            def synchronize(self):
                a = pc(); self.e.synchronize(); T["wait"].append(pc() - a)
        torch.cuda.synchronize()
        for i in range(199):
            if ahead and s._tok_ready is not None and not isinstance(s._tok_ready, EvW):
                s._tok_ready = EvW(s._tok_ready)
            a = pc()
            if s.step(): break
            T["step"].append(pc() - a)
        if ahead:
            print(f"{spec} ahead: step {med(T['step'][50:]):.0f} us | step_device {med(T['sd'][50:]):.0f} | wait {med(T['wait'][50:]):.0f} | take {med(T['take'][50:]):.0f}", flush=True)
        else:
            print(f"{spec} off: step {med(T['step'][50:]):.0f} us | graphs.step {med(T['gs'][50:]):.0f} | take(incl argmax+item) {med(T['take'][50:]):.0f}", flush=True)
        s.close()
