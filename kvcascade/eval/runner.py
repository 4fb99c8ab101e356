"""The evaluation runner: tasks x policies x budgets x lengths (x depths x samples), one JSONL row per sample.

Rows go to ``DIR/results.jsonl`` as soon as each finishes; a rerun skips rows already there (same task,
policy, budget, length, depth and sample index), so an interrupted grid resumes where it stopped. The run
ends by writing ``DIR/summary.md`` and the plots (:mod:`kvcascade.eval.report`).

What keeps a folder honest:

* ``DIR/grid.json`` records the settings that make rows comparable (model, dtype, seed, chunk size, ppl
  bucket, and a checksum of any ``--text`` / ``--haystack-file``); a run with other settings is refused
  rather than mixed in.
* ``DIR/.lock``: one run per folder at a time (a second gets a clear "in use" error; ``--workers`` children
  run under their parent's lock).
* A last line torn by an interrupted write is moved to ``DIR/results.jsonl.torn`` and the file repaired
  before anything is appended.
* A row that fails (an exception, a non-finite score) is recorded with its ``error`` and the grid goes on;
  a rerun tries it again. The run ends by checking that every row of the grid is there.

Prompts depend on (seed, task, length, depth, sample) only, never on the policy: every policy answers the
same prompts. ``full`` runs without a budget and only up to ``full_max`` tokens (default: the model's window).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
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
from ..policies.base import takes_budget
from .tasks import DEPTH_TASKS, RULER, make_sample, parse_task_spec, score

RESULTS = "results.jsonl"
SETTINGS = "grid.json"
LOCK = ".lock"
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
            for b in (self.budgets if takes_budget(name) else [None]):
                make_policy(name, b, **args)  # unknown policy, bad budget or option: fails here, before any work
        if any(takes_budget(n) for n, _ in map(parse_policy_spec, self.policies)) and not self.budgets:
            raise KVCascadeError("--budgets is needed for policies other than full")
        if self.samples < 1:
            raise KVCascadeError(f"samples must be >= 1, got {self.samples}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise KVCascadeError(f"chunk size must be a positive number of tokens, got {self.chunk_size}")
        if not isinstance(self.ppl_bucket, int) or self.ppl_bucket < 1:
            raise KVCascadeError(f"ppl bucket must be a positive number of tokens, got {self.ppl_bucket}")
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
                    if not takes_budget(pname) and self.full_max and length > self.full_max:
                        continue
                    for budget in (self.budgets if takes_budget(pname) else [None]):
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


def is_ok(r: dict) -> bool:
    """A finished row (not a recorded failure)."""
    return not r.get("error")


def read_rows(out_dir, unique: bool = False) -> list[dict]:
    """Rows of ``out_dir/results.jsonl`` in file order; ``unique``: one per grid key (the last finished one, else
    the last failure), as the report counts them."""
    path = Path(out_dir) / RESULTS
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"kvcascade: warning: {path}:{n} is not JSON (an interrupted write?); ignored", file=sys.stderr)
            continue
        if not isinstance(row, dict):
            print(f"kvcascade: warning: {path}:{n} is not a row object; ignored", file=sys.stderr)
            continue
        rows.append(row)
    return unique_rows(rows, path) if unique else rows


def unique_rows(rows: list[dict], where="results") -> list[dict]:
    """One row per grid key, in first-seen order: the last finished one, else the last failure."""
    best: dict = {}
    for r in rows:
        try:
            k = row_key(r)
        except KeyError as e:
            raise KVCascadeError(f"{where}: a row lacks the field {e}; not a kvcascade eval row") from None
        if k not in best or is_ok(r) or not is_ok(best[k]):
            best[k] = r
    return list(best.values())


def repair_tail(out_dir) -> None:
    """Make ``results.jsonl`` end with a complete line: a torn last line (an interrupted write) is moved to
    ``results.jsonl.torn`` (nothing is thrown away) and cut from the file; a complete last row that only lacks
    its newline gets one."""
    path = Path(out_dir) / RESULTS
    if not path.exists():
        return
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        try:
            json.loads(tail)
            f.seek(size)
            f.write(b"\n")
            return
        except ValueError:
            pass
        with (path.parent / (RESULTS + ".torn")).open("ab") as t:
            t.write(tail + b"\n")
        f.truncate(cut)
    print(f"kvcascade: warning: the last line of {path} was torn (an interrupted write); moved to "
          f"{RESULTS}.torn, its row will run again", file=sys.stderr)


def _digest(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def grid_settings(grid: "Grid", model_name: str, dtype: str, prose: str | None = None,
                  ppl_text: str | None = None) -> dict:
    """What rows of one folder must share to be compared (recorded in ``grid.json``)."""
    return {"model": model_name, "dtype": str(dtype).replace("torch.", ""), "seed": grid.seed,
            "chunk_size": grid.chunk_size, "ppl_bucket": grid.ppl_bucket,
            "haystack_sha256": _digest(prose), "text_sha256": _digest(ppl_text)}


def check_settings(out: Path, settings: dict) -> None:
    """Record ``settings`` in ``out/grid.json``, or refuse if the folder holds rows made with other ones."""
    path = out / SETTINGS
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            raise KVCascadeError(f"'{path}' is unreadable; it records the settings of the rows in '{out}'") from None
    else:  # a folder from before grid.json: what its rows say
        rows = read_rows(out)
        old = {}
        for key in ("model", "seed", "chunk_size"):
            vals = {r.get(key) for r in rows if key in r}
            if len(vals) == 1:
                old[key] = vals.pop()
    diff = [f"{k} {old[k]!r} there, {settings[k]!r} now" for k in settings if k in old and old[k] != settings[k]]
    if diff:
        raise KVCascadeError(f"'{out}' holds rows made with other settings ({'; '.join(diff)}); use another --out "
                             "(rows of different settings would be mixed)")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**old, **settings}, indent=1) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def folder_lock(out: Path):
    """Hold ``out/.lock`` for one run; a second run on the same folder gets a clear error."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    f = (out / LOCK).open("a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            who = f.read().strip() or "another process"
            raise KVCascadeError(f"'{out}' is in use by another kvcascade eval ({who}); wait for it to finish or "
                                 "use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield
    finally:
        f.close()


def missing_rows(grid: "Grid", rows: list[dict]) -> tuple[list[tuple], list[dict]]:
    """Grid keys with no finished row, and the failure rows among them (latest per key)."""
    ok = {row_key(r) for r in rows if is_ok(r)}
    failed = {row_key(r): r for r in rows if not is_ok(r)}
    missing = [k for k in grid.runs() if k not in ok]
    return missing, [failed[k] for k in missing if k in failed]


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


def run_safely(model, tokenizer, key, grid: Grid, model_name: str, machine: str, prose=None, ppl_text=None) -> dict:
    """:func:`run_one`, with a failure turned into a row that says what went wrong (the grid goes on)."""
    task, pol, budget, length, depth, index = key
    try:
        row = run_one(model, tokenizer, task, pol, budget, length, depth, index, grid, model_name, machine,
                      prose=prose, ppl_text=ppl_text)
        if not (isinstance(row.get("score"), (int, float)) and math.isfinite(row["score"])):
            raise KVCascadeError(f"the score is not a finite number ({row.get('score')!r})")
        return row
    except Exception as e:  # noqa: BLE001 - recorded in the row, reported at the end; Ctrl-C still stops
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"task": task, "model": model_name, "policy": pol, "budget": budget, "length": length, "depth": depth,
                "sample": index, "seed": grid.seed, "chunk_size": grid.chunk_size, "machine": machine, "score": None,
                "error": f"{type(e).__name__}: {e}"}


def run_grid(model, tokenizer, grid: Grid, out_dir, model_name: str = "", prose: str | None = None,
             ppl_text: str | None = None, progress: bool = True, report: bool = True,
             shard: tuple[int, int] | None = None) -> list[dict]:
    """Run every missing row of ``grid`` into ``out_dir/results.jsonl``; then write the summary and plots.

    Returns the folder's rows, one per grid key (:func:`read_rows` with ``unique``); rows that failed carry an
    ``error`` (see :func:`missing_rows`). ``shard=(k, n)``: run only the rows whose index in run order is
    ``k mod n`` (one of ``n`` workers, under the parent's lock; see :mod:`kvcascade.eval.workers`), and write
    how many are to run to ``out_dir/.shard-k-of-n.todo``.
    """
    grid.validate()
    if grid.full_max is None:
        from ..models import model_window

        grid.full_max = model_window(model.config)
    out = make_out_dir(out_dir)
    settings = grid_settings(grid, model_name, model.dtype, prose, ppl_text)
    lock = folder_lock(out) if shard is None else contextlib.nullcontext()
    with lock:
        if shard is None:
            repair_tail(out)
        check_settings(out, settings)
        rows = _run_todo(model, tokenizer, grid, out, model_name, prose, ppl_text, progress, shard)
        if report:
            from .report import write_report

            write_report(out, rows)
    return rows


def _run_todo(model, tokenizer, grid, out, model_name, prose, ppl_text, progress, shard) -> list[dict]:
    done = {row_key(r) for r in read_rows(out) if is_ok(r)}
    todo = [r for i, r in enumerate(grid.runs()) if r not in done and (shard is None or i % shard[1] == shard[0])]
    if shard is not None:
        (out / SHARD_TODO.format(k=shard[0], n=shard[1])).write_text(str(len(todo)))
    if any(parse_task_spec(t)[0] == "ppl" for t, *_ in todo) and ppl_text is None:
        from ..texts import kjv_text

        ppl_text = kjv_text()
    machine = machine_name(model)
    from ..progress import progress_bar

    bar = progress_bar(total=len(todo), desc="eval", unit="run", enabled=progress and bool(todo))
    if len(done):
        print(f"kvcascade eval: {len(done)} rows already in {out / RESULTS}; {len(todo)} to run", file=sys.stderr)
    failed = 0
    with (out / RESULTS).open("a") as f:
        for key in todo:
            task, pol, budget, length, depth, index = key
            bar.set_postfix_str(f"{task} {pol} b={budget} L={length} d={depth}", refresh=False)
            row = run_safely(model, tokenizer, key, grid, model_name, machine, prose=prose, ppl_text=ppl_text)
            if not is_ok(row):
                failed += 1
                print(f"kvcascade: warning: row {task} {pol} budget={budget} length={length} depth={depth} "
                      f"sample={index} failed: {row['error']}", file=sys.stderr)
            _append_row(f, row)
            bar.update(1)
    bar.close()
    return read_rows(out, unique=True)
