"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453).

Keep the first ``sinks`` tokens (attention sinks) and the most recent ``budget - sinks``; positions are
assigned by slot (in-cache positions), which lets the model run past its trained window.
"""

import torch

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
        n = len(layer)
        if n <= self.budget:
            return
        recent = self.budget - self.sinks
        if n == self.budget + 1:  # a decode step: the oldest token after the sinks goes (fused on CUDA)
            layer.drop_one(victim=self.sinks)
            return
        dev = layer.keys.device  # indices made on the device: a host tensor copied over would sync
        idx = torch.cat([torch.arange(self.sinks, device=dev), torch.arange(n - recent, n, device=dev)])
        layer.compact(idx)
