"""TOVA (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104).

When the layer is over budget, evict the tokens with the lowest attention weight from the *current* query
(the newest token; for a prompt chunk, the chunk's last token), averaged over all heads of the layer, so the
decision is shared by the heads of a layer. No accumulation across steps. Original positions
(``positions=cache``: slot positions, as StreamingLLM, for streams past the model's window).
"""

from .base import Policy, PositionsParam, register
from .share import SHARE_DOCS, SHARE_PARAMS, ShareParam
from .storage import STORAGE_DOCS, STORAGE_PARAMS, StorageParam


@register
class TOVA(StorageParam, ShareParam, PositionsParam, Policy):
    """Keep the tokens the newest query attends to most, averaged over heads (TOVA, arXiv 2401.06104)."""

    name = "tova"
    graph_safe = True
    grows_below_cap = True  # evicts only beyond the cap: below it, decode runs padded
    PARAMS = {"budget": 2048, "positions": "original", **SHARE_PARAMS, **STORAGE_PARAMS}
    DOCS = {"budget": "tokens kept per layer (all heads keep the same tokens)",
            "positions": PositionsParam.POSITIONS_DOC, **SHARE_DOCS, **STORAGE_DOCS}
    obs_window = 1

    def step(self, cache, layer, stats) -> None:
        if len(layer) <= self.budget:
            return
        score = stats.obs.mean(dim=1, keepdim=True) / stats.group  # [B, 1, N]
        layer.keep_top(self.shared(cache, layer, score), self.budget)
