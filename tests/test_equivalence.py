"""First test of every policy: with a budget at least the sequence length it reproduces the full model."""

import pytest
import torch

from kvcascade import make_policy
from kvcascade.cache import CompressedCache
from kvcascade.policies import REGISTRY

from .conftest import reference_logits, run_chunks, tiny_model

SEQ = 40
NEW = 6


def groups_file(model, tmp_path, together: bool) -> str:
    """A groups file for ``model``: every layer its own block, or all layers one block per KV head."""
    import json

    from kvcascade.interlayer.calibrate import FORMAT
    from kvcascade.models import fingerprint

    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    blocks = [list(range(L))] if together else [[i] for i in range(L)]
    path = tmp_path / f"groups-{'one' if together else 'alone'}.json"
    path.write_text(json.dumps({"format": FORMAT, "model": "tiny", "fingerprint": fingerprint(model.config),
                                "similarity": [[[1.0] * L] * L] * H, "groups": [blocks] * H, "delta": 0.5}))
    return str(path)


def big_budget_policy(name, model=None, tmp_path=None):
    cls = REGISTRY[name]
    if name == "interlayer":  # every layer its own block: nothing is shared, so it must equal full
        return make_policy(name, groups=groups_file(model, tmp_path, together=False))
    extra = {"heads": "random"} if name == "locret" else {}  # tiny models have no trained heads
    return make_policy(name, budget=256, **extra) if "budget" in cls.PARAMS else make_policy(name)


@pytest.mark.parametrize("policy", sorted(REGISTRY))
@pytest.mark.parametrize("chunk", [1, 7, 16, SEQ])
def test_prefill_matches_full_model(arch, policy, chunk, tmp_path):
    model = tiny_model(arch)
    if policy == "interlayer" and arch == "gemma3":
        pytest.skip("interlayer does not apply to sliding-window models")
    ids = torch.randint(0, model.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(model, ids)
    got = run_chunks(model, CompressedCache(model, big_budget_policy(policy, model, tmp_path)), ids, chunk)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", sorted(REGISTRY))
def test_decode_matches_full_model(arch, policy, tmp_path):
    model = tiny_model(arch)
    if policy == "interlayer" and arch == "gemma3":
        pytest.skip("interlayer does not apply to sliding-window models")
    ids = torch.randint(0, model.config.vocab_size, (1, SEQ + NEW), generator=torch.Generator().manual_seed(2))
    ref = reference_logits(model, ids)
    cache = CompressedCache(model, big_budget_policy(policy, model, tmp_path))
    got = [run_chunks(model, cache, ids[:, :SEQ], 16)]
    cache.phase = "decode"
    with torch.no_grad():
        for t in range(SEQ, SEQ + NEW):
            out = cache.forward(model, ids[:, t:t + 1])
            got.append(out.logits)
    torch.testing.assert_close(torch.cat(got, dim=1), ref, rtol=1e-4, atol=1e-4)


def test_fallback_attention_without_our_cache(arch):
    """A model switched to kvcascade attention still computes plain causal attention with no cache."""
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    ref = reference_logits(model, ids)
    model.set_attn_implementation("eager")
    CompressedCache(model, make_policy("full"))  # installs the kvcascade attention
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_cache_positions_option_of_h2o_and_tova(arch):
    """``positions=cache`` numbers kept tokens by slot: H2O keeping only recent tokens is then the sliding window
    (which uses slot positions), and the option changes the logits once tokens were dropped."""
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(4))
    h2o_recent = make_policy("h2o", budget=12, recent_ratio=1.0, positions="cache")
    assert h2o_recent.position_mode == "cache" and make_policy("h2o", budget=12).position_mode == "original"
    got = run_chunks(model, CompressedCache(model, h2o_recent), ids, 5)
    want = run_chunks(model, CompressedCache(model, make_policy("window", budget=12)), ids, 5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for name in ("h2o", "tova"):
        cached = run_chunks(model, CompressedCache(model, make_policy(name, budget=12, positions="cache")), ids, 5)
        orig = run_chunks(model, CompressedCache(model, make_policy(name, budget=12)), ids, 5)
        assert not torch.allclose(cached[:, -1], orig[:, -1], atol=1e-3)
    from kvcascade.errors import KVCascadeError

    with pytest.raises(KVCascadeError, match="positions must be original or cache"):
        make_policy("tova", budget=12, positions="rolling")
