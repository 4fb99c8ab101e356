"""Passkey accuracy per policy and budget on one model (prints a table, writes JSON rows as it goes).

Example (the issue-2 table): python scripts/passkey_table.py --length 4096 --samples 10 --budgets 512,2048
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


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=kvcascade.DEFAULT_MODEL)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--budgets", default="512,2048")
    ap.add_argument("--policies", default="full,window,streaming,h2o,tova,snapkv,pyramidkv")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default="docs/results/passkey_table.jsonl")
    a = ap.parse_args()
    model, tok = kvcascade.load_model(a.model, device=a.device, dtype=a.dtype)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["policy"], r["budget"], r["sample"]))
    machine = f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, {a.device}"
    budgets = [int(b) for b in a.budgets.split(",")]
    for pol in a.policies.split(","):
        for budget in ([None] if pol == "full" else budgets):
            for i in range(a.samples):
                if (pol, budget, i) in done:
                    continue
                depth = (i + 0.5) / a.samples
                s = make_passkey(tok, a.length, depth, seed=i)
                t0 = time.time()
                r = kvcascade.generate(model, tok, s.prompt, policy=pol, budget=budget, max_new_tokens=8,
                                       chunk_size=a.chunk_size)
                row = {"model": a.model, "policy": pol, "budget": budget, "sample": i, "depth": depth,
                       "tokens": s.tokens, "answer": r.text, "key": s.answer, "score": score_passkey(r.text, s.answer),
                       "kv_bytes_peak": r.kv_bytes_peak, "kv_bytes_full": r.kv_bytes_full,
                       "prefill_s": r.prefill_s, "seconds": time.time() - t0, "machine": machine}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{pol:10s} {str(budget):>5s} depth={depth:.2f} score={row['score']:.0f} "
                      f"{row['seconds']:.1f}s", file=sys.stderr, flush=True)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    print(f"\npasskey accuracy, {a.model}, ~{a.length} tokens, {a.samples} samples, chunk {a.chunk_size}, {machine}")
    print(f"| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for pol in a.policies.split(","):
        cells = []
        for b in budgets:
            rs = [r for r in rows if r["policy"] == pol and (r["budget"] in (b, None) if pol == "full" else r["budget"] == b)]
            cells.append(f"{sum(r['score'] for r in rs) / len(rs):.0%} ({len(rs)})" if rs else "-")
        print(f"| {pol} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
