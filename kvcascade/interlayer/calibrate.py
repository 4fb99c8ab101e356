"""Which layers attend alike: calibration and grouping for inter-layer sharing (PoD, Ma et al., arXiv 2412.02252;
spec ``shared/docs/interlayer.md``).

Calibration (``kvcascade calibrate interlayer``): on ``samples`` local texts of ``length`` tokens (King James
Old Testament and installed Python sources, alternating), one forward of the model records, for every layer and
query head, the attention distribution of the last ``queries`` query positions over all causal keys. The
similarity of layers ``a`` and ``b`` for KV head ``h`` is ``1 - JSD(P_a, P_b)`` (Jensen-Shannon divergence, log
base 2, so in [0, 1]), averaged over the query rows, over the query heads that share KV head ``h`` (head ``i`` of
layer ``a`` paired with head ``i`` of layer ``b``) and over the samples.

Grouping (:func:`group_layers`), per KV head, greedy from the bottom: open a block at the lowest layer not yet
grouped (its *base*), extend it with the next layers while their similarity to the base is at least ``delta``
(default 0.5), then open the next block. Blocks are runs of consecutive layers. The groups file stores the whole
similarity matrix, so another ``delta`` regroups without a new calibration (:func:`regroup`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..errors import KVCascadeError
from ..probe import current_state, observe, sdpa

FORMAT = "kvcascade-interlayer-groups/1"
CAPTURE_ATTENTION = "kvcascade_interlayer_capture"


def jsd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (log base 2, in [0, 1]) between distributions along the last axis."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a):
        return torch.where(a > 0, a * (torch.log2(a.clamp_min(1e-300)) - torch.log2(m.clamp_min(1e-300))),
                           torch.zeros_like(a)).sum(-1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(0.0, 1.0)


def similarity_from_attention(probs: list[torch.Tensor], n_kv: int) -> torch.Tensor:
    """``[n_kv, L, L]`` similarity ``1 - JSD`` from per-layer attention ``[Hq, Q, T]`` (one sample)."""
    L = len(probs)
    Hq = probs[0].shape[0]
    g = Hq // n_kv
    sim = torch.eye(L, dtype=torch.float64, device=probs[0].device).repeat(n_kv, 1, 1)
    for a in range(L):
        for b in range(a + 1, L):
            d = jsd(probs[a], probs[b]).mean(-1)  # [Hq]: mean over query rows
            s = 1.0 - d.view(n_kv, g).mean(-1)
            sim[:, a, b] = s
            sim[:, b, a] = s
    return sim


def check_delta(delta: float, name: str = "delta") -> None:
    """A grouping threshold is a similarity: in [0, 1] (NaN refused)."""
    if not 0.0 <= delta <= 1.0:
        raise KVCascadeError(f"{name} must be in [0, 1], got {delta}")


def group_layers(sim: torch.Tensor, delta: float) -> list[list[list[int]]]:
    """Per KV head, consecutive-layer blocks (each a list of layers, the base first), greedy from the bottom."""
    check_delta(delta)
    groups = []
    n_kv, L, _ = sim.shape
    for h in range(n_kv):
        blocks, a = [], 0
        while a < L:
            block = [a]
            b = a + 1
            while b < L and float(sim[h, a, b]) >= delta:
                block.append(b)
                b += 1
            blocks.append(block)
            a = b
        groups.append(blocks)
    return groups


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state = current_state()
    if state is not None:
        Qn = state["queries"]
        B, Hq, T, D = query.shape
        H = key.shape[1]
        s = scaling if scaling is not None else D ** -0.5
        q = query[:, :, T - Qn:].float()
        k = key.float().repeat_interleave(Hq // H, dim=1)
        logits = torch.einsum("bhqd,bhtd->bhqt", q, k) * s
        rows = torch.arange(T - Qn, T, device=query.device).view(-1, 1)
        causal = torch.arange(T, device=query.device).view(1, -1) <= rows
        window = kwargs.get("sliding_window")
        if window:
            causal &= rows - torch.arange(T, device=query.device).view(1, -1) < window
        logits = logits.masked_fill(~causal, float("-inf"))
        state["probs"][module.layer_idx] = torch.softmax(logits, dim=-1)[0]  # [Hq, Q, T]
    return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@torch.no_grad()
def attention_of_last_queries(model, ids: torch.Tensor, queries: int) -> list[torch.Tensor]:
    """Per layer, the attention ``[Hq, queries, T]`` of the last ``queries`` positions of ``ids`` ``[1, T]``."""
    probs = observe(model, ids, CAPTURE_ATTENTION, _capture_attention,
                    {"queries": min(queries, ids.shape[1]), "probs": {}})["probs"]
    from ..models import text_config

    n = text_config(model.config).num_hidden_layers
    if len(probs) != n:
        raise KVCascadeError("the model's attention did not go through the calibration function in every layer")
    return [probs[i] for i in range(n)]


def calibration_texts(tokenizer, samples: int, length: int, seed: int = 0) -> list[list[int]]:
    """``samples`` token lists of ``length`` tokens: King James Old Testament and Python sources, alternating."""
    from ..texts import kjv_part, python_sources

    rng = random.Random(seed)
    ot = kjv_part("ot")
    files = python_sources(limit_bytes=5_000_000)
    out = []
    for i in range(samples):
        if i % 2 == 0 or not files:
            start = rng.randrange(0, max(1, len(ot) - length * 6))
            text = ot[start:start + length * 6]
        else:
            parts, size = [], 0
            while size < length * 6:
                t = rng.choice(files).read_text(encoding="utf-8", errors="replace")
                parts.append(t)
                size += len(t)
            text = "\n".join(parts)
        ids = tokenizer(text, add_special_tokens=False).input_ids[:length]
        if len(ids) < length:
            raise KVCascadeError(f"calibration text too short for {length} tokens")
        out.append(ids)
    return out


def calibrate(model, tokenizer, *, samples: int = 64, length: int = 8192, queries: int = 64, delta: float = 0.5,
              seed: int = 0, model_name: str = "", progress: bool = True) -> dict:
    """Measure layer similarity per KV head and group layers; returns the groups-file content."""
    from ..models import fingerprint, text_config
    from ..progress import progress_bar

    if samples < 1 or length < 16 or queries < 1:
        raise KVCascadeError(f"samples, length and queries must be positive (got {samples}, {length}, {queries})")
    check_delta(delta)  # before any work
    cfg = text_config(model.config)
    n_kv = cfg.num_key_value_heads
    total = None
    bar = progress_bar(total=samples, desc="calibrate", unit="sample", enabled=progress)
    for ids in calibration_texts(tokenizer, samples, length, seed):
        probs = attention_of_last_queries(model, torch.tensor([ids], device=model.device), queries)
        sim = similarity_from_attention(probs, n_kv).cpu()  # on the model's device: 276 JSDs per sample
        total = sim if total is None else total + sim
        bar.update(1)
    bar.close()
    sim = total / samples
    return {"format": FORMAT, "model": model_name, "fingerprint": fingerprint(model.config), "delta": delta,
            "samples": samples, "length": length, "queries": queries, "seed": seed,
            "similarity": sim.tolist(), "groups": group_layers(sim, delta)}


def save_groups(info: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)
    return path


def check_groups(info: dict, model, where) -> None:
    """Refuse groups calibrated on another architecture (one clear error)."""
    from ..models import fingerprint

    if info.get("fingerprint") != fingerprint(model.config):
        raise KVCascadeError(f"inter-layer groups '{where}' were calibrated for {info.get('model') or 'another model'}, "
                             "not this one; calibrate with: kvcascade calibrate interlayer --model NAME --out FILE")


def base_layers(groups: list[list[list[int]]]) -> list[list[int]]:
    """``[layer][kv_head]``: the base (lowest) layer of the block holding that layer for that head."""
    n_layers = 1 + max(layer for blocks in groups for block in blocks for layer in block)
    base_of = [[i] * len(groups) for i in range(n_layers)]
    for h, blocks in enumerate(groups):
        for block in blocks:
            for layer in block:
                base_of[layer][h] = block[0]
    return base_of


def load_groups(path, model=None) -> dict:
    """Read a groups file; with ``model``, refuse one calibrated on another architecture (one clear error)."""
    try:
        info = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KVCascadeError(f"inter-layer groups file '{path}' does not exist (make one with: kvcascade calibrate "
                             "interlayer --model NAME --out groups.json)") from None
    except (OSError, ValueError) as e:
        raise KVCascadeError(f"cannot read inter-layer groups '{path}': {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise KVCascadeError(f"'{path}' is not a kvcascade inter-layer groups file")
    if model is not None:
        check_groups(info, model, path)
    return info


def groups_for(path, model, missing: str) -> tuple[dict, str]:
    """``(info, path)`` of the groups file ``path`` checked against ``model``; ``"auto"``: the file shipped for the
    model, or the error ``missing`` when none ships."""
    if path == "auto":
        path = find_shipped(model)
        if path is None:
            raise KVCascadeError(missing)
    return load_groups(path, model), str(path)


def regroup(info: dict, delta: float) -> dict:
    """The same calibration grouped with another ``delta``."""
    sim = torch.tensor(info["similarity"], dtype=torch.float64)
    return {**info, "delta": delta, "groups": group_layers(sim, delta)}


SHIPPED_DIR = Path(__file__).resolve().parent / "groups"


def find_shipped(model) -> Path | None:
    """The groups file shipped for ``model``: the same architecture, and the same registered model where the model
    was loaded by a kvcascade short name."""
    from ..locret.heads import model_name_of
    from ..models import fingerprint

    fp, name = fingerprint(model.config), model_name_of(model)
    for path in sorted(SHIPPED_DIR.glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if info.get("fingerprint") == fp and name in (None, info.get("model")):
            return path
    return None
