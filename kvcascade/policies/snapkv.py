"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469).

Applied once, at the end of prefill: the observation window is the last ``window`` prompt tokens. For each KV
head, prefix keys are scored by the attention the window's queries give them (summed over the window and
over the query heads sharing the KV head), smoothed by 1-D pooling (``kernel``, max or avg), and the top
``budget - window`` are kept together with the window itself. Until the last prompt chunk the cache keeps
everything (SnapKV compresses after prefill; ``chunked=true`` applies the same selection after every prompt
chunk instead, bounding memory during prefill). While decoding, the selected prefix stays and the newest
tokens slide through the remaining ``window`` slots. Original positions.

Defaults: window 32 (the paper's observation window), max pooling with kernel 7 (our method spec; the
KVCache-Factory code defaults to avg pooling, kernel 5).
"""

import torch
import torch.nn.functional as F

from ..errors import KVCascadeError
from .base import Policy, keep_indices, register
from .storage import STORAGE_DOCS, STORAGE_PARAMS, StorageParam


@register
class SnapKV(StorageParam, Policy):
    """Observation-window attention, pooled, per-head top-k at the end of prefill (SnapKV, arXiv 2404.14469)."""

    name = "snapkv"
    graph_safe = True
    grows_below_cap = True  # evicts only beyond the cap: below it, decode runs padded
    PARAMS = {"budget": 2048, "window": 32, "kernel": 7, "pooling": "max", "chunked": False,
              **STORAGE_PARAMS}
    DOCS = {"budget": "tokens kept per layer and KV head after prefill (window included)",
            "window": "observation window: last prompt tokens whose attention scores the prefix (paper: 32)",
            "kernel": "1-D pooling kernel over key positions (odd)",
            "pooling": "max or avg",
            "chunked": "also compress after every prompt chunk (bounded prefill memory), not only the last",
            **STORAGE_DOCS}

    def validate(self) -> None:
        super().validate()
        if self.window <= 0 or self.window >= self.budget:
            raise KVCascadeError(f"policy '{self.name}': window ({self.window}) must be in [1, budget)")
        if self.kernel <= 0 or self.kernel % 2 == 0:
            raise KVCascadeError(f"policy '{self.name}': kernel must be a positive odd number, got {self.kernel}")
        if self.pooling not in ("max", "avg"):
            raise KVCascadeError(f"policy '{self.name}': pooling must be 'max' or 'avg', got {self.pooling!r}")

    @property
    def obs_window(self) -> int:  # the kernel sums attention over this many trailing queries
        return self.window

    def prefix_budget(self, layer_idx: int, num_layers: int, n: int) -> int:
        """Prefix tokens kept (window excluded) in this layer for a prompt of ``n`` cached tokens."""
        return self.budget - self.window

    def max_tokens(self, prompt_tokens: int, max_new: int, chunk: int, num_layers: int) -> int:
        bound = super().max_tokens(prompt_tokens, max_new, chunk, num_layers)
        if self.chunked:
            return bound
        return min(prompt_tokens + max_new, max(bound, prompt_tokens))  # the whole prompt until its last chunk

    def layer_cap(self, cache, layer) -> int:
        """Decoding keeps the prefix chosen at the end of prefill plus ``window`` recent tokens per layer (for
        PyramidKV, the layer's pyramid share: upper layers never grow back to ``budget``)."""
        if "prefix" in layer.state:
            return layer.state["prefix"] + self.window
        return self.layer_budget(layer.idx, cache.num_layers)

    def _pool(self, score: torch.Tensor) -> torch.Tensor:
        B, H, P = score.shape
        x = score.reshape(B * H, 1, P)
        pad = self.kernel // 2
        if self.pooling == "max":
            x = F.max_pool1d(x, self.kernel, stride=1, padding=pad)
        else:
            x = F.avg_pool1d(x, self.kernel, stride=1, padding=pad, count_include_pad=False)
        return x.view(B, H, P)

    def step(self, cache, layer, stats) -> None:
        n = len(layer)
        if stats.phase == "prefill":
            if not (stats.final_chunk or self.chunked):
                return
            w = min(self.window, stats.n_queries, n)
            keep_prefix = self.prefix_budget(layer.idx, cache.num_layers, n)
            layer.state["prefix"] = keep_prefix  # decoding keeps this layer at keep_prefix + window (layer_cap)
            if n - w <= keep_prefix:
                return
            score = self._pool(stats.obs[:, :, : n - w])
            idx = keep_indices(score, keep_prefix)
            tail = torch.arange(n - w, n, device=idx.device).view(1, 1, -1).expand(idx.shape[0], idx.shape[1], -1)
            layer.compact(torch.cat([idx, tail], dim=-1))
            return
        # decoding: the selected prefix stays, the newest tokens slide
        # through the remaining slots
        if stats.phase == "decode":
            budget = self.layer_cap(cache, layer)
            if n > budget:
                p = min(layer.state.get("prefix", budget - self.window), budget - 1)
                layer.keep_ends(p, budget - p)
