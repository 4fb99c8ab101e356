"""Training labels for the retaining heads, computed inside the training step (no label files).

For a sequence ``prefix + answer`` the label of prefix token ``j`` in layer ``l`` and KV head ``h`` is the
largest pre-softmax attention logit ``q_p . k_j * scaling`` that any answer token ``p`` gives it, over the query
heads sharing KV head ``h`` (the official ``data_gen.py`` reduction; its ``1/sqrt(d)`` scaling is the layer's
own ``scaling``). One forward of the frozen model over the whole sequence gives the labels of every layer:
an attention function registered with ``transformers`` sees each layer's rotated (and, for Gemma3, normed)
queries and keys exactly as the model attends with them, reduces them to labels, and then runs the model's
plain SDPA attention, so the forward itself is unchanged. A :class:`~kvcascade.locret.heads.ProjectionTap`
on the same forward records the heads' inputs.
"""

from __future__ import annotations

import threading

import torch

from ..errors import KVCascadeError

LABEL_ATTENTION = "kvcascade_locret_labels"
_ctx = threading.local()


def _label_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = getattr(_ctx, "state", None)
    if state is not None and module.layer_idx in state["layers"]:
        P = state["prefix"]
        B, Hq, T, D = query.shape
        H = key.shape[1]
        s = scaling if scaling is not None else D ** -0.5
        q = query[:, :, P:].float().view(B, H, Hq // H, T - P, D)
        k = key[:, :, :P].float()
        logits = torch.einsum("bhgad,bhpd->bhgap", q, k) * s  # answer rows see every prefix token (causal)
        state["labels"][module.layer_idx] = logits.amax(dim=(2, 3))  # [B, H, P]
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if LABEL_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(LABEL_ATTENTION, _label_attention)
    if LABEL_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        ALL_MASK_ATTENTION_FUNCTIONS.register(LABEL_ATTENTION, sdpa_mask)  # the causal mask SDPA gets


@torch.no_grad()
def labels_and_features(model, tap, ids: torch.Tensor, prefix_len: int, layers: list[int]):
    """One frozen forward over ``ids`` (``[1, T]``, prefix then answer).

    Returns ``(labels {layer: [H, P]}, features {layer: [P, in_dim]})``: the labels described in the module
    docstring, and the heads' inputs (raw ``q;k;v``) for the prefix tokens."""
    T = ids.shape[1]
    if not 0 < prefix_len < T:
        raise KVCascadeError(f"a training example needs a prefix and an answer (prefix {prefix_len} of {T} tokens)")
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(LABEL_ATTENTION)
    _ctx.state = {"prefix": prefix_len, "layers": set(layers), "labels": {}}
    tap.clear()
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        labels = _ctx.state["labels"]
    finally:
        _ctx.state = None
        model.set_attn_implementation(previous)
    missing = [i for i in layers if i not in labels]
    if missing:
        raise KVCascadeError(f"no labels were recorded for layers {missing}: the model's attention did not go "
                             "through the label function")
    return ({i: labels[i][0] for i in layers},
            {i: tap.qkv(i)[0, :prefix_len] for i in layers})
