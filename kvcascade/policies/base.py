"""The policy interface and registry.

A policy decides what stays in the cache. It never runs the model: after each attention call of a layer
(a prompt chunk or one decoded token) the cache has appended the chunk and calls ``policy.step(cache,
layer, stats)``; the policy updates per-token scores from ``stats`` (attention mass) and compacts the layer
when it holds more than the policy's budget. A policy sees the whole cache (all layers), so cross-layer
methods fit the same interface.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..errors import KVCascadeError

REGISTRY: dict[str, type[Policy]] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


class Policy:
    """Base class. Subclasses set ``name``, ``PARAMS`` (defaults) and ``DOCS`` (one line per parameter)."""

    name: ClassVar[str] = "base"
    #: "original": queries and keys use original token positions; "cache": positions are in-cache slots.
    position_mode: ClassVar[str] = "original"
    PARAMS: ClassVar[dict[str, Any]] = {}
    DOCS: ClassVar[dict[str, str]] = {}
    obs_window: int = 0  # trailing queries whose attention the kernel sums separately (stats.obs)
    needs_mass: bool = False  # whether the kernel must return stats.mass
    tail_tokens: int = 0  # the engine runs the prompt's last tail_tokens tokens as their own final chunk

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            known = ", ".join(self.PARAMS) or "none"
            raise KVCascadeError(f"policy '{self.name}' has no parameter {', '.join(unknown)} (parameters: {known})")
        for key, default in self.PARAMS.items():
            value = params.get(key, default)
            if value is not None and default is not None and not isinstance(value, type(default)):
                try:
                    value = _coerce(value, type(default))
                except (TypeError, ValueError):
                    raise KVCascadeError(
                        f"policy '{self.name}': parameter {key}={value!r} is not a {type(default).__name__}"
                    ) from None
            setattr(self, key, value)
        self.validate()

    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.PARAMS}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    # -- to override ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        budget = getattr(self, "budget", None)
        if "budget" in self.PARAMS and (not isinstance(budget, int) or budget <= 0):
            raise KVCascadeError(f"policy '{self.name}': budget must be a positive number of tokens, got {budget!r}")
        sinks = getattr(self, "sinks", None)
        if sinks is not None and budget is not None and (sinks < 0 or sinks >= budget):
            raise KVCascadeError(f"policy '{self.name}': budget ({budget}) must be larger than sinks ({sinks})")

    def setup(self, cache) -> None:
        """Called once when a cache is created for this policy."""

    def teardown(self, cache) -> None:
        """Called once when that cache is released (remove hooks, free what ``setup`` made)."""

    def layer_budget(self, layer_idx: int, num_layers: int) -> int | None:
        """Tokens this layer may keep per KV head (None: unbounded)."""
        return getattr(self, "budget", None)

    def max_tokens(self, prompt_tokens: int, max_new: int, chunk: int, num_layers: int) -> int:
        """An upper bound on the tokens any layer holds per KV head at any moment of a generation (prompt chunk
        included at attention time): what a server reserves for a request."""
        total = prompt_tokens + max_new
        caps = [self.layer_budget(i, num_layers) for i in range(num_layers)]
        if any(c is None for c in caps):
            return total
        return min(total, max(caps) + chunk)

    def layer_cap(self, cache, layer) -> int | None:
        """Tokens ``layer`` may hold per KV head after this policy's step, now (default: :meth:`layer_budget`)."""
        return self.layer_budget(layer.idx, cache.num_layers)

    def attention(self, cache, layer, query, k_all, v_all, *, q_orig, k_orig, scaling, softcap):
        """A policy's own attention for ``layer`` (``(out, mass, obs)``), or None for the standard kernels."""
        return None

    #: whether a decode step of this policy may be replayed as a CUDA graph (see :mod:`kvcascade.graphs`): its
    #: step must issue the same kernels whenever the layers hold the same token counts and host state, and copy
    #: nothing from the host to the device
    graph_safe: ClassVar[bool] = False
    #: whether sessions of this policy may decode as rows of one batch (``engine.BatchDecoder``; also needs
    #: ``graph_safe``): not when a step's decisions follow each sequence's own arrival times (the cascade)
    batchable: ClassVar[bool] = True
    #: a policy that never evicts and does nothing in its decode step (``full``): a growing cache's decode step can
    #: then be captured once per buffer and replayed at every length (padded decode, see kvcascade.graphs)
    graph_grow: ClassVar[bool] = False
    #: a policy that evicts only beyond :meth:`layer_cap`: below the cap a decode step only adds the token (and
    #: whatever :meth:`padded_step` does), so a prompt shorter than the budget decodes padded under CUDA graphs
    #: until the cache reaches the cap
    grows_below_cap: ClassVar[bool] = False

    def graph_key(self, cache, tokens: int = 1):
        """What, beyond the layers' token counts and state, decides this policy's step on ``tokens`` new tokens (1: a
        decode step, more: a prompt chunk) on the host (a hashable value), or None when the step cannot be replayed
        (see :mod:`kvcascade.graphs`)."""
        return () if self.graph_safe else None

    def before_step(self, cache, tokens: int) -> None:
        """Called before every step of ``tokens`` new tokens that :class:`~kvcascade.graphs.DecodeGraphs` runs
        (eagerly, captured or replayed), outside any graph: a policy whose step depends on host numbers that
        :meth:`graph_key` leaves out writes them to device memory here (the cascade's unit to drop)."""

    def grows_next(self, cache, layer) -> bool:
        """Whether this policy's next decode step on ``layer`` only adds the token (no eviction, nothing but
        :meth:`padded_step` to do): then it can run padded (see ``CompressedCache.padded``). Default: a policy
        that never evicts (``graph_grow``), or one that grows below its cap (``grows_below_cap``) with room
        for the token under the cap."""
        if self.grows_below_cap:
            cap = self.layer_cap(cache, layer)
            return cap is None or len(layer) + 1 <= cap
        return self.graph_grow

    #: a padded decode step needs the attention mass of the query over every slot (``[B, H, capacity]``, zero on
    #: empty slots), passed to :meth:`padded_step` as ``mass``
    padded_mass: ClassVar[bool] = False

    def padded_step(self, cache, layer, slot, mass=None) -> None:
        """A padded decode step's bookkeeping for the token written at ``slot`` (a device index): the padded
        twin of :meth:`step` when :meth:`grows_next` held (``mass``: see ``padded_mass``)."""

    def layer_bytes(self, layer) -> int:
        """K/V bytes ``layer`` holds in this policy's storage layout (default: what its tensors take)."""
        return layer.nbytes()

    def query_weights(self, n_queries: int, device):
        """Per-query weights of ``stats.mass`` (None: a plain sum over the chunk's queries)."""
        return None

    def step(self, cache, layer, stats) -> None:
        """Update scores and compact ``layer`` after an attention call."""
        raise NotImplementedError


class PositionsParam:
    """Mixin for policies with original positions that can also run with in-cache positions (``positions=cache``).

    With original positions, a prompt longer than the model's window reaches positions (and query-key distances)
    the model never saw in training; ``positions=cache`` numbers kept tokens by slot, as StreamingLLM does, so
    distances stay below ``budget + chunk``. Default ``original`` (the papers' setting).
    """

    POSITIONS_DOC = "original (token positions, the paper) or cache (slot positions, as StreamingLLM: for streams " \
                    "longer than the model's window)"

    def validate(self) -> None:
        super().validate()
        if self.positions not in ("original", "cache"):
            raise KVCascadeError(f"policy '{self.name}': positions must be original or cache, got '{self.positions}'")
        self.position_mode = self.positions


def _coerce(value, kind):
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return bool(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if isinstance(value, str):
            value = value.lower().replace("_", "")
            mult = 1024 if value.endswith("k") else 1
            return int(value.rstrip("k")) * mult
        return int(value)
    return kind(value)


# -- helpers shared by policies --------------------------------------------------------------------------
def keep_indices(score: torch.Tensor, k: int, protect: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``[B, H, k]`` (sorted) of the ``k`` highest scores; ``protect`` (bool, broadcastable) always kept.
    Of equal scores at the cut, which are kept is topk's choice; when one token is dropped, it is the first of the
    lowest."""
    s = score.float()
    if protect is not None:
        s = s.masked_fill(protect, float("inf"))
    n = s.shape[-1]
    if k == n - 1:  # a decode step at the budget drops one token: the lowest score (the first of equal ones)
        victim = s.argmin(dim=-1, keepdim=True)  # one reduction where topk + sort are two radix sorts on a GPU
        ar = torch.arange(k, device=s.device)
        return ar + (ar >= victim).long()
    idx = torch.topk(s, k, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values


def sink_mask(pos: torch.Tensor, sinks: int) -> torch.Tensor:
    return pos < sinks


def make_policy(policy: str | Policy = "streaming", budget: int | None = None, /, **params) -> Policy:
    """Build a policy by registry name (``budget`` and ``params`` are its parameters) or pass one through.

    The budget may come as the second argument or as ``budget=`` among the parameters, not both."""
    if budget is not None and params.get("budget") is not None:
        raise KVCascadeError(f"policy '{policy}': the budget is given twice ({budget} and budget={params['budget']}); "
                             "give it once (with --budget / --budgets, or as a policy argument)")
    if budget is None:
        budget = params.pop("budget", None)
    else:
        params.pop("budget", None)
    if isinstance(policy, Policy):
        if budget is not None or params:
            raise KVCascadeError("pass budget/parameters when naming a policy, not with a policy object")
        return policy
    if policy not in REGISTRY:
        raise KVCascadeError(f"unknown policy '{policy}'; known policies: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[policy]
    if budget is not None:
        if "budget" not in cls.PARAMS:
            raise KVCascadeError(f"policy '{policy}' takes no budget")
        params["budget"] = budget
    return cls(**params)


def takes_budget(name: str) -> bool:
    """Whether the registered policy ``name`` has a token budget (``full`` and ``interlayer`` keep everything)."""
    return name in REGISTRY and "budget" in REGISTRY[name].PARAMS


def parse_policy_spec(spec: str) -> tuple[str, dict]:
    """``'cascade:block=16:cascades=8'`` -> ``('cascade', {'block': '16', 'cascades': '8'})``."""
    name, *args = spec.split(":")
    bad = [a for a in args if "=" not in a]
    if bad:
        raise KVCascadeError(f"policy spec '{spec}': expected name:key=value:..., got '{bad[0]}'")
    return name, dict(a.split("=", 1) for a in args)


SLIDING_LAYERS_NOTE = (
    "On sliding-window layers (Gemma3's local layers; any model whose config sets a sliding window) every policy "
    "keeps the last window - 1 tokens, the most such a layer ever attends to (capped by the policy's budget for "
    "that layer); the policy itself runs on the global (full-attention) layers.")


def describe_policies() -> list[dict]:
    return [
        {"name": name, "summary": (cls.__doc__ or "").strip().splitlines()[0], "position_mode": cls.position_mode,
         "params": {k: {"default": v, "doc": cls.DOCS.get(k, "")} for k, v in cls.PARAMS.items()},
         "sliding_layers": "keep the last window - 1 tokens (see SLIDING_LAYERS_NOTE)"}
        for name, cls in sorted(REGISTRY.items())
    ]
