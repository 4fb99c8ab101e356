"""Passkey accuracy over policies x budgets x lengths (depths spread evenly); resumable JSONL, table last.

Example (GPU): python scripts/passkey_grid.py --device cuda --lengths 4k,16k,64k --policies cascade,streaming
    --budgets 4096,8192 --samples 10 --out $OUT/passkey.jsonl
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import kvcascade
from kvcascade.eval import make_passkey, score_passkey
from kvcascade.eval.runner import parse_length as parse_len
from kvcascade.policies import parse_policy_spec


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=kvcascade.DEFAULT_MODEL)
    ap.add_argument("--lengths", default="4k")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--depth", type=float, default=None, help="fixed depth for every sample (default: spread)")
    ap.add_argument("--budgets", default="512,2048")
    ap.add_argument("--policies", default="full,window,streaming,h2o,tova,snapkv,pyramidkv,cascade")
    ap.add_argument("--full-max", type=parse_len, default=32768, help="longest prompt given to `full`")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default="passkey.jsonl")
    a = ap.parse_args()
    model, tok = kvcascade.load_model(a.model, device=a.device, dtype=a.dtype, progress=False)
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"{platform.machine()} CPU"
    machine = f"{dev}, torch {torch.__version__}, {model.dtype}"
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {(r["policy"], r["budget"], r["length"], r["sample"]) for r in map(json.loads, out.read_text().splitlines())}
    lengths = [parse_len(x) for x in a.lengths.split(",")]
    budgets = [int(b) for b in a.budgets.split(",")]
    policies = a.policies.split(",")
    for length in lengths:
        for pol in policies:
            name, pargs = parse_policy_spec(pol)
            if name == "full" and length > a.full_max:
                continue
            for budget in ([None] if name == "full" else budgets):
                for i in range(a.samples):
                    if (pol, budget, length, i) in done:
                        continue
                    depth = (i + 0.5) / a.samples if a.depth is None else a.depth
                    s = make_passkey(tok, length, depth, seed=i)
                    t0 = time.time()
                    r = kvcascade.generate(model, tok, s.prompt, policy=name, budget=budget, policy_args=pargs,
                                           max_new_tokens=8, chunk_size=a.chunk_size)
                    row = {"model": a.model, "policy": pol, "budget": budget, "length": length, "sample": i,
                           "depth": depth, "tokens": s.tokens, "answer": r.text, "key": s.answer,
                           "score": score_passkey(r.text, s.answer), "kv_bytes_peak": r.kv_bytes_peak,
                           "kv_bytes_full": r.kv_bytes_full, "prefill_s": r.prefill_s,
                           "seconds": time.time() - t0, "machine": machine}
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{length:>8} {pol:10s} {str(budget):>5s} d={depth:.2f} score={row['score']:.0f} "
                          f"prefill={r.prefill_s:.1f}s", file=sys.stderr, flush=True)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    print(f"\npasskey accuracy (samples per cell in parentheses), {a.model}, chunk {a.chunk_size}, {machine}")
    for budget in budgets:
        print(f"\nbudget {budget} (full: no budget)")
        print("| policy | " + " | ".join(f"{L // 1024}K" for L in lengths) + " |")
        print("|---|" + "---|" * len(lengths))
        for pol in policies:
            cells = []
            for L in lengths:
                rs = [r for r in rows if r["policy"] == pol and r["length"] == L and
                      (r["budget"] is None if pol == "full" else r["budget"] == budget)]
                cells.append(f"{sum(r['score'] for r in rs) / len(rs):.0%} ({len(rs)}) "
                             f"{sum(r['prefill_s'] for r in rs) / len(rs):.1f}s" if rs else "-")
            print(f"| {pol} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
