"""Cross-layer selection (issue 12, part 2; ours, after the inter-layer similarity of PoD, arXiv 2412.02252).

A score-based policy evicts each layer on its own, so a token that one layer finds important can be dropped by
the next layer, which attends almost the same way, because it lost a close competition there. The cascade's
misses at 1M tokens were measured as exactly this: the key gone from 9-13 of 24 layers, kept in the rest.

``share=group`` lets a token's importance in one layer protect it in the layers that attend alike (the blocks of
the inter-layer calibration, per KV head: ``share_groups=auto`` uses the groups shipped for the model, or a file
from ``kvcascade calibrate interlayer``); ``share=all`` treats every layer as alike; ``share=none`` (the default)
is the policy as published. How: scores of different layers are on different scales (attention mass, an EMA,
a trained head's logit), so each layer's scores are turned into per-row percentiles (rank / (n - 1), in [0, 1]);
when layer ``i`` selects, a token's score is the largest percentile it has in any layer of ``i``'s block that has
already scored this forward pass (the lower layers of the block, and ``i`` itself), matched by original position
(``share_combine=max``, the default), or the mean of those percentiles (``share_combine=mean``, ours too: the
largest of 24 saturates, since many tokens reach a top percentile in some layer; measured to lose recent keys at
256K). A token a lower layer already dropped counts 0 there (for ``max``: only where it is still held). Selection
then runs on those combined scores; everything else about the policy is unchanged (budgets, protected tokens,
positions).
"""

from __future__ import annotations

import torch

from ..errors import KVCascadeError

SHARE_PARAMS = {"share": "none", "share_groups": "auto", "share_combine": "max"}
SHARE_DOCS = {"share": "none (the paper), group (a token's importance in a layer protects it in the layers of the "
                       "same inter-layer block) or all (in every layer)",
              "share_groups": "share=group: groups file from kvcascade calibrate interlayer, or auto (shipped)",
              "share_combine": "max (a token's largest percentile in the alike layers) or mean (their average; a "
                               "layer that no longer holds the token counts 0)"}


def percentile(score: torch.Tensor) -> torch.Tensor:
    """Per-row rank of each score, scaled to [0, 1] (the highest is 1)."""
    n = score.shape[-1]
    if n <= 1:
        return torch.ones_like(score, dtype=torch.float32)
    return score.float().argsort(-1).argsort(-1).float() / (n - 1)


class ShareParam:
    """Mixin for score-based policies: the ``share`` and ``share_groups`` parameters and :meth:`shared`."""

    def validate(self) -> None:
        super().validate()
        if self.share not in ("none", "group", "all"):
            raise KVCascadeError(f"policy '{self.name}': share must be none, group or all, got '{self.share}'")
        if self.share_combine not in ("max", "mean"):
            raise KVCascadeError(f"policy '{self.name}': share_combine must be max or mean, got '{self.share_combine}'")
        if self.share == "group" and self.share_groups != "auto":
            from ..interlayer.calibrate import load_groups

            load_groups(self.share_groups)  # a missing or broken file is refused before any model is loaded

    def setup(self, cache) -> None:
        super().setup(cache)
        if self.share == "none":
            return
        n, H = cache.num_layers, cache.num_kv_heads
        if self.share == "all":
            block = [[0] * H for _ in range(n)]
        else:
            from ..interlayer.calibrate import groups_for

            info, _ = groups_for(self.share_groups, cache._model,
                                 f"policy '{self.name}': share=group needs inter-layer groups and none ship for this "
                                 "model; make some with: kvcascade calibrate interlayer --model NAME --out groups.json, "
                                 "then share_groups=groups.json (or use share=all)")
            block = [[0] * H for _ in range(n)]
            for h, blocks in enumerate(info["groups"]):
                for b, layers in enumerate(blocks):
                    for i in layers:
                        block[i][h] = b
        cache.aux["share"] = {"block": block, "records": {}, "masks": {}}

    def teardown(self, cache) -> None:
        cache.aux.pop("share", None)
        super().teardown(cache)

    def shared(self, cache, layer, score: torch.Tensor) -> torch.Tensor:
        """``score`` ``[B, R, N]`` (R: KV heads, or 1 for a selection shared by the heads) as this layer selects
        with it: its percentiles, raised to the percentile a token has in an alike layer that scored it in this
        forward pass. ``share=none``: ``score`` unchanged."""
        if self.share == "none":
            return score
        aux = cache.aux["share"]
        block, records = aux["block"], aux["records"]
        B, R, N = score.shape
        pos = layer.pos if R == layer.pos.shape[1] else layer.pos[:, :1]
        own = percentile(score)
        combined = own
        mean = self.share_combine == "mean"
        count = 1.0
        i = layer.idx
        for j, (seen, pos_j, own_j) in records.items():
            if j == i or seen != layer.seen:  # another forward pass's record
                continue
            same = [block[j][h] == block[i][h] for h in range(len(block[i]))]
            if R != len(same):
                same = [any(same)]
            if not any(same):
                continue
            idx = torch.searchsorted(pos_j, pos.contiguous()).clamp(max=pos_j.shape[-1] - 1)
            hit = pos_j.gather(-1, idx) == pos
            val = torch.where(hit, own_j.gather(-1, idx), torch.zeros((), device=own.device))
            weight = 1.0
            if not all(same):  # some KV heads of layer j are in i's block, others not: mask made once, on the device
                key = (i, j, R)
                if key not in aux["masks"]:
                    aux["masks"][key] = torch.tensor(same, dtype=val.dtype, device=val.device).view(1, -1, 1)
                weight = aux["masks"][key]
                val = val * weight
            if mean:
                combined = combined + val
                count = count + weight
            else:
                combined = torch.maximum(combined, val)
        records[i] = (layer.seen, pos.contiguous().clone(), own)
        return combined / count if mean else combined
