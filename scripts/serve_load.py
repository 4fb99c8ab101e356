"""Load test of `kvcascade serve`: N concurrent completions of long prompts, per policy, through the `openai` client.

For each policy spec a fresh server is started (so its device-memory peak is that policy's), N distinct prompts of
--prompt-tokens tokens (King James text from different offsets, ending in a question) are sent at once, and the
script reports aggregate completion tokens/s, the slowest request, KV bytes at peak per request (the server's
figure) and the server process's device-memory peak. Prints a table and writes JSON.

Usage: python scripts/serve_load.py --device cuda --requests 32 --prompt-tokens 32000 --max-tokens 32 \
           --policies locret,streaming,full --budget 4096 --out serve_load.json
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def prompts(tokenizer, n: int, tokens: int) -> list[str]:
    from kvcascade.texts import kjv_text

    text = kjv_text()
    out = []
    step = max(1, (len(text) - tokens * 6) // n)
    for i in range(n):
        piece = text[i * step:i * step + tokens * 6]
        body = tokenizer.decode(tokenizer(piece).input_ids[:tokens - 24])
        out.append(body + "\n\nQuestion: in one sentence, what was the last verse above about?\nAnswer:")
    return out


async def run_phase(base: str, model: str, texts: list[str], max_tokens: int) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base + "/v1", api_key="none", timeout=3600, max_retries=0)

    async def one(text):
        t = time.perf_counter()
        r = await client.completions.create(model=model, prompt=text, max_tokens=max_tokens, temperature=0)
        extra = r.model_extra.get("kvcascade", {}) if r.model_extra else {}
        return {"s": time.perf_counter() - t, "completion_tokens": r.usage.completion_tokens,
                "prompt_tokens": r.usage.prompt_tokens, **extra}

    return await asyncio.gather(*(one(t) for t in texts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--policies", default="locret,streaming,full")
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--kv-limit-mib", type=int, default=60000)
    ap.add_argument("--out", default="serve_load.json")
    args = ap.parse_args()

    import kvcascade
    from transformers import AutoTokenizer

    from kvcascade.models import prepare

    tok = AutoTokenizer.from_pretrained(str(prepare(args.model, progress=False)))
    texts = prompts(tok, args.requests, args.prompt_tokens)
    rows = []
    for spec in args.policies.split(","):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "kvcascade.cli", "serve", "--model", args.model, "--device", args.device,
               "--policy", spec, "--port", str(port), "--chunk-size", str(args.chunk_size), "--quiet",
               "--max-prompt-tokens", str(args.prompt_tokens + 64), "--kv-limit-mib", str(args.kv_limit_mib),
               "--queue-timeout", "3600"]
        if spec != "full":
            cmd += ["--budget", str(args.budget)]
        log = open(f"{args.out}.{spec}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            for _ in range(600):
                try:
                    get(base + "/health")
                    break
                except OSError:
                    if proc.poll() is not None:
                        raise SystemExit(f"server for {spec} exited: see {log.name}")
                    time.sleep(0.5)
            t = time.perf_counter()
            res = asyncio.run(run_phase(base, args.model, texts, args.max_tokens))
            wall = time.perf_counter() - t
            health = get(base + "/health")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        gen = sum(r["completion_tokens"] for r in res)
        row = {"policy": spec, "budget": None if spec == "full" else args.budget, "requests": args.requests,
               "prompt_tokens": sum(r["prompt_tokens"] for r in res) / len(res), "completion_tokens": gen,
               "wall_s": wall, "tokens_per_s": gen / wall, "slowest_s": max(r["s"] for r in res),
               "kv_peak_per_request_mib": max(r.get("kv_bytes_peak", 0) for r in res) / 2**20,
               "device_memory_peak_mib": health.get("device_memory_peak_bytes", 0) / 2**20,
               "device": health.get("device", args.device), "kvcascade": kvcascade.__version__}
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\n{args.requests} concurrent requests of {args.prompt_tokens:,} prompt tokens, {args.max_tokens} new tokens "
          f"each, on {rows[0]['device']}\n")
    print("| policy | budget | aggregate tokens/s | wall s | slowest request s | KV peak per request MiB | "
          "device memory peak MiB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['budget'] or '-'} | {r['tokens_per_s']:.1f} | {r['wall_s']:.1f} | "
              f"{r['slowest_s']:.1f} | {r['kv_peak_per_request_mib']:.0f} | {r['device_memory_peak_mib']:,.0f} |")


if __name__ == "__main__":
    main()
