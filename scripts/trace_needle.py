"""Which share of a passkey needle's tokens each layer still holds after the prefill, per policy.

Example (2 CPU cores, ~1 min per policy): python scripts/trace_needle.py --policies h2o,tova --budget 2048
"""

import argparse

import torch

import kvcascade
from kvcascade.cache import CompressedCache
from kvcascade.engine import prefill, tokenize
from kvcascade.eval.tasks import PASSKEY_NEEDLE, make_sample
from kvcascade.policies import make_policy, parse_policy_spec

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--policies", default="h2o,tova")
ap.add_argument("--budget", type=int, default=2048)
ap.add_argument("--length", type=int, default=4096)
ap.add_argument("--depth", type=float, default=0.5)
ap.add_argument("--seed", type=int, default=3)
ap.add_argument("--early", type=int, default=1024, help="also report the share of kept tokens from the first N")
ap.add_argument("--device", default="cpu")
a = ap.parse_args()
model, tok = kvcascade.load_model(device=a.device, progress=False)
s = make_sample("passkey", tok, a.length, a.depth, seed=a.seed)
ids = tokenize(tok, s.prompt)
needle_len = len(tok(PASSKEY_NEEDLE.format(key=s.answers[0]), add_special_tokens=False).input_ids)
span = torch.arange(s.needle_token, s.needle_token + needle_len, device=model.device)
print(f"{s.tokens} tokens, needle at token {s.needle_token} ({needle_len} tokens), budget {a.budget}")
for spec in a.policies.split(","):
    name, args = parse_policy_spec(spec)
    cache = CompressedCache(model, make_policy(name, a.budget, **args))
    logits = prefill(model, cache, ids, 512)
    kept = [float(torch.isin(span, L.pos[0, h]).float().mean()) for L in cache.layers for h in range(L.pos.shape[1])]
    H = cache.layers[0].pos.shape[1]
    per_layer = [sum(kept[i * H:(i + 1) * H]) / H for i in range(len(cache.layers))]
    early = [float((L.pos[0] < a.early).float().mean()) for L in cache.layers]
    print(f"{spec:10s} next token {tok.decode([int(logits.argmax())])!r}")
    print(f"  needle share kept, layers 0..{len(per_layer) - 1}: " + " ".join(f"{k:.1f}" for k in per_layer))
    print(f"  share of kept tokens from the first {a.early}:  " + " ".join(f"{x:.2f}" for x in early))
