"""Locret's retaining heads: the module and its files (:mod:`.heads`), training labels (:mod:`.labels`) and
training (:mod:`.train`, ``kvcascade train locret``). The policy itself is ``kvcascade.policies.locret``."""

from .heads import RetainingHeads, find_shipped, fingerprint, scored_layers

__all__ = ["RetainingHeads", "find_shipped", "fingerprint", "scored_layers"]
