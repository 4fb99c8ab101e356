"""Decode steps (and prompt chunks) replayed as captured CUDA graphs.

Decoding a small model is launch-bound: one step issues thousands of small kernels (the model's and the
policy's), and the host's time to launch them, not the GPU's to run them, sets the speed. A CUDA graph records
one step's kernels once and replays them with one launch.

A captured step is only valid while everything the host decided when recording it stays the same: every tensor
shape, every index computed from a Python integer, every branch taken. So a graph is keyed by that host state:
the policy's :meth:`~kvcascade.policies.Policy.graph_key` (``None``: this policy's decode step cannot be
replayed now), every layer's token count, buffer address and capacity, and the policy's per-layer host state.
In a policy's *steady state* (the cache at its budget: each token arrives and one leaves) the key repeats every
step, and a step is replayed. A step that only adds its token (``full``; Locret while its decode window fills:
``Policy.grows_next``) is decoded *padded*: the token is written at its slot through a device index and attends
over the buffer's whole capacity, the empty slots hidden (``CompressedCache.padded``), so one graph per buffer
serves every length; so is a step of a policy that does nothing below its cap while the cache is under it
(``Policy.grows_below_cap``: a prompt shorter than the budget). What changes every step on the
device (the token, the original positions) lives in device memory that the graph reads (the input token buffer,
:class:`~kvcascade.cache.CompressedCache`'s position counter); the cache's buffers are written in place
(:class:`~kvcascade.cache.LayerCache`), so a replay reads and writes the same memory as the capture did.

What a key leaves out of the host state reaches the device through :meth:`~kvcascade.policies.Policy.before_step`,
which every step calls outside any graph (the cascade writes there which unit its next step drops, so all of its
steady steps share one graph).

A key is captured the second time it is seen among the last ``SEEN_KEYS`` keys (the first run compiles every
kernel eagerly; a policy whose step cycles through a few keys, like the cascade's prompt chunks, is captured once
per key of the cycle), and a replay then sets the host state to what the capture left (token counts, policy
state; ``seen`` advanced by the step). If a capture fails, the host state is restored, graphs are turned off for
the rest of the process with one warning (a failed capture can leave CUDA state behind: the default CUDA generator
stays in capture mode, so later draws from it raise), and the step runs eagerly: never a wrong token. Policies
opt in (``graph_safe``). Sliding-window layers (Gemma3) are captured too: the Triton kernels read the window's
query position on the device.
``KVCASCADE_CUDA_GRAPHS=0`` turns graphs off; CPU never uses them.

Prompt chunks go the same way (:meth:`DecodeGraphs.chunk`, from :func:`kvcascade.engine.iter_prefill`): a long
prompt at the budget runs chunk after chunk of one size with the same host state, as launch-bound as decoding.
A chunk's key adds its size, whether it is the prompt's last (SnapKV selects there) and how much of the prompt is
left up to the policy's tail (Locret), and never pads. Perplexity (every token's logits) runs eagerly.
"""

from __future__ import annotations

import copy
import gc
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

MAX_GRAPHS = 16  # kept per cache; capturing another drops the oldest (a batch whose rows change makes new buffers)
SEEN_KEYS = 64  # keys remembered (each seen once, run eagerly); a key seen again among them is captured
_FAILED = False  # a capture failed in this process: none is tried again (a broken capture can leave CUDA state
#                  behind, e.g. the default generator still in capture mode), every step runs eagerly


_host = threading.local()  # .on: inside host_only(); .baked: a list that records baked() values (the CPU guard's)


@contextmanager
def host_only():
    """Marks a decode step's work on host (CPU) tensors, e.g. the cascade's slot schedule: a CUDA graph does not
    record it, so it may differ between steps with one key, as long as what it hands to the device is fixed by the
    key: as Python numbers (arguments the graph records) or through :func:`baked`. ``tests/test_graph_keys.py``
    traces a step's operators on CPU, leaving out what runs here."""
    prev = getattr(_host, "on", False)
    _host.on = True
    try:
        yield
    finally:
        _host.on = prev


def in_host_only() -> bool:
    return getattr(_host, "on", False)


def baked(value) -> None:
    """Declares a host value a captured step uses as a device constant (made once per value): two steps with one
    graph key must bake the same values (the CPU guard records them beside the operators)."""
    sink = getattr(_host, "baked", None)
    if sink is not None:
        sink.append(("baked", value))


SETTLE_MAX = 32  # throwaway graphs settle() instantiates at most
SETTLE_RISE = 1.08  # a reference graph's replay this much slower: the driver has switched
_settled: dict | None = None  # what settle() saw (kept for the benchmarks' JSON)


def _replay_us(graph) -> float:
    """Median device time of ``graph.replay()`` in microseconds (two warm-up runs, seven timed)."""
    from .bench import cuda_time

    return cuda_time(graph.replay, warmup=2, reps=7) * 1e3


def settle(device) -> dict | None:
    """Put this process's CUDA graphs into the state a long-lived process is in, before a benchmark times anything.

    On the CUDA 13 driver measured here (580.159, H100 and H200), every graph of a process replays about 18% slower
    once the process has instantiated a few graphs (the 4th or the 7th in the processes timed): any graph, one
    kernel or thousands, kept or destroyed, the graphs captured before it too; kernels take as long as before, the
    GPU's gaps between a graph's kernels grow (``python scripts/graph_drift.py``; docs/results/README.md, tenth
    session). A server, or a cascade prefill (a graph per chunk key), is past that point within seconds; a short
    benchmark is not, so rows timed before and after it would differ by the count alone. This times a reference
    graph of tiny kernels, then instantiates throwaway graphs (64 tiny kernels each, over a tensor of its own, all
    dropped at the end) until the reference replays ``SETTLE_RISE`` slower (at most ``SETTLE_MAX``), once per
    process, so that every timed row is in the steady
    state whatever ran before it. Returns what it saw (``graphs`` instantiated, reference ``before_us`` /
    ``after_us``, ``switched``), also on later calls; None on CPU or with graphs off."""
    global _settled
    if _settled is not None or not graphs_enabled(device):
        return _settled
    x = torch.zeros(1, device=device)
    x.add_(1)  # (the kernel loaded before any capture)
    torch.cuda.synchronize(device)
    ref = torch.cuda.CUDAGraph()
    with torch.cuda.graph(ref):
        for _ in range(400):
            x.add_(1)
    before = after = _replay_us(ref)
    n, held = 1, []
    while after < before * SETTLE_RISE and n < SETTLE_MAX:
        # each on a tensor of its own (kept alive with its graph until the end), replayed a few times: graphs of
        # one kernel over one shared tensor, replayed once, did not move the driver (an H200, tenth session)
        y = torch.zeros(256, device=device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(64):
                y.add_(1)
        for _ in range(3):
            g.replay()
        held.append((g, y))
        n += 1
        after = _replay_us(ref)
    del held
    _settled = {"graphs": n, "before_us": round(before, 1), "after_us": round(after, 1),
                "switched": after >= before * SETTLE_RISE}
    return _settled


def graphs_enabled(device) -> bool:
    return (torch.device(device).type == "cuda" and os.environ.get("KVCASCADE_CUDA_GRAPHS", "1") != "0"
            and not _FAILED)


def _addresses(layer) -> tuple:
    """Where every buffer of ``layer`` lives: a graph captured on other memory must never be replayed (a freed
    buffer's address can come back for one buffer and not for the others)."""
    if layer._k is None:
        return ()
    own = (layer._k.data_ptr(), layer._v.data_ptr(), layer._pos.data_ptr(), layer._score.data_ptr())
    extra = layer._extra  # (written out: this runs for every layer at every decode step)
    return (tuple(extra),) + own + tuple(b.data_ptr() for b in extra.values()) if extra else ((),) + own


def _is_chunk(toks) -> bool:
    """Whether a step's input is a prompt chunk (``[1, C]`` on the device), not decode tokens (a list of ints, or a
    device tensor ``[rows]``)."""
    return isinstance(toks, torch.Tensor) and toks.dim() == 2


@dataclass
class _Entry:
    graph: object
    logits: torch.Tensor
    after: list  # per layer: (n, seen delta, peak_tokens, peak_bytes, state)
    seen_delta: int
    grow: bool = False  # a padded step (the cache grows by seen_delta per replay) instead of a steady one
    # per layer: the step leaves the policy state as it found it (the cascade's counts once every cascade is full;
    # most policies keep none), so a replay, whose key matched that state, leaves it alone instead of copying
    kept: tuple = ()


class DecodeGraphs:
    """One cache's decode steps: :meth:`step` returns the next-token logits for the token of each row."""

    def __init__(self, cache, model):
        self.cache, self.model = cache, model
        self.enabled = graphs_enabled(model.device)
        self.graphs: dict = {}
        self.seen: dict = {}  # keys seen once (insertion order: the oldest is forgotten first)
        self.tok = {}  # rows -> the input buffer [rows, 1] the graphs read
        self.replays = self.captures = self.eager = 0  # decode steps
        self.chunk_replays = 0  # prompt chunks replayed (their captures and eager runs are not counted)

    # -- host state ----------------------------------------------------------------------------------------
    def _key(self, chunk: int = 1):
        cache = self.cache
        pk = cache.policy.graph_key(cache, chunk)
        if pk is None:
            return None
        from .cache import _padded_ok

        counter = None if cache._seen_dev is None else cache._seen_dev.data_ptr()
        if chunk == 1 and _padded_ok(cache):  # a step that only adds the token: padded, one graph per buffer
            return "grow", pk, tuple((layer.capacity, _addresses(layer)) for layer in cache.layers), counter
        if chunk == 1 and cache.policy.graph_grow:
            return None
        layers = tuple((layer.n, layer.capacity, _addresses(layer), repr(layer.state)) for layer in cache.layers)
        if chunk > 1:  # a prompt chunk: what the policy's prefill step reads beyond the layers (SnapKV: the last
            # chunk; Locret: whether more than its tail remains)
            rest = min(cache.remaining or 0, cache.policy.tail_tokens + 1)
            return "prefill", chunk, cache.final_chunk, rest, pk, layers, counter
        return pk, layers, counter

    def _snapshot(self) -> list:
        return [(layer.n, layer.seen, layer.peak_tokens, layer.peak_bytes, copy.deepcopy(layer.state))
                for layer in self.cache.layers]

    def _restore(self, snap: list) -> None:
        for layer, (n, seen, pt, pb, state) in zip(self.cache.layers, snap):
            layer.n, layer.seen, layer.peak_tokens, layer.peak_bytes, layer.state = n, seen, pt, pb, state

    # -- steps ---------------------------------------------------------------------------------------------
    def _eager(self, toks) -> torch.Tensor:
        if _is_chunk(toks):  # a prompt chunk, on the device already (not counted)
            inp = toks
        else:
            self.eager += 1
            inp = (toks if isinstance(toks, torch.Tensor) else torch.tensor(toks, device=self.model.device)).view(-1, 1)
        return self.cache.forward(self.model, inp, logits_to_keep=1).logits[:, -1]

    def _fill(self, toks) -> torch.Tensor:
        if _is_chunk(toks):  # a prompt chunk [1, C], already on the device
            shape = tuple(toks.shape)
            if shape not in self.tok:
                self.tok[shape] = torch.zeros(shape, dtype=torch.long, device=self.model.device)
            return self.tok[shape].copy_(toks)
        rows = len(toks)
        if rows not in self.tok:
            self.tok[rows] = torch.zeros(rows, 1, dtype=torch.long, device=self.model.device)
        buf = self.tok[rows]
        if isinstance(toks, torch.Tensor):  # tokens on the device: the graphs read them from the same buffer
            buf.copy_(toks.view(rows, 1))
        elif rows == 1:
            buf.fill_(toks[0])
        else:
            buf.copy_(torch.tensor(toks).view(rows, 1), non_blocking=False)
        return buf

    def chunk(self, ids: torch.Tensor) -> torch.Tensor:
        """Run one prompt chunk ``ids`` ``[1, C]`` (on the device) and return the logits of its last token,
        ``[1, vocab]`` (a copy: a replay's output buffer is rewritten by the next replay). A chunk whose key repeats
        (a cache at its budget, chunks of one size, the policy's schedule in the same phase) is replayed like a
        decode step; every other chunk runs eagerly."""
        return self._step(ids).clone()

    def release(self) -> None:
        """Drop the captured graphs and their memory now (a closed session's), not whenever the collector comes."""
        self.graphs.clear()

    def step(self, tok) -> torch.Tensor:
        """Decode one token per row (``tok``: an int, or a list with one per row of a batched cache): the logits of
        the next, ``[vocab]`` for an int, ``[rows, vocab]`` for a list."""
        toks = [tok] if isinstance(tok, int) else list(tok)
        logits = self._step(toks)
        return logits[0] if isinstance(tok, int) else logits

    def step_device(self, tok: torch.Tensor) -> torch.Tensor:
        """Decode one token per row given on the device (``tok``: ``[rows]`` or ``[rows, 1]`` int64, e.g. the argmax
        of the last logits, which the host has not read): the next logits, ``[rows, vocab]``. Nothing waits for the
        device, so the host can read the token while this step runs."""
        return self._step(tok.reshape(-1))

    def _step(self, toks) -> torch.Tensor:
        # toks: a list of ints (one per row), a device tensor [rows] of them, or a prompt chunk [1, C] on the device
        chunk = toks.shape[1] if _is_chunk(toks) else 1
        self.cache.policy.before_step(self.cache, chunk)  # (outside any graph: host numbers to device memory)
        key = self._key(chunk) if self.enabled else None
        if key is not None:
            key = key + (len(toks),)
        if key is None:
            return self._eager(toks)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen:  # captured the second time it is seen: the first run compiled every kernel
                if len(self.seen) >= SEEN_KEYS:
                    self.seen.pop(next(iter(self.seen)))
                self.seen[key] = True
                return self._eager(toks)
            if len(self.graphs) >= MAX_GRAPHS:  # the oldest goes (its buffers were most likely replaced)
                self.graphs.pop(next(iter(self.graphs)))
            entry = self._capture(key, toks)
            if entry is None:
                return self._eager(toks)
        else:
            self._fill(toks)
            if entry.grow and not self.cache.keys_rotated:
                self.cache.sync_slot_counter(self.model.device)  # in place: the slot this replay writes
        entry.graph.replay()
        if chunk > 1:
            self.chunk_replays += 1
        else:
            self.replays += 1
        cache = self.cache  # the host state the replayed step leaves
        kept = entry.kept
        for i, (layer, (n, _, pt, pb, state)) in enumerate(zip(cache.layers, entry.after)):
            layer.seen += entry.seen_delta
            if entry.grow:  # a padded step added its token, whatever the count was
                layer.n += entry.seen_delta
                pt, pb = layer.n, cache.policy.layer_bytes(layer)
            else:
                layer.n = n
                if not kept[i]:
                    layer.state = copy.deepcopy(state)
            layer.peak_tokens, layer.peak_bytes = max(layer.peak_tokens, pt), max(layer.peak_bytes, pb)
        if cache.row_seen is not None:
            cache.row_seen = [r + entry.seen_delta for r in cache.row_seen]
        cache._seen_host = cache._expected_seen()
        return entry.logits[:, -1]

    def _capture(self, key, toks: list[int]):
        from .cache import _pending

        cache = self.cache
        cache.sync_position_counter(self.model.device)  # as the capture will find it: nothing set anew inside
        snap = self._snapshot()
        seen_host, row_seen = cache._seen_host, cache.row_seen
        inp = self._fill(toks)
        graph = torch.cuda.CUDAGraph()
        grow = key[0] == "grow"  # (a prompt chunk's key starts with "prefill")
        if grow and not cache.keys_rotated:
            cache.sync_slot_counter(self.model.device)
        # no garbage collection during the capture: a graph it frees then (another session's, kept in a reference
        # cycle) is destroyed mid-capture, which invalidates the capture (seen on an H100)
        collecting = gc.isenabled()
        gc.disable()
        try:
            torch.cuda.synchronize()
            cache.padded = grow
            with torch.cuda.graph(graph):
                out = cache.forward(self.model, inp, logits_to_keep=1)
        except Exception as e:  # noqa: BLE001 - recorded kernels never ran: restore the host state, run eagerly
            global _FAILED
            _FAILED = True
            cache.padded = False
            _pending.item = None
            self._restore(snap)
            cache._seen_host, cache.row_seen = seen_host, row_seen
            self.enabled = False
            warnings.warn(f"kvcascade: CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly",
                          RuntimeWarning, stacklevel=3)
            return None
        finally:
            if collecting:
                gc.enable()
        cache.padded = False
        after = self._snapshot()
        delta = after[0][1] - snap[0][1]
        self._restore(snap)  # replay() below runs the step; step() then applies `after`
        cache._seen_host, cache.row_seen = seen_host, row_seen
        kept = tuple(repr(a[4]) == repr(b[4]) for a, b in zip(after, snap))  # (the key compares states by repr)
        entry = _Entry(graph, out.logits, after, delta, grow, kept)
        self.graphs[key] = entry
        if key[0] != "prefill":
            self.captures += 1  # decode captures (profile_decode.py waits until they stop)
        return entry
