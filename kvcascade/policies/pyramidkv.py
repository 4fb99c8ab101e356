"""PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", arXiv 2406.02069).

SnapKV's selection with a per-layer budget that shrinks linearly from the lowest to the highest layer, the
average staying ``budget``. The budget formula follows the authors' code (KVCache-Factory,
``pyramidkv_utils.py``): with ``P = budget - window``, ``min = P // beta``, ``max = 2P - min`` (clipped to
the prompt's prefix length, ``min`` then re-derived so the mean stays ``P``), ``step = (max - min) // (L - 1)``
and layer ``l`` keeps ``max - l * step`` prefix tokens plus the window; a prompt whose prefix is shorter
than ``2P`` gets SnapKV's uniform ``P`` (as in that code). Original positions.
"""

from .base import register
from .snapkv import SnapKV


@register
class PyramidKV(SnapKV):
    """SnapKV selection with a linearly decreasing per-layer budget (PyramidKV, arXiv 2406.02069)."""

    name = "pyramidkv"
    # no storage=interlayer: its layers keep different counts, so a block's layers cannot share distant keys
    PARAMS = {**{k: v for k, v in SnapKV.PARAMS.items() if not k.startswith("storage")}, "beta": 20}
    DOCS = {**{k: v for k, v in SnapKV.DOCS.items() if not k.startswith("storage")},
            "beta": "pyramid steepness: the top layer keeps (budget - window) / beta (paper: 20)",
            "budget": "average tokens kept per layer and KV head after prefill (window included)"}

    def validate(self) -> None:
        super().validate()
        if self.beta < 1:
            from ..errors import KVCascadeError

            raise KVCascadeError(f"policy 'pyramidkv': beta must be >= 1, got {self.beta}")

    def prefix_budget(self, layer_idx: int, num_layers: int, n: int | None = None) -> int:
        p = self.budget - self.window
        if n is not None and n - self.window < 2 * p:
            return p  # short prompt: the authors' code falls back to SnapKV's uniform budget
        lo = p // self.beta
        hi = 2 * p - lo
        if n is not None and hi >= n - self.window:
            hi = n - self.window
            lo = 2 * p - hi
        step = max(0, (hi - lo) // max(1, num_layers - 1))
        return max(1, hi - layer_idx * step)

    def layer_budget(self, layer_idx: int, num_layers: int) -> int:
        # the most a layer can be given before the prompt length is known: a short prompt gets the uniform SnapKV
        # budget, which can exceed the pyramid's upper layers; once prefill has chosen, layer_cap is the layer's share
        return max(self.prefix_budget(layer_idx, num_layers) + self.window, self.budget)
