"""Decode steps replayed as CUDA graphs give the tokens eager decoding gives (CUDA only; CPU never captures)."""

import pytest
import torch

from kvcascade.engine import Session
from kvcascade.graphs import DecodeGraphs
from kvcascade.policies import make_policy
from kvcascade.policies.streaming import Streaming

from .conftest import tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + int(i) % 26) for i in ids)


def _decode(model, spec, monkeypatch, graphs: bool, new=40):
    monkeypatch.setenv("KVCASCADE_CUDA_GRAPHS", "1" if graphs else "0")
    name, args = spec
    ids = torch.randint(0, 96, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    s = Session(model, _Tok(), ids, make_policy(name, **args), max_new_tokens=new, chunk_size=32, stop_on_eos=False)
    try:
        while not s.step():
            pass
        return s.new, s.graphs.replays, [layer.pos.clone() for layer in s.cache.layers]
    finally:
        s.close()


BOUNDED = [("streaming", {"budget": 24}), ("window", {"budget": 24}), ("h2o", {"budget": 24}),
           ("tova", {"budget": 24}), ("snapkv", {"budget": 48, "window": 8}), ("pyramidkv", {"budget": 48, "window": 8}),
           ("locret", {"budget": 24, "stabilizers": 8, "local": 2, "decode_window": 4, "heads": "random"})]


@cuda
@pytest.mark.parametrize("spec", BOUNDED, ids=[s[0] for s in BOUNDED])
def test_graphs_replay_the_steady_state_with_the_same_tokens(spec, monkeypatch):
    model = tiny_model("qwen2", layers=3).to("cuda", torch.bfloat16)
    eager, none, pos_e = _decode(model, spec, monkeypatch, graphs=False)
    graphed, replays, pos_g = _decode(model, spec, monkeypatch, graphs=True)
    assert none == 0
    assert replays >= 30, replays  # 39 decode steps: the first ones eager, then one capture, then replays
    assert graphed == eager
    for a, b in zip(pos_e, pos_g):
        assert torch.equal(a, b)  # the same tokens kept, in the same slots


@cuda
@pytest.mark.parametrize("spec", [("full", {}), ("cascade", {"budget": 32})], ids=["full", "cascade"])
def test_growing_or_unsafe_steps_run_eagerly(spec, monkeypatch):
    model = tiny_model("qwen2", layers=3).to("cuda", torch.bfloat16)
    eager, _, _ = _decode(model, spec, monkeypatch, graphs=False)
    graphed, replays, _ = _decode(model, spec, monkeypatch, graphs=True)
    assert replays == 0 and graphed == eager


class _SyncingStreaming(Streaming):
    """Claims graph safety but reads a device value on the host: the capture must fail, cleanly."""

    name = "syncing-streaming"
    graph_safe = True

    def step(self, cache, layer, stats):
        if float(layer.score.sum()) >= 0:  # a host sync: not allowed while capturing
            super().step(cache, layer, stats)


@cuda
def test_a_failed_capture_falls_back_to_eager_tokens(monkeypatch):
    model = tiny_model("qwen2", layers=3).to("cuda", torch.bfloat16)
    eager, _, _ = _decode(model, ("streaming", {"budget": 24}), monkeypatch, graphs=False)
    monkeypatch.setenv("KVCASCADE_CUDA_GRAPHS", "1")
    ids = torch.randint(0, 96, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    s = Session(model, _Tok(), ids, _SyncingStreaming(budget=24), max_new_tokens=40, chunk_size=32,
                stop_on_eos=False)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        while not s.step():
            pass
    s.close()
    assert s.new == eager and s.graphs.replays == 0


def test_cpu_never_captures():
    model = tiny_model("qwen2", layers=2)
    ids = list(range(1, 60))
    s = Session(model, _Tok(), ids, make_policy("streaming", 16), max_new_tokens=12, chunk_size=16,
                stop_on_eos=False)
    while not s.step():
        pass
    s.close()
    assert isinstance(s.graphs, DecodeGraphs) and not s.graphs.enabled and s.graphs.replays == 0
    assert len(s.new) == 12
