"""One inference thread shares the model among requests, with admission by KV bytes.

Every request is a :class:`~kvcascade.engine.Session` (its own cache, policy and budget). The thread runs the
admitted sessions round-robin, one step each (a prefill chunk or one decoded token), so a long prompt does not
hold the others up for its whole prefill and every stream makes progress. Sessions that finished their prefill and
are alike (same policy and parameters, same token count in every layer: a bounded policy's steady state) are
decoded together, one forward per round for all of them (:class:`~kvcascade.engine.BatchDecoder`); the others
decode one token per round on their own.

Admission: each request reserves an upper bound of the KV bytes it can hold (its policy's
:meth:`~kvcascade.policies.Policy.max_tokens` for its prompt, ``max_tokens`` and chunk size, times the model's
bytes per token); it starts once the reservations of the running requests leave room under ``kv_limit_bytes``,
in arrival order, and is refused (503) if that has not happened within ``queue_timeout_s``. A request whose
bound alone exceeds the limit is refused at once (400). A cancelled request (its client went away) is dropped
at its next step and its cache released.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import KVCascadeError


def kv_bytes_per_token(model) -> list[tuple[int, int | None]]:
    """Per layer: (K+V bytes per token, sliding window or None)."""
    from ..cache import _layer_windows
    from ..models import head_dim, text_config

    cfg = text_config(model.config)
    size = next(model.parameters()).element_size()
    per = 2 * cfg.num_key_value_heads * head_dim(cfg) * size
    return [(per, w) for w in _layer_windows(cfg)]


def kv_bound_bytes(model, policy, prompt_tokens: int, max_new: int, chunk: int) -> int:
    layers = kv_bytes_per_token(model)
    tokens = policy.max_tokens(prompt_tokens, max_new, chunk, len(layers))
    return sum(per * (min(tokens, w - 1 + chunk) if w else tokens) for per, w in layers)


@dataclass
class Job:
    """A request as the scheduler sees it. ``emit(kind, payload)`` is called from the inference thread."""

    ids: list[int]
    policy: object
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    chunk_size: int
    kv_bound: int
    emit: object  # callable(kind: str, payload)
    id: str = ""
    created: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    session: object = None

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    def __init__(self, model, tokenizer, kv_limit_bytes: int, queue_timeout_s: float = 30.0, log=None):
        self.model, self.tokenizer = model, tokenizer
        self.kv_limit = int(kv_limit_bytes)
        self.queue_timeout = queue_timeout_s
        self.pending: deque[Job] = deque()
        self.active: list[Job] = []
        self.cond = threading.Condition()
        self.running = True
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._ids = itertools.count(1)
        from ..engine import BatchDecoder

        self.batch = BatchDecoder(model)
        self.thread = threading.Thread(target=self._loop, name="kvcascade-inference", daemon=True)
        self.thread.start()

    # -- called from request handlers ---------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        if job.kv_bound > self.kv_limit:
            raise KVCascadeError(f"this request may hold up to {job.kv_bound / 2**20:,.1f} MiB of KV cache, more than "
                                 f"the server's limit of {self.kv_limit / 2**20:,.1f} MiB; lower max_tokens, the "
                                 "budget, or the prompt")
        with self.cond:
            self.pending.append(job)
            self.cond.notify()

    def reserved(self) -> int:
        with self.cond:
            return sum(j.kv_bound for j in self.active)

    def stats(self) -> dict:
        with self.cond:
            return {"active": len(self.active), "waiting": len(self.pending),
                    "kv_reserved_bytes": sum(j.kv_bound for j in self.active), "kv_limit_bytes": self.kv_limit}

    def shutdown(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify()
        self.thread.join(timeout=10)

    # -- the inference thread -----------------------------------------------------------------------------
    def _admit(self) -> None:
        now = time.monotonic()
        used = sum(j.kv_bound for j in self.active)
        while self.pending:
            job = self.pending[0]
            if job.cancelled.is_set():
                self.pending.popleft()
                job.emit("cancelled", None)
                continue
            if used + job.kv_bound <= self.kv_limit:
                self.pending.popleft()
                self._start(job)
                used += job.kv_bound
                continue
            break
        for job in list(self.pending):  # the ones still waiting: refuse those that waited too long
            if now - job.created > self.queue_timeout:
                self.pending.remove(job)
                job.emit("rejected", f"the server's KV memory ({self.kv_limit / 2**20:,.1f} MiB) stayed in use by "
                                     f"other requests for {self.queue_timeout:g} s; try again later")

    def _start(self, job: Job) -> None:
        from ..engine import Session

        try:
            job.session = Session(self.model, self.tokenizer, job.ids, job.policy, max_new_tokens=job.max_new_tokens,
                                  chunk_size=job.chunk_size, temperature=job.temperature, top_p=job.top_p,
                                  seed=job.seed, stop=job.stop, on_token=lambda piece: job.emit("piece", piece))
        except Exception as e:  # noqa: BLE001 - reported to that request only
            job.emit("error", f"{type(e).__name__}: {e}")
            return
        self.active.append(job)

    def _drop(self, job: Job) -> None:
        if job in self.active:
            self.active.remove(job)
        if job.session is not None:
            if job.session in self.batch.sessions:
                self.batch.remove(job.session)
            job.session.close()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while self.running and not self.active and not self.pending:
                    self.cond.wait()
                if not self.running:
                    for job in self.active + list(self.pending):
                        job.emit("error", "the server is shutting down")
                    for job in list(self.active):
                        self._drop(job)
                    return
                self._admit()
                batch = list(self.active)
            if not batch:  # only waiting requests: wake on a new request, or to time their wait in _admit
                with self.cond:
                    self.cond.wait(timeout=0.05)
                continue
            batched = self.batch
            for job in batch:
                if job.cancelled.is_set():
                    with self.cond:
                        self._drop(job)
                    job.emit("cancelled", None)
                    continue
                if job.session in batched.sessions:
                    continue  # decoded below, with the batch
                if batched.compatible(job.session):
                    try:
                        batched.add(job.session)
                    except Exception as e:  # noqa: BLE001 - e.g. no memory for the batch: that request ends
                        with self.cond:
                            self._drop(job)
                        job.emit("error", f"{type(e).__name__}: {e}")
                    continue
                try:
                    done = job.session.step()
                except Exception as e:  # noqa: BLE001 - one request's failure ends that request only
                    with self.cond:
                        self._drop(job)
                    job.emit("error", f"{type(e).__name__}: {e}")
                    continue
                if done:
                    result = job.session.result()
                    with self.cond:
                        self._drop(job)
                    job.emit("done", result)
            if batched.sessions:
                jobs = {id(j.session): j for j in batch}
                try:
                    finished = batched.step()
                except Exception as e:  # noqa: BLE001 - the batch's forward failed: those requests end with it
                    for s in list(batched.sessions):
                        job = jobs.get(id(s))
                        with self.cond:
                            if job is not None:
                                self._drop(job)
                            batched.remove(s)
                        if job is not None:
                            job.emit("error", f"{type(e).__name__}: {e}")
                    continue
                for s in finished:
                    job = jobs.get(id(s))
                    if job is None:
                        continue
                    result = s.result()
                    with self.cond:
                        self._drop(job)
                    job.emit("done", result)
