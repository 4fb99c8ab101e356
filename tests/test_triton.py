"""Triton kernels against the plain-PyTorch reference: on CUDA when there is a GPU, else in Triton's CPU
interpreter (small shapes) when triton is installed; skipped otherwise."""

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
# (conftest sets TRITON_INTERPRET=1 when there is no GPU, before anything imports triton)

pytestmark = pytest.mark.skipif(not HAS_TRITON or (not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
                                reason="needs triton (CUDA, or its CPU interpreter)")

DEV = "cuda" if HAS_CUDA else "cpu"


def _inputs(B, Hq, H, C, n_cached, D, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    N = n_cached + C
    q = torch.randn(B, Hq, C, D, generator=g).to(DEV, dtype)
    k = torch.randn(B, H, N, D, generator=g).to(DEV, dtype)
    v = torch.randn(B, H, N, D, generator=g).to(DEV, dtype)
    return q, k, v


def _ref(q, k, v, **kw):
    from kvcascade.kernels.reference import attention_with_scores

    return attention_with_scores(q.float(), k.float(), v.float(), **kw)


def _close(got, want, rel, name):
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item() + 1e-6
    assert err <= rel * scale, f"{name}: max abs err {err:.3g} vs scale {scale:.3g} (rel {err / scale:.3g} > {rel})"


SHAPES = [  # B, Hq, H, C, n_cached, D
    (1, 4, 2, 16, 0, 16), (1, 4, 1, 33, 20, 32), (2, 6, 2, 50, 37, 64), (1, 2, 2, 17, 100, 64),
    (1, 6, 2, 64, 48, 16),  # whole blocks of queries and keys: the kernels' unmasked loops (blocks of 16 on the CPU)
]
if HAS_CUDA:
    SHAPES += [(1, 14, 2, 512, 4096, 64), (1, 32, 8, 1000, 3000, 128), (2, 8, 8, 256, 8192, 128),
               (1, 8, 1, 4096, 8192, 64), (1, 4, 1, 1024, 3000, 256)]  # 256: Gemma3
DTYPES = [torch.float32] if not HAS_CUDA else [torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["mass", "weighted", "obs", "out"])
def test_chunk_attention_matches_reference(shape, dtype, mode):
    from kvcascade.kernels.triton_attention import chunk_attention

    B, Hq, H, C, n_cached, D = shape
    q, k, v = _inputs(B, Hq, H, C, n_cached, D, dtype)
    w = torch.rand(C, device=DEV) if mode == "weighted" else None
    kw = dict(scaling=D ** -0.5, obs_window=8 if mode == "obs" else 0, need_mass=mode in ("mass", "weighted"),
              q_weights=w)
    out, mass, obs = chunk_attention(q, k, v, **kw)
    r_out, r_mass, r_obs = _ref(q, k, v, **kw)
    _close(out, r_out, TOL[dtype], "out")
    if kw["need_mass"]:
        _close(mass, r_mass, TOL[dtype], "mass")
        # mass is normalised: without weights it sums to (queries x group) per KV head
        if w is None:
            torch.testing.assert_close(mass.sum(-1), torch.full_like(mass.sum(-1), C * Hq // H), rtol=1e-3, atol=1e-3)
    else:
        assert mass is None
    if mode == "obs":
        _close(obs, r_obs, TOL[dtype], "obs")


WINDOWED = [  # kernel, queries, cached keys, first query position, window, seed, keys no query may see
    ("chunk_attention", 40, 30, 100, 31, 3, 0),
    ("decode_attention", 1, 60, 500, 17, 5, 44),  # the window's query position is read on the device
]


@pytest.mark.parametrize("kernel,C,n_cached,seen,window,seed,cut", WINDOWED, ids=[w[0] for w in WINDOWED])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_sliding_window(kernel, C, n_cached, seen, window, seed, cut, dtype):
    from kvcascade.kernels import triton_attention

    B, Hq, H, D = 1, 4, 2, 32
    q, k, v = _inputs(B, Hq, H, C, n_cached, D, dtype, seed=seed)
    # the chunk starts at original position `seen`; the cache holds the n_cached tokens before it
    k_orig = torch.cat([torch.arange(seen - n_cached, seen), torch.arange(seen, seen + C)]).to(DEV)
    k_orig = k_orig.view(1, 1, -1).expand(B, H, -1)
    q_orig = torch.arange(seen, seen + C, device=DEV)
    kw = dict(scaling=D ** -0.5, q_orig=q_orig, k_orig=k_orig, window=window, need_mass=True)
    out, mass, _ = getattr(triton_attention, kernel)(q, k, v, **kw)
    r_out, r_mass, _ = _ref(q, k, v, **kw)
    _close(out, r_out, TOL[dtype], "out")
    _close(mass, r_mass, TOL[dtype], "mass")
    if cut:
        assert float(r_mass[..., :cut].abs().max()) == 0.0  # the window really cut the old keys


DEC = [(1, 4, 2, 1, 200, 16), (1, 14, 2, 1, 1000, 64), (2, 8, 2, 3, 500, 32)]
if HAS_CUDA:
    DEC += [(1, 32, 8, 1, 131072, 128), (1, 14, 2, 1, 8192, 64), (1, 32, 8, 4, 65536, 128)]


@pytest.mark.parametrize("shape", DEC)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_mass", [True, False])
def test_decode_attention_matches_reference(shape, dtype, need_mass):
    from kvcascade.kernels.triton_attention import decode_attention

    B, Hq, H, C, n_cached, D = shape
    q, k, v = _inputs(B, Hq, H, C, n_cached, D, dtype, seed=5)
    w = torch.rand(C, device=DEV) if need_mass else None
    kw = dict(scaling=D ** -0.5, need_mass=need_mass, q_weights=w, obs_window=1)
    out, mass, obs = decode_attention(q, k, v, **kw)
    r_out, r_mass, r_obs = _ref(q, k, v, **kw)
    _close(out, r_out, TOL[dtype], "out")
    _close(obs, r_obs, TOL[dtype], "obs")
    if need_mass:
        _close(mass, r_mass, TOL[dtype], "mass")


@pytest.mark.skipif(not HAS_CUDA, reason="dispatch picks Triton on CUDA only")
def test_dispatch_uses_triton_on_cuda_and_matches_reference():
    from kvcascade.kernels import attention_with_scores, backend_for

    q, k, v = _inputs(1, 14, 2, 512, 2048, 64, torch.bfloat16)
    assert backend_for(q) == "triton"
    out, mass, _ = attention_with_scores(q, k, v, scaling=0.125, need_mass=True)
    r_out, r_mass, _ = _ref(q, k, v, scaling=0.125)
    _close(out, r_out, 3e-2, "out")
    _close(mass, r_mass, 3e-2, "mass")


def test_strided_prefill_benchmark_runs_the_policy_on_kernel_mass():
    """The benchmark's one-layer strided prefill keeps the cascade within its budget (small, any device)."""
    from kvcascade.bench import strided_prefill

    q, k, v = _inputs(1, 4, 2, 200, 0, 32, DTYPES[0], seed=9)
    fn, flops = strided_prefill(q, k, v, cache=64, stride=32, policy_name="cascade")
    assert flops > 0
    fn()


SHARED = [  # B, Hq, H, C, n_cached, D, sinks, recent
    (1, 4, 2, 16, 20, 16, 2, 5), (2, 6, 2, 33, 40, 32, 1, 7), (1, 2, 1, 1, 50, 16, 4, 9), (1, 4, 2, 20, 0, 16, 0, 64),
]
if HAS_CUDA:
    SHARED += [(1, 14, 2, 1024, 7168, 64, 16, 1008), (1, 14, 2, 1, 8191, 64, 16, 1008), (1, 8, 2, 300, 5000, 128, 4, 700)]


@pytest.mark.parametrize("shape", SHARED)
@pytest.mark.parametrize("share", ["scores", "keys"])
@pytest.mark.parametrize("per_head", [False, True])
def test_shared_attention_matches_reference(shape, share, per_head):
    """The inter-layer (PoD) kernel against its reference: proximal keys its own, distant ones the base layer's, one
    softmax; positions with gaps (an evicting selector's), per head when ``per_head``."""
    from kvcascade.interlayer.attention import shared_attention as reference
    from kvcascade.kernels.triton_attention import shared_attention

    B, Hq, H, C, n_cached, D, sinks, recent = shape
    dtype = DTYPES[-1]
    q, k, v = _inputs(B, Hq, H, C, n_cached, D, dtype, seed=C)
    qb, kb, _ = _inputs(B, Hq, H, C, n_cached, D, dtype, seed=C + 1)
    g = torch.Generator(device="cpu").manual_seed(7)
    seen = 3 * n_cached + 10  # the cache holds n_cached of the tokens before the chunk
    if per_head:
        old = torch.stack([torch.randperm(seen, generator=g)[:n_cached].sort().values for _ in range(B * H)])
        old = old.view(B, H, n_cached)
    else:
        old = torch.randperm(seen, generator=g)[:n_cached].sort().values.view(1, 1, -1).expand(B, H, -1)
    k_pos = torch.cat([old, torch.arange(seen, seen + C).view(1, 1, -1).expand(B, H, -1)], -1).to(DEV)
    q_pos = torch.arange(seen, seen + C, device=DEV)
    kw = dict(scaling=D ** -0.5, q_pos=q_pos, n_sink=sinks, n_recent=recent, k_base=kb, q_base=qb, share=share)
    got = shared_attention(q, k, v, k_pos=k_pos if per_head else k_pos[0, 0], **kw)
    want = reference(q.float(), k.float(), v.float(), k_pos=k_pos, **{**kw, "k_base": kb.float(), "q_base": qb.float()})
    _close(got, want, TOL[dtype], "out")


DROPS = [  # B, H, n, capacity, D, mode, lo/hi or victim
    (1, 2, 40, 48, 16, "score", 30), (2, 3, 33, 33, 32, "score", 33), (1, 2, 20, 24, 16, "score", 0),
    (1, 1, 300, 320, 64, "shared", 300), (1, 2, 17, 20, 16, "victim", 4), (2, 2, 9, 12, 16, "victim", 0),
    # the cascade's decode step: the lower of two adjacent units of `width` slots from a start, or a fixed unit
    (1, 2, 40, 48, 16, "unit", (10, 3)), (2, 2, 30, 32, 16, "unit-shared", (0, 1)), (1, 2, 40, 40, 16, "unit", (36, 2)),
    (1, 2, 25, 32, 16, "victim", (4, 4)),
    # the same from a device schedule [start, fixed] (the cascade's replayed step)
    (1, 2, 40, 48, 16, "sched", (10, 3, 0)), (2, 2, 30, 32, 16, "sched-shared", (7, 1, 0)),
    (1, 2, 40, 48, 16, "sched", (12, 4, 1)),
]
if HAS_CUDA:
    DROPS += [(1, 2, 2049, 2304, 64, "score", 1025), (4, 8, 4097, 4352, 128, "shared", 4097),
              (1, 2, 2049, 2049, 64, "victim", 4), (1, 2, 8224, 12320, 64, "unit-shared", (4000, 32))]


@pytest.mark.parametrize("shape", DROPS)
def test_drop_one_matches_keep_indices_and_compact(shape):
    """The fused one-token (or one-unit) eviction of a decode step at the budget, against the PyTorch path (argmin +
    compact): the same slots kept in the same order, in every buffer, ties going to the first lowest score."""
    from kvcascade.cache import EMPTY_POS, LayerCache
    from kvcascade.kernels.triton_cache import drop_one

    B, H, n, cap, D, mode, arg = shape
    width = arg[1] if isinstance(arg, tuple) else 1
    g = torch.Generator(device="cpu").manual_seed(n)
    ref = LayerCache(0, None)
    ref.reserve(cap)
    ref.append(torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g))
    ref.score = torch.randint(0, 5, (B, H, n), generator=g).float()  # many ties
    bufs = [t.clone().to(DEV) for t in (ref._k, ref._v, ref._pos, ref._score)]
    if mode == "shared":  # one score for every KV head (TOVA)
        select = torch.randint(0, 3, (B, 1, n), generator=g).float()
        ref.drop_one(select)
        drop_one(*bufs, tuple(torch.empty_like(b) for b in bufs), n, select=select.to(DEV), empty=EMPTY_POS)
    elif mode == "score":
        ref.drop_one(ref.score.clone(), arg)
        drop_one(*bufs, tuple(torch.empty_like(b) for b in bufs), n, select=bufs[3][:, :, :n].clone(), hi=arg,
                 empty=EMPTY_POS)
    elif mode.startswith("sched"):  # rows of full scores; the unit from start, or the lower of two from there
        select = torch.randint(0, 3, (B, 1 if mode == "sched-shared" else H, n), generator=g).float()
        sched = torch.tensor([arg[0], arg[2]])
        ref.drop_one(select, pair=sched, width=width)
        drop_one(*bufs, tuple(torch.empty_like(b) for b in bufs), n, select=select.to(DEV), sched=sched.to(DEV),
                 width=width, empty=EMPTY_POS)
    elif mode.startswith("unit"):  # the same from a host start: the kernel takes the two units' largest scores
        select = torch.randint(0, 3, (B, 1 if mode == "unit-shared" else H, n), generator=g).float()
        ref.drop_one(select, pair=arg[0], width=width)
        two = select[..., arg[0]:arg[0] + 2 * width].reshape(B, -1, 2, width).amax(-1)
        drop_one(*bufs, tuple(torch.empty_like(b) for b in bufs), n, select=two.to(DEV), hi=2, base=arg[0],
                 width=width, empty=EMPTY_POS)
    else:
        victim = arg[0] if isinstance(arg, tuple) else arg
        ref.drop_one(victim=victim, width=width)
        drop_one(*bufs, tuple(torch.empty_like(b) for b in bufs), n, victim=victim, width=width, empty=EMPTY_POS)
    assert len(ref) == n - width
    for name, want, got in zip(("keys", "values", "pos", "score"), (ref._k, ref._v, ref._pos, ref._score), bufs):
        assert torch.equal(got[:, :, :n].cpu(), want[:, :, :n]), name


ROPES = [(1, 2, 40, 48, 64, 37, 3, "int"), (2, 2, 33, 40, 32, 0, 5, "int"), (1, 2, 24, 24, 16, 9, 1, "device")]
if HAS_CUDA:
    ROPES += [(1, 2, 2049, 2304, 64, 2048, 1, "int"), (1, 2, 12288, 12288, 64, 517, 1, "device"),
              (1, 2, 8192, 12288, 64, 4096, 4096, "int"), (1, 4, 300, 320, 128, 299, 1, "int")]


@pytest.mark.parametrize("shape", ROPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_keys_matches_apply_and_unapply_rope(shape, dtype):
    """One kernel for the keys a step with in-cache positions attends to (every stored key rotated at its slot, the
    new keys as they came) and the new keys stored un-rotated, against apply_rope / unapply_rope: the new keys exactly,
    the others within one rounding of the storage dtype; nothing else written."""
    from kvcascade.cache import apply_rope, unapply_rope
    from kvcascade.kernels.triton_cache import rope_keys

    B, H, n, cap, D, first, C, mode = shape
    g = torch.Generator(device="cpu").manual_seed(n + C)
    k = torch.randn(B, H, cap, D, generator=g).to(DEV, dtype)
    new = torch.randn(B, H, C, D, generator=g).to(DEV, dtype)
    ang = torch.arange(n).float().view(-1, 1) * (10000 ** (-torch.arange(D // 2).float() / (D // 2))).view(1, -1)
    ang = torch.cat([ang, ang], dim=-1).view(1, n, D)
    cos, sin = ang.cos().to(DEV, dtype), ang.sin().to(DEV, dtype)
    want_k = k.clone()
    want_k[:, :, first:first + C] = unapply_rope(new, cos[:, first:first + C].unsqueeze(1),
                                                 sin[:, first:first + C].unsqueeze(1))
    want = apply_rope(k[:, :, :n], cos.unsqueeze(1), sin.unsqueeze(1))
    want[:, :, first:first + C] = new
    got_k = k.clone()
    at = torch.tensor([first], device=DEV) if mode == "device" else first
    v, pos, score = (torch.randn(B, H, cap, D, generator=g).to(DEV, dtype), torch.full((B, H, cap), -7, device=DEV),
                     torch.rand(B, H, cap, generator=g).to(DEV))
    v0, pos0, score0 = v.clone(), pos.clone(), score.clone()
    v_new = torch.randn(B, H, C, D, generator=g).to(DEV, dtype)
    orig = torch.arange(100, 100 + B * C, device=DEV).view(B, C)[:1 if mode == "device" else B]
    got = rope_keys(got_k, new, cos, sin, n, at, store=(v, v_new, pos, orig, score))
    # the rest of an append: values, original positions (one row of them shared by the batch, or one per row), scores
    assert torch.equal(v[:, :, first:first + C], v_new)
    assert torch.equal(pos[:, :, first:first + C], orig.view(-1, 1, C).expand(B, H, C))
    assert not score[:, :, first:first + C].any()
    for t, t0 in ((v, v0), (pos, pos0), (score, score0)):
        assert torch.equal(t[:, :, :first], t0[:, :, :first]) and torch.equal(t[:, :, first + C:], t0[:, :, first + C:])
    # within one rounding of the storage dtype (on an H200 about 1 in 5 values differ by one unit in the last place)
    _close(got, want, 1e-2, "rotated keys")
    assert torch.equal(got[:, :, first:first + C], new)
    assert torch.equal(got_k[:, :, :first], k[:, :, :first]) and torch.equal(got_k[:, :, first + C:], k[:, :, first + C:])
    _close(got_k[:, :, first:first + C], want_k[:, :, first:first + C], 1e-2, "stored keys")


CACHE_EDITS = [("streaming", {"budget": 24}), ("cascade", {"budget": 32}),
               ("cascade", {"budget": 48, "block": 4, "cascades": 2, "head_reduction": "none"}),
               ("locret", {"budget": 24, "stabilizers": 8, "local": 2, "decode_window": 6, "heads": "random"})]


@pytest.mark.parametrize("spec", CACHE_EDITS, ids=[f"{s[0]}{i}" for i, s in enumerate(CACHE_EDITS)])
def test_cache_edit_kernels_keep_what_the_pytorch_path_keeps(spec, monkeypatch):
    """The cache-editing kernels inside a real decode (eviction with LayerCache.drop_one, the cascade's unit drops,
    append_rotated for in-cache positions, padded steps included), in float32 so that both paths compute alike: the
    same tokens decoded and the same tokens kept as with the PyTorch twins. On CUDA where there is one, else in
    Triton's CPU interpreter (CI)."""
    import kvcascade.cache as cache_mod
    from kvcascade.cache import _padded_ok
    from kvcascade.engine import Session
    from kvcascade.kernels import triton_cache
    from kvcascade.policies import make_policy

    from .conftest import tiny_model
    from .test_graph_keys import _Tok, _traced_step

    model = tiny_model("qwen2", layers=2).to(DEV)
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(8)).tolist()
    runs, calls = [], []
    for fused in (False, True):
        if fused:
            for name in ("drop_one", "rope_keys"):
                fn = getattr(triton_cache, name)
                monkeypatch.setattr(triton_cache, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
            monkeypatch.setattr(cache_mod, "_triton_edits", lambda t: True)
            monkeypatch.setattr(cache_mod, "_fused_rope",
                                lambda layer, keys: layer._k is not None and layer._v.shape[-1] == layer._k.shape[-1])
        s = Session(model, _Tok(), ids, make_policy(spec[0], **spec[1]), max_new_tokens=12, chunk_size=32,
                    stop_on_eos=False)
        with torch.inference_mode():
            while s.t1 is None:
                s.step()
            while len(s.new) < 11:  # padded where a CUDA graph would be (a step that evicts nothing)
                s.new.append(int(s.logits.argmax()))
                _traced_step(s, model, s.new[-1], padded=_padded_ok(s.cache))
        runs.append((list(s.new), [layer.pos.clone() for layer in s.cache.layers],
                     [layer.score.clone() for layer in s.cache.layers]))
        s.close()
    (tok_a, pos_a, sc_a), (tok_b, pos_b, sc_b) = runs
    assert calls.count("rope_keys") >= 20 and (spec[0] == "locret" or calls.count("drop_one") >= 4), calls
    assert tok_a == tok_b
    assert all(torch.equal(a, b) for a, b in zip(pos_a, pos_b))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(sc_a, sc_b))


def test_tuned_launch_configurations_load_and_bad_files_say_so(tmp_path, monkeypatch):
    import json

    from kvcascade.errors import KVCascadeError
    from kvcascade.kernels import triton_attention as ta

    monkeypatch.setattr(ta, "FWD_CONFIG", dict(ta.FWD_CONFIG))
    monkeypatch.setattr(ta, "MASS_CONFIG", dict(ta.MASS_CONFIG))
    good = tmp_path / "tune.json"
    good.write_text(json.dumps({"device": "x", "fwd": {"64": [64, 128, 8, 4]}, "mass": {"128": [64, 64, 4, 3]}}))
    ta.load_configs(str(good))
    assert ta.FWD_CONFIG[64] == (64, 128, 8, 4) and ta.MASS_CONFIG[128] == (64, 64, 4, 3)
    before = (dict(ta.FWD_CONFIG), dict(ta.MASS_CONFIG))
    for text in ("not json", json.dumps({"fwd": {"64": [64, 128]}}), json.dumps({"mass": {"48": [64, 64, 4, 2]}}),
                 json.dumps({"fwd": {"64": [64, 64, 4, 2]}, "mass": {"64": [64, 0, 4, 2]}}), "[]"):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(KVCascadeError, match="KVCASCADE_KERNEL_CONFIG"):
            ta.load_configs(str(bad))
        assert (ta.FWD_CONFIG, ta.MASS_CONFIG) == before  # nothing half-applied
    with pytest.raises(KVCascadeError, match="not launch configurations"):
        ta.load_configs(str(tmp_path / "missing.json"))
