"""Whether this machine's CUDA driver replays every graph slower once a process has instantiated a few (CUDA only).

On the CUDA 13 driver measured here (580.159: H100 and H200), every graph of a process replays about 18% slower once
the process has instantiated a few graphs (the 4th or the 7th in the processes timed), the graphs captured before it
too, kept or destroyed, of one kernel or thousands (docs/results/README.md, tenth session);
``kvcascade.graphs.settle`` puts a benchmark into that steady state before it times anything. This prints, after each
new graph, a reference graph's replay time (``--kernels`` tiny kernels, captured first) and the new graph's own; with ``--decode``, instead, the default model's replayed decode
step (random weights, full cache, ``--prompt`` tokens) in a fresh process's first session and again after
``settle``. Usage: python scripts/graph_drift.py [--graphs 6] [--kernels 2000] [--decode] [--out F.json]
"""

import argparse
import json
import statistics

import torch

from kvcascade.bench import cuda_time, device_name, random_default_model


def _replay_us(replay) -> float:
    """Median device time of ``replay()`` in microseconds (three warm-up runs, twelve timed)."""
    return cuda_time(replay, warmup=3, reps=12) * 1e3


def _count(args) -> list[dict]:
    x = torch.zeros(256, device="cuda")
    x.add_(1)
    torch.cuda.synchronize()
    ref = torch.cuda.CUDAGraph()
    with torch.cuda.graph(ref):
        for _ in range(args.kernels):
            x.add_(1)
    rows = [{"graphs": 1, "ref_us": _replay_us(ref.replay), "new_us": None}]
    for i in range(2, args.graphs + 2):
        y = torch.zeros(256, device="cuda")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y.add_(1)
        new = _replay_us(g.replay)
        del g, y  # destroyed: the count is what matters, not how many are alive
        rows.append({"graphs": i, "ref_us": _replay_us(ref.replay), "new_us": new})
    print(f"| graphs instantiated | reference graph ({args.kernels} kernels) us | newest graph (1 kernel) us |  "
          f"({device_name()})\n|---|---|---|")
    for r in rows:
        new = "-" if r["new_us"] is None else f"{r['new_us']:.1f}"
        print(f"| {r['graphs']} | {r['ref_us']:.1f} | {new} |")
    return rows


def _decode(args) -> list[dict]:
    from kvcascade import make_policy
    from kvcascade.engine import Session
    from kvcascade.graphs import settle

    model = random_default_model("cuda")
    ids = torch.randint(100, 20000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    tok = type("Tok", (), {"decode": lambda self, ids, skip_special_tokens=True: ""})()
    times: list = []
    plain = torch.cuda.CUDAGraph.replay

    def timed(graph):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        plain(graph)
        b.record()
        times.append((a, b))

    rows = []
    settled = None
    for when in ("first session", "after settle()"):
        if when != "first session":
            settled = settle("cuda")
        s = Session(model, tok, ids, make_policy("full", None), max_new_tokens=args.new, chunk_size=4096,
                    stop_on_eos=False)
        while not s.decoding:
            s.step()
        times.clear()
        torch.cuda.CUDAGraph.replay = timed
        try:
            while not s.step():
                pass
        finally:
            torch.cuda.CUDAGraph.replay = plain
        torch.cuda.synchronize()
        us = [a.elapsed_time(b) * 1e3 for a, b in times][len(times) // 4:]
        rows.append({"when": when, "graph_us": statistics.median(us), "replays": len(times),
                     "captures": s.graphs.captures, "settle": settled})
        s.close()
    print(f"| full, prompt {args.prompt}, random weights | replayed step us (median) | replays |  ({device_name()})\n"
          "|---|---|---|")
    for r in rows:
        print(f"| {r['when']} | {r['graph_us']:.0f} | {r['replays']} |")
    print(f"settle(): {settled}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", type=int, default=6, help="throwaway graphs after the reference graph")
    ap.add_argument("--kernels", type=int, default=2000, help="tiny kernels in the reference graph")
    ap.add_argument("--decode", action="store_true", help="time a decode step before and after settle() instead")
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kvcascade: error: graph_drift.py needs a CUDA GPU")
    rows = _decode(args) if args.decode else _count(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name(), "driver_cuda": torch.version.cuda, "args": vars(args), "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
