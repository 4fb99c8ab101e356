"""Run one evaluation grid in several processes that share a device (``kvcascade eval --workers N``).

Decoding one token of a small model under a compressed cache is host-bound: hundreds of small kernel launches
from one Python thread leave the GPU mostly idle (``docs/results/README.md``, "Where the time goes"). Several
processes, each with its own copy of the model, fill those gaps. Worker ``k`` of ``n`` runs the grid rows whose
index in run order is ``k mod n`` (:func:`kvcascade.eval.runner.run_grid` with ``shard=(k, n)``) and appends
them to the shared ``results.jsonl`` under a file lock; the parent shows one progress bar, waits, and writes
the report. Rows are the same as with one process (prompts depend on the seed, never on the worker), and the
folder stays resumable. With several GPUs, workers are spread over them round-robin.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import KVCascadeError
from .runner import RESULTS, SHARD_TODO, make_out_dir, read_rows

LOG_FILE = "worker-{k}.log"


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """``"2/8"`` -> ``(2, 8)``; None stays None."""
    if spec is None:
        return None
    try:
        k, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise KVCascadeError(f"bad shard '{spec}' (use K/N with 0 <= K < N)") from None
    if not 0 <= k < n:
        raise KVCascadeError(f"bad shard '{spec}' (use K/N with 0 <= K < N)")
    return k, n


def _count_rows(out: Path) -> int:
    path = out / RESULTS
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _gpu_count(device: str) -> int:
    if not str(device).startswith("cuda") and device != "auto":
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch CUDA: workers share the named device
        return 0


def run_workers(n: int, child_args: list[str], out_dir, device: str = "cpu", progress: bool = True,
                poll_s: float = 2.0) -> list[dict]:
    """Start ``n`` worker processes of ``kvcascade eval`` (``child_args`` without ``--workers``), wait, return rows.

    A worker that fails makes this raise after the others finish (their rows stay in ``results.jsonl``; rerun
    to resume). Worker output goes to ``OUT/worker-K.log``.
    """
    if n < 1:
        raise KVCascadeError(f"--workers must be >= 1, got {n}")
    out = make_out_dir(out_dir)
    for k in range(n):
        (out / SHARD_TODO.format(k=k, n=n)).unlink(missing_ok=True)
    gpus = _gpu_count(device)
    threads = max(1, (os.cpu_count() or 1) // n)
    start_rows = _count_rows(out)
    procs = []

    def _term(signum, frame):  # `timeout` or a scheduler stopping us: stop the workers too
        raise SystemExit(128 + signum)

    old_term = signal.signal(signal.SIGTERM, _term) if _main_thread() else None
    try:
        for k in range(n):
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", str(threads))
            if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
                env["CUDA_VISIBLE_DEVICES"] = str(k % gpus)
            log = (out / LOG_FILE.format(k=k)).open("w")
            cmd = [sys.executable, "-m", "kvcascade.cli", "eval", *child_args, "--shard", f"{k}/{n}", "--quiet"]
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        bar = None
        if progress:
            from ..progress import progress_bar

            bar = progress_bar(total=None, desc=f"eval ({n} workers)", unit="run")
        while any(p.poll() is None for p, _ in procs):
            time.sleep(poll_s)
            if bar is not None:
                todo = [out / SHARD_TODO.format(k=k, n=n) for k in range(n)]
                if bar.total is None and all(t.exists() for t in todo):
                    bar.total = sum(int(t.read_text() or 0) for t in todo)
                    bar.refresh()
                bar.n = _count_rows(out) - start_rows
                bar.refresh()
        if bar is not None:
            bar.n = _count_rows(out) - start_rows
            bar.close()
    except BaseException:
        for p, _ in procs:
            if p.poll() is None:
                p.terminate()
        for p, _ in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        for _, log in procs:
            log.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    failed = [(k, p.returncode) for k, (p, _) in enumerate(procs) if p.returncode != 0]
    if failed:
        k, rc = failed[0]
        tail = (out / LOG_FILE.format(k=k)).read_text(errors="replace").strip().splitlines()[-3:]
        raise KVCascadeError(f"{len(failed)} of {n} workers failed (worker {k}: exit {rc}: {' | '.join(tail)}); "
                             f"logs in {out}/worker-K.log; rerun to resume")
    for k in range(n):  # logs are kept only when something failed
        (out / SHARD_TODO.format(k=k, n=n)).unlink(missing_ok=True)
        (out / LOG_FILE.format(k=k)).unlink(missing_ok=True)
    return read_rows(out, unique=True)
