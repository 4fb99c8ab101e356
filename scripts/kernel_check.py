"""Runs a real model's prefill and a few decode steps under ``full`` and compares, at every attention call, the
Triton kernels with the PyTorch reference on the very inputs the model gave (CUDA only; the forward itself goes
on with the reference's result). Prints the worst difference per layer (sliding-window layers marked) and the
calls where the two disagree beyond bf16 rounding, with their shapes and arguments.

Written to find why Gemma-3-270M (head dim 256) gave perplexity 578 through the Triton kernels on an H200 where
the reference gives 4.8 (docs/results, "Gemma3 through the Triton kernels"). Usage:
python scripts/kernel_check.py [--model gemma-3-270m] [--tokens 4096] [--chunk 1024] [--out F.json]
"""

import argparse
import json
import os
from collections import defaultdict

import torch

import kvcascade
import kvcascade.cache as kc
from kvcascade.bench import device_name
from kvcascade.engine import generate
from kvcascade.texts import kjv_part


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = kvcascade.load_model(args.model, device="cuda", progress=False)
    ids = tok(kjv_part("nt")[: args.tokens * 6]).input_ids[: args.tokens]
    original = kc.attention_with_scores
    worst = defaultdict(lambda: [0.0, 0.0, 0])  # layer -> [max |out diff|, max |mass diff| (relative), calls]
    bad = []
    call = [0]

    def both(q, k, v, **kw):
        prev = os.environ.get("KVCASCADE_KERNELS")
        try:
            os.environ["KVCASCADE_KERNELS"] = "triton"
            t_out, t_mass, _ = original(q, k, v, **kw)
            os.environ["KVCASCADE_KERNELS"] = "reference"
            r = original(q, k, v, **kw)
        finally:
            if prev is None:
                os.environ.pop("KVCASCADE_KERNELS", None)
            else:
                os.environ["KVCASCADE_KERNELS"] = prev
        r_out, r_mass, _ = r
        d_out = float((t_out.float() - r_out.float()).abs().max())
        d_mass = 0.0
        if t_mass is not None and r_mass is not None:
            d_mass = float(((t_mass - r_mass).abs() / r_mass.abs().clamp_min(1e-3)).max())
        layer = call[0] % model.config.get_text_config().num_hidden_layers
        call[0] += 1
        w = worst[layer]
        w[0], w[1], w[2] = max(w[0], d_out), max(w[1], d_mass), w[2] + 1
        if d_out > 0.05 and len(bad) < 40:
            bad.append({"layer": layer, "q": list(q.shape), "k": list(k.shape), "window": kw.get("window"),
                        "q_orig0": int(kw["q_orig"].flatten()[0]) if kw.get("q_orig") is not None else None,
                        "need_mass": kw.get("need_mass"), "obs_window": kw.get("obs_window"), "d_out": d_out})
        return r

    kc.attention_with_scores = both
    try:
        r = generate(model, tok, ids, policy="full", max_new_tokens=4, chunk_size=args.chunk, stop_on_eos=False)
    finally:
        kc.attention_with_scores = original
    windows = kc._layer_windows(model.config.get_text_config())
    print(f"{args.model} on {device_name()}: {args.tokens} tokens, chunk {args.chunk}; answer {r.text!r}")
    print("| layer | window | calls | max abs out diff | max rel mass diff |\n|---|---|---|---|---|")
    for layer in sorted(worst):
        d_out, d_mass, n = worst[layer]
        print(f"| {layer} | {windows[layer]} | {n} | {d_out:.4f} | {d_mass:.4f} |")
    print(f"{len(bad)} calls with |out diff| > 0.05" + (":" if bad else ""))
    for b in bad[:12]:
        print("   ", b)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name(), "model": args.model, "layers": dict(worst), "bad": bad}, f, indent=1)


if __name__ == "__main__":
    main()
