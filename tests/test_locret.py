"""Locret: retaining heads, labels, the policy's rules, training, files and errors (tiny random models)."""

import pytest
import torch

from kvcascade import make_policy
from kvcascade.cache import CompressedCache
from kvcascade.engine import chunk_bounds, prefill
from kvcascade.errors import KVCascadeError
from kvcascade.locret.heads import ProjectionTap, RetainingHeads, scored_layers
from kvcascade.locret.labels import labels_and_features

from .conftest import tiny_model


def test_head_shapes_per_architecture(arch):
    model = tiny_model(arch, layers=3)
    heads = RetainingHeads.for_model(model, width=32)
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert heads.in_dim == (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    if arch == "gemma3":  # only the global layer gets a head; sliding layers keep their window
        assert heads.layers == [2]
    else:
        assert heads.layers == [0, 1, 2]
    tap = ProjectionTap(model, heads.layers)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
    for layer in heads.layers:
        qkv = tap.qkv(layer)
        assert qkv.shape == (1, 5, heads.in_dim)
        assert heads.score(layer, qkv).shape == (1, 5, cfg.num_key_value_heads)
    tap.close()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2]]))
    assert not tap.out[heads.layers[0]]  # hooks removed


def _naive_labels(model, ids, P, layer):
    """Rotated q . k * scaling from hooked projections, one (head, answer row, prefix column) at a time."""
    from kvcascade.cache import apply_rope

    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    Hq, H = cfg.num_attention_heads, cfg.num_key_value_heads
    tap = ProjectionTap(model, [layer])
    with torch.no_grad():
        model(input_ids=ids)
        cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(ids.shape[1]).view(1, -1))
    o = tap.out[layer]
    T = ids.shape[1]
    q = apply_rope(o["q"].view(1, T, Hq, d).transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))[0]
    k = apply_rope(o["k"].view(1, T, H, d).transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))[0]
    tap.close()
    out = torch.full((H, P), float("-inf"))
    for hq in range(Hq):
        h = hq // (Hq // H)
        for p in range(P, T):
            for j in range(P):
                out[h, j] = max(out[h, j], float(q[hq, p] @ k[h, j]) * d ** -0.5)
    return out


@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])
def test_labels_match_a_naive_loop(arch_name):
    model = tiny_model(arch_name, layers=2)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 96, (1, 14), generator=torch.Generator().manual_seed(1))
    tap = ProjectionTap(model, [0, 1])
    labels, feats = labels_and_features(model, tap, ids, 10, [0, 1])
    tap.close()
    assert model.config._attn_implementation == "sdpa"  # switched back
    for layer in (0, 1):
        torch.testing.assert_close(labels[layer], _naive_labels(model, ids, 10, layer), rtol=1e-4, atol=1e-4)
        assert feats[layer].shape == (10, (4 + 2 * 2) * 16)


def _policy(budget=12, **kw):
    return make_policy("locret", budget, heads="random", **kw)


def _run(model, policy, ids, chunk):
    with CompressedCache(model, policy) as cache:
        prefill(model, cache, ids, chunk)
        return cache, [layer.pos.clone() for layer in cache.layers]


def test_chunks_keep_budget_stabilizers_and_the_question_tail():
    model = tiny_model("qwen2", layers=2)
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    policy = _policy(budget=12, stabilizers=5, local=6)
    assert chunk_bounds(70, 16, 0, 6) == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 70)]
    cache, pos = _run(model, policy, ids, 16)
    for layer, p in zip(cache.layers, pos):
        assert p.shape[-1] == 12 + 6  # budget plus the never-evicted tail
        assert (p[..., -6:] == torch.arange(64, 70)).all()  # the tail, whole
        assert (p[..., 1:] > p[..., :-1]).all()
    # in-cache positions: the next token is numbered right after the kept ones
    assert int(cache.next_position_ids(1)[0, 0]) == 18


def test_stabilizers_protect_the_newest_units_mid_prompt():
    model = tiny_model("llama", layers=2)
    policy = _policy(budget=10, stabilizers=4, local=0)
    cache = CompressedCache(model, policy)
    ids = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(4))
    cache.remaining = 20  # more chunks follow: stabilizers apply
    cache.final_chunk = False
    cache.forward(model, ids[:, :16])
    for layer in cache.layers:
        assert len(layer) == 10 and (layer.pos[..., -4:] == torch.arange(12, 16)).all()
    cache.release()


def test_heads_scores_decide_what_stays():
    """Heads that score a token id high keep it: a hand-set head scoring by the input vector's sign pattern."""
    model = tiny_model("llama", layers=2)
    policy = _policy(budget=8, stabilizers=0, local=0)
    cache = CompressedCache(model, policy)
    heads, tap = cache.aux["locret"]
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(5))
    cache.final_chunk = True
    cache.remaining = 0
    captured = {}
    orig = heads.score

    def spy(layer, qkv):
        s = orig(layer, qkv)
        captured[layer] = s[0].t().clone()  # [H, C]
        return s

    heads.score = spy
    cache.forward(model, ids)
    for layer in cache.layers:
        want = torch.topk(captured[layer.idx], 8, dim=1).indices.sort(dim=1).values
        assert torch.equal(layer.pos[0], want)  # per KV head: its own top 8
    cache.release()
    assert "locret" not in cache.aux


def test_bounded_decode_and_paper_growth():
    model = tiny_model("qwen2", layers=2)
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(6)).tolist()
    for decode, cap in (("bounded", 8 + 2 + 3), ("grow", None)):
        policy = _policy(budget=8, stabilizers=3, local=2, decode=decode, decode_window=3)
        with CompressedCache(model, policy) as cache:
            prefill(model, cache, ids, 8)
            cache.phase = "decode"
            for t in range(10):
                cache.forward(model, torch.tensor([[t + 1]]))
            n = len(cache.layers[0])
            assert n == (cap if cap else 8 + 2 + 10)
            assert (cache.layers[0].pos[..., -3:] == torch.arange(47, 50)).all()  # newest units stay


def test_bad_locret_settings():
    with pytest.raises(KVCascadeError, match="smaller than the budget"):
        make_policy("locret", 2048, stabilizers=2048)
    with pytest.raises(KVCascadeError, match="does not exist"):
        make_policy("locret", 2048, heads="/nonexistent/heads.safetensors")
    with pytest.raises(KVCascadeError, match="decode must be"):
        make_policy("locret", 2048, decode="sometimes")
    assert make_policy("locret", 6000).stabilizers == 2500  # the paper's ratio
    model = tiny_model("llama")
    with pytest.raises(KVCascadeError, match="kvcascade train locret"):
        CompressedCache(model, make_policy("locret", 64))  # no heads ship for a tiny random model


def test_save_load_round_trip_and_wrong_model(tmp_path):
    model = tiny_model("qwen2", layers=2)
    heads = RetainingHeads.for_model(model, width=16, model_name="tiny-qwen2")
    path = heads.save(tmp_path / "h.safetensors", trained={"steps": 3})
    back = RetainingHeads.load(path, model)
    assert back.model_name == "tiny-qwen2" and back.meta["trained"]["steps"] == 3 and back.layers == [0, 1]
    for a, b in zip(heads.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(KVCascadeError, match="trained for tiny-qwen2"):
        RetainingHeads.load(path, tiny_model("llama", layers=3))
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(KVCascadeError, match="cannot read"):
        RetainingHeads.load(tmp_path / "bad.safetensors")
    # a policy given that file runs with it
    with CompressedCache(model, make_policy("locret", 8, heads=str(path), local=0)) as cache:
        prefill(model, cache, list(range(20)), 8)
        assert len(cache.layers[0]) == 8


def test_a_few_training_steps_lower_the_loss(tmp_path, tiny_model_dir):
    import kvcascade
    from kvcascade.locret.train import train

    model, tok = kvcascade.load_model(str(tiny_model_dir), progress=False)
    out = tmp_path / "h.safetensors"
    summary = train(model, tok, out, model_name="tiny", steps=60, width=32, examples=60, kinds=("needles",),
                    min_prefix=256, max_prefix=300, lr=5e-3, held_out=4, progress=False, checkpoint_every=20)
    assert summary["finished"] and out.exists()
    assert summary["loss_last50"] < summary["loss_first50"] * 0.8, summary
    assert not out.with_name(out.name + ".ckpt").exists()
    heads = RetainingHeads.load(out, model)
    assert heads.meta["trained"]["steps"] == 60


def test_training_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    import kvcascade
    from kvcascade.locret.train import train

    model, tok = kvcascade.load_model(str(tiny_model_dir), progress=False)
    out = tmp_path / "h.safetensors"
    kw = dict(model_name="tiny", steps=20, width=16, examples=20, kinds=("needles",), min_prefix=256, max_prefix=280,
              held_out=2, progress=False, checkpoint_every=5)
    first = train(model, tok, out, time_limit_s=0.0, **kw)  # stops after its first step, checkpointed
    assert not first["finished"] and first["steps_done"] == 1
    done = train(model, tok, out, **kw)
    assert done["finished"] and done["steps_done"] == 20 and out.exists()
    with pytest.raises(KVCascadeError, match="another run"):
        train(model, tok, out, **{**kw, "model_name": "other"})


@pytest.mark.parametrize("argv,msg", [
    (["train", "locret", "--out", "x.safetensors", "--data", "novels"], "--data takes"),
    (["train", "locret", "--out", "x.safetensors", "--text", "/nonexistent.txt"], "cannot read training text"),
    (["train", "locret", "--out", "x.safetensors", "--steps", "0"], "--steps and --width"),
    (["generate", "--policy", "locret", "--budget", "64", "--policy-arg", "stabilizers=64", "--prompt", "hi"],
     "smaller than the budget"),
    (["generate", "--policy", "locret", "--policy-arg", "heads=/no/such.safetensors", "--prompt", "hi"],
     "does not exist"),
])
def test_locret_cli_errors(argv, msg, capsys):
    from kvcascade.cli import main

    assert main(argv + ["--model", "/nonexistent-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvcascade: error:") and msg in err[0], err


def test_unknown_model_without_heads_names_the_training_command(tiny_model_dir, capsys):
    from kvcascade.cli import main

    assert main(["generate", "--model", str(tiny_model_dir), "--policy", "locret", "--prompt", "w1 w2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvcascade: error:") and "kvcascade train locret" in err and err.count("\n") == 1


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, tiny_model_dir):
    """The example order comes from the step, so stopping and resuming trains the same heads."""
    import kvcascade
    from kvcascade.locret.train import train

    model, tok = kvcascade.load_model(str(tiny_model_dir), progress=False)
    kw = dict(model_name="tiny", steps=12, width=16, examples=6, kinds=("needles",), min_prefix=256, max_prefix=280,
              held_out=2, progress=False, checkpoint_every=3)
    train(model, tok, tmp_path / "a.safetensors", **kw)
    train(model, tok, tmp_path / "b.safetensors", time_limit_s=0.0, **kw)
    train(model, tok, tmp_path / "b.safetensors", **kw)
    a = RetainingHeads.load(tmp_path / "a.safetensors")
    b = RetainingHeads.load(tmp_path / "b.safetensors")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y)
