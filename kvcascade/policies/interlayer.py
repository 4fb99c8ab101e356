"""Inter-layer attention sharing, training-free (ours, after PoD: Ma et al., "Compressing KV Cache for
Long-Context LLM Inference with Inter-Layer Attention Similarity", arXiv 2412.02252; spec
``shared/docs/interlayer.md``).

Every token is kept (no eviction, original positions, like ``full``). Layers are grouped per KV head into blocks
of consecutive layers that attend alike (``kvcascade calibrate interlayer``). The block's lowest layer (its base)
attends as usual; every other layer of the block uses its own keys for *proximal* tokens (the first ``sinks``
and the newest ``recent``) and, for *distant* tokens, the base's attention scores (``share=scores``: v1, the
paper's first version and the default) or the base's keys with its own queries (``share=keys``: v2), always with
its own values, in one exact softmax (:func:`kvcascade.interlayer.attention.shared_attention`).

Storage: in this layout a non-base layer needs no keys for distant tokens, so the KV bytes reported
(``kv_bytes_peak``) are those of the PoD layout, computed exactly per KV head: base heads keep K and V for
every token, the others V for every token and K for the proximal ones. **Physically the cache still holds every
key** (one buffer per layer holds all its KV heads alike); the memory figure is the method's, not this
implementation's. The same layout composes with a selector for bounded memory: ``storage=interlayer`` on
``h2o``, ``tova``, ``snapkv`` or ``locret`` (:mod:`kvcascade.policies.storage`). On CUDA the shared heads run a
Triton kernel (:func:`kvcascade.kernels.triton_attention.shared_attention`), elsewhere the PyTorch reference. The
paper adapts the model to the sharing with billions of tokens of post-training; this is the version without it,
which is expected to lose some quality: measure it.

Defaults and their sources: ``sinks=16``, ``recent=4080`` (the paper's 16 + 4080 proximal tokens);
``delta=-1`` keeps the groups file's own threshold (calibration default 0.5, the paper's).
"""

from __future__ import annotations

from ..errors import KVCascadeError
from .base import Policy, register


@register
class Interlayer(Policy):
    """Full cache; distant tokens scored through the block's base layer (PoD without post-training, ours)."""

    name = "interlayer"
    PARAMS = {"groups": "auto", "sinks": 16, "recent": 4080, "share": "scores", "delta": -1.0}
    DOCS = {"groups": "groups file from kvcascade calibrate interlayer; auto: the groups shipped for the model "
                      "(qwen2.5-coder-0.5b: calibrated on an H200, 64 samples of 8K tokens, delta 0.5)",
            "sinks": "first tokens that stay proximal (paper: 16)",
            "recent": "newest tokens, the query's own included, that stay proximal (paper: 4080)",
            "share": "scores (v1, default: the base layer's q.k for distant tokens) or keys (v2: own q, base k)",
            "delta": "regroup the file's calibration at this threshold (-1: the file's own grouping)"}

    def validate(self) -> None:
        super().validate()
        if not self.groups:
            raise KVCascadeError("policy 'interlayer' needs groups=FILE or groups=auto (make a file with: kvcascade "
                                 "calibrate interlayer --model NAME --out groups.json)")
        if self.share not in ("scores", "keys"):
            raise KVCascadeError(f"policy 'interlayer': share must be scores or keys, got '{self.share}'")
        if self.sinks < 0 or self.recent < 1:
            raise KVCascadeError(f"policy 'interlayer': sinks must be >= 0 and recent >= 1 (got {self.sinks}, "
                                 f"{self.recent})")
        if self.delta != -1.0 and not 0.0 <= self.delta <= 1.0:
            raise KVCascadeError(f"policy 'interlayer': delta must be in [0, 1] (or -1), got {self.delta}")
        self._info = None
        if self.groups != "auto":
            from ..interlayer.calibrate import load_groups

            # a missing or broken file is refused here, before any model is loaded
            self._use(load_groups(self.groups), str(self.groups))

    def _use(self, info: dict, path: str) -> None:
        from ..interlayer.calibrate import regroup

        self._info = regroup(info, self.delta) if self.delta != -1.0 else info
        self._path = path

    def setup(self, cache) -> None:
        from ..interlayer.calibrate import base_layers, check_groups, groups_for
        from .storage import SharedLayout

        if any(layer.is_sliding for layer in cache.layers):
            raise KVCascadeError("policy 'interlayer' does not apply to models with sliding-window layers (Gemma3's "
                                 "global layers are never adjacent)")
        if self.groups == "auto":
            self._use(*groups_for("auto", cache._model,
                                  "no inter-layer groups ship for this model; make some with: kvcascade calibrate "
                                  "interlayer --model NAME --out groups.json, then --policy-arg groups=groups.json"))
        else:  # read in validate(), before any model was loaded
            check_groups(self._info, cache._model, self._path)  # one clear error for another model's groups
        # nothing is ever evicted: a later layer of a block reads its base's cache directly
        self._layout = SharedLayout(base_layers(self._info["groups"]), sinks=self.sinks, recent=self.recent,
                                    share=self.share, snapshot=False)
        cache.aux["interlayer"] = self._layout

    def teardown(self, cache) -> None:
        cache.aux.pop("interlayer", None)

    def attention(self, cache, layer, query, k_all, v_all, *, q_orig, k_orig, scaling, softcap):
        out, _, _ = cache.standard_attention(layer, query, k_all, v_all, q_orig=q_orig, k_orig=k_orig, scaling=scaling,
                                             softcap=softcap)  # (this policy asks for no statistics)
        out = cache.aux["interlayer"].attention(cache, layer, query, k_all, v_all, out, q_orig=q_orig,
                                                k_orig=k_orig, scaling=scaling)
        return out, None, None

    def layer_bytes(self, layer) -> int:
        return self._layout.layer_bytes(layer)

    def step(self, cache, layer, stats) -> None:
        return None
