"""Decode steps replayed as CUDA graphs give the tokens eager decoding gives (CUDA only; CPU never captures)."""

import pytest
import torch

from kvcascade.engine import Session
from kvcascade.graphs import DecodeGraphs
from kvcascade.policies import REGISTRY, make_policy
from kvcascade.policies.streaming import Streaming

from .conftest import tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + int(i) % 26) for i in ids)


def _decode(model, spec, monkeypatch, graphs: bool, new=40, ahead=False, numbers=None):
    """Greedy decoding of a fixed prompt: the tokens, the steps replayed, every layer's kept positions (``ahead``:
    running ahead, KVCASCADE_RUN_AHEAD=1; ``numbers``: a list that gets the result's peak KV tokens and bytes and its
    token count)."""
    monkeypatch.setenv("KVCASCADE_CUDA_GRAPHS", "1" if graphs else "0")
    monkeypatch.setenv("KVCASCADE_RUN_AHEAD", "1" if ahead else "0")
    name, args = spec
    ids = torch.randint(0, 96, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    s = Session(model, _Tok(), ids, make_policy(name, **args), max_new_tokens=new, chunk_size=32, stop_on_eos=False)
    assert s.pipelined == ahead
    try:
        while not s.step():
            pass
        if numbers is not None:
            r = s.result()
            numbers.append((r.kv_tokens_peak, r.kv_bytes_peak, r.new_tokens))
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


FUSED = BOUNDED + [("cascade", {"budget": 32}), ("cascade", {"budget": 32, "rule": "fixed"}),
                   ("cascade", {"budget": 48, "block": 4, "cascades": 2}),
                   ("cascade", {"budget": 48, "block": 4, "cascades": 2, "head_reduction": "none"})]


@cuda
@pytest.mark.parametrize("spec", FUSED, ids=[f"{s[0]}{i}" for i, s in enumerate(FUSED)])
def test_fused_eviction_keeps_what_the_pytorch_path_keeps(spec, monkeypatch):
    """A decode step at the budget drops one token (the cascade: one unit) with two Triton kernels
    (LayerCache.drop_one); with them turned off (argmin + compact) every step keeps the same tokens in the same slots
    and decodes the same tokens."""
    import kvcascade.cache as cache_mod

    model = tiny_model("qwen2", layers=3).to("cuda", torch.bfloat16)
    fused, _, pos_f = _decode(model, spec, monkeypatch, graphs=True)
    monkeypatch.setattr(cache_mod, "_fused_edits", lambda layer: False)
    plain, _, pos_p = _decode(model, spec, monkeypatch, graphs=True)
    assert fused == plain
    assert all(torch.equal(a, b) for a, b in zip(pos_f, pos_p))


ROPED = [("streaming", {"budget": 24}), ("cascade", {"budget": 32}), ("cascade", {"budget": 48, "block": 4, "cascades": 2}),
         ("locret", {"budget": 24, "stabilizers": 8, "local": 2, "decode_window": 40, "heads": "random"})]


def _forced(model, spec, monkeypatch, tokens, graphs=True):
    """Prefill, then decode feeding ``tokens`` (not the model's picks): the logits before each token and after the
    last, ``[len(tokens) + 1, vocab]`` fp32, and every layer's kept positions."""
    monkeypatch.setenv("KVCASCADE_CUDA_GRAPHS", "1" if graphs else "0")
    name, args = spec
    ids = torch.randint(0, 96, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    s = Session(model, _Tok(), ids, make_policy(name, **args), max_new_tokens=len(tokens) + 1, chunk_size=32,
                stop_on_eos=False)
    try:
        with torch.inference_mode():  # what Session.step does, with the tokens given
            for _, logits in s._prefill:
                pass
            s.cache.phase, s.cache.final_chunk, s.cache.remaining = "decode", True, 0
            out = [logits[-1].float()]
            out += [s.graphs.step(t).float() for t in tokens]
        return torch.stack(out), [layer.pos.clone() for layer in s.cache.layers]
    finally:
        s.close()


ROPE_TOL = 1.5e-2  # of the largest logit: see test_the_rotation_tolerance_tells_a_wrong_rotation


def _rope_model(device):
    """The tiny bf16 model with its query and key projections scaled 3x: attention peaked enough that a key rotated
    to the wrong position moves the logits well past ROPE_TOL (unscaled, it moves them by one bf16 step)."""
    model = tiny_model("qwen2", layers=3).to(device, torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3)
            layer.self_attn.k_proj.weight.mul_(3)
    return model


@cuda
@pytest.mark.parametrize("spec", ROPED, ids=[f"{s[0]}{i}" for i, s in enumerate(ROPED)])
def test_fused_rotation_keeps_what_the_pytorch_path_keeps(spec, monkeypatch):
    """Policies with in-cache positions rotate every stored key at every step: one Triton kernel (rope_keys, padded
    steps and prompt chunks too) instead of apply_rope / unapply_rope. The two round a key differently by at most one
    bf16 step, so greedy tokens may part at a near-tie (an H200 run did at step 13): both decode the same given tokens
    here, and keep the same tokens with logits within ROPE_TOL."""
    import kvcascade.cache as cache_mod

    model = _rope_model("cuda")
    tokens = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    fused, pos_f = _forced(model, spec, monkeypatch, tokens)
    monkeypatch.setattr(cache_mod, "_fused_rope", lambda layer, keys: False)
    plain, pos_p = _forced(model, spec, monkeypatch, tokens)
    assert all(torch.equal(a, b) for a, b in zip(pos_f, pos_p))
    err = (fused - plain).abs().max().item()
    assert err <= ROPE_TOL * plain.abs().max().item(), err


@pytest.mark.parametrize("spec", ROPED, ids=[f"{s[0]}{i}" for i, s in enumerate(ROPED)])
def test_the_rotation_tolerance_tells_a_wrong_rotation(spec, monkeypatch):
    """ROPE_TOL's two sides, on the PyTorch path (any device): every rotated key rounded one bf16 step off at random
    (more than the Triton kernel ever differs) stays inside it with the same tokens kept; keys rotated one position
    off land outside it."""
    import kvcascade.cache as cache_mod

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = _rope_model(dev)
    tokens = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    monkeypatch.setattr(cache_mod, "_fused_rope", lambda layer, keys: False)
    plain, pos = _forced(model, spec, monkeypatch, tokens, graphs=False)  # (the noise below is drawn on the host)
    rope = cache_mod.apply_rope
    g = torch.Generator().manual_seed(0)

    def one_step_off(x, cos, sin):
        y = rope(x, cos, sin)
        step = (torch.randint(0, 3, y.shape, generator=g) - 1).to(y.device)
        return (y.float() * (1 + 2.0 ** -8 * step)).to(y.dtype)

    monkeypatch.setattr(cache_mod, "apply_rope", one_step_off)
    rounded, pos_r = _forced(model, spec, monkeypatch, tokens, graphs=False)
    monkeypatch.setattr(cache_mod, "apply_rope", lambda x, cos, sin: rope(x, cos.roll(1, -2), sin.roll(1, -2)))
    wrong, _ = _forced(model, spec, monkeypatch, tokens, graphs=False)
    scale = plain.abs().max().item()
    assert all(torch.equal(a, b) for a, b in zip(pos, pos_r))
    assert (rounded - plain).abs().max().item() <= ROPE_TOL * scale
    assert (wrong - plain).abs().max().item() > ROPE_TOL * scale


PREFILL = BOUNDED + [("cascade", {"budget": 32}), ("cascade", {"budget": 48, "block": 4, "cascades": 2})]


@cuda
@pytest.mark.parametrize("spec", PREFILL, ids=[f"{s[0]}{i}" for i, s in enumerate(PREFILL)])
def test_prompt_chunks_replay_with_the_same_tokens(spec, monkeypatch):
    """A long prompt's chunks at the budget are replayed as CUDA graphs: the same kept tokens and the same answer as
    running every chunk eagerly."""
    model = tiny_model("qwen2", layers=3).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 96, (640,), generator=torch.Generator().manual_seed(6)).tolist()
    runs = []
    for graphs in (False, True):
        monkeypatch.setenv("KVCASCADE_CUDA_GRAPHS", "1" if graphs else "0")
        name, args = spec
        s = Session(model, _Tok(), ids, make_policy(name, **args), max_new_tokens=8, chunk_size=32,
                    stop_on_eos=False)
        try:
            while not s.step():
                pass
            runs.append((s.new, s.graphs.chunk_replays, [layer.pos.clone() for layer in s.cache.layers]))
        finally:
            s.close()
    (eager, none, pos_e), (graphed, replays, pos_g) = runs
    assert none == 0
    if name not in ("snapkv", "pyramidkv"):  # those hold the whole prompt until its last chunk: nothing repeats
        assert replays >= 10, replays
    assert graphed == eager
    assert all(torch.equal(a, b) for a, b in zip(pos_e, pos_g))


CASCADES = [("cascade", {"budget": 32}), ("cascade", {"budget": 32, "rule": "fixed"}),
            ("cascade", {"budget": 48, "block": 4, "cascades": 2})]


@cuda
@pytest.mark.parametrize("spec", CASCADES, ids=["paper", "fixed", "block4"])
def test_the_cascade_schedule_cycle_replays_with_the_same_tokens(spec, monkeypatch):
    """The cascade's step cycles through a few graph keys (its schedule's period): each is captured the second time
    it comes round, and the replays keep the eager tokens, in the same slots."""
    model = tiny_model("qwen2", layers=3).to("cuda", torch.bfloat16)
    eager, none, pos_e = _decode(model, spec, monkeypatch, graphs=False, new=60)
    graphed, replays, pos_g = _decode(model, spec, monkeypatch, graphs=True, new=60)
    assert none == 0 and replays >= 25, replays  # 59 steps: one cycle (4 keys, block4: 3) eager, then replays
    assert graphed == eager
    assert all(torch.equal(a, b) for a, b in zip(pos_e, pos_g))


@cuda
def test_unsafe_steps_run_eagerly(monkeypatch):
    """A policy that does not opt in (``graph_safe``; here `window` with it turned off) never replays."""
    model = tiny_model("qwen2", layers=3).to("cuda", torch.bfloat16)
    spec = ("window", {"budget": 32})
    monkeypatch.setattr(REGISTRY["window"], "graph_safe", False)
    eager, _, _ = _decode(model, spec, monkeypatch, graphs=False)
    graphed, replays, _ = _decode(model, spec, monkeypatch, graphs=True)
    assert replays == 0 and graphed == eager


GROWING = [("full", {}), ("locret", {"budget": 24, "stabilizers": 8, "local": 2, "decode_window": 60,
                                     "heads": "random"}),
           ("streaming", {"budget": 400}), ("tova", {"budget": 400}), ("snapkv", {"budget": 400, "window": 8}),
           ("h2o", {"budget": 400})]


@cuda
@pytest.mark.parametrize("spec", GROWING, ids=[g[0] for g in GROWING])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_growing_cache_replays_padded(spec, dtype, monkeypatch):
    model = tiny_model("qwen2", layers=3).to("cuda", dtype)
    eager, _, pos_e = _decode(model, spec, monkeypatch, graphs=False)
    graphed, replays, pos_g = _decode(model, spec, monkeypatch, graphs=True)
    assert replays >= 30
    assert all(torch.equal(a, b) for a, b in zip(pos_e, pos_g))
    if dtype == torch.float32:
        assert graphed == eager
    else:  # bf16: the padded step's split-K sums round differently; a near-tie may flip a late token
        assert graphed[:8] == eager[:8]


class _SyncingStreaming(Streaming):
    """Claims graph safety but reads a device value on the host: the capture must fail, cleanly."""

    name = "syncing-streaming"
    graph_safe = True

    def step(self, cache, layer, stats):
        if float(layer.score.sum()) >= 0:  # a host sync: not allowed while capturing
            super().step(cache, layer, stats)


def _failed_capture_scenario() -> None:
    """Run in a subprocess: a failed capture may leave CUDA state behind (that is why graphs then stay off)."""
    import json
    import os
    import warnings

    model = tiny_model("qwen2", layers=3).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 96, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    out = {}
    for name, policy, graphs in (("eager", Streaming(budget=24), "0"), ("syncing", _SyncingStreaming(budget=24), "1"),
                                 ("after", Streaming(budget=24), "1")):
        os.environ["KVCASCADE_CUDA_GRAPHS"] = graphs
        s = Session(model, _Tok(), ids, policy, max_new_tokens=40, chunk_size=32, stop_on_eos=False)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            while not s.step():
                pass
        s.close()
        out[name] = {"tokens": s.new, "replays": s.graphs.replays,
                     "warned": any("CUDA graph capture failed" in str(x.message) for x in w)}
    print(json.dumps(out))


@cuda
def test_a_failed_capture_falls_back_to_eager_tokens():
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", "from tests.test_cuda_graphs import _failed_capture_scenario as f; f()"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["syncing"]["warned"] and out["syncing"]["replays"] == 0
    assert out["syncing"]["tokens"] == out["eager"]["tokens"]  # the failed capture cost no token
    assert out["after"]["replays"] == 0 and out["after"]["tokens"] == out["eager"]["tokens"]  # off for the process


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


@cuda
@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_batched_rows_replay_with_the_tokens_of_one_at_a_time(policy, monkeypatch):
    from kvcascade.engine import generate

    model = tiny_model("qwen2", layers=3).to("cuda")  # float32: batched products round like single ones, nearly
    prompts = [torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (90, 130, 111)]
    monkeypatch.setenv("KVCASCADE_CUDA_GRAPHS", "0")
    solo = [generate(model, _Tok(), p, policy=policy, budget=24, max_new_tokens=30, chunk_size=32, stop_on_eos=False)
            for p in prompts]
    monkeypatch.setenv("KVCASCADE_CUDA_GRAPHS", "1")
    batch = generate(model, _Tok(), prompts, policy=policy, budget=24, max_new_tokens=30, chunk_size=32,
                     stop_on_eos=False)
    assert all(r.decode_batch == 3 for r in batch) and batch[0].decode_graph_steps >= 20
    same = sum(a.token_ids == b.token_ids for a, b in zip(batch, solo))
    assert same == 3, [(a.token_ids, b.token_ids) for a, b in zip(batch, solo)]


@cuda
@pytest.mark.parametrize("spec", [("streaming", {"budget": 24}), ("h2o", {"budget": 24})], ids=["streaming", "h2o"])
def test_sliding_window_models_replay_with_the_same_tokens(spec, monkeypatch):
    model = tiny_model("gemma3", layers=3).to("cuda", torch.bfloat16)
    eager, _, _ = _decode(model, spec, monkeypatch, graphs=False)
    graphed, replays, _ = _decode(model, spec, monkeypatch, graphs=True)
    assert replays >= 30 and graphed == eager


@cuda
@pytest.mark.parametrize("spec", [("full", {}), ("streaming", {"budget": 24}), ("cascade", {"budget": 32}),
                                  ("cascade", {"budget": 48, "block": 4, "cascades": 2})],
                         ids=["full", "streaming", "cascade", "cascade-units"])
def test_running_ahead_on_the_gpu_gives_the_step_by_step_tokens(spec, monkeypatch):
    """KVCASCADE_RUN_AHEAD=1 on CUDA (pinned slots, events, the next step launched before the token is read): the
    tokens and kept slots of step-by-step decoding, with the steps replayed as graphs."""
    model = tiny_model("qwen2", layers=3).to("cuda", torch.bfloat16)
    numbers = []
    new0, _, pos0 = _decode(model, spec, monkeypatch, graphs=True, numbers=numbers)
    new1, rep1, pos1 = _decode(model, spec, monkeypatch, graphs=True, ahead=True, numbers=numbers)
    assert rep1 >= 30 and new1 == new0
    assert numbers[1] == numbers[0]
    for a, b in zip(pos0, pos1):
        assert torch.equal(a, b)


@cuda
def test_settle_captures_once_and_decoding_after_it_gives_the_same_tokens(monkeypatch):
    """``graphs.settle`` (benchmarks call it before timing) captures its throwaway graphs on the GPU once per process;
    decoding after it replays its steps and gives the tokens eager decoding gives."""
    from kvcascade import graphs

    monkeypatch.setenv("KVCASCADE_CUDA_GRAPHS", "1")
    monkeypatch.setattr(graphs, "_settled", None)
    seen = graphs.settle("cuda")
    assert 2 <= seen["graphs"] <= graphs.SETTLE_MAX and seen["before_us"] > 0
    assert seen["switched"] == (seen["after_us"] >= seen["before_us"] * graphs.SETTLE_RISE)
    assert graphs.settle("cuda") is seen  # once per process
    model = tiny_model("qwen2", layers=3).to("cuda", torch.bfloat16)
    spec = ("streaming", {"budget": 24})
    eager, _, _ = _decode(model, spec, monkeypatch, graphs=False)
    graphed, replays, _ = _decode(model, spec, monkeypatch, graphs=True)
    assert replays > 0 and graphed == eager
