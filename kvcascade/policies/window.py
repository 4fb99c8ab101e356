"""Sliding window: keep only the most recent ``budget`` tokens."""

from .base import Policy, register


@register
class Window(Policy):
    """Keep the most recent `budget` tokens; in-cache positions (Beltagy et al. 2020, local attention)."""

    name = "window"
    graph_safe = True
    grows_below_cap = True  # evicts only beyond the cap: below it, decode runs padded
    position_mode = "cache"
    PARAMS = {"budget": 2048}
    DOCS = {"budget": "tokens kept per layer and KV head"}

    def step(self, cache, layer, stats) -> None:
        layer.keep_last(self.budget)
