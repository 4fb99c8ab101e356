"""Speed benchmarks (``kvcascade bench attention|decode|e2e``): each prints a table and writes JSON rows.

A benchmark is a measurement, not a test: nothing here asserts a speed. Times are CUDA-event medians after
warm-up. TFLOP/s counts the work actually done (causal attention: ``2 * T^2 * Hq * D`` for the masked half of
QK^T and PV; our chunk kernel with mass: its forward plus the second QK^T pass).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ..errors import KVCascadeError

LLAMA8B = {"Hq": 32, "H": 8, "D": 128}
QWEN05B = {"Hq": 14, "H": 2, "D": 64}  # the default model's attention


def random_default_model(device="cuda", layers: int = 24, vocab: int = 151936, dtype=torch.bfloat16):
    """Random weights in the default model's shape (Qwen2.5-Coder-0.5B: 896 wide, 14/2 heads of 64, MLP 4864, tied
    embeddings): for speed and host-sync measurements, which do not depend on the weights; never for quality."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                      num_attention_heads=QWEN05B["Hq"], num_key_value_heads=QWEN05B["H"], max_position_embeddings=32768,
                      tie_word_embeddings=True, rope_theta=1e6)
    return Qwen2ForCausalLM(cfg).to(device, dtype).eval()


def _need_cuda():
    if not torch.cuda.is_available():
        raise KVCascadeError("benchmarks need a CUDA GPU (they time GPU kernels)")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise KVCascadeError("benchmarks need triton (pip install triton)") from None


def cuda_time(fn, warmup: int = 1, reps: int = 3, max_s: float = 20.0) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs (fewer if one run takes more than ``max_s / reps``)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
        if sum(times) > max_s * 1000:
            break
    times.sort()
    return times[len(times) // 2]


def device_name() -> str:
    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"


def _fmt_T(T: int) -> str:
    return f"{T // 1024}K" if T < 1024 * 1024 else f"{T / 2**20:g}M"


def print_table(rows: list[dict], cols: list[str], title: str) -> None:
    print(f"\n{title}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, float):
                v = f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
            elif c == "T" and isinstance(v, int):
                v = _fmt_T(v)
            cells.append("-" if v is None else str(v))
        print("| " + " | ".join(cells) + " |")


def write_json(rows: list[dict], path, meta: dict) -> None:
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")  # written whole, then renamed: an interrupted run never leaves half a file
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        tmp.replace(p)


# ------------------------------------------------------------------------------------------- attention
def _sdpa_ms(q, k, v, backend) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    F = torch.nn.functional

    def run():
        with sdpa_kernel([be]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return cuda_time(run)


def _flex_ms(q, k, v, sinks: int, window: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask(b, h, qi, ki):
        return (ki <= qi) & ((ki < sinks) | (qi - ki < window))

    T = q.shape[2]
    bm = create_block_mask(mask, None, None, T, T, device=q.device, _compile=True)
    flex = torch.compile(flex_attention, dynamic=False)

    def run():
        flex(q, k, v, block_mask=bm, enable_gqa=True)

    ms = cuda_time(run, warmup=1)
    # attended pairs: the window (fewer at the start) plus the sinks once a query is past the window
    i = torch.arange(T, dtype=torch.float64)
    pairs = float(torch.clamp(i + 1, max=window).sum() + torch.clamp(i + 1 - window, min=0, max=sinks).sum())
    return ms, 4 * pairs * q.shape[1] * q.shape[3]


def strided_prefill(q, k, v, cache: int, stride: int, policy_name: str = "cascade", policy_args: dict | None = None):
    """One layer of the strided prefill: every stride attends to the cache plus itself (Triton kernel, with
    mass), then the policy updates the cache on the GPU. Returns ``fn`` (runs it) and the FLOPs it does."""
    from ..kernels.triton_attention import chunk_attention
    from ..policies import make_policy
    from ..cache import AttnStats, LayerCache

    B, Hq, T, D = q.shape
    H = k.shape[1]
    pol = make_policy(policy_name, cache, **(policy_args or {}))

    class _Cache:  # what a policy step reads from the cache
        num_layers = 1

    flops = 0.0
    n = 0
    for s in range(0, T, stride):
        c = min(stride, T - s)
        flops += 4 * c * (n + (c + 1) / 2) * Hq * D * (1.5 if pol.needs_mass else 1.0)
        n = min(n + c, pol.layer_budget(0, 1))

    def run():
        layer = LayerCache(0, None)
        for s in range(0, T, stride):
            c = min(stride, T - s)
            qc = q[:, :, s:s + c]
            kc, vc = k[:, :, s:s + c], v[:, :, s:s + c]
            if layer.keys is not None:
                k_all = torch.cat([layer.keys, kc], 2)
                v_all = torch.cat([layer.values, vc], 2)
            else:
                k_all, v_all = kc, vc
            _, mass, obs = chunk_attention(qc, k_all, v_all, scaling=D ** -0.5, need_mass=pol.needs_mass,
                                           q_weights=pol.query_weights(c, q.device) if pol.needs_mass else None,
                                           obs_window=pol.obs_window)
            layer.append(kc, vc)
            pol.step(_Cache, layer, AttnStats(mass, obs, c, Hq // H, "prefill", s + c >= T))

    return run, flops


def bench_attention(lengths=(32768, 131072, 524288, 1048576), caches=(8192, 65536), stride: int | None = None,
                    methods=("cudnn", "flash", "flex", "cascade"), out=None, quiet=False) -> list[dict]:
    """One attention layer of Llama-3.1-8B's shape (32 query heads, 8 KV heads, head dim 128), bf16."""
    _need_cuda()
    Hq, H, D = LLAMA8B["Hq"], LLAMA8B["H"], LLAMA8B["D"]
    rows = []
    dev = "cuda"
    for T in lengths:
        torch.cuda.empty_cache()
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, Hq, T, D, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16, generator=g)
        causal_flops = 2.0 * T * T * Hq * D
        base = None
        for m in methods:
            row = {"T": T, "method": m, "ms": None, "tflops": None, "speedup_vs_cudnn": None, "note": ""}
            try:
                if m in ("cudnn", "flash"):
                    ke = k.repeat_interleave(Hq // H, dim=1)
                    ve = v.repeat_interleave(Hq // H, dim=1)
                    row["method"] = f"sdpa-{m} (full causal)"
                    row["ms"] = _sdpa_ms(q, ke, ve, m)
                    row["tflops"] = causal_flops / row["ms"] / 1e9
                    del ke, ve
                    if m == "cudnn":
                        base = row["ms"]
                elif m == "flex":
                    row["method"] = "flex sink4+window8K"
                    row["ms"], work = _flex_ms(q, k, v, 4, 8192)
                    row["tflops"] = work / row["ms"] / 1e9
                elif m in ("cascade", "streaming"):
                    for M in caches:
                        st = stride or M
                        r2 = dict(row, method=f"ours strided {m} cache {M // 1024}K stride {st // 1024}K")
                        fn, flops = strided_prefill(q, k, v, M, st, m)
                        r2["ms"] = cuda_time(fn, warmup=1, reps=3)
                        r2["tflops"] = flops / r2["ms"] / 1e9
                        if base:
                            r2["speedup_vs_cudnn"] = base / r2["ms"]
                        rows.append(r2)
                        if not quiet:
                            print(f"{_fmt_T(T):>5} {r2['method']:<44} {r2['ms']:10.2f} ms {r2['tflops']:7.1f} TFLOP/s",
                                  file=sys.stderr, flush=True)
                    continue
            except (RuntimeError, torch.OutOfMemoryError) as e:
                row["note"] = f"did not run: {str(e).splitlines()[0][:80]}"
                torch.cuda.empty_cache()
            if row["ms"] is not None and base:
                row["speedup_vs_cudnn"] = base / row["ms"]
            rows.append(row)
            if not quiet:
                print(f"{_fmt_T(T):>5} {row['method']:<44} {row['ms'] or float('nan'):10.2f} ms {row['note']}",
                      file=sys.stderr, flush=True)
        del q, k, v
    meta = {"device": device_name(), "shape": "Llama-3.1-8B attention: 32 q heads, 8 kv heads, dim 128, bf16, batch 1"}
    print_table(rows, ["T", "method", "ms", "tflops", "speedup_vs_cudnn", "note"], f"bench attention ({meta['device']})")
    write_json(rows, out, meta)
    return rows


def bench_chunk_kernel(T_cache=(8192, 65536), chunk=4096, out=None) -> list[dict]:
    """Our chunk kernel vs SDPA on equal work: a chunk of queries over cache + itself (no mass, and with mass), in
    Llama-3.1-8B's attention shape and the default model's (head dim 64)."""
    _need_cuda()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..kernels.triton_attention import chunk_attention

    rows = []
    for shape_name, shape in (("Llama-3.1-8B", LLAMA8B), ("Qwen2.5-0.5B", QWEN05B)):
        Hq, H, D = shape["Hq"], shape["H"], shape["D"]
        for n_cached in T_cache:
            N = n_cached + chunk
            q = torch.randn(1, Hq, chunk, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            flops = 4.0 * chunk * (n_cached + (chunk + 1) / 2) * Hq * D
            # SDPA cannot express "cache + causal chunk" except with a mask; on equal work we time its causal
            # square of the same FLOPs: T' with 2 T'^2 Hq D = flops
            Tsq = int(math.sqrt(flops / (2 * Hq * D)))
            qs = torch.randn(1, Hq, Tsq, D, device="cuda", dtype=torch.bfloat16)
            ks, vs = torch.randn_like(qs), torch.randn_like(qs)
            res = {}
            for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                def run(be=be):
                    with sdpa_kernel([be]):
                        torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
                try:
                    ms = cuda_time(run, reps=10)
                    res[name] = 2.0 * Tsq * Tsq * Hq * D / ms / 1e9
                except RuntimeError:
                    res[name] = None
            for mass in (False, True):
                ms = cuda_time(lambda: chunk_attention(q, k, v, scaling=D ** -0.5, need_mass=mass), reps=10)
                tf = flops * (1.5 if mass else 1.0) / ms / 1e9
                rows.append({"T": N, "shape": shape_name,
                             "method": f"ours chunk {chunk} over cache {n_cached // 1024}K" + (" +mass" if mass else ""),
                             "ms": ms, "tflops": tf, "sdpa_cudnn_tflops": res["cudnn"],
                             "sdpa_flash_tflops": res["flash"],
                             "vs_cudnn_tflops": tf / res["cudnn"] if res["cudnn"] else None, "speedup_vs_cudnn": None})
    meta = {"device": device_name(), "shape": "Llama-3.1-8B (32/8 heads, dim 128) and Qwen2.5-0.5B (14/2, dim 64) "
                                              "attention, bf16, batch 1; SDPA timed on a causal square of equal FLOPs"}
    print_table(rows, ["T", "shape", "method", "ms", "tflops", "sdpa_cudnn_tflops", "sdpa_flash_tflops",
                       "vs_cudnn_tflops"], f"bench kernel: chunk attention TFLOP/s vs SDPA ({meta['device']})")
    write_json(rows, out, meta)
    return rows


# ------------------------------------------------------------------------------------------- decode
def bench_decode(sizes=(4096, 16384, 65536, 262144, 1048576), out=None, quiet=False) -> list[dict]:
    """One decode step (1 query token) over a cache of N tokens, Llama-3.1-8B attention shape, bf16."""
    _need_cuda()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..kernels.triton_attention import decode_attention

    Hq, H, D = LLAMA8B["Hq"], LLAMA8B["H"], LLAMA8B["D"]
    rows = []
    for N in sizes:
        q = torch.randn(1, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        kv_bytes = 2 * k.numel() * k.element_size()
        cands = [("ours split-K", lambda: decode_attention(q, k, v, scaling=D ** -0.5, need_mass=False)),
                 ("ours split-K +mass", lambda: decode_attention(q, k, v, scaling=D ** -0.5, need_mass=True))]
        for name, be in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                         ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def run(be=be):
                with sdpa_kernel([be]):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            cands.append((name + " (gqa)", run))
        for name, fn in cands:
            row = {"T": N, "method": name, "ms": None, "gbps": None, "tflops": None, "speedup_vs_cudnn": None, "note": ""}
            try:
                row["ms"] = cuda_time(fn, warmup=2, reps=20, max_s=5)
                row["gbps"] = kv_bytes / row["ms"] / 1e6
                row["tflops"] = 4.0 * N * Hq * D / row["ms"] / 1e9
            except RuntimeError as e:
                row["note"] = f"did not run: {str(e).splitlines()[0][:70]}"
            rows.append(row)
        base = next((r["ms"] for r in rows if r["T"] == N and r["method"].startswith("sdpa-cudnn") and r["ms"]), None)
        for r in rows:
            if r["T"] == N and base and r["ms"]:
                r["speedup_vs_cudnn"] = base / r["ms"]
        if not quiet:
            print(f"decode N={N}: done", file=sys.stderr, flush=True)
        del q, k, v
    meta = {"device": device_name(), "shape": "Llama-3.1-8B attention, bf16, batch 1, 1 query token; GB/s = K+V bytes / time"}
    print_table(rows, ["T", "method", "ms", "gbps", "speedup_vs_cudnn", "note"], f"bench decode ({meta['device']})")
    write_json(rows, out, meta)
    return rows


# ------------------------------------------------------------------------------------------- end to end
def bench_e2e(model_name=None, length: int = 1048576, budget: int = 8192, policy: str = "cascade",
              chunk_size: int = 4096, full_lengths=(32768,), new_tokens: int = 64, out=None) -> list[dict]:
    """A ``length``-token passkey prompt through the model under ``policy`` at ``budget``: prefill seconds,
    decode tokens/s, peak GPU memory; then the full cache at ``full_lengths``."""
    _need_cuda()
    from ..engine import generate, run_ahead_enabled
    from ..eval.tasks import make_sample
    from ..graphs import settle
    from ..models import DEFAULT_MODEL, load_model
    from ..policies import parse_policy_spec

    model_name = model_name or DEFAULT_MODEL
    model, tok = load_model(model_name, device="cuda", progress=False)
    settled = settle("cuda")  # every row in a long-lived process's graph state (kvcascade.graphs.settle)
    rows = []
    runs = [(policy, budget, length)] + [("full", None, L) for L in full_lengths]
    for pol, b, _ in runs:  # warm-up: compile the kernels of every phase before anything is timed
        name, pargs = parse_policy_spec(pol)
        warm = make_sample("passkey", tok, min(length, 3 * chunk_size), 0.5, seed=1)
        generate(model, tok, warm.prompt, policy=name, budget=b, policy_args=pargs, max_new_tokens=8,
                 chunk_size=chunk_size, stop_on_eos=False)
    for pol, b, L in runs:
        t0 = time.time()
        s = make_sample("passkey", tok, L, 0.5, seed=0)
        gen_s = time.time() - t0
        name, pargs = parse_policy_spec(pol)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        r = generate(model, tok, s.prompt, policy=name, budget=b, policy_args=pargs, max_new_tokens=new_tokens,
                     chunk_size=chunk_size, stop_on_eos=False, progress=True)
        rows.append({"T": s.tokens, "method": f"{pol}" + (f" budget {b}" if b else ""), "chunk": chunk_size,
                     "prefill_s": r.prefill_s, "prefill_tok_s": s.tokens / r.prefill_s,
                     "decode_tok_s": r.new_tokens / r.decode_s if r.decode_s else None,
                     "steady_tok_s": 1 / r.decode_step_s if r.decode_step_s else None,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "weights_gib": base / 2**30,
                     "kv_mib": r.kv_bytes_peak / 2**20, "passkey_found": s.answers[0] in r.text,
                     "answer": r.text[:40], "prompt_build_s": gen_s, "ms": r.prefill_s * 1000, "tflops": None,
                     "speedup_vs_cudnn": None})
        print(f"{pol} {L}: prefill {r.prefill_s:.1f} s, answer {r.text[:30]!r}", file=sys.stderr, flush=True)
    meta = {"device": device_name(), "model": model_name, "dtype": str(model.dtype),
            "run_ahead": run_ahead_enabled(), "graphs_settled": settled}
    print_table(rows, ["T", "method", "chunk", "prefill_s", "prefill_tok_s", "decode_tok_s", "steady_tok_s",
                       "peak_gib", "kv_mib", "passkey_found"], f"bench e2e ({meta['device']}, {model_name})")
    write_json(rows, out, meta)
    return rows


# ------------------------------------------------------------------------------------------- decode speed
def _stock_decode(model, ids: torch.Tensor, new_tokens: int, cache_implementation: str | None) -> dict:
    """Stock ``model.generate`` (greedy, exactly ``new_tokens``), timed per step by a logits processor that
    synchronises and reads the clock (generate checks its stopping criteria on the host every step anyway): decode
    tokens/s over the steps after the first, and at the median step (``steady_tok_s``). One warm-up run first
    (which also compiles, where transformers does)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores):
            torch.cuda.synchronize()
            self.t.append(time.perf_counter())
            return scores

    kw = {"do_sample": False, "pad_token_id": 0, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    if cache_implementation:
        kw["cache_implementation"] = cache_implementation
    t = time.perf_counter()
    model.generate(ids, **kw)
    warm = time.perf_counter() - t
    clock = Clock()
    t = time.perf_counter()
    model.generate(ids, logits_processor=LogitsProcessorList([clock]), **kw)
    return {"decode_tok_s": (len(clock.t) - 1) / (clock.t[-1] - clock.t[0]), "prefill_s": clock.t[0] - t,
            "steady_tok_s": 1 / statistics.median(b - a for a, b in zip(clock.t, clock.t[1:])), "warmup_s": warm}


def bench_generate(model_name=None, lengths=(4096, 32768), policies=("full", "streaming", "h2o", "tova", "snapkv",
                   "locret", "cascade"), budget: int = 2048, new_tokens: int = 256, chunk_size: int = 4096,
                   peers=("static", "dynamic"), batches=(8, 32), batch_policy: str = "streaming", run_ahead=True,
                   out=None) -> list[dict]:
    """Decode speed after a prompt of each length: stock ``generate`` (static cache, as transformers runs it, and
    dynamic cache) as the peer, then ours per policy eagerly, with CUDA graphs step by step
    (``KVCASCADE_RUN_AHEAD=0``) and (``run_ahead``, the default) with graphs and greedy decoding run ahead, as
    ``generate`` decodes by default; then ``batch_policy`` with ``batches`` different prompts
    decoded together (aggregate tokens/s over the batched decode); same model, run."""
    _need_cuda()
    from ..engine import generate
    from ..graphs import settle
    from ..models import DEFAULT_MODEL, load_model
    from ..policies import parse_policy_spec
    from ..texts import kjv_part

    model_name = model_name or DEFAULT_MODEL
    model, tok = load_model(model_name, device="cuda", progress=False)
    settled = settle("cuda")  # every row in a long-lived process's graph state (kvcascade.graphs.settle)
    text_ids = tok(kjv_part("nt")[:max(lengths) * 6]).input_ids
    meta = {"device": device_name(), "model": model_name, "dtype": str(model.dtype), "new_tokens": new_tokens,
            "text": "King James New Testament", "chunk": chunk_size, "graphs_settled": settled}

    class _Rows(list):  # every row is saved as it comes, so a run stopped by a time limit keeps what it measured
        def append(self, row):
            super().append(row)
            write_json(self, out, {**meta, "complete": False})

    rows = _Rows()
    run_ahead_env = os.environ.get("KVCASCADE_RUN_AHEAD")  # (put back for the batched rows, which never run ahead)
    for L in lengths:
        ids = text_ids[:L]
        for peer in peers:
            try:
                r = _stock_decode(model, torch.tensor([ids], device="cuda"), new_tokens, peer)
            except Exception as e:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
                rows.append({"T": L, "method": f"transformers generate, {peer} cache", "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            rows.append({"T": L, "method": f"transformers generate, {peer} cache", "decode_tok_s": r["decode_tok_s"],
                         "steady_tok_s": r["steady_tok_s"], "prefill_s": r["prefill_s"],
                         "note": f"first run {r['warmup_s']:.1f} s"})
            print(f"{L} {peer}: {r['decode_tok_s']:.0f} tok/s", file=sys.stderr, flush=True)
        for spec in policies:
            name, pargs = parse_policy_spec(spec)
            b = None if name in ("full", "interlayer") else budget
            for graphs, ahead in [("0", "0"), ("1", "0")] + ([("1", "1")] if run_ahead else []):
                os.environ["KVCASCADE_CUDA_GRAPHS"], os.environ["KVCASCADE_RUN_AHEAD"] = graphs, ahead
                for warm in (True, False):  # a short warm-up run compiles every kernel first
                    r = generate(model, tok, ids[:L if not warm else min(L, 2 * chunk_size)], policy=name, budget=b,
                                 policy_args=pargs, max_new_tokens=new_tokens if not warm else 8,
                                 chunk_size=chunk_size, stop_on_eos=False)
                rows.append({"T": L, "method": f"kvcascade {spec}" + (f" budget {b}" if b else "") +
                             (", eager" if graphs == "0" else ", CUDA graphs, run ahead" if ahead == "1"
                              else ", CUDA graphs, step by step"),
                             "decode_tok_s": r.new_tokens / r.decode_s, "prefill_s": r.prefill_s,
                             "steady_tok_s": 1 / r.decode_step_s if r.decode_step_s else None,
                             "kv_mib": r.kv_bytes_peak / 2**20,
                             "note": f"{r.decode_graph_steps} of {r.new_tokens - 1} decode steps replayed" if graphs == "1" else ""})
                print(f"{L} {spec} graphs={graphs}: {r.new_tokens / r.decode_s:.0f} tok/s", file=sys.stderr, flush=True)
        os.environ.pop("KVCASCADE_CUDA_GRAPHS", None)
        if run_ahead_env is None:
            os.environ.pop("KVCASCADE_RUN_AHEAD", None)
        else:
            os.environ["KVCASCADE_RUN_AHEAD"] = run_ahead_env
        name, pargs = parse_policy_spec(batch_policy)
        for nb in batches:
            starts = [(i * 997) % max(1, len(text_ids) - L) for i in range(nb)]  # nb different prompts of L tokens
            prompts = [text_ids[a:a + L] for a in starts]
            generate(model, tok, [p[:min(L, 2 * chunk_size)] for p in prompts], policy=name, budget=budget,
                     policy_args=pargs, max_new_tokens=8, chunk_size=chunk_size, stop_on_eos=False)  # warm-up, as above
            torch.cuda.synchronize()
            t = time.perf_counter()
            rs = generate(model, tok, prompts, policy=name, budget=budget, policy_args=pargs,
                          max_new_tokens=new_tokens, chunk_size=chunk_size, stop_on_eos=False)
            wall = time.perf_counter() - t
            decode_wall = wall - sum(r.prefill_s for r in rs)
            total = sum(r.new_tokens for r in rs)
            rows.append({"T": L, "method": f"kvcascade {batch_policy} budget {budget}, {nb} prompts decoded together",
                         "decode_tok_s": total / decode_wall, "prefill_s": sum(r.prefill_s for r in rs),
                         "steady_tok_s": len(rs) / statistics.median(r.decode_step_s for r in rs),
                         "kv_mib": sum(r.kv_bytes_peak for r in rs) / 2**20,
                         "note": f"aggregate; batch {max(r.decode_batch for r in rs)}, "
                                 f"{rs[0].decode_graph_steps} of {new_tokens - 1} steps replayed"})
            print(f"{L} batch {nb}: {total / decode_wall:.0f} tok/s aggregate", file=sys.stderr, flush=True)
    print_table(rows, ["T", "method", "decode_tok_s", "steady_tok_s", "prefill_s", "kv_mib", "note"],
                f"bench generate ({meta['device']}, {model_name}, {new_tokens} new tokens)")
    write_json(rows, out, {**meta, "complete": True})
    if out:
        try:
            print(f"plot: {plot_generate(out)}", file=sys.stderr)
        except ImportError:
            print("kvcascade: matplotlib is not installed; no plot (pip install 'kvcascade[plot]')", file=sys.stderr)
    return list(rows)


def plot_generate(json_path, png_path=None) -> Path:
    """A bar chart of a ``bench generate`` JSON (decode tokens/s per method, one panel per context length), written
    beside it (``.png``) unless ``png_path`` is given; also ``kvcascade report FILE.json``."""
    p = Path(json_path)
    try:
        data = json.loads(p.read_text())
        meta, rows = data["meta"], [r for r in data["rows"] if r.get("decode_tok_s")]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KVCascadeError(f"'{p}' is not a JSON file written by kvcascade bench generate ({type(e).__name__})") from None
    if not rows or "T" not in rows[0]:
        raise KVCascadeError(f"'{p}' has no decode rows (not a kvcascade bench generate file?)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(row) -> str:
        return row["method"].replace("kvcascade ", "").replace("transformers generate, ", "stock, ")

    lengths = sorted({r["T"] for r in rows})
    methods = list(dict.fromkeys(label(r) for r in rows))
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 0.38 * len(methods) + 1.6), sharey=True,
                             squeeze=False)
    for ax, T in zip(axes[0], lengths):
        speed = {label(r): r["decode_tok_s"] for r in rows if r["T"] == T}
        vals = [speed.get(m, 0.0) for m in methods]
        colors = ["tab:gray" if m.startswith("stock") else "tab:orange" if "prompts" in m else
                  "tab:blue" if "graphs" in m else "tab:cyan" for m in methods]
        ax.barh(range(len(methods)), vals, color=colors)
        for i, v in enumerate(vals):
            if v:
                ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
        ax.set_title(f"{_fmt_T(T)} prompt")
        ax.set_xlabel("decode tokens/s (batch rows: all prompts together)")
        ax.set_xlim(0, 1.18 * max(vals))
    axes[0][0].set_yticks(range(len(methods)), methods, fontsize=8)
    axes[0][0].invert_yaxis()  # the shared axis: the first method on top
    fig.suptitle(f"kvcascade bench generate: {meta.get('model', '')}, {meta.get('device', '')}, "
                 f"{meta.get('new_tokens', '')} new tokens", fontsize=10)
    fig.tight_layout()
    out = Path(png_path) if png_path else p.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
