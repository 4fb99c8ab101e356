"""Which kernels of a replayed decode step get slower in a process's later sessions.

On an H100 the same CUDA graph replayed 18% slower from a process's fourth ``Session`` on, whatever the mode, with or
without ``torch.cuda.empty_cache()`` between sessions (docs/results/README.md, ninth session). This runs sessions one
after another (random weights in the default model's shape, greedy, graphs on) and profiles the decode of two of them;
it prints each kernel's device time per step in both and sorts by the difference.
Usage (GPU): python scripts/session_drift.py [--policy full] [--budget 2048] [--prompt 4096] [--sessions 2,5]
(``--device cpu --layers 2`` runs it small on a CPU with CPU ops in place of kernels, to check the script)
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvcascade import make_policy
from kvcascade.bench import device_name, random_default_model
from kvcascade.engine import Session


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "x" * len(ids)


def _time_us(event, cuda: bool) -> float:
    """The event's device time (its own CPU time on a CPU run)."""
    if not cuda:
        return event.self_cpu_time_total
    t = getattr(event, "device_time_total", None)
    return t if t is not None else getattr(event, "cuda_time_total", 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="full")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new", type=int, default=160)
    ap.add_argument("--sessions", default="2,5", help="the two sessions to profile (1-based)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    picked = [int(x) for x in args.sessions.split(",")]
    model = random_default_model(args.device, layers=args.layers)
    ids = torch.randint(100, 20000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    found = {}
    for i in range(1, max(picked) + 1):
        s = Session(model, _Tok(), ids, make_policy(args.policy, None if args.policy == "full" else args.budget),
                    max_new_tokens=args.new, chunk_size=4096, stop_on_eos=False)
        while not s.decoding:
            s.step()
        for _ in range(min(40, args.new // 4)):  # the eager step, the captures, warm replays: not profiled
            s.step()
        if cuda:
            torch.cuda.synchronize()
        if i in picked:
            steps = 0
            with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                while not s.step():
                    steps += 1
                if cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t
            steps = max(steps, 1)
            found[i] = {e.key: (_time_us(e, cuda) / steps, e.count / steps) for e in prof.key_averages()}
            print(f"session {i}: {steps} steps, {dt / steps * 1e6:.0f} us per step (profiled)", flush=True)
        else:
            while not s.step():
                pass
        s.close()
    a, b = (found[i] for i in picked)
    rows = sorted(((b.get(k, (0, 0))[0] - a.get(k, (0, 0))[0], k) for k in set(a) | set(b)), reverse=True)
    print(f"\n({device_name() if cuda else 'CPU'}, {args.policy}, prompt {args.prompt}) device us per step: session "
          f"{picked[0]} {sum(t for t, _ in a.values()):.0f}, session {picked[1]} {sum(t for t, _ in b.values()):.0f}")
    print(f"| kernel | s{picked[0]} us/step | s{picked[1]} us/step | difference | s{picked[0]} calls/step | "
          f"s{picked[1]} calls/step |\n|---|---|---|---|---|---|")
    for d, k in rows[:args.top] + rows[-5:]:
        (ta, ca), (tb, cb) = a.get(k, (0, 0)), b.get(k, (0, 0))
        print(f"| {k[:90]} | {ta:.1f} | {tb:.1f} | {d:+.1f} | {ca:.1f} | {cb:.1f} |")


if __name__ == "__main__":
    main()
