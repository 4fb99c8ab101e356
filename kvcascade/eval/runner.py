"""The evaluation runner: tasks x policies x budgets x lengths (x depths x samples), one JSONL row per sample.

Rows go to ``DIR/results.jsonl`` as soon as each finishes; a rerun skips rows already there (same task,
policy, budget, length, depth and sample index), so an interrupted grid resumes where it stopped. The run
ends by writing ``DIR/summary.md`` and the plots (:mod:`kvcascade.eval.report`).

Prompts depend on (seed, task, length, depth, sample) only, never on the policy: every policy answers the
same prompts. ``full`` runs without a budget and only up to ``full_max`` tokens (default: the model's window).
"""

from __future__ import annotations

import json
import platform
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import KVCascadeError
from ..policies import make_policy, parse_policy_spec
from .tasks import DEPTH_TASKS, RULER, make_sample, parse_task_spec, score

RESULTS = "results.jsonl"
SHARD_TODO = ".shard-{k}-of-{n}.todo"  # a worker's count of rows to run (read by kvcascade.eval.workers)


def parse_length(s) -> int:
    """``4096``, ``4k`` (= 4096), ``1m`` (= 1048576), ``1.5k``; ``all`` (= 0: the whole text, for ppl)."""
    if isinstance(s, int):
        return s
    t = str(s).strip().lower()
    if t == "all":
        return 0
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        v = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise KVCascadeError(f"bad length '{s}' (use e.g. 4096, 4k, 1m)") from None
    if v < 1 or v != int(v):
        raise KVCascadeError(f"bad length '{s}'")
    return int(v)


def expand_tasks(spec: str) -> list[str]:
    out = []
    for t in [x.strip() for x in spec.split(",") if x.strip()]:
        if t == "ruler":
            out.extend(RULER)
        else:
            parse_task_spec(t)  # validates
            out.append(t)
    if not out:
        raise KVCascadeError("no task given")
    return out


def sample_seed(seed: int, task: str, length: int, depth, index: int) -> int:
    return random.Random(f"{seed}:{task}:{length}:{depth}:{index}").randrange(2**31)


@dataclass
class Grid:
    tasks: list[str]
    policies: list[str]
    budgets: list[int]
    lengths: list[int]
    samples: int = 10
    depths: list[float] | None = None  # None: spread evenly, (i + 0.5) / samples
    seed: int = 0
    full_max: int | None = None
    chunk_size: int = 512
    ppl_bucket: int = 8192
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not self.policies:
            raise KVCascadeError("no policy given")
        for p in self.policies:
            name, args = parse_policy_spec(p)
            for b in ([None] if name == "full" else self.budgets):
                make_policy(name, b, **args)  # unknown policy, bad budget or option: fails here, before any work
        if any(n != "full" for n, _ in map(parse_policy_spec, self.policies)) and not self.budgets:
            raise KVCascadeError("--budgets is needed for policies other than full")
        if self.samples < 1:
            raise KVCascadeError(f"samples must be >= 1, got {self.samples}")
        if 0 in self.lengths and any(parse_task_spec(t)[0] != "ppl" for t in self.tasks):
            raise KVCascadeError("length 'all' is for the ppl task only")
        if not self.lengths:
            raise KVCascadeError("no length given")
        for d in self.depths or []:
            if not 0.0 <= d <= 1.0:
                raise KVCascadeError(f"depth must be in [0, 1], got {d}")

    def runs(self):
        """Every (task, policy, budget, length, depth, sample index) of the grid, in run order."""
        for task in self.tasks:
            name, _ = parse_task_spec(task)
            for length in self.lengths:
                for pol in self.policies:
                    pname, _ = parse_policy_spec(pol)
                    if pname == "full" and self.full_max and length > self.full_max:
                        continue
                    for budget in ([None] if pname == "full" else self.budgets):
                        if name == "ppl":
                            yield task, pol, budget, length, None, 0
                            continue
                        if name not in DEPTH_TASKS:
                            points = [(None, i) for i in range(self.samples)]
                        elif self.depths:
                            points = [(d, i) for d in self.depths for i in range(self.samples)]
                        else:
                            points = [(round((i + 0.5) / self.samples, 4), i) for i in range(self.samples)]
                        for depth, i in points:
                            yield task, pol, budget, length, depth, i


def row_key(r: dict) -> tuple:
    return (r["task"], r["policy"], r["budget"], r["length"], r["depth"], r["sample"])


def read_rows(out_dir) -> list[dict]:
    path = Path(out_dir) / RESULTS
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"kvcascade: warning: {path}:{n} is not JSON (an interrupted write?); ignored", file=sys.stderr)
    return rows


def make_out_dir(out_dir) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KVCascadeError(f"cannot create output folder '{out}': {e.strerror}") from None
    return out


def machine_name(model) -> str:
    dev = model.device
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"{platform.machine()} CPU x{torch.get_num_threads()} threads"
    return f"{name}, torch {torch.__version__}, {str(model.dtype).replace('torch.', '')}"


def _peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peaks(device) -> dict:
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    out["peak_device_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return out


def run_one(model, tokenizer, task, pol, budget, length, depth, index, grid: Grid, model_name: str, machine: str,
            prose=None, ppl_text=None) -> dict:
    from ..engine import generate
    from .ppl import streaming_perplexity

    pname, pargs = parse_policy_spec(pol)
    name, _ = parse_task_spec(task)
    base = {"task": task, "model": model_name, "policy": pol, "budget": budget, "length": length, "depth": depth,
            "sample": index, "seed": grid.seed, "chunk_size": grid.chunk_size, "machine": machine}
    _peak_reset(model.device)
    t0 = time.perf_counter()
    if name == "ppl":
        r = streaming_perplexity(model, tokenizer, ppl_text, policy=pname, budget=budget, policy_args=pargs,
                                 chunk_size=grid.chunk_size, bucket=grid.ppl_bucket, max_tokens=length or None, progress=False)
        return {**base, "tokens": r["tokens"], "score": r["ppl"], "ppl": r["ppl"], "bucket": r["bucket"],
                "ppl_per_bucket": r["ppl_per_bucket"], "kv_bytes_peak": r["kv_bytes_peak"],
                "kv_tokens_peak": r["kv_tokens_peak"], "seconds": time.perf_counter() - t0, **_peaks(model.device)}
    s = make_sample(task, tokenizer, length, depth, seed=sample_seed(grid.seed, task, length, depth, index), prose=prose)
    g = generate(model, tokenizer, s.prompt, policy=pname, budget=budget, policy_args=pargs,
                 max_new_tokens=s.max_new_tokens, chunk_size=grid.chunk_size)
    return {**base, "tokens": s.tokens, "needle_token": s.needle_token, "answer": g.text, "answers": s.answers,
            "score": score(s, g.text), "prefill_s": g.prefill_s, "decode_s": g.decode_s, "new_tokens": g.new_tokens,
            "seconds": time.perf_counter() - t0, "kv_bytes_peak": g.kv_bytes_peak, "kv_bytes_full": g.kv_bytes_full,
            "kv_tokens_peak": g.kv_tokens_peak, **_peaks(model.device)}


def _append_row(f, row: dict) -> None:
    """Append one JSON line; under an exclusive lock where the OS has one (workers share the file)."""
    line = json.dumps(row) + "\n"
    try:
        import fcntl
    except ImportError:  # not POSIX: one process per folder
        f.write(line)
        f.flush()
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        f.write(line)
        f.flush()
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def run_grid(model, tokenizer, grid: Grid, out_dir, model_name: str = "", prose: str | None = None,
             ppl_text: str | None = None, progress: bool = True, report: bool = True,
             shard: tuple[int, int] | None = None) -> list[dict]:
    """Run every missing row of ``grid`` into ``out_dir/results.jsonl``; then write the summary and plots.

    ``shard=(k, n)``: run only the rows whose index in run order is ``k mod n`` (one of ``n`` workers; see
    :mod:`kvcascade.eval.workers`), and write how many are to run to ``out_dir/.shard-k-of-n.todo``.
    """
    grid.validate()
    if grid.full_max is None:
        grid.full_max = getattr(getattr(model.config, "get_text_config", lambda: model.config)(),
                                "max_position_embeddings", None)
    out = make_out_dir(out_dir)
    done = {row_key(r) for r in read_rows(out)}
    todo = [r for i, r in enumerate(grid.runs()) if r not in done and (shard is None or i % shard[1] == shard[0])]
    if shard is not None:
        (out / SHARD_TODO.format(k=shard[0], n=shard[1])).write_text(str(len(todo)))
    if any(parse_task_spec(t)[0] == "ppl" for t, *_ in todo) and ppl_text is None:
        from .ppl import kjv_text

        ppl_text = kjv_text()
    machine = machine_name(model)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="eval", unit="run", file=sys.stderr)
    if len(done):
        print(f"kvcascade eval: {len(done)} rows already in {out / RESULTS}; {len(todo)} to run", file=sys.stderr)
    with (out / RESULTS).open("a") as f:
        for task, pol, budget, length, depth, index in todo:
            if bar is not None:
                bar.set_postfix_str(f"{task} {pol} b={budget} L={length} d={depth}")
            row = run_one(model, tokenizer, task, pol, budget, length, depth, index, grid, model_name, machine,
                          prose=prose, ppl_text=ppl_text)
            _append_row(f, row)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    rows = read_rows(out)
    if report:
        from .report import write_report

        write_report(out, rows)
    return rows
