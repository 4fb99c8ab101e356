"""Streaming perplexity of policies over a long text (default: the KJV Bible); prints a table, writes JSON.

Example: python scripts/ppl.py --device cuda --budget 8192 --policies cascade,streaming,window --out ppl.json
"""

import argparse
import json
import time

import torch

import kvcascade
from kvcascade.eval.ppl import kjv_text, streaming_perplexity
from kvcascade.policies import parse_policy_spec


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=kvcascade.DEFAULT_MODEL)
    ap.add_argument("--text", default=None, help="text file (default: the KJV Bible via `bible`)")
    ap.add_argument("--policies", default="cascade,streaming,window")
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=0, help="0: the whole text")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="ppl.json")
    a = ap.parse_args()
    model, tok = kvcascade.load_model(a.model, device=a.device, progress=False)
    text = open(a.text, encoding="utf-8").read() if a.text else kjv_text()
    ids = tok(text).input_ids
    rows = []
    for pol in a.policies.split(","):
        t0 = time.time()
        name, pargs = parse_policy_spec(pol)
        r = streaming_perplexity(model, tok, ids, policy=name, budget=a.budget, policy_args=pargs,
                                 chunk_size=a.chunk_size, max_tokens=a.max_tokens or None, progress=False)
        r["spec"] = pol
        r["seconds"] = time.time() - t0
        r["machine"] = (torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU") + f", {model.dtype}"
        rows.append(r)
        with open(a.out, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    print(f"\nstreaming perplexity, {a.model}, budget {a.budget}, chunk {a.chunk_size}, {rows[0]['machine']}")
    print("| policy | tokens | ppl | ppl first 8K | ppl last 8K | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        b = r["ppl_per_bucket"]
        print(f"| {r['spec']} | {r['tokens']:,} | {r['ppl']:.3f} | {b[0]:.3f} | {b[-1]:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
