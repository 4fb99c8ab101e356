"""Inter-layer sharing (PoD) pieces: grouping, similarity, the shared-score attention, storage accounting,
calibration on a tiny model, and bad inputs."""

import json

import pytest
import torch

from kvcascade.errors import KVCascadeError
from kvcascade.interlayer.attention import proximal_mask, shared_attention, storage_bytes
from kvcascade.interlayer.calibrate import (calibrate, group_layers, jsd, load_groups, regroup, save_groups,
                                            similarity_from_attention)

from .conftest import make_tiny_tokenizer, tiny_model


def test_grouping_on_hand_made_similarities():
    sim = torch.eye(6, dtype=torch.float64).repeat(2, 1, 1)
    # head 0: layers 0-2 alike, 3 alone, 4-5 alike; head 1: nothing alike
    for a, b in [(0, 1), (0, 2), (1, 2), (4, 5)]:
        sim[0, a, b] = sim[0, b, a] = 0.8
    sim[0, 1, 3] = sim[0, 3, 1] = 0.9  # alike to layer 1, but the block's base is 0: 3 starts a new block
    assert group_layers(sim, 0.5) == [[[0, 1, 2], [3], [4, 5]], [[0], [1], [2], [3], [4], [5]]]
    assert group_layers(sim, 0.85) == [[[0], [1], [2], [3], [4], [5]]] * 2
    assert group_layers(sim, 0.0) == [[[0, 1, 2, 3, 4, 5]]] * 2
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(KVCascadeError, match="delta must be in"):
            group_layers(sim, bad)


def test_jsd_and_similarity():
    p = torch.tensor([[0.5, 0.5, 0.0]])
    assert float(jsd(p, p)) == pytest.approx(0.0)
    assert float(jsd(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))) == pytest.approx(1.0)
    a = torch.softmax(torch.randn(4, 3, 10), -1)  # [Hq=4, Q=3, T=10], 2 KV heads
    b = a.clone()
    b[2:] = torch.softmax(torch.randn(2, 3, 10), -1)  # KV head 1's query heads differ
    sim = similarity_from_attention([a, b], n_kv=2)
    assert float(sim[0, 0, 1]) == pytest.approx(1.0) and float(sim[1, 0, 1]) < 1.0
    assert torch.equal(sim[:, 0, 1], sim[:, 1, 0]) and float(sim[1, 0, 0]) == 1.0


def naive_shared(q, k, v, k_base, q_base, scaling, q_pos, k_pos, n_sink, n_recent, share):
    B, Hq, C, D = q.shape
    H, N = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hq, C, D, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            h = hq // (Hq // H)
            for i in range(C):
                logits = []
                for j in range(N):
                    if k_pos[j] > q_pos[i]:
                        logits.append(float("-inf"))
                        continue
                    proximal = k_pos[j] < n_sink or q_pos[i] - k_pos[j] < n_recent
                    if k_base is None or proximal:
                        s = q[b, hq, i].double() @ k[b, h, j].double()
                    elif share == "scores":
                        s = q_base[b, hq, i].double() @ k_base[b, h, j].double()
                    else:
                        s = q[b, hq, i].double() @ k_base[b, h, j].double()
                    logits.append(float(s) * scaling)
                p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                out[b, hq, i] = p @ v[b, h].double()
    return out


@pytest.mark.parametrize("share", ["scores", "keys"])
@pytest.mark.parametrize("n_sink,n_recent", [(2, 3), (0, 1), (1, 100)])
def test_shared_attention_equals_a_naive_loop(share, n_sink, n_recent):
    g = torch.Generator().manual_seed(n_recent)
    B, Hq, H, C, N, D = 1, 4, 2, 5, 12, 8
    q, qb = torch.randn(B, Hq, C, D, generator=g), torch.randn(B, Hq, C, D, generator=g)
    k, kb, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    q_pos, k_pos = torch.arange(N - C, N), torch.arange(N)
    got = shared_attention(q, k, v, scaling=0.3, q_pos=q_pos, k_pos=k_pos, n_sink=n_sink, n_recent=n_recent,
                           k_base=kb, q_base=qb, share=share)
    want = naive_shared(q, k, v, kb, qb, 0.3, q_pos.tolist(), k_pos.tolist(), n_sink, n_recent, share)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_every_layer_its_own_block_is_full_attention():
    """A base layer attends as usual; and with every token proximal, a non-base layer does too."""
    from kvcascade.kernels import reference_attention_with_scores

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, 8, generator=g)
    k, v, kb = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(3))
    pos = torch.arange(10)
    ref = reference_attention_with_scores(q, k, v, scaling=0.25, q_orig=pos[4:], k_orig=pos.view(1, 1, -1),
                                          need_mass=False)[0]
    base = shared_attention(q, k, v, scaling=0.25, q_pos=pos[4:], k_pos=pos, n_sink=1, n_recent=2)
    allprox = shared_attention(q, k, v, scaling=0.25, q_pos=pos[4:], k_pos=pos, n_sink=0, n_recent=10, k_base=kb,
                               share="keys")
    torch.testing.assert_close(base, ref)
    torch.testing.assert_close(allprox, ref)
    m = proximal_mask(pos[4:], pos, 1, 2)
    assert m[0].tolist() == [True, False, False, True, True, False, False, False, False, False]


def test_storage_accounting():
    # 4 layers, 2 KV heads: head 0 blocks [0,1,2],[3]; head 1 all separate; 100 tokens, 4 sinks + 16 recent
    groups = [[[0, 1, 2], [3]], [[0], [1], [2], [3]]]
    r = storage_bytes(groups, 4, 100, 4, 16, head_dim=8, element_size=2)
    per = 16
    full = 2 * 4 * 2 * 100 * per
    kept = full - 2 * (100 - 20) * per  # head 0: layers 1 and 2 drop 80 distant keys each
    assert r == {"full": full, "kept": kept, "saved": pytest.approx(1 - kept / full)}
    alone = storage_bytes([[[0], [1], [2], [3]]] * 2, 4, 100, 4, 16, 8, 2)
    assert alone["saved"] == 0.0


def test_calibrate_a_tiny_model_and_regroup(tmp_path):
    model = tiny_model("qwen2", layers=4)
    tok = make_tiny_tokenizer(tmp_path / "tok")
    info = calibrate(model, tok, samples=2, length=64, queries=8, delta=0.5, model_name="tiny", progress=False)
    sim = torch.tensor(info["similarity"])
    assert sim.shape == (2, 4, 4) and torch.allclose(sim, sim.transpose(1, 2))
    assert ((sim >= 0) & (sim <= 1.0 + 1e-9)).all() and torch.allclose(sim[:, range(4), range(4)], torch.ones(2, 4))
    assert all(sum(len(b) for b in blocks) == 4 for blocks in info["groups"])
    path = save_groups(info, tmp_path / "g.json")
    back = load_groups(path, model)
    assert back["groups"] == info["groups"]
    assert regroup(back, 0.0)["groups"] == [[[0, 1, 2, 3]]] * 2
    assert regroup(back, 1.0)["groups"] == [[[0], [1], [2], [3]]] * 2
    assert model.config._attn_implementation != "kvcascade_interlayer_capture"
    with pytest.raises(KVCascadeError, match="calibrated for tiny"):
        load_groups(path, tiny_model("llama", layers=3))


@pytest.mark.parametrize("argv,msg", [
    (["calibrate", "interlayer", "--out", "g.json", "--delta", "1.5"], "--delta must be in"),
    (["calibrate", "interlayer", "--out", "g.json", "--regroup", "/no/such/groups.json"], "does not exist"),
    (["calibrate", "interlayer", "--out", "g.json", "--samples", "0"], "--samples"),
])
def test_calibrate_cli_errors(argv, msg, capsys):
    from kvcascade.cli import main

    assert main(argv + ["--model", "/nonexistent-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvcascade: error:") and msg in err[0], err


def test_calibrate_cli_regroups_without_the_model(tmp_path, capsys):
    from kvcascade.cli import main

    info = {"format": "kvcascade-interlayer-groups/1", "model": "m", "fingerprint": {},
            "similarity": torch.eye(3).repeat(1, 1, 1).tolist(), "groups": [[[0], [1], [2]]], "delta": 0.5}
    (tmp_path / "a.json").write_text(json.dumps(info))
    assert main(["calibrate", "interlayer", "--regroup", str(tmp_path / "a.json"), "--delta", "0",
                 "--out", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["groups"] == [[[0, 1, 2]]]
    (tmp_path / "bad.json").write_text("{}")
    assert main(["calibrate", "interlayer", "--regroup", str(tmp_path / "bad.json"), "--out", "x.json"]) == 2
    assert "not a kvcascade inter-layer groups file" in capsys.readouterr().err


def _groups(model, tmp_path, blocks_per_head, sim=1.0):
    from kvcascade.interlayer.calibrate import FORMAT
    from kvcascade.models import fingerprint

    L = model.config.num_hidden_layers
    path = tmp_path / "groups.json"
    path.write_text(json.dumps({"format": FORMAT, "model": "tiny", "fingerprint": fingerprint(model.config),
                                "similarity": [[[1.0 if a == b else sim for b in range(L)] for a in range(L)]]
                                * len(blocks_per_head), "groups": blocks_per_head,
                                "delta": 0.5}))
    return str(path)


def test_interlayer_policy_shares_only_where_grouped(tmp_path):
    from kvcascade import make_policy
    from kvcascade.cache import CompressedCache

    from .conftest import run_chunks

    model = tiny_model("qwen2", layers=3)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    full = run_chunks(model, CompressedCache(model, make_policy("full")), ids, 8)
    together = _groups(model, tmp_path, [[[0, 1, 2]], [[0], [1, 2]]])
    for share in ("scores", "keys"):
        # every token proximal: sharing changes nothing
        near = run_chunks(model, CompressedCache(model, make_policy("interlayer", groups=together, sinks=0,
                                                                    recent=64, share=share)), ids, 8)
        torch.testing.assert_close(near, full, rtol=1e-4, atol=1e-4)
        # a short window: distant tokens go through the base layer, and the answer changes
        far = run_chunks(model, CompressedCache(model, make_policy("interlayer", groups=together, sinks=1, recent=4,
                                                                   share=share)), ids, 8)
        assert not torch.allclose(far[:, -1], full[:, -1], atol=1e-3)
    # the bytes of the PoD layout: head 0 has layers 1, 2 without distant keys, head 1 layer 2
    cache = CompressedCache(model, make_policy("interlayer", groups=together, sinks=1, recent=4))
    run_chunks(model, cache, ids, 8)
    want = storage_bytes([[[0, 1, 2]], [[0], [1, 2]]], 3, 40, 1, 4, head_dim=16, element_size=4)
    assert cache.kv_bytes() == sum(layer.nbytes() for layer in cache.layers)  # physically every key is still held
    assert sum(cache.policy.layer_bytes(layer) for layer in cache.layers) == want["kept"]
    assert want["saved"] > 0.2


def test_interlayer_bad_inputs(tmp_path):
    from kvcascade import make_policy
    from kvcascade.cache import CompressedCache

    with pytest.raises(KVCascadeError, match="needs groups=FILE"):
        make_policy("interlayer", groups="")
    with pytest.raises(KVCascadeError, match="does not exist"):
        make_policy("interlayer", groups="/no/groups.json")
    model = tiny_model("qwen2", layers=3)
    g = _groups(model, tmp_path, [[[0, 1, 2]], [[0, 1, 2]]], sim=0.6)
    with pytest.raises(KVCascadeError, match="delta must be in"):
        make_policy("interlayer", groups=g, delta=1.5)
    with pytest.raises(KVCascadeError, match="share must be"):
        make_policy("interlayer", groups=g, share="values")
    with pytest.raises(KVCascadeError, match="calibrated for tiny"):
        CompressedCache(tiny_model("llama", layers=2), make_policy("interlayer", groups=g))
    assert make_policy("interlayer", groups=g, delta=0.7)._info["groups"] == [[[0], [1], [2]]] * 2
    assert make_policy("interlayer", groups=g)._info["groups"] == [[[0, 1, 2]]] * 2  # the file's own grouping


def test_interlayer_in_an_eval_grid(tiny_model_dir, tmp_path):
    import kvcascade
    from kvcascade.eval.runner import Grid, run_grid

    model, tok = kvcascade.load_model(str(tiny_model_dir), progress=False)
    L = model.config.num_hidden_layers
    g = _groups(model, tmp_path, [[list(range(L))]] * model.config.num_key_value_heads)
    grid = Grid(tasks=["passkey"], policies=["full", f"interlayer:groups={g}:recent=16"], budgets=[40],
                lengths=[96], samples=2, chunk_size=32)
    rows = run_grid(model, tok, grid, tmp_path / "ev", model_name="tiny", progress=False, report=False)
    il = [r for r in rows if r["policy"].startswith("interlayer")]
    assert len(il) == 2 and all(r["budget"] is None and not r.get("error") for r in il)
    full = {r["sample"]: r for r in rows if r["policy"] == "full"}
    assert all(r["kv_bytes_peak"] < full[r["sample"]]["kv_bytes_peak"] for r in il)  # the PoD layout's bytes


def test_shipped_groups_found_for_the_default_model_only():
    import types

    from transformers import Qwen2Config

    from kvcascade import make_policy
    from kvcascade.cache import CompressedCache
    from kvcascade.interlayer.calibrate import find_shipped, load_groups

    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2)
    path = find_shipped(types.SimpleNamespace(config=cfg))
    assert path is not None and path.name == "qwen2.5-coder-0.5b.json"
    info = load_groups(path)
    assert len(info["groups"]) == 2 and sorted(sum(info["groups"][0], [])) == list(range(24))
    assert find_shipped(tiny_model("qwen2", layers=2)) is None
    with pytest.raises(KVCascadeError, match="no inter-layer groups ship"):
        CompressedCache(tiny_model("qwen2", layers=2), make_policy("interlayer"))


# -- storage=interlayer: the layout composed with a selector (bounded memory) ----------------------------------
COMPOSED = [("h2o", {}), ("tova", {}), ("snapkv", {"window": 4, "chunked": True}),
            ("locret", {"heads": "random", "local": 4, "decode_window": 4})]


@pytest.mark.parametrize("name,args", COMPOSED, ids=[c[0] for c in COMPOSED])
def test_storage_with_every_layer_alone_is_the_selector(name, args, tmp_path):
    """No block shares anything: the composed policy is the selector, logits and kept tokens."""
    from kvcascade import make_policy
    from kvcascade.cache import CompressedCache

    from .conftest import run_chunks

    model = tiny_model("qwen2", layers=3)
    ids = torch.randint(0, 96, (1, 48), generator=torch.Generator().manual_seed(4))
    alone = _groups(model, tmp_path, [[[0], [1], [2]]] * 2)
    plain = CompressedCache(model, make_policy(name, 20, **args))
    composed = CompressedCache(model, make_policy(name, 20, storage="interlayer", storage_groups=alone,
                                                  storage_sinks=1, storage_recent=4, **args))
    want = torch.cat([run_chunks(model, plain, ids[:, :40], 8), run_chunks(model, plain, ids[:, 40:], 1)], 1)
    got = torch.cat([run_chunks(model, composed, ids[:, :40], 8), run_chunks(model, composed, ids[:, 40:], 1)], 1)
    torch.testing.assert_close(got, want)
    for a, b in zip(plain.layers, composed.layers):
        assert torch.equal(a.pos, b.pos)


def test_storage_without_eviction_is_the_interlayer_policy(tmp_path):
    """Budget above the sequence: nothing is evicted, and h2o with the layout is the `interlayer` policy."""
    from kvcascade import make_policy
    from kvcascade.cache import CompressedCache

    from .conftest import run_chunks

    model = tiny_model("qwen2", layers=3)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    together = _groups(model, tmp_path, [[[0, 1, 2]], [[0], [1, 2]]])
    for share in ("scores", "keys"):
        il = run_chunks(model, CompressedCache(model, make_policy("interlayer", groups=together, sinks=1, recent=4,
                                                                  share=share)), ids, 8)
        composed = CompressedCache(model, make_policy("h2o", 64, storage="interlayer", storage_groups=together,
                                                      storage_sinks=1, storage_recent=4, storage_share=share))
        torch.testing.assert_close(run_chunks(model, composed, ids, 8), il)


@pytest.mark.parametrize("name,args", COMPOSED, ids=[c[0] for c in COMPOSED])
def test_storage_heads_follow_their_base(name, args, tmp_path):
    """Within a block every layer holds its base's tokens (so distant keys can be shared), the selector's budget
    holds, the base layer selects as the selector alone does, and the layout's bytes are counted."""
    from kvcascade import make_policy
    from kvcascade.cache import CompressedCache

    from .conftest import run_chunks

    model = tiny_model("qwen2", layers=3)
    ids = torch.randint(0, 96, (1, 60), generator=torch.Generator().manual_seed(5))
    blocks = [[[0, 1, 2]], [[0], [1, 2]]]
    g = _groups(model, tmp_path, blocks)
    plain = CompressedCache(model, make_policy(name, 20, **args))
    cache = CompressedCache(model, make_policy(name, 20, storage="interlayer", storage_groups=g, storage_sinks=1,
                                               storage_recent=4, **args))
    assert not cache.policy.graph_safe and not cache.policy.batchable
    want = run_chunks(model, plain, ids[:, :48], 8)
    got = run_chunks(model, cache, ids[:, :48], 8)
    for _ in range(2):
        L = cache.layers
        assert all(len(layer) <= 20 + 8 for layer in L)
        assert torch.equal(L[1].pos[:, 0], L[0].pos[:, 0]) and torch.equal(L[2].pos[:, 0], L[0].pos[:, 0])
        assert torch.equal(L[2].pos[:, 1], L[1].pos[:, 1])
        assert torch.equal(L[0].pos, plain.layers[0].pos)  # the lowest layer is every head's base
        run_chunks(model, cache, ids[:, 48:50], 1)
        run_chunks(model, plain, ids[:, 48:50], 1)
    assert not torch.allclose(got[:, -1], want[:, -1], atol=1e-4)  # distant tokens went through the base
    N, per = len(L[0]), 16 * 4  # head dim 16, fp32
    prox = min(N, 1 + 4)
    assert cache.policy.layer_bytes(L[0]) == 2 * 2 * N * per
    assert cache.policy.layer_bytes(L[1]) == 2 * N * per + (prox + N) * per  # head 0 follows layer 0
    assert cache.policy.layer_bytes(L[2]) == 2 * N * per + 2 * prox * per
    assert cache.kv_bytes_peak() < plain.kv_bytes_peak()


def test_storage_bad_inputs(tmp_path):
    from kvcascade import make_policy
    from kvcascade.cache import CompressedCache

    with pytest.raises(KVCascadeError, match="storage must be none or interlayer"):
        make_policy("h2o", 64, storage="quant")
    with pytest.raises(KVCascadeError, match="has no parameter storage"):
        make_policy("pyramidkv", 64, storage="interlayer")
    with pytest.raises(KVCascadeError, match="has no parameter storage"):
        make_policy("cascade", 64, storage="interlayer")
    with pytest.raises(KVCascadeError, match="storage_share must be"):
        make_policy("h2o", 64, storage="interlayer", storage_recent=8, storage_share="values")
    with pytest.raises(KVCascadeError, match="must be below the budget"):
        make_policy("tova", 64, storage="interlayer")  # 16 + 1008 proximal tokens: nothing would be shared
    with pytest.raises(KVCascadeError, match="does not exist"):
        make_policy("snapkv", 64, storage="interlayer", storage_recent=8, storage_groups="/no/groups.json")
    with pytest.raises(KVCascadeError, match="no inter-layer groups ship"):
        CompressedCache(tiny_model("qwen2", layers=2), make_policy("h2o", 64, storage="interlayer", storage_recent=8))
    model = tiny_model("qwen2", layers=3)
    g = _groups(model, tmp_path, [[[0, 1, 2]]] * 2)
    with pytest.raises(KVCascadeError, match="calibrated for tiny"):
        CompressedCache(tiny_model("llama", layers=2), make_policy("h2o", 64, storage="interlayer",
                                                                  storage_recent=8, storage_groups=g))
    assert make_policy("h2o", 64).storage == "none" and make_policy("h2o", 64).graph_safe


def test_storage_cli_error_is_one_line(capsys):
    from kvcascade.cli import main

    assert main(["generate", "--model", "/nonexistent-model", "--prompt", "x", "--policy", "h2o", "--budget", "64",
                 "--policy-arg", "storage=interlayer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvcascade: error:") and "below the budget" in err[0], err
