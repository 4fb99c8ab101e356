"""Property tests of every policy's invariants, driven through a tiny real-architecture model."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcascade import make_policy
from kvcascade.cache import CompressedCache
from kvcascade.policies import REGISTRY

from .conftest import tiny_model

BUDGETED = sorted(n for n, c in REGISTRY.items() if "budget" in c.PARAMS)
MODEL = tiny_model("llama", layers=2)
GEMMA = tiny_model("gemma3", layers=3)


SHARES = sorted(n for n, c in REGISTRY.items() if "share" in c.PARAMS)


def policy_for(name, budget, share="none"):
    extra = {"share": share} if share != "none" and name in SHARES else {}
    if name in ("snapkv", "pyramidkv"):
        extra["window"] = max(1, budget // 4)
    if name == "streaming":
        extra["sinks"] = min(4, budget - 1)
    if name == "cascade":
        extra.update(sinks=2, cascades=max(1, min(3, (budget - 2) // 2)), beta=0.9)
    if name == "locret":
        extra.update(heads="random", local=3, decode_window=2)
    return make_policy(name, budget=budget, **extra)


def feed(model, cache, ids, chunks, decode):
    """Feed the prompt in the given chunk sizes, then ``decode`` single tokens; yield after each call."""
    pos = 0
    n = len(ids)
    with torch.no_grad():
        sizes = list(chunks)
        while pos < n:
            c = sizes.pop(0) if sizes else 3
            part = torch.tensor([ids[pos:pos + c]])
            pos += part.shape[1]
            cache.phase = "prefill"
            cache.final_chunk = pos >= n
            cache.forward(model, part)
            yield "prefill", cache.final_chunk
        cache.phase = "decode"
        for t in range(decode):
            part = torch.tensor([[ids[t % n]]])
            cache.forward(model, part)
            yield "decode", True


def check_invariants(cache, policy, phase, final):
    for layer in cache.layers:
        n = len(layer)
        if n == 0:
            continue
        # kept tokens' original positions strictly increase, per head
        assert bool((layer.pos[..., 1:] > layer.pos[..., :-1]).all())
        assert int(layer.pos.max()) < layer.seen
        assert layer.keys.shape[2] == layer.values.shape[2] == layer.pos.shape[2] == layer.score.shape[2] == n
        if layer.is_sliding:
            assert n <= layer.window - 1
            continue
        budget = policy.layer_cap(cache, layer)
        if policy.name in ("snapkv", "pyramidkv"):
            assert budget <= policy.layer_budget(layer.idx, cache.num_layers)
        grows_in_prefill = policy.name in ("snapkv", "pyramidkv") and not policy.chunked
        if policy.name == "locret" and phase == "prefill":
            budget = policy.budget if not final else policy.budget + policy.local  # the tail is never evicted
        if not (grows_in_prefill and phase == "prefill" and not final) and budget is not None:
            assert n <= budget, (policy, n, budget)
        sinks = getattr(policy, "sinks", 0)
        if sinks and layer.seen >= sinks:
            assert bool((layer.pos[..., :sinks] == torch.arange(sinks)).all())
    # in-cache positions are contiguous: the next query sits right after the kept tokens
    ref = cache._reference_layer()
    expected = len(ref) if policy.position_mode == "cache" else ref.seen
    assert int(cache.next_position_ids(1)[0, 0]) == expected


def snapshot(cache):
    return [(l.keys.clone(), l.values.clone(), l.pos.clone(), l.score.clone()) for l in cache.layers if len(l)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(BUDGETED),
    budget=st.integers(6, 20),
    length=st.integers(1, 48),
    chunks=st.lists(st.integers(1, 17), min_size=1, max_size=6),
    decode=st.integers(0, 6),
    gemma=st.booleans(),
    seed=st.integers(0, 1000),
    share=st.sampled_from(["none", "all"]),
)
def test_invariants(name, budget, length, chunks, decode, gemma, seed, share):
    model = GEMMA if gemma else MODEL
    ids = torch.randint(0, 96, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    policy = policy_for(name, budget, share)
    cache = CompressedCache(model, policy)
    for phase, final in feed(model, cache, ids, chunks, decode):
        check_invariants(cache, policy, phase, final)
    # same inputs -> same cache
    again = CompressedCache(model, policy_for(name, budget, share))
    for _ in feed(model, again, ids, chunks, decode):
        pass
    for a, b in zip(snapshot(cache), snapshot(again)):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_in_cache_positions_stay_inside_budget():
    """A prompt far longer than budget + chunk never gets a position past them under streaming."""
    policy = make_policy("streaming", budget=16, sinks=4)
    cache = CompressedCache(MODEL, policy)
    seen_positions = []
    ids = list(range(90))
    with torch.no_grad():
        for s in range(0, 90, 8):
            part = torch.tensor([ids[s:s + 8]]) % 96
            seen_positions.append(int(cache.next_position_ids(part.shape[1]).max()))
            cache.forward(MODEL, part)
    assert max(seen_positions) < 16 + 8
    assert cache.layers[0].seen == 90
    assert cache.layers[0].pos[0, 0].tolist() == [0, 1, 2, 3] + list(range(78, 90))


def test_h2o_keeps_heavy_hitters_and_recent():
    policy = make_policy("h2o", budget=8, recent_ratio=0.5)
    cache = CompressedCache(MODEL, policy)
    layer = cache.layers[0]
    k = torch.zeros(1, 2, 12, 16)
    layer.append(k, k)
    mass = torch.zeros(1, 2, 12)
    mass[:, 0, [1, 3, 5, 7]] = 1.0  # head 0: four heavy hitters among the old tokens
    mass[:, 1, [0, 2, 4, 6]] = 1.0  # head 1: four others
    from kvcascade.cache import AttnStats

    policy.step(cache, layer, AttnStats(mass, None, 12, 2, "prefill", True))
    assert layer.pos[0, 0].tolist() == [1, 3, 5, 7, 8, 9, 10, 11]
    assert layer.pos[0, 1].tolist() == [0, 2, 4, 6, 8, 9, 10, 11]


def test_pyramid_budgets_shrink_and_average_to_budget():
    p = make_policy("pyramidkv", budget=544, window=32)
    budgets = [p.prefix_budget(i, 24, n=100_000) for i in range(24)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    assert abs(sum(budgets) / 24 - 512) < 512 * 0.05
    assert all(p.layer_budget(i, 24) >= b + 32 for i, b in enumerate(budgets))


def test_pyramid_layers_keep_their_share_while_decoding():
    """After a long prompt each layer keeps its pyramid share + window while decoding; upper layers never grow
    back to the average budget (which would put the total about a quarter over the pyramid's)."""
    model = tiny_model("llama", layers=6)
    policy = make_policy("pyramidkv", budget=12, window=4, kernel=3)
    cache = CompressedCache(model, policy)
    ids = torch.randint(0, 96, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    shares = [policy.prefix_budget(i, 6, 60) + 4 for i in range(6)]
    assert shares == sorted(shares, reverse=True) and shares[-1] < 12
    for phase, final in feed(model, cache, ids, [20, 20, 20], decode=30):
        if phase == "decode":
            assert [len(layer) for layer in cache.layers] == shares
    assert sum(len(layer) for layer in cache.layers) <= 6 * 12 * 1.05


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(REGISTRY)), budget=st.integers(6, 20), length=st.integers(1, 48),
       chunk=st.integers(1, 17), decode=st.integers(0, 6), seed=st.integers(0, 1000))
def test_max_tokens_bounds_what_a_generation_holds(name, budget, length, chunk, decode, seed):
    """The bound a server reserves per request is never below what the cache actually held."""
    from kvcascade.engine import Session

    if name == "interlayer":
        return  # keeps every token, like full (bounded by the prompt plus the new tokens): tested in test_interlayer
    policy = make_policy("full") if name == "full" else policy_for(name, budget)
    ids = torch.randint(0, 96, (length,), generator=torch.Generator().manual_seed(seed)).tolist()

    class Tok:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    s = Session(MODEL, Tok(), ids, policy, max_new_tokens=decode, chunk_size=chunk, stop_on_eos=False)
    while not s.step():
        pass
    held = s.cache.kv_tokens_peak()
    s.close()
    assert held <= policy.max_tokens(length, decode, chunk, MODEL.config.num_hidden_layers)


def _two_layer_h2o(share):
    from kvcascade.cache import AttnStats

    policy = make_policy("h2o", budget=8, recent_ratio=0.5, share=share)
    cache = CompressedCache(MODEL, policy)
    k = torch.zeros(1, 2, 12, 16)
    small = torch.arange(12, dtype=torch.float32) * 0.001
    m0 = small.clone()
    m0[1] = 5.0  # layer 0 finds token 1 by far the most important
    m1 = small.clone()
    m1[[0, 2, 4, 6]] = torch.tensor([1.0, 1.1, 1.2, 1.3])  # layer 1 prefers 0, 2, 4, 6; token 1 is its least
    for layer, m in zip(cache.layers, (m0, m1)):
        layer.append(k, k)
        policy.step(cache, layer, AttnStats(m.view(1, 1, 12).expand(1, 2, 12).clone(), None, 12, 2, "prefill", True))
    return cache


def test_share_lets_one_layers_importance_protect_a_token_in_an_alike_layer():
    assert _two_layer_h2o("none").layers[1].pos[0, 0].tolist() == [0, 2, 4, 6, 8, 9, 10, 11]
    # share=all: token 1 keeps layer 0's top percentile in layer 1 and displaces layer 1's weakest pick (token 0)
    assert _two_layer_h2o("all").layers[1].pos[0, 0].tolist() == [1, 2, 4, 6, 8, 9, 10, 11]
    assert _two_layer_h2o("all").layers[0].pos[0, 0].tolist() == _two_layer_h2o("none").layers[0].pos[0, 0].tolist()


def test_share_combine_mean_averages_the_alike_layers_percentiles():
    from kvcascade.cache import AttnStats
    from kvcascade.policies.share import percentile

    policy = make_policy("h2o", budget=8, recent_ratio=0.5, share="all", share_combine="mean")
    cache = CompressedCache(MODEL, policy)
    g = torch.Generator().manual_seed(3)
    m0, m1 = torch.rand(1, 2, 12, generator=g), torch.rand(1, 2, 12, generator=g)
    k = torch.zeros(1, 2, 12, 16)
    for layer in cache.layers:
        layer.append(k, k)
    policy.step(cache, cache.layers[0], AttnStats(m0.clone(), None, 12, 2, "prefill", True))
    got = policy.shared(cache, cache.layers[1], m1)
    torch.testing.assert_close(got, (percentile(m0) + percentile(m1)) / 2)
    assert make_policy("h2o", budget=8, share="all").share_combine == "max"


def test_share_group_follows_the_groups_file(tmp_path):
    import json

    from kvcascade.interlayer.calibrate import FORMAT
    from kvcascade.models import fingerprint

    def groups(blocks):
        path = tmp_path / f"g{len(blocks[0])}.json"
        path.write_text(json.dumps({"format": FORMAT, "model": "tiny", "fingerprint": fingerprint(MODEL.config),
                                    "similarity": [[[1.0, 0.5], [0.5, 1.0]]] * 2, "groups": blocks, "delta": 0.5}))
        return str(path)

    from kvcascade.cache import AttnStats

    apart, together = groups([[[0], [1]], [[0], [1]]]), groups([[[0, 1]], [[0, 1]]])
    for g, first in ((apart, 0), (together, 1)):
        policy = make_policy("h2o", budget=8, recent_ratio=0.5, share="group", share_groups=g)
        cache = CompressedCache(MODEL, policy)
        k = torch.zeros(1, 2, 12, 16)
        small = torch.arange(12, dtype=torch.float32) * 0.001
        m0, m1 = small.clone(), small.clone()
        m0[1] = 5.0
        m1[[0, 2, 4, 6]] = torch.tensor([1.0, 1.1, 1.2, 1.3])
        for layer, m in zip(cache.layers, (m0, m1)):
            layer.append(k, k)
            policy.step(cache, layer, AttnStats(m.view(1, 1, 12).expand(1, 2, 12).clone(), None, 12, 2, "prefill",
                                                True))
        assert cache.layers[1].pos[0, 0, 0].item() == first


def test_share_bad_inputs():
    import pytest

    from kvcascade.errors import KVCascadeError

    with pytest.raises(KVCascadeError, match="share must be"):
        make_policy("cascade", 64, share="some")
    with pytest.raises(KVCascadeError, match="share_combine must be max or mean"):
        make_policy("locret", 64, share="all", share_combine="median")
    with pytest.raises(KVCascadeError, match="does not exist"):
        make_policy("h2o", 64, share="group", share_groups="/no/such.json")
    with pytest.raises(KVCascadeError, match="none ship for this model"):
        CompressedCache(MODEL, make_policy("tova", 64, share="group"))


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), n=st.integers(2, 40), protect_from=st.integers(0, 40),
       seed=st.integers(0, 10_000))
def test_keep_indices_drop_one_equals_topk(B, H, n, protect_from, seed):
    """Dropping one token (a decode step at the budget) takes the argmin path; it keeps what topk keeps."""
    from kvcascade.policies.base import keep_indices

    g = torch.Generator().manual_seed(seed)
    score = torch.randperm(B * H * n, generator=g).float().view(B, H, n)  # distinct: no ties at the cut
    protect = torch.arange(n) >= max(1, protect_from)  # a policy always leaves some token unprotected
    for p in (None, protect):
        got = keep_indices(score, n - 1, p)
        s = score if p is None else score.masked_fill(p, float("inf"))
        want = torch.topk(s, n - 1, dim=-1).indices.sort(dim=-1).values
        assert got.shape == (B, H, n - 1)
        assert torch.equal(got, want)
