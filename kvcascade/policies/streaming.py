"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453).

Keep the first ``sinks`` tokens (attention sinks) and the most recent ``budget - sinks``; positions are
assigned by slot (in-cache positions), which lets the model run past its trained window.
"""

from .base import Policy, register


@register
class Streaming(Policy):
    """Attention sinks + recent window, in-cache positions (StreamingLLM, arXiv 2309.17453)."""

    name = "streaming"
    graph_safe = True
    grows_below_cap = True  # evicts only beyond the cap: below it, decode runs padded
    position_mode = "cache"
    PARAMS = {"budget": 2048, "sinks": 4}
    DOCS = {"budget": "tokens kept per layer and KV head (sinks included)",
            "sinks": "first tokens kept forever (paper: 4)"}

    def step(self, cache, layer, stats) -> None:
        layer.keep_ends(self.sinks, self.budget - self.sinks)  # nothing while the cache is within its budget
