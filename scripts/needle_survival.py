"""Passkey samples per policy: the answer, and whether the needle survived the prefill in the cache.

For each sample (depths spread evenly) and policy: prefill the prompt, then record per layer whether the cache
still holds the whole needle sentence and at least one whole copy of the key's tokens, then decode the answer.
This separates eviction failures (the key is gone) from reading failures (the key is there, the model misses
it), and shows a key cut in two by unit boundaries. Rows go to a JSON-lines file (resumed when re-run); a table
is printed last.

Example (2 CPU cores, ~1.5 min per row):
    python scripts/needle_survival.py --length 8192 --budget 512 --samples 10 \\
        --policies cascade:block=32:cascades=7,cascade:block=32:cascades=7:recenter=1 --out needle.jsonl
"""

import argparse
import json
import os
import time

import torch

import kvcascade
from kvcascade.cache import CompressedCache
from kvcascade.engine import prefill, tokenize
from kvcascade.eval.tasks import PASSKEY_NEEDLE, make_sample, score_first_number
from kvcascade.policies import make_policy, parse_policy_spec


def find(seq: list[int], sub: list[int], start: int) -> list[int]:
    """Start indices of ``sub`` in ``seq`` at or after ``start``, within a window of 64 tokens."""
    return [i for i in range(start, min(len(seq) - len(sub), start + 64) + 1) if seq[i:i + len(sub)] == sub]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", required=True, help="comma-separated policy specs")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=10, help="depths (i + 0.5) / samples, i = 0..samples-1")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="sample indices to run, comma-separated (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="needle_survival.jsonl")
    a = ap.parse_args()
    model, tok = kvcascade.load_model(device=a.device, progress=False)
    done = set()
    if os.path.exists(a.out):
        for line in open(a.out):
            r = json.loads(line)
            done.add((r["policy"], r["sample"]))
    only = {int(x) for x in a.only.split(",") if x.strip()}
    for i in range(a.samples):
        if only and i not in only:
            continue
        depth = round((i + 0.5) / a.samples, 4)
        s = make_sample("passkey", tok, a.length, depth, seed=a.seed * 1000 + i)
        ids = tokenize(tok, s.prompt)
        key = s.answers[0]
        needle = tok(PASSKEY_NEEDLE.format(key=key), add_special_tokens=False).input_ids
        key_ids = tok(f" {key}", add_special_tokens=False).input_ids
        bare_ids = tok(f"{key}", add_special_tokens=False).input_ids
        copies = [(p, len(key_ids)) for p in find(ids, key_ids, s.needle_token)]
        copies += [(p, len(bare_ids)) for p in find(ids, bare_ids, s.needle_token)]
        for spec in a.policies.split(","):
            if (spec, i) in done:
                continue
            name, args = parse_policy_spec(spec)
            cache = CompressedCache(model, make_policy(name, a.budget, **args))
            t0 = time.perf_counter()
            logits = prefill(model, cache, ids, a.chunk_size)
            prefill_s = time.perf_counter() - t0
            span = torch.arange(s.needle_token, s.needle_token + len(needle), device=model.device)
            needle_whole, key_whole = [], []
            for layer in cache.layers:
                kept = layer.pos[0, 0]
                needle_whole.append(bool(torch.isin(span, kept).all()))
                key_whole.append(any(bool(torch.isin(torch.arange(p, p + n, device=kept.device), kept).all())
                                     for p, n in copies))
            cache.phase, cache.final_chunk = "decode", True
            out_ids = [int(logits.argmax())]
            for _ in range(7):  # greedy, a few tokens: the key is 5 digits
                out_ids.append(int(cache.forward(model, torch.tensor([[out_ids[-1]]], device=model.device),
                                                 logits_to_keep=1).logits[0, -1].argmax()))
            answer = tok.decode(out_ids)
            row = {"policy": spec, "budget": a.budget, "length": len(ids), "depth": depth, "sample": i, "key": key,
                   "answer": answer, "score": score_first_number(answer, [key]),
                   "layers_needle_whole": sum(needle_whole), "layers_key_whole": sum(key_whole),
                   "layers": len(cache.layers), "prefill_s": prefill_s, "device": str(model.device)}
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{spec} depth {depth}: {answer!r} key {key} score {row['score']:.0f} "
                  f"needle whole in {row['layers_needle_whole']}/{row['layers']} layers, "
                  f"key whole in {row['layers_key_whole']}/{row['layers']} ({prefill_s:.0f} s)", flush=True)
    rows = [json.loads(line) for line in open(a.out)]
    specs = list(dict.fromkeys(r["policy"] for r in rows))
    print(f"\n| policy | found | needle whole (mean layers of {rows[0]['layers']}) | key whole (mean layers) | "
          f"samples with key whole in every layer |")
    print("|---|---|---|---|---|")
    for spec in specs:
        rs = [r for r in rows if r["policy"] == spec]
        n = len(rs)
        print(f"| {spec} | {sum(r['score'] for r in rs):.0f}/{n} | "
              f"{sum(r['layers_needle_whole'] for r in rs) / n:.1f} | {sum(r['layers_key_whole'] for r in rs) / n:.1f} | "
              f"{sum(r['layers_key_whole'] == r['layers'] for r in rs)}/{n} |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
