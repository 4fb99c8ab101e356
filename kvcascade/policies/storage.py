"""Storage layouts that compose with a selector (issue 12, part 1, item 4; ours).

A policy decides *which* tokens stay; a storage layout decides *how* they are held. ``storage=interlayer`` is the
inter-layer layout of PoD (Ma et al., arXiv 2412.02252; the ``interlayer`` policy is the same layout over a full
cache): per KV head, the layers of a calibrated block (``kvcascade calibrate interlayer``) hold the keys of their
*distant* tokens once, in the block's lowest layer (its base). A non-base layer attends with its own keys to
*proximal* tokens (the first ``storage_sinks`` positions and the newest ``storage_recent`` up to the query) and,
for distant ones, with the base's scores (``storage_share=scores``, v1) or the base's keys (``keys``, v2), always
with its own values, in one exact softmax (:func:`kvcascade.interlayer.attention.attend_shared`).

Sharing distant keys needs the layers of a block to hold the same tokens: here a non-base head *follows its
base*: whatever the selector decides for that layer, the head keeps exactly the tokens its base kept in the same
step (the base is a lower layer, so it has already chosen). The selector still runs unchanged in every base
layer, and its scores are still kept for every head. Selectors whose layers all hold the same number of tokens
at the same steps compose: ``h2o``, ``tova``, ``snapkv`` and ``locret`` (not ``pyramidkv``: its layers keep
different counts; not ``cascade``: its sub-caches move tokens by their own rules; not ``streaming``/``window``:
they keep only proximal tokens, so there is nothing distant to share).

Memory: ``kv_bytes_peak`` reports the layout's K/V bytes: base heads K and V for every kept token, the others V
for every kept token and K for at most ``storage_sinks + storage_recent`` of them (an upper bound: a sink the
selector dropped is still counted). Physically the cache still holds every key (as for the ``interlayer``
policy), and a base's keys of the current step are copied once for its block's later layers, freed after the
block's last layer: the figure is the layout's, not this implementation's. Training-free (the paper post-trains).
CUDA graphs and batched decoding are off for a composed policy (its decode step runs eagerly).
"""

from __future__ import annotations

from ..errors import KVCascadeError

COMPOSABLE = ("h2o", "tova", "snapkv", "locret")
STORAGE_PARAMS = {"storage": "none", "storage_groups": "auto", "storage_sinks": 16, "storage_recent": 1008,
                  "storage_share": "scores"}
STORAGE_DOCS = {"storage": "none (every layer holds its own keys) or interlayer (PoD's layout: layers of a "
                           "calibrated block share distant keys; see kvcascade.policies.storage)",
                "storage_groups": "storage=interlayer: groups file from kvcascade calibrate interlayer, or auto "
                                  "(shipped for the model)",
                "storage_sinks": "storage=interlayer: first positions that stay proximal",
                "storage_recent": "storage=interlayer: newest tokens (the query's own included) that stay proximal",
                "storage_share": "storage=interlayer: scores (v1: the base layer's q.k for distant tokens) or keys "
                                 "(v2: own q, base k)"}


class SharedLayout:
    """The inter-layer layout's attention and accounting for one cache: per layer and KV head, its block's base.

    ``snapshot``: copy a base's keys at its attention call for the block's later layers (the base may evict before
    they attend); without it (nothing is ever evicted) the later layers read the base's cache directly."""

    def __init__(self, base_of: list[list[int]], *, sinks: int, recent: int, share: str, snapshot: bool):
        self.base_of, self.sinks, self.recent, self.share, self.snapshot = base_of, sinks, recent, share, snapshot
        n = len(base_of)
        # for each (base layer, KV head) with followers: the last layer that reads it
        self.last_reader = {}
        for i in range(n):
            for h, b in enumerate(base_of[i]):
                if b != i:
                    self.last_reader[(b, h)] = max(i, self.last_reader.get((b, h), i))
        self.held = {}  # (base, head) -> (keys [B, 1, N, D], queries of the head's group or None)

    def attention(self, cache, layer, query, k_all, v_all, out, *, q_orig, k_orig, scaling):
        """Write the shared heads' output into ``out`` (computed for every head as usual) and keep what the block's
        later layers need."""
        from ..interlayer.attention import attend_shared

        i = layer.idx
        H = k_all.shape[1]
        g = query.shape[1] // H
        for h in range(H):
            qs = slice(h * g, (h + 1) * g)
            if (i, h) in self.last_reader:  # a base with followers: keep its keys (and queries) of this step
                keys = k_all[:, h:h + 1]
                self.held[(i, h)] = (keys.clone() if self.snapshot else keys,
                                     query[:, qs] if self.share == "scores" else None)
            b = self.base_of[i][h]
            if b == i:
                continue
            k_base, q_base = self.held[(b, h)]
            if k_base.shape[2] != k_all.shape[2]:
                raise KVCascadeError(f"storage=interlayer: layer {i} holds {k_all.shape[2]} tokens where its base "
                                     f"layer {b} held {k_base.shape[2]} (the selector kept different counts)")
            out[:, qs] = attend_shared(query[:, qs], k_all[:, h:h + 1], v_all[:, h:h + 1], scaling=scaling,
                                       q_pos=q_orig, k_pos=k_orig[:, h:h + 1], n_sink=self.sinks,
                                       n_recent=self.recent, k_base=k_base, q_base=q_base, share=self.share)
            if self.last_reader[(b, h)] == i:
                del self.held[(b, h)]
        return out

    def layer_bytes(self, layer) -> int:
        if layer.keys is None:
            return 0
        B, H, N, D = layer.keys.shape
        per = B * D * layer.keys.element_size()
        prox = min(N, self.sinks + self.recent)
        keys = sum(N if base == layer.idx else prox for base in self.base_of[layer.idx]) * per
        return keys + H * N * B * layer.values.shape[-1] * layer.values.element_size()


class StorageParam:
    """Mixin for the selectors in :data:`COMPOSABLE`: the ``storage*`` parameters (see the module docstring)."""

    def validate(self) -> None:
        super().validate()
        storage = getattr(self, "storage", "none")
        if storage not in ("none", "interlayer"):
            raise KVCascadeError(f"policy '{self.name}': storage must be none or interlayer, got '{storage}'")
        if storage == "none":
            return
        if self.name not in COMPOSABLE:
            raise KVCascadeError(f"policy '{self.name}': storage=interlayer composes with {', '.join(COMPOSABLE)} "
                                 "(selectors whose layers keep the same number of tokens)")
        if self.storage_share not in ("scores", "keys"):
            raise KVCascadeError(f"policy '{self.name}': storage_share must be scores or keys, got "
                                 f"'{self.storage_share}'")
        if self.storage_sinks < 0 or self.storage_recent < 1:
            raise KVCascadeError(f"policy '{self.name}': storage_sinks must be >= 0 and storage_recent >= 1 (got "
                                 f"{self.storage_sinks}, {self.storage_recent})")
        if self.storage_sinks + self.storage_recent >= self.budget:
            raise KVCascadeError(f"policy '{self.name}': storage_sinks + storage_recent ({self.storage_sinks} + "
                                 f"{self.storage_recent}) must be below the budget ({self.budget}), or every kept "
                                 "token is proximal and nothing is shared")
        if self.storage_groups != "auto":
            from ..interlayer.calibrate import load_groups

            load_groups(self.storage_groups)  # a missing or broken file is refused before any model is loaded
        # the shared heads' attention runs outside the captured kernels, and the layout needs whole-cache steps
        self.graph_safe = self.batchable = self.grows_below_cap = False

    def setup(self, cache) -> None:
        super().setup(cache)
        if getattr(self, "storage", "none") == "none":
            return
        if any(layer.is_sliding for layer in cache.layers):
            raise KVCascadeError(f"policy '{self.name}': storage=interlayer does not apply to models with "
                                 "sliding-window layers")
        from ..interlayer.calibrate import base_layers, groups_for

        info, _ = groups_for(self.storage_groups, cache._model,
                             f"policy '{self.name}' storage=interlayer: no inter-layer groups ship for this model; make "
                             "some with: kvcascade calibrate interlayer --model NAME --out groups.json, and pass that "
                             "file as storage_groups")
        base_of = base_layers(info["groups"])
        layout = SharedLayout(base_of, sinks=self.storage_sinks, recent=self.storage_recent, share=self.storage_share,
                              snapshot=True)
        kept = {}  # base layer -> (layer.seen, indices [B, H, K]) of its last compaction
        followed = {b for (b, _h) in layout.last_reader}

        def follow(layer, idx):
            B, H = layer._k.shape[:2]
            idx = idx.view(1, 1, -1) if idx.dim() == 1 else idx
            idx = idx.expand(B, H, idx.shape[-1])
            i = layer.idx
            heads = [(h, b) for h, b in enumerate(base_of[i]) if b != i]
            if heads:
                idx = idx.clone()
                for h, b in heads:
                    seen, base_idx = kept.get(b, (None, None))
                    if seen != layer.seen or base_idx.shape[-1] != idx.shape[-1]:
                        raise KVCascadeError(f"storage=interlayer: layer {i} evicts where its base layer {b} did "
                                             "not, or keeps another count (the selector must treat layers alike)")
                    idx[:, h] = base_idx[:, h]
            if i in followed:
                kept[i] = (layer.seen, idx)
            return idx

        for layer in cache.layers:
            layer.on_compact = follow
        cache.aux["storage"] = layout
        self._storage_layout = layout  # layer_bytes sees only the layer

    def teardown(self, cache) -> None:
        if cache.aux.pop("storage", None) is not None:
            for layer in cache.layers:
                layer.on_compact = None
            self._storage_layout = None
        super().teardown(cache)

    def attention(self, cache, layer, query, k_all, v_all, *, q_orig, k_orig, scaling, softcap):
        layout = cache.aux.get("storage")
        if layout is None:
            return super().attention(cache, layer, query, k_all, v_all, q_orig=q_orig, k_orig=k_orig,
                                     scaling=scaling, softcap=softcap)
        # the selector's statistics come from every head's own keys (a following head's selection is its base's)
        out, mass, obs = cache.standard_attention(layer, query, k_all, v_all, q_orig=q_orig, k_orig=k_orig,
                                                  scaling=scaling, softcap=softcap)
        out = layout.attention(cache, layer, query, k_all, v_all, out, q_orig=q_orig, k_orig=k_orig, scaling=scaling)
        return out, mass, obs

    def layer_bytes(self, layer) -> int:
        layout = getattr(self, "_storage_layout", None)
        return super().layer_bytes(layer) if layout is None else layout.layer_bytes(layer)
