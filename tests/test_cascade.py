"""The cascade policy: vectorised insertion against a plain per-token simulation of the paper's rule,
its invariants, the EMA formula, and its reductions to StreamingLLM and to the full cache."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcascade import make_policy
from kvcascade.errors import KVCascadeError
from kvcascade.cache import AttnStats, CompressedCache
from kvcascade.policies.cascade import segments_last_first

from .conftest import reference_logits, run_chunks, tiny_model

MODEL = tiny_model("llama", layers=2)


class Simulator:
    """The paper's insertion rule, one token at a time, on plain Python lists (one head)."""

    def __init__(self, sinks, cascades, window, every, eager, rule, block=1, recenter=False, peak=False):
        self.S, self.C, self.W, self.every, self.eager, self.rule = sinks, cascades, window, every, eager, rule
        self.b, self.recenter, self.peak = block, recenter, peak
        self.sinks, self.casc, self.score = [], [[] for _ in range(cascades)], {}
        self.sel = self.score  # what competitions compare: the current score, or (peak) the highest so far
        if peak:
            self.sel = {}
        self.pending = []
        self.group = [[] for _ in range(cascades)]  # candidates for each cascade's newest slot in this stride

    def unit_score(self, u):
        return max(self.sel[p] for p in range(u, u + self.b))

    def new_stride(self, tokens):
        """A stride's competitors for a slot are its holder at the stride's start and the stride's offers;
        ``tokens``: the positions in the cache, whose scores were just updated."""
        self.group = [c[-1:] for c in self.casc]
        if self.peak:
            for p in tokens:
                self.sel[p] = max(self.sel.get(p, 0.0), self.score[p])

    def select(self, group):
        """The slot's holder among ``group`` (unit starts in text order): the last highest unit score, then
        (recenter) the b-window over the winner and its text-contiguous neighbours that holds the winner's
        top token and has the largest score sum; ties: smallest shift, left first."""
        w = max(range(len(group)), key=lambda j: (self.unit_score(group[j]), j))
        u = group[w]
        if not self.recenter:
            return u
        b = self.b
        lo = group[w - 1] if w > 0 and group[w - 1] + b == u else u
        hi = group[w + 1] + b if w + 1 < len(group) and u + b == group[w + 1] else u + b
        vals = [self.sel[p] for p in range(u, u + b)]
        top = u + vals.index(max(vals))
        best, best_sum = None, None
        for o in [0] + [o for k in range(1, b) for o in (-k, k)]:
            st = u + o
            if lo <= st and st + b <= hi and st <= top < st + b:
                tot = sum(self.sel[p] for p in range(st, st + b))
                if best is None or tot > best_sum:
                    best, best_sum = st, tot
        return best

    def insert(self, pos):
        if len(self.sinks) < self.S:
            self.sinks.append(pos)
            return
        self.pending.append(pos)
        if len(self.pending) < self.b:
            return
        unit, self.pending = self.pending[0], []
        t = (unit - self.S) // self.b
        carry = unit
        for i in range(self.C):
            due = t % self.every(i) == 0 or (self.eager and t < self.C * self.W)
            if due:
                self.group[i] = [carry]
                if len(self.casc[i]) < self.W:
                    self.casc[i].append(carry)
                    return
                old = self.casc[i].pop(0)
                self.casc[i].append(carry)
                carry = old
            else:
                if not self.casc[i]:
                    self.casc[i].append(carry)
                    self.group[i] = [carry]
                elif self.rule == "ema":
                    self.group[i].append(carry)
                    self.casc[i][-1] = self.select(self.group[i])
                return

    def kept(self):
        units = [u for i in reversed(range(self.C)) for u in self.casc[i]]
        return self.sinks + [u + j for u in units for j in range(self.b)] + self.pending


def drive(policy, strides, seed, heads=1, ties=True):
    """Feed strides of random attention mass straight into the policy; compare with the simulator."""
    rng = torch.Generator().manual_seed(seed)
    cache = CompressedCache(MODEL, policy)
    layer = cache.layers[0]
    sims = [Simulator(policy.sinks, policy.cascades, policy.units, policy.every, policy.eager_fill, policy.rule,
                      policy.block, policy.recenter, policy.select == "peak") for _ in range(heads)]
    raw = [{} for _ in range(heads)]
    for c in strides:
        k = torch.zeros(1, heads, c, 16)
        policy.before_step(cache, c)  # (a full cascade's decode step takes its unit to drop from the device)
        layer.append(k, k)
        mass = torch.rand(1, heads, len(layer), generator=rng)
        if ties:
            mass[mass < 0.3] = 0.5  # plenty of exact ties, to pin down the tie rule
        before = layer.pos.clone()
        decay = policy.beta ** c
        for h in range(heads):
            for j, p in enumerate(before[0, h].tolist()):
                raw[h][p] = raw[h].get(p, 0.0) * decay + float(mass[0, h, j])
                sims[h].score[p] = raw[h][p]
        if policy.head_reduction == "mean":  # the simulator of head 0 sees the mean score
            for p in before[0, 0].tolist():
                sims[0].score[p] = sum(raw[h][p] for h in range(heads)) / heads
        policy.step(cache, layer, AttnStats(mass, None, c, 1, "prefill", True))
        for h, sim in enumerate(sims if policy.head_reduction == "none" else sims[:1]):
            sim.new_stride(before[0, h].tolist())
            for p in before[0, h].tolist()[len(before[0, h]) - c:]:
                sim.insert(p)
            assert layer.pos[0, h].tolist() == sim.kept(), (h, layer.seen)
            counts = layer.state["counts"]
            assert counts == [len(x) for x in sim.casc]
            assert all(n <= policy.units for n in counts)
        if policy.head_reduction == "mean":
            assert all(torch.equal(layer.pos[0, h], layer.pos[0, 0]) for h in range(heads))
        assert len(layer) <= policy.budget
    return cache


@settings(max_examples=60, deadline=None)
@given(
    sinks=st.integers(0, 3), cascades=st.integers(1, 4), window=st.integers(1, 5),
    strides=st.lists(st.integers(1, 23), min_size=1, max_size=12), seed=st.integers(0, 10_000),
    rule=st.sampled_from(["ema", "fixed"]), rate=st.sampled_from(["pow2", "pow3"]), eager=st.booleans(),
    per_head=st.booleans(), block=st.sampled_from([1, 1, 2, 3]),
)
def test_vectorised_insertion_matches_per_token_rule(sinks, cascades, window, strides, seed, rule, rate, eager,
                                                     per_head, block):
    budget = sinks + cascades * window * block + block - 1
    policy = make_policy("cascade", budget=budget, sinks=sinks, cascades=cascades, beta=0.9, rule=rule, rate=rate,
                         eager_fill=eager, head_reduction="none" if per_head else "mean", block=block)
    assert policy.units == window
    drive(policy, strides, seed, heads=2)


@settings(max_examples=60, deadline=None)
@given(
    sinks=st.integers(0, 3), cascades=st.integers(1, 4), window=st.integers(1, 4),
    strides=st.lists(st.integers(1, 23), min_size=1, max_size=12), seed=st.integers(0, 10_000),
    rate=st.sampled_from(["pow2", "pow3"]), eager=st.booleans(), per_head=st.booleans(), block=st.sampled_from([2, 3, 4]),
)
def test_recentred_insertion_matches_per_token_rule(sinks, cascades, window, strides, seed, rate, eager, per_head,
                                                    block):
    budget = sinks + cascades * window * block + block - 1
    policy = make_policy("cascade", budget=budget, sinks=sinks, cascades=cascades, beta=0.9, rate=rate,
                         eager_fill=eager, head_reduction="none" if per_head else "mean", block=block, recenter=True)
    cache = drive(policy, strides, seed, heads=2, ties=False)
    layer = cache.layers[0]
    for h in range(layer.pos.shape[1]):  # every kept unit is still b tokens contiguous in the text
        pos = layer.pos[0, h].tolist()[min(sinks, layer.seen):]
        pos = pos[:len(pos) - cache.policy.pending(layer)]
        assert len(pos) % block == 0
        assert all(pos[j + block - 1] - pos[j] == block - 1 for j in range(0, len(pos), block))


@settings(max_examples=40, deadline=None)
@given(
    sinks=st.integers(0, 3), cascades=st.integers(1, 4), window=st.integers(1, 4),
    strides=st.lists(st.integers(1, 23), min_size=1, max_size=12), seed=st.integers(0, 10_000),
    per_head=st.booleans(), block=st.sampled_from([1, 2, 3]), recenter=st.booleans(),
)
def test_peak_selection_matches_per_token_rule(sinks, cascades, window, strides, seed, per_head, block, recenter):
    budget = sinks + cascades * window * block + block - 1
    policy = make_policy("cascade", budget=budget, sinks=sinks, cascades=cascades, beta=0.5, select="peak",
                         head_reduction="none" if per_head else "mean", block=block, recenter=recenter and block > 1)
    drive(policy, strides, seed, heads=2, ties=False)


@settings(max_examples=60, deadline=None)
@given(
    sinks=st.integers(0, 3), cascades=st.integers(1, 4), window=st.integers(1, 4), prompt=st.integers(1, 40),
    decode=st.integers(1, 60), seed=st.integers(0, 10_000), rule=st.sampled_from(["ema", "fixed"]),
    rate=st.sampled_from(["pow2", "pow3"]), eager=st.booleans(), per_head=st.booleans(),
    block=st.sampled_from([1, 1, 2, 3]), peak=st.booleans(),
)
def test_decode_tokens_match_per_token_rule(sinks, cascades, window, prompt, decode, seed, rule, rate, eager,
                                            per_head, block, peak):
    """Decode steps (one token each: the schedule walked on the host, at most one unit dropped in place) after a
    prompt stride keep what the per-token rule keeps, ties included."""
    budget = sinks + cascades * window * block + block - 1
    policy = make_policy("cascade", budget=budget, sinks=sinks, cascades=cascades, beta=0.9, rule=rule, rate=rate,
                         eager_fill=eager, head_reduction="none" if per_head else "mean", block=block,
                         select="peak" if peak and rule == "ema" else "ema")
    drive(policy, [prompt] + [1] * decode, seed, heads=2)


def test_peak_remembers_a_burst_of_attention():
    """One token per stride, beta 0.5, two cascades of one slot. Tokens 1 and 2 compete for cascade 1's slot
    at t = 3: token 1 drew a burst (2.0) at t = 1, then nothing (EMA 2.0 -> 1.0 -> 0.5); token 2 draws 0.1
    then 0.9 (EMA 0.1 -> 0.95). The EMA rule keeps token 2, select=peak keeps token 1 (peak 2.0 > 0.95)."""
    kept = {}
    for select in ("ema", "peak"):
        policy = make_policy("cascade", budget=2, sinks=0, cascades=2, beta=0.5, eager_fill=False, select=select)
        cache = CompressedCache(MODEL, policy)
        layer = cache.layers[0]
        k = torch.zeros(1, 1, 1, 16)
        for mass in ([0.1], [0.1, 2.0], [0.0, 0.0, 0.1], [0.0, 0.9, 0.0]):  # pools [0], [0 1], [0 1 2], [1 2 3]
            layer.append(k, k)
            policy.step(cache, layer, AttnStats(torch.tensor([[mass]]), None, 1, 1, "prefill", True))
        kept[select] = layer.pos[0, 0].tolist()
    assert kept == {"ema": [2, 3], "peak": [1, 3]}


def test_recenter_keeps_a_needle_cut_by_a_unit_boundary_whole():
    """One sink, units of 4 tokens (1-4, 5-8, 9-12, 13-16), two cascades of one unit. A 3-token 'needle' at
    text positions 7, 8, 9 straddles units 5-8 and 9-12, which compete for cascade 1's slot (5-8 arrives when
    the slot is due, 9-12 when it is not). 5-8 holds the top token (7) and wins. Without recentring the needle
    loses token 9; with it the slot slides to 6-9 (sums: 5-8 1.92, 6-9 2.71, 7-10 2.71; the smaller shift wins)."""
    kept = {}
    for recenter in (False, True):
        policy = make_policy("cascade", budget=1 + 2 * 1 * 4 + 3, sinks=1, cascades=2, beta=0.5, block=4,
                             eager_fill=False, recenter=recenter)
        cache = CompressedCache(MODEL, policy)
        layer = cache.layers[0]
        k = torch.zeros(1, 1, 17, 16)
        layer.append(k, k)
        mass = torch.full((1, 1, 17), 0.01)
        mass[0, 0, 7:10] = torch.tensor([1.0, 0.9, 0.8])
        policy.step(cache, layer, AttnStats(mass, None, 17, 1, "prefill", True))
        kept[recenter] = layer.pos[0, 0].tolist()
    assert kept[False] == [0, 5, 6, 7, 8, 13, 14, 15, 16]
    assert kept[True] == [0, 6, 7, 8, 9, 13, 14, 15, 16]


def test_recenter_needs_blocks():
    with pytest.raises(KVCascadeError, match="recenter"):
        make_policy("cascade", budget=64, recenter=True)
    with pytest.raises(KVCascadeError, match="recenter"):
        make_policy("cascade", budget=64, block=4, rule="fixed", recenter=True)


def test_accepted_tokens_come_from_the_previous_cascade():
    """Track every token's cascade over time: a token only ever moves from cascade i to i + 1."""
    policy = make_policy("cascade", budget=3 + 3 * 4, sinks=3, cascades=3, beta=0.9)
    cache = CompressedCache(MODEL, policy)
    layer = cache.layers[0]
    where = {}
    rng = random.Random(0)
    for _ in range(40):
        c = rng.randint(1, 6)
        k = torch.zeros(1, 1, c, 16)
        layer.append(k, k)
        policy.step(cache, layer, AttnStats(torch.rand(1, 1, len(layer)), None, c, 1, "prefill", True))
        counts = layer.state["counts"]
        pos = layer.pos[0, 0].tolist()[min(3, layer.seen):]
        now = {}
        off = 0
        for i in reversed(range(3)):
            for p in pos[off:off + counts[i]]:
                now[p] = i
            off += counts[i]
        for p, i in now.items():
            if p in where:
                assert i in (where[p], where[p] + 1), (p, where[p], i)
        where = now


def test_ema_follows_the_formula():
    """beta = 0.5, old score 0.2, two queries giving 0.6 then 0.3: sequential EMA gives 0.4 then 0.35."""
    policy = make_policy("cascade", budget=9, sinks=1, cascades=2, beta=0.5)
    w = policy.query_weights(2, "cpu")
    assert w.tolist() == pytest.approx([0.25, 0.5])
    cache = CompressedCache(MODEL, policy)
    layer = cache.layers[0]
    k = torch.zeros(1, 1, 2, 16)
    layer.append(k, k)
    layer.score[:] = torch.tensor([[[0.2, 0.0]]])
    p = torch.tensor([[[0.6, 0.0], [0.3, 1.0]]])  # [B, query, key]: probabilities of the two queries
    mass = torch.einsum("bqn,q->bn", p, w).unsqueeze(1)
    policy.step(cache, layer, AttnStats(mass, None, 2, 1, "prefill", True))
    assert layer.score[0, 0].tolist() == pytest.approx([0.35, 0.5])


def test_segments_last_first_pick_each_groups_last_maximum():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 2.0, 2.0, 5.0])
    gid = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    seg = segments_last_first(gid, 4)
    assert seg.tolist() == [[2, 1, 0], [3, 7, 7], [5, 4, 7], [6, 7, 7]]
    ext = torch.cat([scores, torch.tensor([float("-inf")])])
    best = seg.gather(1, ext[seg].argmax(1, keepdim=True)).squeeze(1)
    assert best.tolist() == [2, 3, 5, 6]  # ties go to the later candidate


def test_one_cascade_without_selection_is_streaming(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(4))
    s_cache = CompressedCache(model, make_policy("streaming", budget=20, sinks=4))
    c_cache = CompressedCache(model, make_policy("cascade", budget=20, sinks=4, cascades=1))
    streaming = run_chunks(model, s_cache, ids, 7)
    cascade = run_chunks(model, c_cache, ids, 7)
    for a, b in zip(s_cache.layers, c_cache.layers):
        assert torch.equal(a.pos, b.pos)
    # same tokens, same positions; the two kernels' float rounding differs (SDPA vs reference)
    torch.testing.assert_close(cascade, streaming, rtol=1e-5, atol=1e-5)


def test_large_budget_is_full(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    ref = reference_logits(model, ids)
    got = run_chunks(model, CompressedCache(model, make_policy("cascade", budget=4 + 4 * 16, cascades=4)), ids, 9)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_cascade_spans_longer_history_than_streaming():
    policy = make_policy("cascade", budget=4 + 4 * 8, sinks=4, cascades=4, beta=0.9)
    cache = CompressedCache(MODEL, policy)
    ids = torch.randint(0, 96, (1, 400), generator=torch.Generator().manual_seed(6))
    run_chunks(MODEL, cache, ids, 16)
    layer = cache.layers[0]
    oldest_non_sink = int(layer.pos[0, 0, 4])
    # a 36-token streaming window reaches back to 364; four cascades of 8 reach ~ 8 * (1 + 2 + 4 + 8) = 120 back
    assert oldest_non_sink < 400 - 36 - 40
    assert len(layer) == 36


def test_recentred_variant_on_a_model(arch):
    """The recentred block variant through a real architecture: equals the full cache while everything fits;
    under pressure (per-KV-head selection) stays within budget and keeps every unit contiguous in the text."""
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (1, 120), generator=torch.Generator().manual_seed(7))
    spec = dict(sinks=2, cascades=3, block=4, recenter=True, beta=0.9)
    got = run_chunks(model, CompressedCache(model, make_policy("cascade", budget=2 + 3 * 40 * 4 + 3, **spec)),
                     ids[:, :40], 9)
    torch.testing.assert_close(got, reference_logits(model, ids[:, :40]), rtol=1e-4, atol=1e-4)
    policy = make_policy("cascade", budget=2 + 3 * 3 * 4 + 3, head_reduction="none", **spec)
    cache = CompressedCache(model, policy)
    run_chunks(model, cache, ids, 11)
    for layer in cache.layers:
        if layer.is_sliding:
            continue
        assert len(layer) <= policy.budget
        for row in layer.pos[0]:
            units = row.tolist()[2:len(row) - cache.policy.pending(layer)]
            assert all(units[j + 3] - units[j] == 3 for j in range(0, len(units), 4))
