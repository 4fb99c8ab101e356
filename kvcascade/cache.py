"""The compressed KV cache: a ``transformers`` ``Cache`` whose layers a policy compresses after each chunk.

Storage, per layer (``B`` batch, ``H`` KV heads, ``N`` kept tokens, ``D`` head dim):

* ``keys``   ``[B, H, N, D]`` keys. With in-cache positions (StreamingLLM, the cascade, ...) they are stored
  **without** rotary embedding (un-rotated on arrival), so that a kept token can be given any position later;
  with original positions (``full``, H2O, SnapKV, ...) a token's position never changes, so keys are stored
  as they arrive, rotated (``CompressedCache.keys_rotated``), and the cache is not re-rotated every step;
* ``values`` ``[B, H, N, D]``;
* ``pos``    ``[B, H, N]`` original position of every kept token, increasing along ``N``;
* ``score``  ``[B, H, N]`` float32, the policy's per-token score (accumulated mass, EMA, ...);
* ``state``  per-layer policy state that is not per token (e.g. the cascade's slot counts);
* ``extra``  more per-token float tensors a policy keeps, by name (e.g. the cascade's peak scores).

Tokens of each (batch, head) are kept sorted by original position; a token's *in-cache position* is its
slot index. Different heads may keep different tokens (per-head policies), always the same count.

How it plugs into ``transformers`` 5.x: the attention modules call ``update(k, v, layer_idx)`` with keys
already rotated at the ``position_ids`` the caller passed, then call the registered attention function
``"kvcascade"`` (see :func:`install`). ``update`` only hands the chunk over; the attention function calls
:meth:`CompressedCache.attend`, which rotates the cached keys at their current positions (in-cache positions
only), runs the attention kernel (that also returns per-key attention mass), stores the chunk, and lets the
policy compress the layer. Query positions are what :meth:`next_position_ids` gives (also what a stock model derives from
:meth:`get_seq_length` when no ``position_ids`` are passed): the token's original position for policies
with ``position_mode = "original"``, the next in-cache slot for ``position_mode = "cache"``, so a model never
sees a position past ``budget + chunk`` and a prompt far longer than its window runs.
"""

from __future__ import annotations

import inspect
import os
import threading
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from .errors import KVCascadeError
from .kernels import attention_with_scores
from .models import check_architecture, text_config

ATTN_IMPLEMENTATION = "kvcascade"
EMPTY_POS = -(2 ** 30)  # original position of a slot that holds no token (see CompressedCache.padded)
PAD_WINDOW = 2 ** 30  # a window that hides exactly the EMPTY_POS slots from every real query
ROPE_MEMO = 64  # decode-step rotary tables a cache keeps (never dropped while it lives: a captured graph may read one)
_pending = threading.local()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope` (also undoes an ``attention_scaling`` folded into ``cos``/``sin``)."""
    xf, cf, sf = x.float(), cos.float(), sin.float()
    return ((xf * cf - rotate_half(xf) * sf) / (cf * cf + sf * sf)).to(x.dtype)


@dataclass
class AttnStats:
    """What one attention call tells the policy about the layer it just attended."""

    mass: torch.Tensor | None  # [B, H, N] attention mass per key, summed over the chunk's queries and group heads
    obs: torch.Tensor | None  # [B, H, N] the same over the last `obs_window` queries only
    n_queries: int  # tokens in the chunk (1 while decoding)
    group: int  # query heads per KV head
    phase: str  # "prefill" or "decode"
    final_chunk: bool  # last chunk of the prompt (SnapKV compresses here)


class _Extra:
    """A layer's extra per-token tensors, stored in the layer's preallocated buffers: ``extra[name] = t`` writes
    ``t`` into the buffer in place (so a captured CUDA graph keeps reading the same memory)."""

    def __init__(self, layer):
        self._layer = layer

    def __getitem__(self, name):
        return self._layer._extra[name][:, :, :self._layer.n]

    def get(self, name, default=None):
        return self[name] if name in self._layer._extra else default

    def __contains__(self, name):
        return name in self._layer._extra

    def __setitem__(self, name, t):
        layer = self._layer
        if name not in layer._extra:
            buf = torch.zeros(*layer._k.shape[:2], layer.capacity, dtype=t.dtype, device=t.device)
            layer._extra[name] = buf
        layer._write(layer._extra[name], t)


class LayerCache:
    """Per-layer storage; see the module docstring for the layout.

    Preallocated: ``keys``, ``values``, ``pos``, ``score`` and ``extra`` are views of the first ``n`` slots of
    buffers of ``capacity`` slots, written in place (a chunk is copied in after the kept tokens; compaction gathers
    the kept tokens to the front). Nothing is concatenated per token, and the memory a step touches stays at the
    same addresses, which is what lets a decode step run as a captured CUDA graph. Capacity comes from
    :meth:`reserve` (the engine reserves what the policy can hold at most) and grows by half when exceeded.
    """

    def __init__(self, idx: int, window: int | None):
        self.idx = idx
        self.window = window  # sliding-window size for sliding layers, else None
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._score: torch.Tensor | None = None
        self._extra: dict[str, torch.Tensor] = {}
        self.extra = _Extra(self)  # more per-token tensors [B, H, N] a policy keeps (zero on arrival)
        self.n = 0  # tokens held
        self.capacity = 0
        self._reserve = 0  # slots to allocate at the first append (see reserve)
        self.state: dict = {}
        self.seen = 0  # tokens this layer has received so far
        self.peak_tokens = 0
        self.peak_bytes = 0
        self.token_bytes = 0  # K/V bytes of one token in all rows and heads (set at the first append)
        self.on_compact = None  # a storage layout's hook: on_compact(layer, idx) -> the indices to keep instead
        self.scratch: dict = {}  # buffers drop_one's kernels write through (the cache shares one dict among layers)

    # -- views -------------------------------------------------------------------------------------------
    def _view(self, buf):
        return None if buf is None else buf[:, :, :self.n]

    @property
    def keys(self):
        return self._view(self._k)

    @property
    def values(self):
        return self._view(self._v)

    @property
    def pos(self):
        return self._view(self._pos)

    @property
    def score(self):
        return self._view(self._score)

    @score.setter
    def score(self, t):  # `layer.score += x` lands here with the view itself; anything else is copied in
        self._write(self._score, t)

    def _write(self, buf, t) -> None:
        view = buf[:, :, :self.n]
        if t.data_ptr() == view.data_ptr() and t.shape == view.shape and t.stride() == view.stride():
            return
        view.copy_(t.expand_as(view) if t.shape != view.shape else t)

    # -- sizes -------------------------------------------------------------------------------------------
    @property
    def is_sliding(self) -> bool:
        return self.window is not None

    def __len__(self) -> int:
        return self.n

    def nbytes(self) -> int:
        """K/V bytes of the tokens held (what the policy keeps; :meth:`allocated_bytes` is what is reserved)."""
        if self._k is None:
            return 0
        return 2 * self.n * self._k.shape[0] * self._k.shape[1] * self._k.shape[3] * self._k.element_size()

    def allocated_bytes(self) -> int:
        if self._k is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    # -- storage -----------------------------------------------------------------------------------------
    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` slots (allocated at the first append when nothing is stored yet)."""
        if self._k is None:
            self._reserve = max(self._reserve, int(tokens))
        elif tokens > self.capacity:
            self._grow(int(tokens))

    def _grow(self, cap: int) -> None:
        def bigger(buf):
            new = buf.new_zeros(*buf.shape[:2], cap, *buf.shape[3:])
            if buf is self._pos:
                new.fill_(EMPTY_POS)
            new[:, :, :self.n] = buf[:, :, :self.n]
            return new

        self._k, self._v, self._pos, self._score = (bigger(b) for b in (self._k, self._v, self._pos, self._score))
        self._extra = {name: bigger(b) for name, b in self._extra.items()}
        self.capacity = cap

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None = None) -> None:
        """Add a chunk (keys as the cache stores them) after the held tokens; ``pos`` ``[C]`` or ``[B, C]``: its
        original positions (default: continuing from ``seen``)."""
        B, H, C, D = k.shape
        need = self.n + C
        if self._k is None:
            cap = max(need, self._reserve)
            self._k = k.new_zeros(B, H, cap, D)
            self._v = v.new_zeros(B, H, cap, v.shape[-1])
            self._pos = torch.full((B, H, cap), EMPTY_POS, dtype=torch.long, device=k.device)
            self._score = torch.zeros(B, H, cap, dtype=torch.float32, device=k.device)
            self.capacity = cap
            self.token_bytes = 2 * B * H * D * k.element_size()
        else:
            self._room(C)
        n = self.n
        if pos is None:
            pos = torch.arange(self.seen, self.seen + C, device=k.device)
        self._k[:, :, n:need] = k
        self._v[:, :, n:need] = v
        self._pos[:, :, n:need] = pos.view(-1, 1, C)
        self._score[:, :, n:need].zero_()
        for buf in self._extra.values():
            buf[:, :, n:need].zero_()
        self.n = need
        self.seen += C

    def _room(self, C: int) -> None:
        """Grow the buffers (by half, at least to fit) when ``C`` more tokens would not fit."""
        need = self.n + C
        if need > self.capacity:
            self._grow(max(need, self.capacity + self.capacity // 2))

    def append_rotated(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, cos, sin) -> torch.Tensor:
        """:meth:`append` for keys that arrive rotated (in-cache positions, CUDA, buffers already made): stores them
        un-rotated and returns the keys to attend to, every held key rotated at its slot by ``cos``, ``sin``
        (``[1, >= n + C, D]``) and the chunk's as they came, ``[B, H, n + C, D]``; one Triton kernel
        (:func:`kvcascade.kernels.triton_cache.rope_keys`) for what :func:`unapply_rope`, :meth:`append` and
        :func:`apply_rope` do in ~20. ``pos`` ``[1 | B, C]``: the chunk's original positions."""
        from .kernels import triton_cache

        C = k.shape[2]
        self._room(C)
        n = self.n
        k_all = triton_cache.rope_keys(self._k, k, cos, sin, n + C, n,
                                       store=(self._v, v, self._pos, pos, self._score))
        for buf in self._extra.values():
            buf[:, :, n:n + C].zero_()
        self.n = n + C
        self.seen += C
        return k_all

    def compact(self, idx: torch.Tensor) -> None:
        """Keep the tokens at ``idx`` (``[B, H, K]`` or ``[K]``, increasing along the last axis), in place."""
        if self._k is None:
            return
        if self.on_compact is not None:
            idx = self.on_compact(self, idx)
        B, H, N, D = self.keys.shape
        K = idx.shape[-1]
        bufs = [self._k, self._v, self._pos, self._score, *self._extra.values()]
        if idx.dim() == 1:
            kept = [buf[:, :, :N][:, :, idx] for buf in bufs]
        else:
            idx = idx.expand(B, H, K)
            idx4 = idx.unsqueeze(-1).expand(B, H, K, D)
            kept = [torch.gather(buf[:, :, :N], 2, idx4 if buf.dim() == 4 else idx) for buf in bufs]
        for buf, t in zip(bufs, kept):
            buf[:, :, :K] = t
        if K < N:
            self._pos[:, :, K:N].fill_(EMPTY_POS)  # freed slots hold no token (padded decode attends over them)
        self.n = K

    def keep_last(self, n: int) -> None:
        self.keep_ends(0, n)

    def keep_ends(self, head: int, tail: int) -> None:
        """Keep the first ``head`` and the last ``tail`` tokens (a window, StreamingLLM's sinks + recent, SnapKV's
        prefix + sliding part); one token dropped (a decode step) goes through :meth:`drop_one`."""
        n = self.n
        if head + tail >= n:
            return
        if head + tail == n - 1:
            self.drop_one(victim=head)
            return
        dev = self._k.device  # indices made on the device: a host tensor copied over would sync
        self.compact(torch.cat([torch.arange(head, device=dev), torch.arange(n - tail, n, device=dev)]))

    def keep_top(self, score: torch.Tensor, k: int, hi: int | None = None) -> None:
        """Keep the ``k`` highest ``score`` (``[B, H | 1, n]``), every slot from ``hi`` on protected (the newest);
        one token dropped (a decode step) goes through :meth:`drop_one`, the rest through :func:`keep_indices`."""
        n = self.n
        hi = n if hi is None else max(0, min(hi, n))
        if k == n - 1:
            self.drop_one(score, hi)
            return
        from .policies.base import keep_indices

        self.compact(keep_indices(score, k, self._protect_from(hi)))

    def _protect_from(self, hi: int) -> torch.Tensor | None:
        if hi >= self.n:
            return None
        protect = torch.zeros(self.n, dtype=torch.bool, device=self._k.device)
        protect[hi:].fill_(True)  # (fill_, not = True: no tensor made from host data, as a captured step needs)
        return protect

    def drop_one(self, score: torch.Tensor | None = None, hi: int | None = None, *, victim: int | None = None,
                 width: int = 1, pair: int | torch.Tensor | None = None) -> None:
        """Drop one token from every row and KV head, in place: the first of the lowest ``score`` (``[B, H | 1, n]``)
        among the slots before ``hi`` (the newer ones are protected), or slot ``victim``. What a decode step at the
        budget does; on CUDA two Triton kernels (:mod:`kvcascade.kernels.triton_cache`) instead of a dozen, elsewhere
        (or with a storage hook, or extra per-token tensors) an argmin and :meth:`compact`.

        ``width > 1`` drops ``width`` consecutive slots (the cascade's unit): from ``victim``, or with ``pair`` (the
        cascade's competition) the lower-scored of the units at ``pair`` and ``pair + width`` (a unit scores its
        largest ``score``; the first goes on a tie). ``pair`` may be a device tensor ``[start, fixed]`` (the unit at
        ``start`` goes outright when ``fixed``), which a CUDA graph of the step reads at every replay."""
        n = self.n
        hi = n if hi is None else max(0, min(hi, n))
        if _fused_edits(self):
            from .kernels import triton_cache

            bufs = (self._k, self._v, self._pos, self._score)
            key = tuple((tuple(b.shape), b.dtype) for b in bufs)
            scratch = self.scratch.get(key)
            if scratch is None:
                scratch = self.scratch[key] = tuple(torch.empty_like(b) for b in bufs)
            if isinstance(pair, torch.Tensor):
                how = {"select": score, "sched": pair}
            elif pair is not None:  # the two units' scores, and the first lowest of them
                how = {"select": _unit_pair(score, pair, width), "hi": 2, "base": pair}
            else:
                how = {"select": score, "hi": hi, "victim": victim}
            triton_cache.drop_one(*bufs, scratch, n, empty=EMPTY_POS, width=width, **how)
            self.n = n - width
            return
        if pair is not None:
            sched = isinstance(pair, torch.Tensor)
            start = pair[0] if sched else pair
            two = _unit_pair(score, start, width)
            offer_goes = two[..., :1] > two[..., 1:]  # the incumbent (the first) goes on a tie
            if sched:
                offer_goes &= pair[1] == 0
            start = start + width * offer_goes.long()
        elif victim is not None:
            start = victim
        elif hi > 0:  # the first of the lowest (torch.argmin's choice among equal scores)
            start = score[..., :hi].float().argmin(dim=-1, keepdim=True)
        else:  # nothing to choose from: the first slot (as the kernel)
            start = 0
        ar = torch.arange(n - width, device=self._k.device)
        self.compact(ar + width * (ar >= start).long())


def _unit_pair(score: torch.Tensor, start, width: int) -> torch.Tensor:
    """``[..., 2]``: the largest ``score`` of the units of ``width`` slots at ``start`` and ``start + width``
    (``start`` an int, or a device tensor: indices made on the device)."""
    if isinstance(start, torch.Tensor):
        two = score.index_select(-1, start + torch.arange(2 * width, device=score.device))
    else:
        two = score[..., start:start + 2 * width]
    return two.reshape(*score.shape[:-1], 2, width).amax(-1) if width > 1 else two


def _fused_edits(layer: LayerCache) -> bool:
    """Whether :meth:`LayerCache.drop_one` runs its Triton kernels: CUDA buffers, triton installed, kernels not
    forced to the reference (``KVCASCADE_KERNELS=reference``), no storage hook and no extra per-token tensors."""
    if layer._k is None or layer.on_compact is not None or layer._extra:
        return False
    return _triton_edits(layer._k) and layer._v.shape[-1] == layer._k.shape[-1]


def _fused_rope(layer: LayerCache, keys: torch.Tensor) -> bool:
    """Whether a step with in-cache positions stores and rotates ``layer``'s keys (``keys``: the new ones) with one
    Triton kernel (:meth:`LayerCache.append_rotated`) instead of :func:`unapply_rope`, :meth:`LayerCache.append`
    and :func:`apply_rope`: CUDA, fp16/bf16, the buffers made, values as wide as keys."""
    return (_triton_edits(keys) and keys.dtype in (torch.float16, torch.bfloat16) and layer._k is not None
            and layer._v.shape[-1] == layer._k.shape[-1])


def _triton_edits(t: torch.Tensor) -> bool:
    if not t.is_cuda or os.environ.get("KVCASCADE_KERNELS", "auto") == "reference":
        return False
    from .kernels import TRITON_HEAD_DIMS, _have_triton

    return _have_triton() and t.shape[-1] in TRITON_HEAD_DIMS


class _Rotary:
    """Calls the model's own rotary-embedding module for any positions of any layer."""

    def __init__(self, model):
        base = getattr(model, "model", model)
        self.module = getattr(base, "rotary_emb", None)
        if self.module is None:
            raise KVCascadeError(f"model '{type(model).__name__}' has no rotary embedding module that kvcascade knows")
        self.takes_layer_type = "layer_type" in inspect.signature(self.module.forward).parameters
        self.layer_types = getattr(model.config, "layer_types", None)

    def __call__(self, layer_idx: int, positions: torch.Tensor, like: torch.Tensor):
        """cos, sin of shape ``[B, L, D]`` for ``positions`` ``[B, L]``."""
        if self.takes_layer_type:
            return self.module(like, positions, self.layer_types[layer_idx])
        return self.module(like, positions)


def _layer_windows(config) -> list[int | None]:
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is not None:
        return [window if t == "sliding_attention" and window else None for t in types[:n]]
    if window and getattr(config, "use_sliding_window", True):
        return [window] * n
    return [None] * n


_install_lock = threading.Lock()


def install(model) -> None:
    """Register the ``kvcascade`` attention function and make ``model`` use it.

    Counted per model: several caches may be in use on one model at once (a server interleaving requests), and
    the model gets its own implementation back only when the last of them is released (:func:`restore`)."""
    from transformers import AttentionInterface

    with _install_lock:
        if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
            AttentionInterface.register(ATTN_IMPLEMENTATION, kvcascade_attention)
        users = getattr(model, "_kvcascade_users", 0)
        if users == 0:
            model._kvcascade_previous_attn = model.config._attn_implementation
        model._kvcascade_users = users + 1
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)


def restore(model) -> None:
    """One user of ``model`` is done: with none left, give it back the implementation :func:`install` found."""
    with _install_lock:
        users = max(0, getattr(model, "_kvcascade_users", 1) - 1)
        model._kvcascade_users = users
        previous = getattr(model, "_kvcascade_previous_attn", None)
        if users == 0 and previous and previous != ATTN_IMPLEMENTATION and \
                model.config._attn_implementation == ATTN_IMPLEMENTATION:
            model.set_attn_implementation(previous)


class CompressedCache(Cache):
    """A KV cache compressed by a :class:`~kvcascade.policies.Policy`.

    Creating one switches ``model`` to the ``kvcascade`` attention function (needed for the cache to see every
    layer's attention); :meth:`release` (or leaving a ``with CompressedCache(...) as cache:`` block) gives the
    model back the attention implementation it had. :func:`kvcascade.generate` and the eval harness do this for
    you, so a model comes back from them as it went in. Feed the model with :meth:`forward`, which passes the
    cache under the argument name the installed ``transformers`` takes (``cache`` or ``past_key_values``) and
    the position ids the policy numbers tokens by.
    """

    is_compileable = False

    def __init__(self, model, policy):
        config = text_config(model.config)
        check_architecture(config)
        super().__init__(layers=[])
        self.model_config = model.config
        self._model = model
        install(model)
        self.config = config
        self.policy = policy
        self.rotary = _Rotary(model)
        windows = _layer_windows(config)
        self.layers = [LayerCache(i, w) for i, w in enumerate(windows)]
        scratch: dict = {}
        for layer in self.layers:
            layer.scratch = scratch  # one scratch per buffer shape, whichever layer edits
        self.num_layers = len(self.layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.phase: str | None = None  # set by the engine; inferred from the chunk size when None
        self.final_chunk = True  # the engine clears it for all but the last prompt chunk
        self.remaining: int | None = None  # prompt tokens after the current chunk (set by the engine; None: unknown)
        self.aux: dict = {}  # what a policy's setup attaches to this cache (hooks, heads)
        self._last_ids = None  # (position ids tensor, its first position, original positions) from next_position_ids
        self._seen_dev = None  # original position of the next token, on the device (see next_position_ids)
        self._seen_host = 0  # what the host expects _seen_dev to hold
        self.row_seen: list[int] | None = None  # batched decoding (rows of several prompts): tokens each row has seen
        # padded decode (kvcascade.graphs, for a cache that only grows: `full`): each token is written at its slot
        # (= its original position) through a device index and attends over the whole capacity, the empty slots
        # hidden by their EMPTY_POS position; the step's kernels then do not depend on the token count
        self.padded = False
        self._slot_dev = None  # padded decode with in-cache positions: the slot of the next token, on the device
        self._slot_ids = None
        self._rope_memo: dict = {}  # (layer type, capacity, dtype) -> (cos, sin) of positions 0 .. capacity - 1
        policy.setup(self)
        if policy.position_mode == "cache" and not all(
            policy.layer_budget(i, self.num_layers) == policy.layer_budget(0, self.num_layers)
            for i in range(self.num_layers)
        ):
            raise KVCascadeError(f"policy '{policy.name}': in-cache positions need the same budget in every layer")

    @property
    def keys_rotated(self) -> bool:
        """Original positions never change, so those policies store keys as they arrive (rotated, like a plain
        ``transformers`` cache) and the cache is not re-rotated every step; in-cache positions store keys
        un-rotated and rotate them at attention time."""
        return self.policy.position_mode == "original"

    # -- use -----------------------------------------------------------------------------------------------
    def release(self) -> None:
        """Give the model back the attention implementation it had before this cache switched it."""
        if self._model is not None:
            self.policy.teardown(self)
            restore(self._model)
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def forward(self, model, input_ids, **kwargs):
        """Run ``model`` on ``input_ids`` (``[1, C]``) with this cache at the policy's next positions."""
        from .compat import model_forward

        if self._model is None:
            install(model)  # released before: switch again for this call (release() restores once more)
            self._model = model
        ids = self.next_position_ids(input_ids.shape[1], input_ids.device)
        out = model_forward(model, input_ids, self, ids, **kwargs)
        self.check_handoff()
        return out

    def check_handoff(self) -> None:
        """Raise if a chunk handed over by :meth:`update` never reached the attention function."""
        item = getattr(_pending, "item", None)
        if item is not None and item[0] is self:
            _pending.item = None
            raise KVCascadeError(
                f"layer {item[1]} handed its keys to the kvcascade cache but its attention ran elsewhere (attention "
                f"implementation '{self.model_config._attn_implementation}'); the cache would silently miss tokens. "
                "Run the model through kvcascade.generate or CompressedCache.forward, and do not change the "
                "attention implementation while a CompressedCache is in use")

    # -- transformers Cache API --------------------------------------------------------------------------
    @property
    def is_sliding(self) -> list[bool]:
        return [layer.is_sliding for layer in self.layers]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Hand the chunk to the attention function (which stores it once it has attended).

        Extra arguments (``cache_kwargs`` up to transformers 5.23, ``kwargs=`` from 5.24) are not needed here."""
        self.check_handoff()
        if self.model_config._attn_implementation != ATTN_IMPLEMENTATION:
            raise KVCascadeError(
                f"the model's attention implementation is '{self.model_config._attn_implementation}', not "
                f"'{ATTN_IMPLEMENTATION}': a CompressedCache only works with kvcascade attention (it was switched "
                "back, e.g. by CompressedCache.release() or model.set_attn_implementation)")
        _pending.item = (self, layer_idx, key_states, value_states)
        return key_states, value_states

    def _reference_layer(self) -> LayerCache:
        for layer in self.layers:
            if not layer.is_sliding:
                return layer
        return self.layers[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Position of the next token as the policy numbers them (see :meth:`next_position_ids`)."""
        layer = self._reference_layer()
        return len(layer) if self.policy.position_mode == "cache" else layer.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return len(self.layers[layer_idx]) + query_length, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    @property
    def seen_tokens(self) -> int:
        return self._reference_layer().seen

    def next_position_ids(self, n: int, device=None) -> torch.Tensor:
        """Position ids ``[1, n]`` of the next ``n`` tokens as the policy numbers them; also sets their original
        positions for :meth:`attend`. Original positions come from a counter kept on the device (advanced here,
        in place), so a decode step captured as a CUDA graph numbers every replay's token right."""
        start = self.get_seq_length()
        with torch.inference_mode():  # the counter is an inference tensor, so it is only ever touched under it
            self.sync_position_counter(device)
            orig = self._seen_dev.view(-1, 1) + torch.arange(n, device=device)  # [rows, n]
            self._seen_dev.add_(n)
        self._seen_host = self._expected_seen(n)
        if self.row_seen is not None:
            self.row_seen = [r + n for r in self.row_seen]
        if self.padded and self.policy.position_mode == "cache":  # slots from the device counter (see padded)
            with torch.inference_mode():
                self._slot_ids = self._slot_dev + torch.arange(n, device=device)
                self._slot_dev.add_(n)
            ids = self._slot_ids.unsqueeze(0)
        else:
            ids = orig if self.policy.position_mode == "original" else \
                torch.arange(start, start + n, device=device).unsqueeze(0)
        self._last_ids = (ids, start, orig)  # attend() reads the first position from here: no device-to-host copy
        return ids

    def _expected_seen(self, ahead: int = 0):
        """What the device counter holds once ``ahead`` more tokens are counted (a tuple per row when batched)."""
        if self.row_seen is not None:
            return tuple(r + ahead for r in self.row_seen)
        return self.seen_tokens + ahead

    def sync_position_counter(self, device=None) -> None:
        """Make the device's position counter hold the number of tokens seen (set anew if anything changed it)."""
        seen = self._expected_seen()
        dev = torch.device(device or "cpu")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if self._seen_dev is None or self._seen_dev.device != dev or self._seen_host != seen:
            with torch.inference_mode():
                self._seen_dev = torch.tensor(seen, dtype=torch.long, device=dev)
            self._seen_host = seen

    def sync_slot_counter(self, device=None) -> None:
        """Padded decode with in-cache positions: set the device's slot counter to the tokens held, in place (a
        captured graph keeps reading the same counter)."""
        n = len(self._reference_layer())
        with torch.inference_mode():
            if self._slot_dev is None:
                self._slot_dev = torch.zeros((), dtype=torch.long, device=device)
            self._slot_dev.fill_(n)

    def reserve(self, tokens: int, chunk: int = 0) -> None:
        """Preallocate every layer for ``tokens`` tokens (sliding layers: at most their window + ``chunk``)."""
        for layer in self.layers:
            layer.reserve(min(tokens, layer.window - 1 + chunk) if layer.is_sliding else tokens)

    # -- memory accounting --------------------------------------------------------------------------------
    def kv_tokens(self) -> int:
        return max(len(layer) for layer in self.layers)

    def kv_bytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def kv_tokens_peak(self) -> int:
        return max(layer.peak_tokens for layer in self.layers)

    def kv_bytes_peak(self) -> int:
        """Sum over layers of each layer's largest K/V storage (attention time, chunk included)."""
        return sum(layer.peak_bytes for layer in self.layers)

    # -- the attention step -------------------------------------------------------------------------------
    def _attend_padded(self, layer, query, key_new, value_new, scaling, softcap, orig):
        """One decode token of a layer that evicts nothing this step, written at its slot through a device index;
        attention over every slot, the empty ones hidden (see ``padded``). The slot is the token's original
        position for a cache that never evicted (``full``), else the device slot counter (in-cache positions)."""
        B, H, C, D = key_new.shape
        P = layer.capacity
        fused = False
        if self.keys_rotated:
            slot = orig[0]  # [C]: slot == original position, since nothing was ever evicted
            k_store, k_all = key_new, layer._k[:, :, :P]
        else:
            slot = self._slot_ids
            cos_c, sin_c = self._rope_at(layer, 0, P, key_new)  # every slot's rotation (slot == position)
            fused = _fused_rope(layer, key_new)
            if not fused:
                cos, sin = cos_c[:, slot], sin_c[:, slot]
                k_store = unapply_rope(key_new, cos.unsqueeze(1), sin.unsqueeze(1))
        if not fused:  # (else rope_keys below stores the token)
            layer._k.index_copy_(2, slot, k_store)
            layer._v.index_copy_(2, slot, value_new)
            layer._pos.index_copy_(2, slot, orig.view(-1, 1, C).expand(B, H, C).contiguous())
            layer._score.index_fill_(2, slot, 0.0)
        for buf in layer._extra.values():
            buf.index_fill_(2, slot, 0.0)
        if fused:  # every slot rotated at its slot position, the new key as it came (and stored un-rotated)
            from .kernels import triton_cache

            k_all = triton_cache.rope_keys(layer._k, key_new, cos_c, sin_c, P, slot,
                                           store=(layer._v, value_new, layer._pos, orig, layer._score))
        elif not self.keys_rotated:
            k_all = apply_rope(layer._k[:, :, :P], cos_c.unsqueeze(1), sin_c.unsqueeze(1))
            k_all.index_copy_(2, slot, key_new)
        layer.n += C
        layer.seen += C
        need = self.policy.padded_mass
        out, mass, _ = attention_with_scores(query, k_all, layer._v[:, :, :P], scaling=scaling, softcap=softcap,
                                             q_orig=orig[0], k_orig=layer._pos[:, :, :P], window=PAD_WINDOW,
                                             need_mass=need,
                                             q_weights=self.policy.query_weights(C, query.device) if need else None)
        self.policy.padded_step(self, layer, slot, mass)
        layer.peak_tokens = max(layer.peak_tokens, len(layer))
        layer.peak_bytes = max(layer.peak_bytes, self.policy.layer_bytes(layer))
        return out

    def _key_positions(self, layer: LayerCache, q_pos0: int, orig0, C: int, device) -> torch.Tensor:
        """Rotation positions ``[B, H, N]`` of the layer's stored keys (the chunk's ``C`` last), given the first
        query's position ``q_pos0`` and its original position ``orig0`` (``[rows, 1, 1]``, on the device: no host copy)."""
        if self.policy.position_mode == "cache" and not layer.is_sliding:
            n = len(layer)
            pos = torch.arange(q_pos0 - (n - C), q_pos0 + C, device=device).view(1, 1, -1)
            return pos.expand(layer.pos.shape[0], layer.pos.shape[1], -1)
        return layer.pos + (q_pos0 - orig0)

    def _rope_at(self, layer, start: int, count: int, like):
        """cos, sin ``[1, count, D]`` of positions ``start .. start + count - 1``, as the model's rotary module gives
        them: views of one table of positions ``0 .. capacity - 1`` per layer type. A decode step of a policy with
        in-cache positions rotates its keys at positions ``0 .. n - 1`` in every layer and at every step, so the table
        is made once and kept (at most ``ROPE_MEMO`` of them; never dropped, since a captured CUDA graph may read one;
        none is made inside a capture)."""
        from . import graphs

        P = layer.capacity
        if start < 0 or start + count > P:
            pos = torch.arange(start, start + count, device=like.device).view(1, -1)
            return self.rotary(layer.idx, pos, like)
        layer_type = self.rotary.layer_types[layer.idx] if self.rotary.takes_layer_type else None
        key = (layer_type, P, like.dtype)
        table = self._rope_memo.get(key)
        if table is None:
            table = self.rotary(layer.idx, torch.arange(P, device=like.device).view(1, -1), like)
            if len(self._rope_memo) < ROPE_MEMO and not (like.is_cuda and torch.cuda.is_current_stream_capturing()):
                self._rope_memo[key] = table
        else:
            graphs.baked(("rope", P))
        cos, sin = table
        return cos[:, start:start + count], sin[:, start:start + count]

    def standard_attention(self, layer, query, k_all, v_all, *, q_orig, k_orig, scaling, softcap):
        """``(out, mass, obs)`` of the standard kernels over ``layer``'s keys, with the statistics the policy asks
        for (what :meth:`attend` runs unless the policy has its own attention, which may start from this)."""
        policy = self.policy
        return attention_with_scores(
            query, k_all, v_all, scaling=scaling, softcap=softcap, q_orig=q_orig, k_orig=k_orig, window=layer.window,
            obs_window=policy.obs_window, need_mass=policy.needs_mass,
            q_weights=policy.query_weights(query.shape[2], query.device) if policy.needs_mass else None)

    def attend(self, layer_idx: int, query, key_new, value_new, *, scaling, softcap=None, position_ids=None):
        layer = self.layers[layer_idx]
        if layer._k is not None and layer._k.is_inference() and not torch.is_inference_mode_enabled():
            with torch.inference_mode():  # buffers made under inference mode are only written under it
                out = self._attend(layer, query, key_new, value_new, scaling, softcap, position_ids)
            return out.clone()  # a normal tensor again, for a caller outside inference mode
        return self._attend(layer, query, key_new, value_new, scaling, softcap, position_ids)

    def _attend(self, layer, query, key_new, value_new, scaling, softcap, position_ids):
        layer_idx = layer.idx
        B, H, C, D = key_new.shape
        if position_ids is None:
            position_ids = self.next_position_ids(C, device=query.device)
        last = self._last_ids
        mine = last is not None and last[0] is position_ids and last[2].shape[-1] == C
        orig = last[2] if mine else torch.arange(layer.seen, layer.seen + C, device=query.device).view(1, C)
        if self.padded:
            return self._attend_padded(layer, query, key_new, value_new, scaling, softcap, orig)
        n_cached = len(layer)
        if self.keys_rotated:  # original positions: keys keep the rotation they arrived with
            layer.append(key_new, value_new, orig)
            k_all = layer.keys
        else:  # stored un-rotated; all keys rotated at their current positions, the chunk's as it came
            memo = mine and not layer.is_sliding and self.policy.position_mode == "cache"
            if memo:  # slot j of the n_cached + C sits at position q0 - n_cached + j in every row and head: one table
                n = n_cached + C
                cos_c, sin_c = self._rope_at(layer, last[1] - n_cached, n, key_new)
                if _fused_rope(layer, key_new):  # one kernel
                    k_all = layer.append_rotated(key_new, value_new, orig, cos_c, sin_c)
                else:
                    cos, sin = cos_c[:, n_cached:], sin_c[:, n_cached:]
                    layer.append(unapply_rope(key_new, cos.unsqueeze(1), sin.unsqueeze(1)), value_new, orig)
                    k_all = key_new
                    if n_cached:
                        k_all = apply_rope(layer.keys, cos_c.unsqueeze(1), sin_c.unsqueeze(1))
                        k_all[:, :, n_cached:] = key_new
            else:
                q_pos = position_ids[0].to(query.device)
                cos, sin = self.rotary(layer_idx, q_pos.view(1, -1), key_new)
                layer.append(unapply_rope(key_new, cos.unsqueeze(1), sin.unsqueeze(1)), value_new, orig)
                k_all = key_new
                if n_cached:
                    q0 = last[1] if mine else int(q_pos[0])
                    rot_pos = self._key_positions(layer, q0, orig[:, :1].unsqueeze(-1), C, query.device)
                    cos_c, sin_c = self.rotary(layer_idx, rot_pos.reshape(B, -1), key_new)
                    k_all = apply_rope(layer.keys, cos_c.view(B, H, -1, D), sin_c.view(B, H, -1, D))
                    k_all[:, :, n_cached:] = key_new
        v_all, k_orig, q_orig = layer.values, layer.pos, orig[0]  # (rows share the query slots; windows: one row)
        policy = self.policy
        custom = policy.attention(self, layer, query, k_all, v_all, q_orig=q_orig, k_orig=k_orig, scaling=scaling,
                                  softcap=softcap)
        if custom is not None:
            out, mass, obs = custom
        else:
            out, mass, obs = self.standard_attention(layer, query, k_all, v_all, q_orig=q_orig, k_orig=k_orig,
                                                     scaling=scaling, softcap=softcap)
        layer.peak_tokens = max(layer.peak_tokens, len(layer))
        layer.peak_bytes = max(layer.peak_bytes, policy.layer_bytes(layer))
        phase = self.phase or ("prefill" if C > 1 else "decode")
        stats = AttnStats(mass, obs, C, query.shape[1] // H, phase, self.final_chunk)
        if layer.is_sliding:
            limit = layer.window - 1
            b = policy.layer_budget(layer_idx, self.num_layers)
            layer.keep_last(min(limit, b) if b else limit)
        else:
            policy.step(self, layer, stats)
        return out


def _padded_ok(cache) -> bool:
    """Whether the next decode step can run padded: one row, no sliding-window layers, room for one more token in
    every layer, a policy that evicts nothing at that step (:meth:`~kvcascade.policies.Policy.grows_next`), and
    the slot known on the device (original positions: nothing ever evicted, so slot == position; in-cache
    positions: every layer at the same count, the slot counter's)."""
    policy, layers = cache.policy, cache.layers
    if cache.row_seen is not None or any(layer.is_sliding or layer._k is None for layer in layers):
        return False
    if not all(layer.n + 1 <= layer.capacity and policy.grows_next(cache, layer) for layer in layers):
        return False
    if cache.keys_rotated:
        return all(layer.n == layer.seen for layer in layers)
    return all(layer.n == layers[0].n for layer in layers)


def kvcascade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                        softcap=None, **kwargs):
    """The attention function registered as ``"kvcascade"`` in ``transformers``.

    With a :class:`CompressedCache` it delegates to :meth:`CompressedCache.attend`; with any other cache (or
    none) it computes plain causal attention with the reference kernel, so the model stays usable.
    Returns ``(out [B, C, Hq, D], None)`` like the other ``transformers`` attention functions.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    item = getattr(_pending, "item", None)
    _pending.item = None
    if item is not None and not (item[1] == module.layer_idx and item[2] is key):
        raise KVCascadeError(f"kvcascade attention of layer {module.layer_idx} got keys that are not the ones layer "
                             f"{item[1]} handed to its CompressedCache: the model's attention does not follow the "
                             "cache protocol kvcascade knows (unsupported model or transformers release)")
    if item is not None:
        cache = item[0]
        out = cache.attend(module.layer_idx, query, key, value, scaling=scaling, softcap=softcap,
                           position_ids=kwargs.get("position_ids"))
    else:
        if attention_mask is not None and attention_mask.dtype == torch.bool and not attention_mask.all():
            raise KVCascadeError("kvcascade attention does not take padding masks; run prompts one at a time")
        C, N = query.shape[2], key.shape[2]
        pos = torch.arange(N, device=query.device)
        out, _, _ = attention_with_scores(
            query, key, value, scaling=scaling, softcap=softcap, q_orig=pos[N - C:],
            k_orig=pos.view(1, 1, N).expand(key.shape[0], key.shape[1], N), window=sliding_window,
            need_mass=False,
        )
    return out.transpose(1, 2).contiguous(), None
