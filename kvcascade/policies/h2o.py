"""H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs", arXiv 2306.14048).

Each KV head keeps its ``budget * recent_ratio`` most recent tokens plus the "heavy hitters": the tokens with
the largest attention mass accumulated over all queries so far. Scores are per KV head (summed over the
query heads that share it). The paper evicts one token per generated token; with chunked prefill we evict
after each chunk, scoring with the accumulated mass of every query seen so far (the usual prefill variant).
Original positions (``positions=cache``: slot positions, as StreamingLLM, for streams past the model's window).
"""

from .base import Policy, PositionsParam, register
from .share import SHARE_DOCS, SHARE_PARAMS, ShareParam
from .storage import STORAGE_DOCS, STORAGE_PARAMS, StorageParam


@register
class H2O(StorageParam, ShareParam, PositionsParam, Policy):
    """Heavy hitters (accumulated attention) + recent tokens, per KV head (H2O, arXiv 2306.14048)."""

    name = "h2o"
    graph_safe = True
    PARAMS = {"budget": 2048, "recent_ratio": 0.5, "positions": "original", **SHARE_PARAMS, **STORAGE_PARAMS}
    DOCS = {"budget": "tokens kept per layer and KV head",
            "recent_ratio": "share of the budget reserved for the most recent tokens (paper: 0.5)",
            "positions": PositionsParam.POSITIONS_DOC, **SHARE_DOCS, **STORAGE_DOCS}
    needs_mass = True

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.recent_ratio <= 1.0:
            from ..errors import KVCascadeError

            raise KVCascadeError(f"policy 'h2o': recent_ratio must be in [0, 1], got {self.recent_ratio}")

    grows_below_cap = True  # below the budget a decode step only adds the token and the query's attention mass
    padded_mass = True

    def padded_step(self, cache, layer, slot, mass=None) -> None:
        layer._score[:, :, : mass.shape[-1]] += mass  # empty slots get no mass (hidden by their position)

    def step(self, cache, layer, stats) -> None:
        layer.score += stats.mass
        n = len(layer)
        if n <= self.budget:
            return
        recent = int(self.budget * self.recent_ratio)
        layer.keep_top(self.shared(cache, layer, layer.score), self.budget, n - recent)
