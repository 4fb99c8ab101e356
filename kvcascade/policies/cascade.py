"""Cascading KV cache (Willette et al., "Training-Free Exponential Context Extension via Cascading KV Cache",
arXiv 2406.17808; official code ``jeffwillette/cascading_cache_2``).

Layout per layer: ``sinks`` slots (the first tokens, kept forever) plus ``cascades`` sub-caches of
``W = (budget - sinks) // cascades`` slots each. A new token (arrival index ``t``, counted after the sinks)
enters cascade 0; a token leaving cascade ``i`` is offered to cascade ``i + 1``:

* cascade ``i`` is *due* when ``t mod 2**i == 0`` (``rate="pow2"``; always during the eager fill, i.e.
  until the cascades are full): it appends the offered token (evicting its oldest slot, which is offered
  to cascade ``i + 1``, when full);
* when not due, the offered token competes with cascade ``i``'s most recently added token and the one with
  the higher EMA score keeps the slot (``>=``: the newer wins ties, as in the official kernel); the loser
  is dropped. With ``rule="fixed"`` (the paper's v1 ablation) the offered token is simply dropped.
* a token leaving the last cascade is dropped.

Scores: every cached token's score is an exponential moving average of the attention it receives,
``s <- beta * s + (1 - beta) * a`` per query. A stride of ``c`` queries applies the ``c`` per-query updates
exactly: ``s <- beta**c * s + (1 - beta) * sum_q beta**(c-1-q) * a_q`` (the kernel returns that weighted
mass), so scores do not depend on the stride size. ``head_reduction="mean"`` (the official default) averages
scores over heads, so all heads of a layer keep the same tokens; ``"none"`` keeps per-KV-head cascades.

Positions are in-cache: sinks ``0..S-1``, then the cascades oldest first (``kvcascade`` keeps tokens sorted
by original position, and every token in cascade ``i + 1`` is older than every token in cascade ``i``,
so the slot order is exactly the paper's order).

Decoding: a token's step walks the schedule on the host and drops at most one unit in place (the loser of the
one competition, or the oldest unit of the last cascade), two kernels; once every cascade is full which unit leaves
is handed to the device before the step (``before_step``), so one CUDA graph replays every steady step.

Strided prefill: each prompt chunk (stride) attends to the cache plus itself; then its tokens are inserted
in order with the scores they got. The insertion is vectorised: which slots are created and evicted at
which arrival times does not depend on scores, so a stride costs one pass per cascade (segment arg-max over
the offered tokens), not one per token.

Variant (ours, not in the paper): ``block=b > 1`` runs the same rule on units of ``b`` consecutive tokens
(a unit's score is its tokens' largest EMA score; an unfinished unit waits in ``b - 1`` extra slots). With
``block=1`` (default) consecutive tokens compete for one slot from cascade 1 on, so a needle spread over
several tokens (a 5-digit key is 5 tokens in Qwen's tokenizer) cannot survive there whole; units keep it
together. See docs/results/README.md for the measurements that motivated it. ``recenter=1`` (also ours)
fixes the case units leave: a needle cut by a unit boundary. When the winner of a competition and a loser next
to it are contiguous in the text, the slot keeps the ``b``-token window over both that holds the winner's top
token and has the most score mass; two halves of a needle then end up in one unit instead of one half being
dropped. Winners are picked exactly as without it; only which ``b`` tokens the slot keeps changes.
``select=peak`` (ours) compares the highest EMA score a token has had (taken at the end of every stride and
every decoded token) instead of its current one: a deep cascade decides thousands of tokens after a token
arrived, when the EMA of a key that drew attention once has decayed to the level of any filler.

Reach: with the pow2 rate a token leaves the last cascade at most ``W * (2**C - 1)`` arrivals after it came,
whatever its score (scores decide *which* token holds a slot, not how long slots last). With budget 8192 the
default 4 cascades reach ~31K tokens back; to hold a key 1M tokens back, raise ``cascades`` (12 cascades of
32-token units reach 2.75M: ``cascade:block=32:cascades=12`` found 90% of keys in 1M-token prompts on the
default 0.5B model with budget 4096 or 8192; the paper's defaults found none past 16K).

Defaults and their sources: ``sinks=4`` (StreamingLLM, used by the paper); ``beta=0.999`` (the value the
paper states; the official code's latest ``init_cache`` uses 0.9999 and an earlier one ``exp(-ln 100 / W)``);
``cascades=4`` (the paper reports 1 to 8; 4 is our default, tune per task); ``rate="pow2"`` and
``eager_fill=True`` as in the official code.
"""

from __future__ import annotations

import torch

from ..errors import KVCascadeError
from ..graphs import baked, host_only
from .base import Policy, register
from .share import SHARE_DOCS, SHARE_PARAMS, ShareParam


def segments_last_first(gid: torch.Tensor, n_groups: int) -> torch.Tensor:
    """For group ids ``gid`` ``[m]`` (0..n_groups-1, non-decreasing; a host tensor), each group's positions, last
    first, padded with ``m``: ``[n_groups, longest group]``. Scores gathered through it (the pad scoring -inf) and
    reduced with ``argmax`` (the first maximum) give each group's *last* maximum: the newer candidate wins a tie."""
    m = gid.numel()
    counts = torch.bincount(gid, minlength=n_groups)
    j = torch.arange(int(counts.max()) if m else 0)
    seg = counts.cumsum(0).view(-1, 1) - 1 - j.view(1, -1)
    return torch.where(j.view(1, -1) < counts.view(-1, 1), seg, torch.full_like(seg, m))


@register
class Cascade(ShareParam, Policy):
    """Sinks + cascading sub-caches with EMA-selective acceptance, in-cache positions (arXiv 2406.17808)."""

    name = "cascade"
    position_mode = "cache"
    PARAMS = {"budget": 2048, "sinks": 4, "cascades": 4, "beta": 0.999, "rule": "ema", "rate": "pow2",
              "head_reduction": "mean", "eager_fill": True, "block": 1, "recenter": False,
              "select": "ema", **SHARE_PARAMS}
    DOCS = {"budget": "tokens kept per layer and KV head (sinks included)",
            "sinks": "first tokens kept forever",
            "cascades": "number of sub-caches; each holds W = (budget - sinks - block + 1) // (cascades * block) units; "
                        "history reach ~ W * block * (2**cascades - 1) tokens",
            "beta": "EMA factor of the attention score (per query)",
            "rule": "ema (v2/v3: compare EMA scores) or fixed (v1: drop tokens offered when not due)",
            "rate": "pow2 (cascade i due every 2**i tokens) or pow3, pow4",
            "head_reduction": "mean (heads share one selection) or none (per-KV-head cascades)",
            "eager_fill": "accept every token until the cascades are full",
            "block": "1 = the paper (tokens); b > 1 = our variant: units of b consecutive tokens, scored by their max",
            "recenter": "with block > 1 (ours): when adjacent units compete, the winner slides over both to the "
                        "b-token window around its top token with the most score mass",
            "select": "ema (the paper: competitions compare current EMA scores) or peak (ours: the highest EMA "
                      "score a token has had, at stride ends)", **SHARE_DOCS}
    needs_mass = True
    graph_safe = True  # the schedule's host decisions are in graph_key; its index tensors are device constants
    batchable = False  # the schedule follows each sequence's own arrival times: rows of one batch would differ

    def graph_key(self, cache, tokens: int = 1):
        """A step's slot schedule (which cascade is due, what merges, what is pushed on) depends on host integers
        only: the layers' unit counts (their state, part of every key anyway) and arrival times. A decode token that
        only joins an unfinished unit (``block > 1``) schedules nothing; once every cascade is full, one that completes
        a unit takes which unit leaves from the device (:meth:`before_step`), so all share one key; before that it is
        decided by which cascades are due at that unit's arrival (at most ``cascades + 1`` patterns: a cascade due is
        due every ``rate``-th time the one before it is). A prompt chunk's schedule follows the arrival time modulo
        the slowest cascade's period and, while the cascades fill (``eager_fill``), the arrival time itself."""
        seen = cache.layers[0].seen
        t = seen - self.sinks
        if tokens == 1 and t >= 0:
            if not self._completes_unit(seen + 1):
                return ("wait",)
            if self._scheduled(cache) is not None:  # one graph: the schedule is device data (before_step)
                return ("unit", "steady")
            return ("unit",) + tuple(self._due(t // self.block, i) for i in range(self.cascades))
        fill = max(0, min(t, self.block * (self.cascades * self.units + 2)))  # exact until every cascade is full
        return (t % (self.block * self.every(self.cascades - 1)), fill)

    def _scheduled(self, cache):
        """For a decode token that completes a unit while every cascade is full (and past the eager fill): which
        unit leaves, ``("fixed" | "pair", start)`` (see :meth:`_walk`); else None. Such steps differ only in these
        two numbers, which :meth:`before_step` hands to the device, so one CUDA graph replays them all."""
        layer = cache._reference_layer()
        counts = layer.state.get("counts")
        if layer.seen < self.sinks or not self._completes_unit(layer.seen + 1) or self.recenter or counts is None:
            return None
        unit = (layer.seen + 1 - self.sinks) // self.block - 1
        if not self._scheduled_now(counts, unit):
            return None
        return self._walk(list(counts), unit, len(layer) + 1)

    def before_step(self, cache, tokens: int) -> None:
        if tokens != 1:
            return
        plan = self._scheduled(cache)
        if plan is None:
            return
        layer = cache._reference_layer()
        sched = cache.aux.get("cascade_sched")
        with torch.inference_mode():
            if sched is None or sched.device != layer._k.device:
                sched = cache.aux["cascade_sched"] = torch.zeros(2, dtype=torch.long, device=layer._k.device)
            sched[0].fill_(plan[1])
            sched[1].fill_(int(plan[0] == "fixed"))
        cache.aux["cascade_sched_for"] = layer.seen

    def _walk(self, counts: list, unit: int, n: int):
        """The schedule of a decode token that completes unit ``unit`` (arrival index after the sinks) in a layer of
        ``n`` tokens (the token included) whose cascades hold ``counts`` units (updated in place): ``(None, 0)``
        (nothing leaves), ``("fixed", start)`` (the unit at slot ``start`` leaves) or ``("pair", start)`` (the
        lower-scored of the units at ``start`` and ``start + block`` leaves: cascade i's newest unit against the
        offer from cascade i - 1, which sits right after it). The cache holds the sinks, then the cascades oldest
        first, then the unfinished unit, so every other slot keeps its order."""
        S, W, C, b = self.sinks, self.units, self.cascades, self.block
        starts = [0] * C  # slot of the first token of cascade i
        s0 = S
        for i in reversed(range(C)):
            starts[i] = s0
            s0 += counts[i] * b
        offer = n - b
        for i in range(C):
            k = counts[i]
            if k == 0 or self._due(unit, i):  # a new slot for the offer; the oldest moves on when full
                if k < W:
                    counts[i] = k + 1
                    return None, 0
                offer = starts[i]
                continue
            if self.rule == "fixed":  # v1: the incumbent keeps the slot
                return "fixed", offer
            return "pair", starts[i] + (k - 1) * b
        return "fixed", offer  # the oldest unit of the last cascade leaves the cache

    def _due(self, unit: int, i: int) -> bool:
        """Whether cascade ``i`` takes the unit that arrives ``unit``-th (after the sinks) as a new slot."""
        return unit % self.every(i) == 0 or (self.eager_fill and unit < self.cascades * self.units)

    def pending(self, layer, seen: int | None = None) -> int:
        """Tokens of an unfinished unit (the newest, not yet offered to a cascade) once ``layer`` has seen ``seen``
        tokens (default: all it has seen)."""
        seen = layer.seen if seen is None else seen
        return (seen - self.sinks) % self.block if seen > self.sinks else 0

    # a decode token that only joins an unfinished unit (block > 1) evicts nothing: it runs padded (one CUDA graph
    # for all of them) and its bookkeeping is the EMA update over every slot
    padded_mass = True

    def grows_next(self, cache, layer) -> bool:
        return self.select == "ema" and layer.seen >= self.sinks and not self._completes_unit(layer.seen + 1)

    def _completes_unit(self, seen: int) -> bool:
        """Whether the token that brings a layer to ``seen`` tokens completes a unit (one past the sinks)."""
        return seen > self.sinks and (seen - self.sinks) % self.block == 0

    def padded_step(self, cache, layer, slot, mass=None) -> None:
        group = cache.num_heads // cache.num_kv_heads
        layer._score[:, :, : mass.shape[-1]].mul_(self.beta).add_(mass, alpha=1 / group)  # empty slots stay 0

    def _on_device(self, t: torch.Tensor, dev) -> torch.Tensor:
        """``t`` (a small host tensor of the schedule) as a device tensor made once per value: a step replayed
        as a CUDA graph copies nothing from the host (its first, eager run made the constant)."""
        consts = self.__dict__.setdefault("_consts", {})
        # a prompt chunk's schedule (thousands of entries) is keyed by its bytes: chunks at the budget repeat it, and
        # a chunk replayed as a CUDA graph copies nothing either
        key = (str(dev), (tuple(t.shape), tuple(t.flatten().tolist())) if t.numel() <= 64
               else (t.dtype, tuple(t.shape), t.numpy().tobytes()))
        baked(key[1])
        if key not in consts:
            if len(consts) >= 4096:  # never dropped (a captured graph may read one): beyond this, copied each time
                return t.to(dev, non_blocking=True)  # (inside a capture that fails it, and the step runs eagerly)
            consts[key] = t.to(dev)
        return consts[key]

    def _arange(self, start: int, n: int, step: int, dev) -> torch.Tensor:
        """``start + step * arange(n)`` as a device constant (:meth:`_on_device`)."""
        with host_only():
            t = start + step * torch.arange(n)
        return self._on_device(t, dev)

    def validate(self) -> None:
        super().validate()
        if self.cascades < 1:
            raise KVCascadeError(f"policy 'cascade': cascades must be >= 1, got {self.cascades}")
        if self.block < 1:
            raise KVCascadeError(f"policy 'cascade': block must be >= 1, got {self.block}")
        if self.units < 1:
            raise KVCascadeError(f"policy 'cascade': budget - sinks ({self.budget - self.sinks}) must hold at least "
                                 f"one unit of {self.block} token(s) per cascade ({self.cascades})")
        if not 0.0 <= self.beta < 1.0:
            raise KVCascadeError(f"policy 'cascade': beta must be in [0, 1), got {self.beta}")
        if self.rule not in ("ema", "fixed"):
            raise KVCascadeError(f"policy 'cascade': rule must be 'ema' or 'fixed', got {self.rule!r}")
        if self.rate not in ("pow2", "pow3", "pow4"):
            raise KVCascadeError(f"policy 'cascade': rate must be pow2, pow3 or pow4, got {self.rate!r}")
        if self.recenter and (self.block < 2 or self.rule != "ema"):
            raise KVCascadeError("policy 'cascade': recenter needs block > 1 and rule=ema")
        if self.select not in ("ema", "peak"):
            raise KVCascadeError(f"policy 'cascade': select must be 'ema' or 'peak', got {self.select!r}")
        if self.head_reduction not in ("mean", "none"):
            raise KVCascadeError(f"policy 'cascade': head_reduction must be 'mean' or 'none', got "
                                 f"{self.head_reduction!r}")

    @property
    def units(self) -> int:
        """Slots (units of ``block`` tokens) per cascade; ``block - 1`` tokens are set aside for an unfinished block."""
        return (self.budget - self.sinks - (self.block - 1)) // (self.cascades * self.block)

    @property
    def window(self) -> int:
        """Tokens per cascade."""
        return self.units * self.block

    def layer_budget(self, layer_idx: int, num_layers: int) -> int:
        return self.sinks + self.cascades * self.window + self.block - 1

    def every(self, i: int) -> int:
        return {"pow2": 2, "pow3": 3, "pow4": 4}[self.rate] ** i

    def query_weights(self, n_queries: int, device) -> torch.Tensor:
        """Per-query weights that turn the summed mass into the exact per-query EMA increment."""
        return (1 - self.beta) * self.beta ** torch.arange(n_queries - 1, -1, -1, device=device, dtype=torch.float32)

    def _recenter(self, cand, cgid, pick, winners, rc: dict) -> torch.Tensor:
        """Slide each group's winning unit (start ``winners``, index ``pick`` into the candidates ``cand``) over
        its neighbours in the group that are contiguous with it in the text: the kept ``b``-token window is the
        one that still holds the winner's top-scoring token and has the largest score sum (ties: the smallest
        shift, left before right). A needle cut by a unit boundary then stays whole instead of losing a half.
        All windows stay inside the group's candidates, so no token is kept twice. ``rc``: the step's per-row
        ``pos``, per-start window ``sums`` and ``top`` offsets, and the ``shifts`` to try, in preference order."""
        b, pos, sums = self.block, rc["pos"], rc["sums"]
        m = cand.shape[1]
        g = torch.arange(pick.shape[1], device=cand.device).view(1, -1)
        prev_i, next_i = (pick - 1).clamp(min=0), (pick + 1).clamp(max=m - 1)
        s_prev, s_next = cand.gather(1, prev_i), cand.gather(1, next_i)
        has_prev = (pick > 0) & (cgid[prev_i] == g) & (pos.gather(1, s_prev + b - 1) + 1 == pos.gather(1, winners))
        has_next = (pick < m - 1) & (cgid[next_i] == g) & (pos.gather(1, winners + b - 1) + 1 == pos.gather(1, s_next))
        lo = torch.where(has_prev, s_prev, winners).unsqueeze(-1)
        hi = torch.where(has_next, s_next + b, winners + b).unsqueeze(-1)
        top = (winners + rc["top"].gather(1, winners)).unsqueeze(-1)
        st = winners.unsqueeze(-1) + rc["shifts"]  # [R, G, 2b - 1]
        ok = (st >= lo) & (st + b <= hi) & (st <= top) & (top < st + b)
        st_sums = sums.gather(1, st.clamp(0, sums.shape[1] - 1).flatten(1)).view(st.shape)
        best = torch.where(ok, st_sums, torch.full_like(st_sums, float("-inf"))).argmax(-1, keepdim=True)
        return st.gather(-1, best).squeeze(-1)

    # -- the policy step ---------------------------------------------------------------------------------
    def _one_token(self, cache, layer, row_scores: torch.Tensor, counts: list) -> None:
        """A decode token's step (``row_scores`` ``[R, n]``: the selection scores): the schedule walked on the host
        (:meth:`_walk`), and at most one unit (``block`` consecutive slots) dropped in place
        (:meth:`LayerCache.drop_one`): the step of :meth:`step` for one token, in two kernels instead of a few dozen
        per cascade. Once every cascade is full the unit to drop comes from the device (:meth:`before_step`)."""
        b = self.block
        if not self._completes_unit(layer.seen):  # the token joined an unfinished unit: nothing is offered
            return
        t = layer.seen - self.sinks
        scores = row_scores.view(layer.keys.shape[0], -1, row_scores.shape[-1])
        if cache.aux.get("cascade_sched_for") == layer.seen - 1 and self._scheduled_now(counts, t // b - 1):
            layer.drop_one(scores, pair=cache.aux["cascade_sched"], width=b)
            return
        kind, start = self._walk(counts, t // b - 1, len(layer))
        if kind == "fixed":
            layer.drop_one(victim=start, width=b)
        elif kind == "pair":  # the lower unit score goes; on a tie the incumbent (the offer wins, as the official kernel)
            layer.drop_one(scores, pair=start, width=b)

    def _scheduled_now(self, counts, unit: int) -> bool:
        """Whether this step is one :meth:`_scheduled` gave to the device (every cascade full, past the fill)."""
        return all(k == self.units for k in counts) and not (self.eager_fill and unit < self.cascades * self.units)

    def step(self, cache, layer, stats) -> None:
        c = stats.n_queries
        n = len(layer)
        seen_before = layer.seen - c
        # EMA update of every token's score (the chunk's tokens start at 0): stats.mass is already weighted
        layer.score.mul_(self.beta ** c).add_(stats.mass, alpha=1 / stats.group)
        counts = layer.state.setdefault("counts", [0] * self.cascades)  # units per cascade
        pending = self.pending(layer, seen_before)  # tokens of an unfinished block, right before the stride
        one = c == 1 and seen_before >= self.sinks and not self.recenter  # a decode token: at most one unit leaves
        if one and not self._completes_unit(layer.seen) and self.select == "ema":
            return  # it joined an unfinished unit: nothing is offered, nothing compared

        S, W, C, b = self.sinks, self.units, self.cascades, self.block
        dev = layer.keys.device
        n_sink_before = min(S, seen_before)
        new_sinks = max(0, min(c, S - seen_before))
        stride_start = n - c
        # row scores: [R, n]; rows are batch (shared selection) or batch*heads
        shared = self.head_reduction == "mean"
        rows = (lambda t: t[:, 0]) if shared else (lambda t: t.reshape(-1, n))  # noqa: E731 - [B, H, n] -> rows
        row_scores = self.shared(cache, layer, layer.score.mean(dim=1, keepdim=True) if shared else layer.score)
        row_scores = row_scores[:, 0] if shared else rows(row_scores)
        if self.select == "peak":  # the highest selection score each token has had (new tokens arrive with 0)
            peak = layer.extra.get("peak")
            if peak is None:
                peak = torch.zeros_like(layer.score)
            peak = torch.maximum(peak, row_scores.view(layer.score.shape[0], -1, n).expand_as(peak))
            layer.extra["peak"] = peak
            row_scores = rows(peak)
        R = row_scores.shape[0]
        if one:
            self._one_token(cache, layer, row_scores, counts)
            return
        rc = None
        if b > 1:  # a unit's score is the largest score among its b tokens; unit = pool index of its first token
            units = torch.nn.functional.pad(row_scores, (0, b - 1), value=float("-inf")).unfold(1, b, 1)
            if self.recenter:  # per start: the window's score sum and its top token; shifts 0, -1, 1, -2, 2, ...
                j = torch.arange(2 * b - 1, device=dev)
                rc = {"pos": rows(layer.pos), "top": units.argmax(-1),
                      "sums": torch.nn.functional.pad(row_scores, (0, b - 1)).unfold(1, b, 1).sum(-1),
                      "shifts": (j + 1) // 2 * (1 - 2 * (j % 2))}
            row_scores = units.amax(dim=-1)

        r0 = stride_start + new_sinks - pending  # first token not yet in a complete block
        n_blocks = (n - r0) // b
        new_pending = (n - r0) % b
        # The slot schedule (which cascade is due at which arrival time, what gets created or evicted) depends
        # only on integers the host knows, so it is computed on the CPU; only the winners of each competition
        # are picked on the device. No host synchronisation.
        offers = self._arange(r0, n_blocks, b, dev).view(1, -1).expand(R, -1)
        # a competition's candidates are gathered through each group's positions, last first; a pad column scoring
        # -inf fills the shorter groups (index len(row_scores), appended to the candidates)
        pad = self._arange(row_scores.shape[1], 1, 1, dev).view(1, 1).expand(R, 1)
        row_ext = torch.nn.functional.pad(row_scores, (0, 1), value=float("-inf")) if self.rule == "ema" else None
        t0 = layer.seen - (n - r0) - S  # arrival index (after the sinks) of the token at r0; a multiple of b
        with host_only():
            times = t0 // b + torch.arange(n_blocks)  # CPU
        starts = [0] * C  # pool index of the first token of cascade i
        s0 = n_sink_before
        for i in reversed(range(C)):
            starts[i] = s0
            s0 += counts[i] * b
        kept: list[torch.Tensor] = [None] * C
        for i in range(C):
            k = counts[i]
            existing = self._arange(starts[i], k, b, dev).view(1, -1).expand(R, -1)
            m = offers.shape[1]
            if m == 0:
                kept[i] = existing
                continue
            with host_only():  # the schedule, on host tensors (a replayed graph holds its outcome, see graph_key)
                due = (times % self.every(i)) == 0
                if self.eager_fill:
                    due = due | (times < C * W)
                creates = due.clone()
                if k == 0:
                    creates[0] = True
                gid = torch.cumsum(creates.long(), 0) - 1  # -1: merges into cascade i's most recent slot
                n_new = int(creates.sum())
                merge = k > 0 and not bool(creates[0])
                cgid = torch.cat([torch.full((1,), -1, dtype=torch.long), gid]) + 1 if merge else gid
                n_groups = n_new + 1 if merge else n_new
                create_times = times[creates]
                seg = segments_last_first(cgid, n_groups) if self.rule == "ema" else None
            cand = torch.cat([existing[:, -1:], offers, pad] if merge else [offers, pad], dim=1)  # [R, m + 1]
            if self.rule == "ema":  # each group's last candidate with the highest score (the newer wins ties)
                seg = self._on_device(seg, dev)
                cand_seg = cand.gather(1, seg.view(1, -1).expand(R, -1)).view(R, n_groups, -1)
                best = row_ext.gather(1, cand_seg.view(R, -1)).view(cand_seg.shape).argmax(-1, keepdim=True)
                winners = cand_seg.gather(-1, best).squeeze(-1)
                if self.recenter:
                    pick = seg.expand(R, -1, -1).gather(-1, best).squeeze(-1)
                    winners = self._recenter(cand[:, :-1], self._on_device(cgid, dev), pick, winners, rc)
            else:  # v1: the token that opened the group (or the incumbent) keeps the slot
                with host_only():
                    first = torch.zeros(n_groups, dtype=torch.long).scatter_reduce(
                        0, cgid, torch.arange(cgid.numel()), reduce="amin", include_self=False)
                winners = cand.gather(1, self._on_device(first, dev).view(1, -1).expand(R, -1))
            slots = torch.cat([existing[:, :-1] if merge else existing, winners], dim=1)
            total = slots.shape[1]
            if total > W:
                n_evict = total - W
                with host_only():  # slot W + e pushes out slot e when it is created
                    times = create_times[W + torch.arange(n_evict) - (total - n_new)]
                offers = slots[:, :n_evict]
                slots = slots[:, n_evict:]
            else:
                offers = slots[:, :0]
                with host_only():
                    times = times[:0]
            kept[i] = slots
            counts[i] = slots.shape[1]
        with host_only():
            sink_idx = torch.cat([torch.arange(n_sink_before), torch.arange(stride_start, stride_start + new_sinks)])
        units = [kept[i] for i in reversed(range(C))]
        if b > 1:  # every kept unit's b tokens, in one operation
            units = [(torch.cat(units, dim=1).unsqueeze(-1) + self._arange(0, b, 1, dev)).reshape(R, -1)]
        idx = torch.cat([self._on_device(sink_idx, dev).view(1, -1).expand(R, -1), *units,
                         self._arange(n - new_pending, new_pending, 1, dev).view(1, -1).expand(R, -1)], dim=1)
        B, H = layer.keys.shape[:2]
        idx = idx.view(B, 1, -1).expand(B, H, -1) if self.head_reduction == "mean" else idx.view(B, H, -1)
        if idx.shape[-1] != n:  # nothing dropped means every token kept in its place: the order is by arrival
            layer.compact(idx)
