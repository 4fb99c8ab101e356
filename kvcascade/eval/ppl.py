"""Streaming perplexity: the text is fed in chunks through a compressed cache; every token is predicted
from whatever the policy kept. Reported overall and per position bucket, so a curve shows whether quality
holds as the text grows past the cache and past the model's window.

SnapKV and PyramidKV compress only at the end of a prompt, so here (where every chunk is scored as it
comes) they compress only with ``chunked=true``.

Default text: the King James Bible, shipped with the package (:func:`kjv_text`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..cache import CompressedCache
from ..engine import iter_prefill
from ..errors import KVCascadeError
from ..policies import make_policy
from ..texts import KJV_FILE, KJV_PARTS, KJV_SHA256, kjv_part, kjv_text  # noqa: F401  (the default text lives there)


@torch.inference_mode()
def streaming_perplexity(model, tokenizer, text_or_ids, policy="streaming", budget=None, policy_args=None,
                         chunk_size: int = 512, bucket: int = 8192, max_tokens: int | None = None,
                         progress: bool = True) -> dict:
    """Negative log-likelihood of every token given the compressed cache; returns overall and per-bucket
    perplexity plus the KV peak."""
    ids = tokenizer(text_or_ids).input_ids if isinstance(text_or_ids, str) else list(text_or_ids)
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise KVCascadeError("perplexity needs a text of at least two tokens")
    if int(chunk_size) <= 0:
        raise KVCascadeError(f"chunk size must be a positive number of tokens, got {chunk_size}")
    if int(bucket) <= 0:
        raise KVCascadeError(f"bucket must be a positive number of tokens, got {bucket}")
    pol = make_policy(policy, budget, **(policy_args or {}))
    with CompressedCache(model, pol) as cache:
        return _perplexity(model, cache, pol, ids, chunk_size, bucket, progress)


def _perplexity(model, cache, pol, ids, chunk_size, bucket, progress) -> dict:
    nll_sum = torch.zeros((len(ids) + bucket - 1) // bucket, dtype=torch.float64)
    counts = torch.zeros_like(nll_sum)
    targets_all = torch.tensor(ids[1:], device=model.device)
    # the last token is only a target, never an input
    for start, logits in iter_prefill(model, cache, ids[:-1], chunk_size, all_logits=True, progress=progress,
                                      desc=f"ppl {pol.name}"):
        targets = targets_all[start:start + logits.shape[0]]
        nll = F.cross_entropy(logits.float(), targets, reduction="none").double().cpu()
        pos = torch.arange(start + 1, start + 1 + targets.shape[0]) // bucket
        nll_sum.index_add_(0, pos, nll)
        counts.index_add_(0, pos, torch.ones_like(nll))
    keep = counts > 0
    total = float(nll_sum.sum() / counts.sum())
    if not math.isfinite(total):
        raise KVCascadeError(f"perplexity is not finite ({total}) for policy {pol.name}: the model produced inf/NaN "
                             "logits (try another dtype)")
    per_bucket = (nll_sum[keep] / counts[keep]).exp().tolist()
    return {"policy": pol.name, "params": pol.params(), "tokens": len(ids),
            "ppl": math.exp(total), "bucket": bucket, "ppl_per_bucket": per_bucket,
            "kv_tokens_peak": cache.kv_tokens_peak(), "kv_bytes_peak": cache.kv_bytes_peak()}
