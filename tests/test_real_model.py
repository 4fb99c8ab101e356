"""A few checks on the real embedded models (converted once, then cached; minutes on 2 CPU cores)."""

import pytest

import kvcascade
from kvcascade.eval import make_passkey, score_passkey

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def qwen():
    return kvcascade.load_model("qwen2.5-coder-0.5b", progress=False)


def test_streaming_finds_key_near_the_end(qwen):
    model, tok = qwen
    s = make_passkey(tok, 1024, depth=0.9, seed=11)
    assert 950 <= s.tokens <= 1100
    r = kvcascade.generate(model, tok, s.prompt, policy="streaming", budget=512, max_new_tokens=8, chunk_size=256)
    assert score_passkey(r.text, s.answer) == 1.0, r.text
    assert r.kv_tokens_peak <= 512 + 256
    assert r.kv_bytes_peak < r.kv_bytes_full


def test_full_finds_key_at_the_start(qwen):
    model, tok = qwen
    s = make_passkey(tok, 1024, depth=0.0, seed=12)
    assert s.needle_token < 60
    r = kvcascade.generate(model, tok, s.prompt, policy="full", max_new_tokens=8, chunk_size=256)
    assert score_passkey(r.text, s.answer) == 1.0, r.text


def test_streaming_loses_key_at_the_start(qwen):
    """The counterpart: a key evicted by the window cannot be recalled (the test can fail, and does not)."""
    model, tok = qwen
    s = make_passkey(tok, 1024, depth=0.0, seed=12)
    r = kvcascade.generate(model, tok, s.prompt, policy="streaming", budget=256, max_new_tokens=8, chunk_size=128)
    assert score_passkey(r.text, s.answer) == 0.0, r.text


def test_gemma_full_and_sliding_layers():
    model, tok = kvcascade.load_model("gemma-3-270m", progress=False)
    assert model.config.model_type == "gemma3_text"
    s = make_passkey(tok, 600, depth=0.5, seed=13)
    r = kvcascade.generate(model, tok, s.prompt, policy="full", max_new_tokens=8, chunk_size=128)
    assert score_passkey(r.text, s.answer) == 1.0, r.text
    # sliding-window layers keep only their window; global layers keep everything under `full`
    from kvcascade.cache import CompressedCache
    from kvcascade.engine import prefill, tokenize

    cache = CompressedCache(model, kvcascade.make_policy("full"))
    prefill(model, cache, tokenize(tok, s.prompt), 128)
    window = model.config.sliding_window
    assert s.tokens > window
    assert {len(layer) for layer in cache.layers if layer.is_sliding} == {window - 1}
    assert {len(layer) for layer in cache.layers if not layer.is_sliding} == {s.tokens}
    assert sum(layer.is_sliding for layer in cache.layers) == 15
