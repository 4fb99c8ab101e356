"""Locret's retaining heads (Huang et al., "Locret: Enhancing Eviction in Long-Context LLM Inference with Trained
Retaining Heads", arXiv 2410.01805; spec: ``shared/docs/locret.md``).

One small MLP per attention layer, ``R(x) = W2 act(W1 x)`` with ``x = [q; k; v]`` the token's raw projections
(every head, after the q/k/v biases, before head split, norms and RoPE), no biases, the model's ``hidden_act``,
no output activation, one score per KV head. The scores predict how much later queries will need each
KV unit (the largest pre-softmax logit an answer token gives it).

The projections are read through the stock model with forward hooks on ``q_proj``/``k_proj``/``v_proj``
(:class:`ProjectionTap`); no model code is copied. Heads are saved as safetensors with the model's name, the
shapes they fit (:func:`fingerprint`) and how they were trained, and refuse to load onto another model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import KVCascadeError
from ..models import fingerprint, head_dim, text_config  # noqa: F401  (shapes a head set must match)

FORMAT = "kvcascade-locret-heads/1"


def attention_layers(model) -> list[nn.Module]:
    """The attention module of every decoder layer, in order."""
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise KVCascadeError(f"model '{type(model).__name__}' has no decoder layers kvcascade knows")
    out = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")):
            raise KVCascadeError("Locret needs separate q_proj/k_proj/v_proj projections in every attention layer")
        out.append(attn)
    return out


def scored_layers(config) -> list[int]:
    """Layers that get a head: every global (full-attention) layer; sliding-window layers keep their window."""
    cfg = text_config(config)
    types = getattr(cfg, "layer_types", None)
    n = cfg.num_hidden_layers
    if types is not None:
        return [i for i, t in enumerate(types[:n]) if t != "sliding_attention"]
    return list(range(n))


def _activation(name: str):
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise KVCascadeError(f"unknown activation '{name}' for Locret heads")
    return ACT2FN[name]


class RetainingHeads(nn.Module):
    """The heads of one model: ``fc1[i]``, ``fc2[i]`` for each scored layer ``layers[i]``."""

    def __init__(self, fp: dict, layers: list[int], width: int = 256, model_name: str = "", meta: dict | None = None):
        super().__init__()
        self.fp = dict(fp)
        self.layers = list(layers)
        self.width = int(width)
        self.model_name = model_name
        self.meta = dict(meta or {})
        d = fp["head_dim"]
        self.in_dim = (fp["num_attention_heads"] + 2 * fp["num_key_value_heads"]) * d
        self.n_kv = fp["num_key_value_heads"]
        self.fc1 = nn.ModuleList(nn.Linear(self.in_dim, self.width, bias=False) for _ in self.layers)
        self.fc2 = nn.ModuleList(nn.Linear(self.width, self.n_kv, bias=False) for _ in self.layers)
        self.act = _activation(fp["hidden_act"])
        self.slot = {layer: i for i, layer in enumerate(self.layers)}
        self.reset_parameters()

    @classmethod
    def for_model(cls, model, width: int = 256, model_name: str = "", seed: int = 0) -> "RetainingHeads":
        torch.manual_seed(seed)
        return cls(fingerprint(model.config), scored_layers(model.config), width, model_name)

    def reset_parameters(self) -> None:
        """``normal(0, 0.02)``, as Hugging Face initialises linear layers (the official heads' init)."""
        for lin in [*self.fc1, *self.fc2]:
            nn.init.normal_(lin.weight, 0.0, 0.02)

    def score(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """Scores ``[..., n_kv]`` for ``qkv`` ``[..., in_dim]`` of layer ``layer`` (float32)."""
        i = self.slot[layer]
        w1 = self.fc1[i].weight
        h = self.act(qkv.to(w1.dtype) @ w1.t())
        return (h @ self.fc2[i].weight.t()).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- files ---------------------------------------------------------------------------------------------
    def save(self, path, **meta) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.bfloat16 if meta.get("bf16") else torch.float32).contiguous()
                   for k, v in self.state_dict().items()}
        header = {"format": FORMAT, "model": self.model_name, "fingerprint": self.fp, "layers": self.layers,
                  "width": self.width, "meta": {**self.meta, **{k: v for k, v in meta.items() if k != "bf16"}}}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"kvcascade": json.dumps(header)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path, model=None) -> "RetainingHeads":
        """Load heads; with ``model``, refuse heads made for another architecture (one clear error)."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = _header_of(f)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise KVCascadeError(f"Locret heads file '{path}' does not exist") from None
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds on bad files
            raise KVCascadeError(f"cannot read Locret heads '{path}': {e}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise KVCascadeError(f"'{path}' is not a kvcascade Locret heads file")
        heads = cls(header["fingerprint"], header["layers"], header["width"], header.get("model", ""),
                    header.get("meta"))
        try:
            heads.load_state_dict({k: v.float() for k, v in tensors.items()})
        except RuntimeError as e:
            raise KVCascadeError(f"Locret heads '{path}' are inconsistent with their own header: {e}") from None
        if model is not None:
            heads.check(model, path)
        return heads

    def check(self, model, where="") -> None:
        fp = fingerprint(model.config)
        diff = [f"{k} {self.fp.get(k)!r} vs the model's {v!r}" for k, v in fp.items() if self.fp.get(k) != v]
        if diff or self.layers != scored_layers(model.config):
            what = "; ".join(diff) or "scored layers differ"
            raise KVCascadeError(f"Locret heads {where or ''} were trained for {self.model_name or 'another model'}, "
                                 f"not this one ({what}); train heads for it with: kvcascade train locret --model "
                                 "NAME --out heads.safetensors")


class ProjectionTap:
    """Forward hooks that keep the latest raw ``q``/``k``/``v`` projection outputs of chosen layers.

    ``tap.qkv(layer)`` -> ``[B, C, in_dim]`` (``cat(q, k, v)`` of the last forward), as the heads read them.
    Hooks never change what the model computes. ``close()`` removes them.
    """

    def __init__(self, model, layers: list[int]):
        self.out: dict[int, dict[str, torch.Tensor]] = {i: {} for i in layers}
        self.handles = []
        attn = attention_layers(model)
        for i in layers:
            for name in ("q", "k", "v"):
                mod = getattr(attn[i], f"{name}_proj")
                self.handles.append(mod.register_forward_hook(self._hook(i, name)))

    def _hook(self, i, name):
        def hook(module, args, output):
            self.out[i][name] = output.detach()
        return hook

    def qkv(self, layer: int) -> torch.Tensor:
        o = self.out[layer]
        if len(o) < 3:
            raise KVCascadeError(f"no q/k/v projections recorded for layer {layer}")
        return torch.cat([o["q"], o["k"], o["v"]], dim=-1)

    def clear(self) -> None:
        for o in self.out.values():
            o.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.clear()


def _header_of(f) -> dict | None:
    return json.loads((f.metadata() or {}).get("kvcascade", "null"))


def read_header(path) -> dict | None:
    """A heads file's kvcascade header (model, fingerprint, layers, width, meta) without its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return _header_of(f)


# -- shipped heads ------------------------------------------------------------------------------------------
SHIPPED_DIR = Path(__file__).resolve().parent / "heads"


def shipped_heads_path(model_name: str) -> Path:
    return SHIPPED_DIR / f"{model_name}.safetensors"


def model_name_of(model) -> str | None:
    """The kvcascade short name a model was loaded by (from its converted folder's ``kvcascade.json``), if any."""
    try:
        meta = Path(getattr(model.config, "_name_or_path", "") or "") / "kvcascade.json"
        return json.loads(meta.read_text()).get("name") if meta.is_file() else None
    except (OSError, ValueError):
        return None


def find_shipped(model) -> Path | None:
    """The shipped heads file made for ``model``: same shapes, and the same registered model where the model was
    loaded by a kvcascade short name (another model of the same shapes gets none)."""
    fp = fingerprint(model.config)
    name = model_name_of(model)
    for path in sorted(SHIPPED_DIR.glob("*.safetensors")):
        try:
            header = read_header(path)
        except Exception:  # noqa: BLE001 - a broken shipped file is skipped here, reported when named
            continue
        if isinstance(header, dict) and header.get("fingerprint") == fp and \
                header.get("layers") == scored_layers(model.config) and name in (None, header.get("model")):
            return path
    return None
