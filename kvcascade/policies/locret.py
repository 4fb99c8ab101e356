"""Locret (Huang et al., "Locret: Enhancing Eviction in Long-Context LLM Inference with Trained Retaining Heads",
arXiv 2410.01805; verified spec ``shared/docs/locret.md``).

Small trained *retaining heads* (:mod:`kvcascade.locret`) score every KV unit once, when it arrives, from the
token's raw ``q``/``k``/``v`` projections; chunked prefill then keeps, per layer and KV head, the ``budget``
highest-scored units, so memory stays bounded by ``budget + chunk`` whatever the prompt's length. As the
official inference loop runs it:

* the prompt's last ``local`` tokens (the question tail) form the last prefill chunk and are never evicted; the
  chunks before it hold ``chunk_size`` tokens;
* after every chunk but the last of those, the ``stabilizers`` most recent units are protected (a sliding local
  window); after the last one nothing is protected, and each layer is cut to ``budget`` per KV head;
* no fixed sinks (the heads learn to keep what matters); in-cache positions: keys are kept without rotary
  embedding and the kept units are renumbered ``0..n-1`` on every step;
* each KV head keeps its own units (the score is per KV head).

Decoding: the paper lets the cache grow by every generated token. Here ``decode=bounded`` (default, ours)
keeps a layer at most ``budget + local + decode_window`` units: past that, the lowest-scored unit older than the
newest ``local + decode_window`` is evicted (each decoded token is scored by the heads when it arrives, like
the prompt's). ``decode=grow`` is the paper's behaviour.

Defaults and their sources: ``local=100`` (paper, all settings); ``stabilizers=-1`` means the paper's ratio
2500/6000 of ``budget`` (Phi-3/RULER settings: b=6000, n_s=2500; a fixed 2500 would not fit our 2K-8K budgets);
``stabilizers >= budget`` is an error (top-k would pick among ties). ``heads=auto`` loads the heads shipped for
the model (``kvcascade/locret/heads/``); ``heads=PATH`` a file from ``kvcascade train locret``; ``heads=random``
untrained heads of the shipped width (the paper's Table 7 ablation).
"""

from __future__ import annotations

import torch

from ..errors import KVCascadeError
from .base import Policy, register
from .share import SHARE_DOCS, SHARE_PARAMS, ShareParam
from .storage import STORAGE_DOCS, STORAGE_PARAMS, StorageParam

PAPER_STABILIZER_RATIO = 2500 / 6000


@register
class Locret(StorageParam, ShareParam, Policy):
    """Trained retaining heads score each unit on arrival; chunked prefill keeps the top `budget` (Locret, arXiv 2410.01805)."""

    name = "locret"
    graph_safe = True
    grows_below_cap = True  # evicts nothing until the cache passes its cap (budget + local + decode window): padded
    position_mode = "cache"
    PARAMS = {"budget": 2048, "stabilizers": -1, "local": 100, "heads": "auto", "decode": "bounded",
              "decode_window": 512, **SHARE_PARAMS, **STORAGE_PARAMS}
    DOCS = {"budget": "units kept per layer and KV head after each prefill chunk (paper's b)",
            "stabilizers": "most recent units protected after each prefill chunk but the last (paper's n_s; "
                           "-1: round(budget * 2500/6000), the paper's ratio)",
            "local": "final prompt tokens run last and never evicted (paper's n_loc: 100)",
            "heads": "auto (shipped heads for the model), a .safetensors path, or random (untrained ablation)",
            "decode": "bounded (ours: evict past budget + local + decode_window) or grow (the paper: keep all)",
            "decode_window": "bounded decode: newest units never evicted while decoding", **SHARE_DOCS, **STORAGE_DOCS}

    def validate(self) -> None:
        super().validate()
        if self.stabilizers == -1:
            self.stabilizers = round(self.budget * PAPER_STABILIZER_RATIO)
        if self.stabilizers < 0:
            raise KVCascadeError(f"policy 'locret': stabilizers must be >= 0 (or -1 for the paper's ratio), "
                                 f"got {self.stabilizers}")
        if self.stabilizers >= self.budget:
            raise KVCascadeError(f"policy 'locret': stabilizers ({self.stabilizers}) must be smaller than the budget "
                                 f"({self.budget}); n_s >= b leaves top-k choosing among protected ties")
        if self.local < 0:
            raise KVCascadeError(f"policy 'locret': local must be >= 0, got {self.local}")
        if self.decode not in ("bounded", "grow"):
            raise KVCascadeError(f"policy 'locret': decode must be bounded or grow, got '{self.decode}'")
        if self.decode_window < 1:
            raise KVCascadeError(f"policy 'locret': decode_window must be >= 1, got {self.decode_window}")
        if self.heads not in ("auto", "random"):
            from pathlib import Path

            if not Path(self.heads).is_file():
                raise KVCascadeError(f"policy 'locret': heads file '{self.heads}' does not exist (train one with: "
                                     "kvcascade train locret --model NAME --out heads.safetensors)")
        self._loaded = {}

    @property
    def tail_tokens(self) -> int:  # the engine runs the prompt's last `local` tokens as their own final chunk
        return self.local

    # -- heads ------------------------------------------------------------------------------------------------
    def _heads_for(self, model):
        from ..locret.heads import RetainingHeads, find_shipped, read_header

        key = (self.heads, id(model), str(model.device))
        if key not in self._loaded:
            if self.heads == "random":
                shipped = find_shipped(model)
                width = read_header(shipped)["width"] if shipped else 256
                heads = RetainingHeads.for_model(model, width=width, model_name="random", seed=0)
            elif self.heads == "auto":
                path = find_shipped(model)
                if path is None:
                    raise KVCascadeError(
                        "no Locret heads ship for this model; train some with: kvcascade train locret --model NAME "
                        "--out heads.safetensors, then use --policy-arg heads=heads.safetensors")
                heads = RetainingHeads.load(path, model)
            else:
                heads = RetainingHeads.load(self.heads, model)
            self._loaded = {key: heads.to(model.device).eval()}
        return self._loaded[key]

    def setup(self, cache) -> None:
        from ..locret.heads import ProjectionTap

        model = cache._model
        heads = self._heads_for(model)
        cache.aux["locret"] = (heads, ProjectionTap(model, heads.layers))
        super().setup(cache)  # share= (cross-layer selection)

    def teardown(self, cache) -> None:
        item = cache.aux.pop("locret", None)
        if item is not None:
            item[1].close()
        super().teardown(cache)

    def max_tokens(self, prompt_tokens: int, max_new: int, chunk: int, num_layers: int) -> int:
        after = self.local + (self.decode_window + 1 if self.decode == "bounded" else max_new)
        return min(prompt_tokens + max_new, self.budget + max(chunk, after))

    def layer_cap(self, cache, layer) -> int:
        if self.decode == "grow":
            return None
        return self.budget + self.local + self.decode_window

    # -- the step ---------------------------------------------------------------------------------------------
    def _score_chunk(self, cache, layer, n_new: int) -> None:
        heads, tap = cache.aux["locret"]
        with torch.no_grad():
            s = heads.score(layer.idx, tap.qkv(layer.idx))  # [B, C, H]
        tap.out[layer.idx].clear()
        layer.score[:, :, -n_new:] = s.transpose(1, 2)

    def padded_step(self, cache, layer, slot, mass=None) -> None:
        heads, tap = cache.aux["locret"]
        with torch.no_grad():
            s = heads.score(layer.idx, tap.qkv(layer.idx))  # [B, C, H]
        tap.out[layer.idx].clear()
        layer._score.index_copy_(2, slot, s.transpose(1, 2).to(layer._score.dtype))

    def step(self, cache, layer, stats) -> None:
        self._score_chunk(cache, layer, stats.n_queries)
        n = len(layer)
        if stats.phase == "prefill":
            tail = stats.final_chunk and self.local > 0 and stats.n_queries <= self.local
            if tail or n <= self.budget:
                return
            remaining = getattr(cache, "remaining", None)
            more_chunks = (remaining > self.local) if remaining is not None else not stats.final_chunk
            layer.keep_top(self.shared(cache, layer, layer.score), self.budget,
                           n - self.stabilizers if more_chunks else None)
            return
        if self.decode == "grow":
            return
        cap = self.budget + self.local + self.decode_window
        if n > cap:
            layer.keep_top(self.shared(cache, layer, layer.score), cap, n - (self.local + self.decode_window))
