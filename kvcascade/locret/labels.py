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

import torch

from ..errors import KVCascadeError
from ..probe import current_state, observe, sdpa

LABEL_ATTENTION = "kvcascade_locret_labels"


def _label_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state = current_state()
    if state is not None and module.layer_idx in state["layers"]:
        P = state["prefix"]
        B, Hq, T, D = query.shape
        H = key.shape[1]
        s = scaling if scaling is not None else D ** -0.5
        q = query[:, :, P:].float().view(B, H, Hq // H, T - P, D)
        k = key[:, :, :P].float()
        logits = torch.einsum("bhgad,bhpd->bhgap", q, k) * s  # answer rows see every prefix token (causal)
        state["labels"][module.layer_idx] = logits.amax(dim=(2, 3))  # [B, H, P]
    return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@torch.no_grad()
def labels_and_features(model, tap, ids: torch.Tensor, prefix_len: int, layers: list[int]):
    """One frozen forward over ``ids`` (``[1, T]``, prefix then answer).

    Returns ``(labels {layer: [H, P]}, features {layer: [P, in_dim]})``: the labels described in the module
    docstring, and the heads' inputs (raw ``q;k;v``) for the prefix tokens."""
    T = ids.shape[1]
    if not 0 < prefix_len < T:
        raise KVCascadeError(f"a training example needs a prefix and an answer (prefix {prefix_len} of {T} tokens)")
    tap.clear()
    labels = observe(model, ids, LABEL_ATTENTION, _label_attention,
                     {"prefix": prefix_len, "layers": set(layers), "labels": {}})["labels"]
    missing = [i for i in layers if i not in labels]
    if missing:
        raise KVCascadeError(f"no labels were recorded for layers {missing}: the model's attention did not go "
                             "through the label function")
    return ({i: labels[i][0] for i in layers},
            {i: tap.qkv(i)[0, :prefix_len] for i in layers})
