"""The inference loop: chunked prefill under a cache policy, then decoding.

One engine owns the loop: it feeds the prompt in chunks of ``chunk_size`` tokens, gives each chunk its
position ids (original or in-cache, as the policy numbers them), lets the policy compress after every chunk
and every decoded token, and measures time and KV memory. Policies never run the model; the model never
knows which policy is active.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from .cache import CompressedCache
from .errors import KVCascadeError
from .graphs import DecodeGraphs
from .policies import Policy, make_policy


@dataclass
class GenerationResult:
    """Answer text plus what it cost."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    kv_tokens_peak: int  # most tokens one layer held per KV head (chunk included, at attention time)
    kv_bytes_peak: int  # sum over layers of each layer's largest K/V storage
    kv_bytes_full: int  # K/V bytes a full cache would hold for the same tokens
    prefill_s: float
    decode_s: float
    policy: str
    params: dict = field(default_factory=dict)
    finish_reason: str = ""  # "stop" (EOS or a stop string) or "length" (max_new_tokens)
    decode_graph_steps: int = 0  # decode steps replayed as a CUDA graph (see kvcascade.graphs)
    decode_batch: int = 1  # most prompts decoded together with this one (generate with a list of prompts)
    # median wall time of one decode step (sampling included): the steady rate, without the first steps' compiles
    # and CUDA graph captures that decode_s counts (0.0 with fewer than two decoded tokens)
    decode_step_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return ids


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(-1)
        sorted_p[(cum - sorted_p) > top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def _full_cache_bytes(cache: CompressedCache, tokens: int) -> int:
    total = 0
    for layer in cache.layers:
        held = min(tokens, layer.window - 1) if layer.is_sliding else tokens
        total += layer.token_bytes * held
    return total


def tokenize(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise KVCascadeError("the prompt is empty")
        ids = tokenizer(prompt).input_ids
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise KVCascadeError("the prompt is empty")
    return ids


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def chunk_bounds(n: int, chunk_size: int, last_min: int = 0, tail: int = 0) -> list[tuple[int, int]]:
    """``(start, end)`` of each prefill chunk of an ``n``-token prompt.

    Chunks hold ``chunk_size`` tokens, except that the last one holds at least ``min(last_min, n)`` (the chunk
    before it is cut short instead): a policy that scores the prefix by the attention of the prompt's last
    ``obs_window`` queries (SnapKV) needs all of them in the final chunk. With ``tail``, the last ``tail``
    tokens are a chunk of their own (Locret's question tail, run after the eviction chunks).
    """
    if 0 < tail < n:
        return chunk_bounds(n - tail, chunk_size, last_min) + [(n - tail, n)]
    bounds = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    need = min(last_min, n)
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < need:
        cut = n - need
        bounds = [(s, min(e, cut)) for s, e in bounds if s < cut] + [(cut, n)]
    return bounds


def _warn_past_window(model, policy: Policy, tokens: int) -> None:
    """Warn (once per policy and window in a process) when original positions run past the model's window."""
    from .models import model_window

    window = model_window(model.config)
    if policy.position_mode != "original" or not window or tokens <= window:
        return
    key = (policy.name, window)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"policy '{policy.name}' gives tokens their original positions, and this prompt ({tokens:,} tokens) runs past "
        f"the model's window ({window:,}): the model never saw such positions in training, so expect worse answers "
        "(in-cache positions keep them inside the window: window, streaming, cascade, or positions=cache for h2o/tova)",
        PastWindowWarning, stacklevel=3)


class PastWindowWarning(UserWarning):
    """A policy with original positions runs a prompt longer than the model's trained window."""


_WARNED: set = set()


@torch.inference_mode()
def iter_prefill(model, cache: CompressedCache, ids: list[int], chunk_size: int, *, all_logits: bool = False,
                 progress: bool = False, desc: str = "prefill", graphs: DecodeGraphs | None = None):
    """Feed ``ids`` through ``model`` in chunks under ``cache``; yield ``(start, logits)`` per chunk.

    ``logits`` is ``[C, vocab]`` for every token of the chunk with ``all_logits`` (perplexity), else ``[1, vocab]``
    for its last token. The cache is told which chunk is the prompt's last (SnapKV compresses there). With
    ``graphs`` (and not ``all_logits``), a chunk whose step repeats (a cache at its budget) is replayed as a CUDA
    graph (:meth:`kvcascade.graphs.DecodeGraphs.chunk`): a long prompt's chunks are launch-bound like decode steps.
    """
    device = model.device
    bar = None
    if progress and len(ids) > chunk_size:
        from .progress import progress_bar

        bar = progress_bar(total=len(ids), desc=desc, unit="tok", unit_scale=True)
    cache.phase = "prefill"
    tokens = torch.tensor(ids, device=device)
    _warn_past_window(model, cache.policy, len(ids))
    for start, end in chunk_bounds(len(ids), chunk_size, cache.policy.obs_window, cache.policy.tail_tokens):
        chunk = tokens[start:end].view(1, -1)
        cache.final_chunk = end >= len(ids)
        cache.remaining = len(ids) - end
        if graphs is not None and not all_logits and chunk.shape[1] > 1:
            logits = graphs.chunk(chunk)
        else:
            logits = cache.forward(model, chunk, logits_to_keep=0 if all_logits else 1).logits[0]
        if bar is not None:
            bar.update(chunk.shape[1])
        yield start, logits
    if bar is not None:
        bar.close()


def prefill(model, cache: CompressedCache, ids: list[int], chunk_size: int, progress: bool = False,
            desc: str = "prefill") -> torch.Tensor:
    """Feed ``ids`` through ``model`` in chunks; return the logits of the last token."""
    logits = None
    for _, logits in iter_prefill(model, cache, ids, chunk_size, progress=progress, desc=desc):
        pass
    return logits[-1]


class StreamDecoder:
    """Turns new token ids into text pieces as they become final, for ``on_token``.

    Only a short window of recent ids is decoded per token (not the whole answer), and a character whose bytes
    are split across tokens is held back until it is complete, so no piece ever carries a U+FFFD that the final
    text does not have. The pieces joined equal the final text (:meth:`finish` flushes what is held back).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids before this one are final and only give context
        self.read = 0  # ids before this one have been emitted
        self.emitted: list[str] = []

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd") or not text.startswith(before):
            return ""
        piece = text[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.emitted.append(piece)
        return piece

    def finish(self) -> str:
        """The rest of the text (held-back bytes that never completed a character, as the tokenizer decodes them)."""
        text = self._decode(self.ids)
        done = "".join(self.emitted)
        rest = text[len(done):] if text.startswith(done) else ""
        if rest:
            self.emitted.append(rest)
        return rest


def _generate_one(model, tokenizer, prompt, policy: Policy, max_new_tokens: int, chunk_size: int,
                  temperature: float, top_p: float, seed: int | None, stop_on_eos: bool, on_token, progress: bool,
                  stop=()):
    session = Session(model, tokenizer, tokenize(tokenizer, prompt), policy, max_new_tokens=max_new_tokens,
                      chunk_size=chunk_size, temperature=temperature, top_p=top_p, seed=seed,
                      stop_on_eos=stop_on_eos, stop=stop, on_token=on_token, progress=progress)
    try:
        while not session.step():
            pass
        return session.result()
    finally:
        session.close()  # the model gets its attention implementation back


def run_ahead_enabled() -> bool:
    """Whether greedy decoding on CUDA with graphs runs one step ahead (:meth:`Session._step_ahead`): yes unless
    ``KVCASCADE_RUN_AHEAD=0``."""
    return os.environ.get("KVCASCADE_RUN_AHEAD", "1") != "0"


class Session:
    """One prompt's generation as a sequence of steps: each :meth:`step` runs one prefill chunk or decodes one
    token, so a caller can interleave several sessions on one model (the server does) or run one to the end
    (:func:`generate`). Greedy or nucleus sampling, EOS, ``stop`` strings (the text ends before the first one; a
    piece that could be the start of a stop string is held back until it is not), streaming through
    ``on_token(piece)``. :meth:`close` releases the cache (also when abandoned half-way).
    """

    def __init__(self, model, tokenizer, ids: list[int], policy: Policy, *, max_new_tokens: int = 64,
                 chunk_size: int = 512, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop_on_eos: bool = True, stop=(), on_token=None, progress: bool = False):
        self.model, self.tokenizer, self.ids, self.policy = model, tokenizer, ids, policy
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.stop = [s for s in (stop or ()) if s]
        self.on_token = on_token
        self.device = model.device
        self.gen = None
        if temperature > 0:
            self.gen = torch.Generator(device=self.device)
            self.gen.manual_seed(0 if seed is None else seed)
        self.eos = _eos_ids(model, tokenizer) if stop_on_eos else set()
        self.cache = CompressedCache(model, policy)
        # preallocate what the policy can hold at most: the cache's buffers are written in place from here on
        self.cache.reserve(policy.max_tokens(len(ids), max_new_tokens, chunk_size, self.cache.num_layers), chunk_size)
        self.graphs = DecodeGraphs(self.cache, model)  # decode steps replayed as CUDA graphs where they repeat
        self._prefill = iter_prefill(model, self.cache, ids, chunk_size, progress=progress, graphs=self.graphs)
        self.logits = None
        self.new: list[int] = []
        self.stream = StreamDecoder(tokenizer)
        self.text = ""  # decoded so far (before stop handling)
        self.sent = 0  # characters of self.text handed to on_token
        self.done = False
        self.finish_reason: str | None = None
        self.t0 = self.t1 = self.t2 = None
        self.marks: list[float] = []  # when each decoded token was taken (decode_step_s)
        self.batch_rows = 1  # most rows of a BatchDecoder this session was decoded in
        self.batch_replays = 0  # its steps there replayed as a CUDA graph
        # greedy decoding on a GPU can run ahead: the token is fed to the next step on the device (its argmax) and
        # the host reads it while that step runs, so the host's work between steps (sampling, text, the next launch)
        # no longer leaves the GPU idle. A step launched for a token that then ends the answer is not counted.
        # On unless KVCASCADE_RUN_AHEAD=0: on an H100 it closed the GPU's idle time between replayed steps from 100-300
        # to 22-27 us (docs/results/README.md, ninth session).
        self.pipelined = temperature <= 0 and self.device.type == "cuda" and self.graphs.enabled and run_ahead_enabled()
        self._tok_host = None  # pinned [2] buffer the tokens are read into (CUDA), and the events that say they arrived
        self._tok_ready = None
        self._ahead = None  # running ahead: the next token on the device and its slot in _tok_host
        self._stats = None  # _numbers() before a step launched ahead (None once its token is taken)

    # -- steps ---------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one prefill chunk or decode one token; return True when the session has finished."""
        if self.done:
            return True
        with torch.inference_mode():
            if self.t1 is None:
                if self.t0 is None:
                    _sync(self.device)
                    self.t0 = time.perf_counter()
                try:
                    _, logits = next(self._prefill)
                    self.logits = logits[-1]
                    return False
                except StopIteration:
                    _sync(self.device)
                    self.t1 = time.perf_counter()
                    self.cache.phase = "decode"
                    self.cache.final_chunk = True
                    self.cache.remaining = 0
                    if self.max_new_tokens == 0:
                        return self._finish("length")
            if self.pipelined:
                return self._step_ahead()
            tok = self._take()
            if tok is None:
                return True
            self.logits = self.graphs.step(tok)
            return False

    def _step_ahead(self) -> bool:
        """A greedy decode step, run ahead: the next step is launched with the argmax of ``self.logits`` still on
        the device, and the host reads that token while the step runs. The same tokens as :meth:`step`'s other path
        (tests/test_engine.py); a step launched for a token that ends the answer is left out of :meth:`result`.

        Each step's argmax, its copy to the host and an event are queued right behind the step's launch (the token
        is read at the next call, from the other of two pinned slots): the order of the graph-level loop that ran at
        the rate of replays back to back on an H200, where launching the step last before the wait left a cascade
        token at 3.1 ms in a session against 2.64 ms (docs/results/README.md, eighth and ninth sessions)."""
        if self._tok_host is None:
            cuda = self.device.type == "cuda"
            self._tok_host = torch.empty(2, dtype=torch.long, pin_memory=cuda)
            self._tok_ready = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None
        if self._ahead is None:  # the first decode step: the prompt's last logits
            self._ahead = self._queue_token(self.logits, 0)
        tok_dev, slot = self._ahead
        nxt = None
        if len(self.new) + 1 < self.max_new_tokens:  # else this token is the last one: nothing to run ahead
            self._stats = self._numbers()
            nxt = self.graphs.step_device(tok_dev)[0]
            self._ahead = self._queue_token(nxt, 1 - slot)
        if self._tok_ready is not None:
            self._tok_ready[slot].synchronize()  # this token only, not the step launched after it
        tok = self._take(int(self._tok_host[slot]))
        if tok is None:
            return True
        self.logits = nxt
        self._stats = None
        return False

    def _queue_token(self, logits: torch.Tensor, slot: int) -> tuple:
        """The argmax of ``logits`` on the device, queued with its copy into pinned slot ``slot`` and that slot's
        event: ``(token on the device, slot)``."""
        tok_dev = logits.argmax(-1, keepdim=True)  # [1]
        self._tok_host[slot:slot + 1].copy_(tok_dev, non_blocking=True)
        if self._tok_ready is not None:
            self._tok_ready[slot].record()
        return tok_dev, slot

    @property
    def decoding(self) -> bool:
        """Prefill done, not finished: the next step decodes a token."""
        return self.t1 is not None and not self.done

    def _take(self, tok: int | None = None) -> int | None:
        """The next token (sampled from the last logits unless given): recorded and checked against EOS, the stop
        strings and the length limit. Returns the token to feed the model, or None when the session has finished."""
        if tok is None:
            tok = _sample(self.logits, self.temperature, self.top_p, self.gen)
        self.marks.append(time.perf_counter())
        if tok in self.eos:
            self._finish("stop")
            return None
        self.new.append(tok)
        self.text += self.stream.push(tok)
        if self._check_stop():
            return None
        if len(self.new) >= self.max_new_tokens:
            self._finish("length")
            return None
        return tok

    def _cut_at_stop(self) -> bool:
        """End the text before the earliest stop string in it; True if there was one."""
        hits = [at for at in (self.text.find(s) for s in self.stop) if at >= 0]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def _check_stop(self) -> bool:
        if self._cut_at_stop():
            return self._finish("stop", flushed=True)
        # hand over what can no longer turn into a stop string
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = len(self.text)
        for k in range(1, hold + 1):
            if any(s.startswith(self.text[-k:]) for s in self.stop if len(self.text) >= k):
                safe = len(self.text) - k
        self._emit(safe)
        return False

    def _emit(self, upto: int) -> None:
        if self.on_token is not None and upto > self.sent:
            self.on_token(self.text[self.sent:upto])
        self.sent = max(self.sent, upto)

    def _finish(self, reason: str, flushed: bool = False) -> bool:
        if not flushed:
            self.text += self.stream.finish()
            if self._cut_at_stop():  # the flushed tail may complete a stop string
                reason = "stop"
        self._emit(len(self.text))
        _sync(self.device)
        # (a step run ahead for the ending token is not decode time: the answer ended when that token was read)
        self.t2 = self.marks[-1] if self._stats is not None and self.marks else time.perf_counter()
        if self.t1 is None:
            self.t1 = self.t2
        self.done = True
        self.finish_reason = reason
        return True

    # -- results -------------------------------------------------------------------------------------------
    def _numbers(self) -> tuple:
        """What :meth:`result` reports of the cache and the graphs: KV tokens and bytes at peak, tokens seen, replays."""
        cache = self.cache
        return cache.kv_tokens_peak(), cache.kv_bytes_peak(), cache.seen_tokens, self.graphs.replays

    def result(self) -> GenerationResult:
        cache = self.cache
        # (a step run ahead for the token that ended the answer is not part of it)
        peak_tokens, peak_bytes, seen, replays = self._stats or self._numbers()
        return GenerationResult(
            text=self.text if self.stop else self.tokenizer.decode(self.new, skip_special_tokens=True),
            token_ids=self.new,
            prompt_tokens=len(self.ids),
            new_tokens=len(self.new),
            kv_tokens_peak=peak_tokens,
            kv_bytes_peak=peak_bytes,
            kv_bytes_full=_full_cache_bytes(cache, seen),
            prefill_s=(self.t1 or 0.0) - (self.t0 or 0.0),
            decode_s=(self.t2 or 0.0) - (self.t1 or 0.0),
            policy=self.policy.name,
            params=self.policy.params(),
            finish_reason=self.finish_reason or "",
            decode_graph_steps=replays + self.batch_replays,
            decode_batch=self.batch_rows,
            decode_step_s=statistics.median(b - a for a, b in zip(self.marks, self.marks[1:])) if len(self.marks) > 1
            else 0.0,
        )

    def close(self) -> None:
        self._prefill.close()
        self.cache.release()
        self.graphs.release()


class BatchDecoder:
    """Decodes several sessions together: one forward of the model per step for all of them.

    Sessions join once their prefill is done (:meth:`add`); their caches become rows of one batched cache (copied
    once), and each step samples every row's token, lets finished sessions leave (their rows are dropped), and runs
    one forward for the rest (replayed as a CUDA graph where the step repeats, like a single session's). Rows must
    be alike (:meth:`compatible`): the same policy and parameters, a policy whose step depends only on the cache's
    token counts (``graph_safe``), no sliding-window layers, and every layer holding as many tokens in each row
    (the steady state of a bounded policy once the prompts are at least the budget). The answers are those of
    decoding each session alone (up to floating-point reassociation in the batched matrix products).
    """

    def __init__(self, model):
        self.model = model
        self.sessions: list[Session] = []
        self.cache: CompressedCache | None = None
        self.graphs: DecodeGraphs | None = None
        self.policy = None

    def compatible(self, session: Session) -> bool:
        c = session.cache
        if not (session.decoding and session.policy.graph_safe and session.policy.batchable
                and session.model is self.model
                and not any(layer.is_sliding for layer in c.layers)
                and all(layer._k is not None for layer in c.layers)):
            return False
        if self.cache is None:
            return True
        return (type(session.policy) is type(self.policy) and session.policy.params() == self.policy.params()
                and all(a.n == b.n and repr(a.state) == repr(b.state) and set(a._extra) == set(b._extra)
                        and a._k.dtype == b._k.dtype for a, b in zip(self.cache.layers, c.layers)))

    def add(self, session: Session) -> None:
        """Make ``session`` (decoding, :meth:`compatible`) a row of the batch."""
        own = session.cache
        if self.cache is None:
            self.policy = session.policy
            self.cache = CompressedCache(self.model, session.policy)
            self.cache.phase, self.cache.final_chunk, self.cache.remaining = "decode", True, 0
            self.cache.row_seen = []
            self.graphs = DecodeGraphs(self.cache, self.model)
        cache = self.cache
        first = not self.sessions

        def stack(b, o, n, cap):
            new = o.new_zeros(((0 if first else b.shape[0]) + o.shape[0], *o.shape[1:2], cap, *o.shape[3:]))
            if not first:
                new[:b.shape[0], :, :n] = b[:, :, :n]
            new[new.shape[0] - o.shape[0]:, :, :n] = o[:, :, :n]
            return new

        merged = []  # every layer's new buffers first, so that a failure (no memory) leaves the batch as it was
        for bl, ol in zip(cache.layers, own.layers):
            n, cap = ol.n, max(bl.capacity, ol.capacity, ol.n + 1)
            bufs = [stack(getattr(bl, a), getattr(ol, a), n, cap) for a in ("_k", "_v", "_pos", "_score")]
            merged.append((n, cap, bufs, {name: stack(bl._extra.get(name), t, n, cap) for name, t in ol._extra.items()}))
        for bl, ol, (n, cap, bufs, extra) in zip(cache.layers, own.layers, merged):
            bl._k, bl._v, bl._pos, bl._score = bufs
            bl._extra = extra
            bl.n, bl.capacity = n, cap
            bl.token_bytes = (0 if first else bl.token_bytes) + ol.token_bytes
            bl.seen = max(bl.seen, ol.seen)
            bl.state = copy.deepcopy(ol.state)
            bl.peak_tokens = max(bl.peak_tokens, n + 1)
            # the session keeps its counters for its result; its own buffers are freed
            ol._k = ol._v = ol._pos = ol._score = None
            ol._extra = {}
        cache.row_seen = cache.row_seen + [own.seen_tokens]
        own.release()
        self.sessions.append(session)

    def _drop(self, rows: list[int]) -> None:
        keep = [i for i in range(len(self.sessions)) if i not in rows]
        self.sessions = [self.sessions[i] for i in keep]
        if not keep:
            self.cache.release()
            self.cache = self.graphs = self.policy = None
            return
        idx = torch.tensor(keep, device=self.cache.layers[0]._k.device)
        for layer in self.cache.layers:
            per_row = layer.token_bytes // layer._k.shape[0]
            layer._k, layer._v = layer._k.index_select(0, idx), layer._v.index_select(0, idx)
            layer._pos, layer._score = layer._pos.index_select(0, idx), layer._score.index_select(0, idx)
            layer._extra = {name: t.index_select(0, idx) for name, t in layer._extra.items()}
            layer.token_bytes = per_row * len(keep)
        self.cache.row_seen = [self.cache.row_seen[i] for i in keep]

    def remove(self, session: Session) -> None:
        """Take ``session`` out of the batch (a cancelled request); its row is dropped."""
        if session in self.sessions:
            self._drop([self.sessions.index(session)])

    def step(self) -> list[Session]:
        """Decode one token for every row; return the sessions that finished (and left the batch)."""
        rows = self.sessions
        greedy = [i for i, s in enumerate(rows) if s.temperature <= 0]
        picks = {}
        if greedy:
            with torch.inference_mode():
                best = torch.stack([rows[i].logits for i in greedy]).argmax(-1).tolist()  # one sync for all
            picks = dict(zip(greedy, best))
        toks = [s._take(picks.get(i)) for i, s in enumerate(rows)]
        done = [i for i, t in enumerate(toks) if t is None]
        finished = [rows[i] for i in done]
        if done:
            self._drop(done)
            toks = [t for t in toks if t is not None]
        if not self.sessions:
            return finished
        for s in self.sessions:  # what each row holds while this token attends, for its own result
            for bl, ol in zip(self.cache.layers, s.cache.layers):
                ol.peak_tokens = max(ol.peak_tokens, bl.n + 1)
                ol.peak_bytes = max(ol.peak_bytes, (bl.n + 1) * ol.token_bytes)
                ol.seen += 1
        with torch.inference_mode():
            before = self.graphs.replays
            logits = self.graphs.step(toks)
            replayed = self.graphs.replays - before
        for s, row in zip(self.sessions, logits):
            s.logits = row
            s.batch_rows = max(s.batch_rows, len(self.sessions))
            s.batch_replays += replayed
        return finished

    def close(self) -> None:
        if self.cache is not None:
            self.cache.release()
            self.cache = self.graphs = None


def with_query(prompt: str, query: str) -> str:
    """The query-aware prompt (Locret-Q): the question before the context, the prompt as it was after it."""
    return query.strip() + "\n\n" + prompt


def check_generation_args(max_new_tokens: int = 64, chunk_size: int = 512, temperature: float = 0.0,
                          top_p: float = 1.0) -> None:
    """Raise :class:`KVCascadeError` for generation settings that cannot work (before any model is loaded)."""
    if chunk_size is None or int(chunk_size) <= 0:
        raise KVCascadeError(f"chunk_size must be a positive number of tokens, got {chunk_size!r}")
    if max_new_tokens < 0:
        raise KVCascadeError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:  # also refuses NaN
        raise KVCascadeError(f"top_p must be in (0, 1], got {top_p}")
    if not (temperature >= 0.0 and math.isfinite(temperature)):  # refuses NaN, inf and negatives
        raise KVCascadeError(f"temperature must be a finite number >= 0, got {temperature}")


def generate(model, tokenizer, prompt, policy: str | Policy = "streaming", budget: int | None = None,
             policy_args: dict | None = None, max_new_tokens: int = 64, chunk_size: int = 512,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop_on_eos: bool = True,
             on_token=None, progress: bool = False, query: str | None = None, stop=None):
    """Generate a continuation of ``prompt`` under a compressed KV cache.

    ``prompt``: text, a list of token ids, or a list of texts or of token-id lists (a batch: one result per prompt,
    in order).
    ``policy``: a registry name (``budget`` and ``policy_args`` are its parameters) or a
    :class:`~kvcascade.policies.Policy`. Greedy unless ``temperature > 0`` (then nucleus sampling with
    ``top_p``, seeded by ``seed``). ``on_token(piece)`` receives the text of each new token as it comes.
    ``stop``: a string or strings; the answer ends before the first one (``finish_reason`` "stop").
    Returns a :class:`GenerationResult` (or a list of them for a batch).

    ``query`` (query-aware mode, Locret-Q in the Locret paper): the question, placed *before* the context as
    well, so a policy that decides during prefill (Locret, H2O, TOVA, the cascade, chunked SnapKV) already
    knows what will be asked while it evicts; the prompt is sent as ``query + "\n\n" + prompt`` (the prompt
    keeps its own question at the end). Works with every policy; costs the query's tokens once more.

    A batch: each prompt is prefilled on its own (one cache each), then the prompts whose caches are alike (the same
    token count in every layer: a bounded policy once each prompt is at least its budget) are decoded together,
    one forward per step (:class:`BatchDecoder`); any other prompt is decoded on its own right after its prefill.
    The answers are those of one prompt at a time (up to floating-point reassociation in the batched products).
    With ``on_token`` the prompts run one after another (so the pieces arrive prompt by prompt).
    """
    check_generation_args(max_new_tokens, chunk_size, temperature, top_p)
    pol = make_policy(policy, budget, **(policy_args or {}))
    batch = isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (str, list, tuple))
    prompts = list(prompt) if batch else [prompt]
    if query is not None:
        if not isinstance(query, str) or not query.strip():
            raise KVCascadeError("the query is empty")
        if not all(isinstance(p, str) for p in prompts):
            raise KVCascadeError("query= needs text prompts (not token ids)")
        prompts = [with_query(p, query) for p in prompts]
    stops = [stop] if isinstance(stop, str) else (stop or ())
    if not batch or len(prompts) < 2 or on_token is not None:
        results = [_generate_one(model, tokenizer, p, pol, max_new_tokens, int(chunk_size), temperature, top_p, seed,
                                 stop_on_eos, on_token, progress, stop=stops) for p in prompts]
        return results if batch else results[0]
    return _generate_batch(model, tokenizer, prompts, pol, max_new_tokens, int(chunk_size), temperature, top_p, seed,
                           stop_on_eos, progress, stops)


def _generate_batch(model, tokenizer, prompts, policy, max_new_tokens, chunk_size, temperature, top_p, seed,
                    stop_on_eos, progress, stop):
    sessions = [Session(model, tokenizer, tokenize(tokenizer, p), policy, max_new_tokens=max_new_tokens,
                        chunk_size=chunk_size, temperature=temperature, top_p=top_p, seed=seed,
                        stop_on_eos=stop_on_eos, stop=stop, progress=progress) for p in prompts]
    batch = BatchDecoder(model)
    try:
        for s in sessions:
            while s.t1 is None and not s.step():  # prefill
                pass
            if batch.compatible(s):
                batch.add(s)
            else:  # decoded alone, now, so that caches that cannot join never pile up
                while not s.step():
                    pass
        while batch.sessions:
            batch.step()
        return [s.result() for s in sessions]
    finally:
        batch.close()
        for s in sessions:
            s.close()
