"""Count the aten ops one decode step issues (each is at least one kernel launch on a GPU), per policy.

Decoding a small model is launch-bound on a GPU, so the op count is a device-independent proxy for its
speed. Usage: python scripts/count_decode_ops.py [--device cpu] [--prompt 3000] [--budget 2048] POLICY ...
(policy specs as in `kvcascade eval`, e.g. full snapkv h2o streaming cascade:cascades=8).
"""

import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kvcascade
from kvcascade import make_policy
from kvcascade.cache import CompressedCache
from kvcascade.engine import prefill
from kvcascade.policies import parse_policy_spec


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("policies", nargs="+")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=3000, help="random prompt tokens before decoding")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps")
    args = ap.parse_args()
    model, _ = kvcascade.load_model("qwen2.5-coder-0.5b", device=args.device, progress=False)
    ids = torch.randint(100, 20000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    print("| policy | aten ops per decode token | ms per decode token | greedy next token |\n|---|---|---|---|")
    for spec in args.policies:
        name, params = parse_policy_spec(spec)
        cache = CompressedCache(model, make_policy(name, None if name == "full" else args.budget, **params))
        tok = int(prefill(model, cache, ids, 512).argmax())
        cache.phase = "decode"
        with torch.inference_mode():
            def step():
                inp = torch.tensor([[tok]], device=model.device)
                return cache.forward(model, inp, logits_to_keep=1)

            counter = Count()
            with counter:
                step()
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                out = step()
            nxt = int(out.logits[0, -1].argmax())
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t) / args.steps * 1000
        print(f"| {spec} | {counter.n} | {ms:.0f} | {nxt} |")


if __name__ == "__main__":
    main()
