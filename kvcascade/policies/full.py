"""Full cache: keeps every token (the reference every other policy is compared with)."""

from .base import Policy, register


@register
class Full(Policy):
    """Keep every token; original positions (the uncompressed baseline)."""

    name = "full"
    graph_safe = True
    graph_grow = True

    def step(self, cache, layer, stats) -> None:
        return None
