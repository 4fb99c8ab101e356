"""Greedy decode speed with and without running ahead (``Session``: the next step launched with the token still on
the device, ``KVCASCADE_RUN_AHEAD``), both in one run on one GPU, CUDA graphs on.

Speed only: random weights in the default model's shape (Qwen2.5-Coder-0.5B: 24 layers, 896 wide, 14/2 heads of 64,
vocab 151,936, bf16), so no model files are needed; tokens are whatever random weights pick. Rows: policy x run ahead
off / on, tokens/s over the decode (first eager steps and captures included) and of the median step. Sessions
alternate off, on, off, on, all after ``kvcascade.graphs.settle`` (without it the first sessions' graphs replay ~18%
faster than later ones', which fell on the "on" rows: docs/results/README.md, ninth and tenth sessions);
docs/results/decode_gap/replay_gaps.py times the graph and the GPU's idle time between replays apart.
Usage (GPU): python scripts/run_ahead_speed.py [--prompt 4096] [--new 256] [--budget 2048] [--split] [--out F.json] POLICY ...
(``--device cpu --layers 2`` runs it small on a CPU, to check the script, not to time anything)

``--split`` also times the parts of each ``Session.step`` call (median microseconds over the last three quarters of
the tokens): the call, ``DecodeGraphs.step`` / ``step_device`` (host work and launch), the wait for the token
(running ahead) and ``Session._take``; its timers add a little host work to every step.
"""

import argparse
import json
import statistics
import time

import torch

from kvcascade import make_policy
from kvcascade.bench import device_name, random_default_model
from kvcascade.engine import Session
from kvcascade.graphs import settle
from kvcascade.policies import parse_policy_spec


class _Timed:
    """A callable that records how long each call of the one it wraps took."""

    def __init__(self, fn, times: list):
        self.fn, self.times = fn, times

    def __call__(self, *args):
        t = time.perf_counter()
        out = self.fn(*args)
        self.times.append(time.perf_counter() - t)
        return out


class _TimedEvent:
    """A CUDA event whose ``synchronize()`` (the wait for a token read ahead) is timed."""

    def __init__(self, event, times: list):
        self.event, self.times = event, times

    def record(self):
        self.event.record()

    def synchronize(self):
        t = time.perf_counter()
        self.event.synchronize()
        self.times.append(time.perf_counter() - t)


def _median_us(times: list) -> float:
    times = times[len(times) // 4:]
    return statistics.median(times) * 1e6 if times else float("nan")


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + int(i) % 26) for i in ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("policies", nargs="*", default=["full", "streaming", "cascade"])
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=24, help="fewer for a quick check")
    ap.add_argument("--split", action="store_true", help="time the parts of each step (see above)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = random_default_model(args.device, layers=args.layers)
    settle(args.device)  # every session in a long-lived process's graph state (kvcascade.graphs.settle)
    ids = torch.randint(100, 20000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for spec in args.policies:
        name, params = parse_policy_spec(spec)
        for ahead in (False, True, False, True):  # twice each, alternating: the first pair also warms up
            s = Session(model, _Tok(), ids, make_policy(name, None if name == "full" else args.budget, **params),
                        max_new_tokens=args.new, chunk_size=4096, stop_on_eos=False)
            s.pipelined = ahead
            while not s.decoding:
                s.step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            parts = {"call": [], "graphs": [], "wait": [], "take": []}
            if args.split:
                s.graphs.step = _Timed(s.graphs.step, parts["graphs"])
                s.graphs.step_device = _Timed(s.graphs.step_device, parts["graphs"])
                s._take = _Timed(s._take, parts["take"])
            t = time.perf_counter()
            while True:
                if args.split and isinstance(s._tok_ready, list) and not isinstance(s._tok_ready[0], _TimedEvent):
                    s._tok_ready = [_TimedEvent(e, parts["wait"]) for e in s._tok_ready]  # (made at the first step)
                a = time.perf_counter()
                done = s.step()
                parts["call"].append(time.perf_counter() - a)
                if done:
                    break
            dt = time.perf_counter() - t
            steps = [b - a for a, b in zip(s.marks, s.marks[1:])]
            rows.append({"policy": spec, "run_ahead": ahead, "tok_s": len(s.new) / dt,
                         "steady_tok_s": 1 / statistics.median(steps), "replayed": s.graphs.replays,
                         "tokens": s.new[:8]})
            if args.split:
                rows[-1]["split_us"] = {k: _median_us(v) for k, v in parts.items()}
            s.close()
    rows = [r for i, r in enumerate(rows) if i % 4 >= 2]  # the second pair of each policy
    dev = device_name() if args.device == "cuda" else "CPU"
    split = " step us | graphs us | wait us | take us |" if args.split else ""
    print(f"| policy | run ahead | tokens/s | median step tok/s | replayed |{split}  ({dev}, random weights in the "
          f"default model's shape, prompt {args.prompt}, {args.new} tokens, budget {args.budget}"
          f"{', with timers' if args.split else ''})\n|---|---|---|---|---|{'---|---|---|---|' if args.split else ''}")
    for r in rows:
        cells = "".join(f" {r['split_us'][k]:.0f} |" for k in ("call", "graphs", "wait", "take")) if args.split else ""
        print(f"| {r['policy']} | {'on' if r['run_ahead'] else 'off'} | {r['tok_s']:.0f} | {r['steady_tok_s']:.0f} | "
              f"{r['replayed']} |{cells}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev, "prompt": args.prompt, "new": args.new, "budget": args.budget, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
