"""CPU guard of the CUDA-graph path: a replayed graph repeats the kernels recorded at capture, so every decode step
with the same key (kvcascade.graphs.DecodeGraphs._key) must issue exactly the same operations with the same
non-tensor arguments, and must not build tensors from host data (on a GPU, a host-to-device copy). Checked here on
CPU, where graphs never run, by recording each step's operator trace."""

import contextlib
import gc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvcascade import graphs
from kvcascade.engine import Session
from kvcascade.policies import REGISTRY, make_policy

from .conftest import tiny_model

FROM_HOST = {"aten.lift_fresh.default", "aten.lift_fresh_copy.default", "aten._local_scalar_dense.default"}


class Trace(TorchDispatchMode):
    """Records a step's operators with their shapes and non-tensor arguments, and the host values it bakes into
    device constants (``graphs.baked``); work marked ``graphs.host_only`` (host tensors, never recorded by a graph)
    is left out."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __enter__(self):
        graphs._host.baked = self.ops
        return super().__enter__()

    def __exit__(self, *exc):
        graphs._host.baked = None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if graphs.in_host_only():
            return func(*args, **(kwargs or {}))

        def sig(a):
            if isinstance(a, torch.Tensor):
                return ("T", tuple(a.shape), str(a.dtype))
            if isinstance(a, (list, tuple)):
                return tuple(sig(x) for x in a)
            return repr(a)

        self.ops.append((str(func), sig(args), sig(sorted((kwargs or {}).items()))))
        return func(*args, **(kwargs or {}))


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + int(i) % 26) for i in ids)


def _traced_step(s, model, tok: int, padded: bool) -> list:
    """One decode step of session ``s`` as a capture would run it (padded or not); its operator trace."""
    inp = torch.tensor([[tok]], device=model.device)  # a replay reads the token from a buffer filled before it
    s.cache.policy.before_step(s.cache, 1)  # (DecodeGraphs calls it outside the graph)
    s.cache.padded = padded
    if padded and not s.cache.keys_rotated:
        s.cache.sync_slot_counter()
    with Trace() as t:
        s.logits = s.cache.forward(model, inp, logits_to_keep=1).logits[0, -1]
    s.cache.padded = False
    return t.ops


SPECS = {"full": {}, "window": {"budget": 24}, "streaming": {"budget": 24}, "h2o": {"budget": 24},
         "tova": {"budget": 24}, "snapkv": {"budget": 48, "window": 8}, "pyramidkv": {"budget": 48, "window": 8},
         "locret": {"budget": 24, "stabilizers": 8, "local": 2, "decode_window": 4, "heads": "random"},
         "h2o-share": {"budget": 24, "share": "all"}, "cascade": {"budget": 24},
         "cascade-block": {"budget": 40, "block": 4, "cascades": 2}, "cascade-fixed": {"budget": 24, "rule": "fixed"},
         "cascade-options": {"budget": 40, "block": 4, "cascades": 2, "select": "peak", "recenter": True,
                             "share": "all"}}


def test_every_graph_safe_policy_is_covered():
    safe = {n for n, c in REGISTRY.items() if c.graph_safe}
    assert safe <= {s.split("-")[0] for s in SPECS}


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_steps_with_one_key_issue_the_same_operations(spec, arch):
    model = tiny_model(arch, layers=3)
    ids = torch.randint(0, 96, (120,), generator=torch.Generator().manual_seed(2)).tolist()
    s = Session(model, _Tok(), ids, make_policy(spec.split("-")[0], **SPECS[spec]), max_new_tokens=30,
                chunk_size=32, stop_on_eos=False)
    traces: dict = {}
    once: set = set()
    steps = 0
    with torch.inference_mode():
        while s.t1 is None:  # prefill
            s.step()
        g = s.graphs
        while len(s.new) < 29:
            key = g._key()
            tok = int(s.logits.argmax())
            s.new.append(tok)
            ops = _traced_step(s, model, tok, padded=key is not None and key[0] == "grow")
            steps += 1
            if key is None:
                continue
            if key not in once:  # a key's first step runs eagerly (it may make device constants); capture is later
                once.add(key)
                continue
            assert not FROM_HOST & {op[0] for op in ops}, "a step builds a tensor from host data"
            if key in traces:
                assert traces[key] == ops, "two steps with one graph key issued different operations"
            traces[key] = ops
    s.close()
    if once:  # (none: this setting never replays, e.g. `full` beside sliding-window layers)
        assert traces and len(once) < steps  # keys repeat: a bounded cache's steady state (or cycle), a padded growth


GROWING = {"full": {}, "locret": {"budget": 24, "stabilizers": 8, "local": 2, "decode_window": 40,
                                  "heads": "random"},
           # a prompt shorter than the budget: the cache grows until it reaches the cap
           "streaming": {"budget": 120}, "window": {"budget": 120}, "tova": {"budget": 120}, "h2o": {"budget": 120},
           "snapkv": {"budget": 120, "window": 8}}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("policy", sorted(GROWING))
def test_padded_decode_of_a_growing_cache_gives_the_same_tokens_with_one_trace(arch, policy):
    """A decode step that only adds its token (`full`; Locret while its decode window fills; a policy below its
    budget) runs padded under CUDA graphs (one graph for every length): the same tokens as unpadded decoding, and
    every padded step issues the same operations although the cache grows."""
    from kvcascade.cache import _padded_ok
    from kvcascade.engine import generate

    model = tiny_model(arch, layers=3)
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(4)).tolist()
    plain = generate(model, _Tok(), ids, policy=policy, policy_args=GROWING[policy], max_new_tokens=20,
                     chunk_size=32, stop_on_eos=False)
    s = Session(model, _Tok(), ids, make_policy(policy, **GROWING[policy]), max_new_tokens=20, chunk_size=32,
                stop_on_eos=False)
    traces = []
    with torch.inference_mode():
        while s.t1 is None:
            s.step()
        while True:
            tok = s._take(int(s.logits.argmax()))
            if tok is None:
                break
            assert _padded_ok(s.cache)
            traces.append(_traced_step(s, model, tok, padded=True))
            assert not FROM_HOST & {op[0] for op in traces[-1]}
    s.close()
    assert s.new == plain.token_ids
    # the first padded step runs eagerly under graphs (a key is captured when seen again): it may make device
    # constants (the rotary table of in-cache positions), so the steps after it must all match
    assert len(traces) >= 18 and all(tr == traces[1] for tr in traces[1:])
    assert all(len(layer) == (24 + 2 if policy == "locret" else len(ids)) + 19 for layer in s.cache.layers)


@pytest.mark.parametrize("policy", ["streaming", "tova", "snapkv", "h2o"])
def test_a_cache_at_its_cap_stops_growing_padded(policy):
    """Padded decoding ends where the cap is: the step that would pass it runs the policy's own (evicting) step."""
    from kvcascade.cache import _padded_ok

    model = tiny_model("qwen2", layers=2)
    ids = torch.randint(0, 96, (60,), generator=torch.Generator().manual_seed(5)).tolist()
    args = {"budget": 64, **({"window": 8} if policy == "snapkv" else {})}
    s = Session(model, _Tok(), ids, make_policy(policy, **args), max_new_tokens=10, chunk_size=32, stop_on_eos=False)
    seen = []
    with torch.inference_mode():
        while s.t1 is None:
            s.step()
        while len(s.new) < 9:
            seen.append((len(s.cache.layers[0]), _padded_ok(s.cache)))
            s.new.append(int(s.logits.argmax()))
            _traced_step(s, model, s.new[-1], padded=seen[-1][1])
    s.close()
    n0 = seen[0][0]
    assert n0 < 63 and seen == [(min(n0 + i, 64), n0 + i < 64) for i in range(len(seen))]


def test_a_graph_key_names_every_buffer_address():
    from kvcascade.cache import LayerCache
    from kvcascade.graphs import _addresses

    layer = LayerCache(0, None)
    k = torch.zeros(1, 2, 5, 4)
    layer.append(k, k)
    before = _addresses(layer)
    layer._v = layer._v.clone()  # one buffer moved, the others not: a graph captured before must not match
    assert _addresses(layer) != before
    layer.extra["peak"] = torch.zeros(1, 2, 5)
    assert len(_addresses(layer)) == len(before) + 1


PADDED = [  # policy, its arguments, prompt tokens, seed, decode steps, padded steps at least
    ("h2o", {"budget": 64}, 56, 6, 15, 5),  # padded until the budget, then evicting by the scores padding summed
    # the cascade with units: a token that only joins the unfinished unit runs padded (3 of every 4 here)
    ("cascade", {"budget": 40, "block": 4, "cascades": 2}, 90, 7, 23, 15),
    ("cascade", {"budget": 40, "block": 4, "cascades": 2, "share": "all"}, 90, 7, 23, 15),
]


@pytest.mark.parametrize("case", PADDED, ids=["h2o", "cascade-units", "cascade-units-share"])
def test_padded_steps_keep_what_unpadded_decoding_keeps(case):
    """A padded step (the token written at its slot through a device index, attention over every slot, the policy's
    padded_step: H2O adds the mass, the cascade updates its EMA) is what a CUDA graph replays whenever the step
    evicts nothing: the tokens, kept positions and scores match unpadded decoding, and padding is chosen exactly
    when the graph key says so."""
    from kvcascade.cache import _padded_ok

    policy, args, n_ids, seed, steps, at_least = case
    model = tiny_model("qwen2", layers=2)
    ids = torch.randint(0, 96, (n_ids,), generator=torch.Generator().manual_seed(seed)).tolist()
    ends = []
    for use_padded in (False, True):
        s = Session(model, _Tok(), ids, make_policy(policy, **args), max_new_tokens=steps + 1, chunk_size=32,
                    stop_on_eos=False)
        padded_steps = 0
        with torch.inference_mode():
            while s.t1 is None:
                s.step()
            while len(s.new) < steps:
                ok = use_padded and _padded_ok(s.cache)
                assert ok == (use_padded and s.graphs._key()[0] == "grow")
                padded_steps += ok
                s.new.append(int(s.logits.argmax()))
                _traced_step(s, model, s.new[-1], padded=ok)
        ends.append((list(s.new), [layer.pos.clone() for layer in s.cache.layers],
                     [layer.score.clone() for layer in s.cache.layers], padded_steps))
        s.close()
    (tok_a, pos_a, sc_a, _), (tok_b, pos_b, sc_b, n_padded) = ends
    assert n_padded >= at_least and tok_a == tok_b
    assert all(torch.equal(a, b) for a, b in zip(pos_a, pos_b))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(sc_a, sc_b))


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_prompt_chunks_with_one_key_issue_the_same_operations(spec):
    """Prompt chunks are replayed as CUDA graphs too (a long prompt at the budget is launch-bound): every chunk with
    one key (DecodeGraphs._key(C)) must issue the same operations and build nothing from host data."""
    from kvcascade.engine import chunk_bounds

    model = tiny_model("qwen2", layers=3)
    ids = torch.randint(0, 96, (420,), generator=torch.Generator().manual_seed(3)).tolist()
    policy = make_policy(spec.split("-")[0], **SPECS[spec])
    s = Session(model, _Tok(), ids, policy, max_new_tokens=1, chunk_size=32, stop_on_eos=False)
    g, cache = s.graphs, s.cache
    traces, once = {}, set()
    repeated = 0
    with torch.inference_mode():
        cache.phase = "prefill"
        tokens = torch.tensor(ids)
        for start, end in chunk_bounds(len(ids), 32, policy.obs_window, policy.tail_tokens):
            cache.final_chunk, cache.remaining = end >= len(ids), len(ids) - end
            key = g._key(end - start)
            chunk = tokens[start:end].view(1, -1)  # a replay reads it from a buffer filled before
            with Trace() as t:
                cache.forward(model, chunk, logits_to_keep=1)
            if key is None:
                continue
            if key not in once:
                once.add(key)
                continue
            repeated += 1
            assert not FROM_HOST & {op[0] for op in t.ops}, "a chunk builds a tensor from host data"
            if key in traces:
                assert traces[key] == t.ops, "two chunks with one graph key issued different operations"
            traces[key] = t.ops
    s.close()
    if spec not in ("full", "snapkv", "pyramidkv"):  # those hold the whole prompt until its end: nothing repeats
        assert repeated >= 4, repeated


class _NoGraph:
    """Stands in for a captured CUDA graph on CPU: its replay does nothing (device results are not compared)."""

    def replay(self):
        pass


def _fake_graphs(monkeypatch, capture=lambda graph: contextlib.nullcontext()):
    """CUDA graphs on CPU: captures run the step eagerly inside ``capture(graph)``, replays do nothing."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _NoGraph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


@pytest.mark.parametrize("spec", ["cascade", "cascade-block", "h2o", "streaming", "locret", "full"])
def test_replays_leave_the_host_state_that_steps_leave(spec, monkeypatch):
    """DecodeGraphs sets the host state a replayed step would have left (token counts, seen, peaks, policy state)
    from what its capture left: checked on CPU with graphs that do nothing, against eager steps fed the same tokens."""
    name = spec.split("-")[0]
    params = SPECS[spec]
    model = tiny_model("qwen2", layers=3)
    ids = torch.randint(0, 96, (120,), generator=torch.Generator().manual_seed(2)).tolist()
    feed = torch.randint(0, 96, (60,), generator=torch.Generator().manual_seed(3)).tolist()

    def host(s):
        return [(la.n, la.seen, la.peak_tokens, la.peak_bytes, repr(la.state)) for la in s.cache.layers]

    def run(graphed: bool):
        s = Session(model, _Tok(), ids, make_policy(name, **params), max_new_tokens=200, chunk_size=32,
                    stop_on_eos=False)
        with torch.inference_mode():
            while s.t1 is None:
                s.step()
            if graphed:
                s.graphs.enabled = True
            states = []
            for tok in feed:
                s.graphs.step(tok)
                states.append(host(s))
        replays = s.graphs.replays
        s.close()
        return states, replays

    eager, _ = run(False)
    _fake_graphs(monkeypatch)
    replayed, replays = run(True)
    assert replays > len(feed) // 2  # (most steps were replays)
    assert replayed == eager


def test_captures_run_without_the_garbage_collector_and_closing_drops_the_graphs(monkeypatch):
    """A graph that the garbage collector frees while another is being captured invalidates that capture (an H100
    run: sessions kept alive by a reference cycle): captures run with the collector off (and turn it back on), and a
    closed session drops its graphs at once."""
    seen = []

    @contextlib.contextmanager
    def capture(graph):
        seen.append(gc.isenabled())
        yield

    model = tiny_model("qwen2", layers=2)
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    _fake_graphs(monkeypatch, capture)
    s = Session(model, _Tok(), ids, make_policy("streaming", 24), max_new_tokens=50, chunk_size=16,
                stop_on_eos=False)
    with torch.inference_mode():
        while s.t1 is None:
            s.step()
        s.graphs.enabled = True
        for tok in range(10):
            s.graphs.step(tok)
    assert seen and not any(seen)  # (captured, every time with the collector off)
    assert gc.isenabled()
    assert s.graphs.graphs
    s.close()
    assert not s.graphs.graphs


def test_settle_instantiates_graphs_until_the_reference_slows_once_per_process_and_never_on_cpu(monkeypatch):
    """``graphs.settle`` (benchmarks call it before timing) instantiates throwaway graphs until its reference graph
    replays SETTLE_RISE slower (the driver's switch), at most SETTLE_MAX, once per process; nothing where graphs are
    off (CPU, KVCASCADE_CUDA_GRAPHS=0)."""
    monkeypatch.setattr(graphs, "_settled", None)
    assert graphs.settle("cpu") is None  # CPU never captures
    captured = []

    @contextlib.contextmanager
    def capture(graph):
        captured.append(graph)
        yield

    _fake_graphs(monkeypatch, capture)
    monkeypatch.setattr(graphs, "graphs_enabled", lambda device: True)
    for switch_at, want in ((5, 5), (10**6, graphs.SETTLE_MAX)):  # the reference slows from the 5th graph on; never
        captured.clear()
        monkeypatch.setattr(graphs, "_settled", None)
        monkeypatch.setattr(graphs, "_replay_us", lambda g: 100.0 if len(captured) < switch_at else 119.0)
        seen = graphs.settle("cpu")
        assert seen["graphs"] == want == len(captured)  # the reference and each throwaway graph: one capture each
        assert seen["switched"] == (switch_at == want) and seen["before_us"] == 100.0
        assert len({id(g) for g in captured}) == len(captured)  # graphs of their own (the count is what matters)
        assert graphs.settle("cpu") is seen and len(captured) == want  # once per process
