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


def _gemma():
    """Gemma-3-270M, or (transformers before 5.23, whose GGUF conversion gets its tokenizer wrong) the clear refusal."""
    import transformers

    from kvcascade.errors import KVCascadeError

    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 23):
        with pytest.raises(KVCascadeError, match="splits text differently"):
            kvcascade.load_model("gemma-3-270m", progress=False)
        pytest.skip("transformers < 5.23 converts Gemma-3's tokenizer wrongly: refused with one clear error (asserted)")
    return kvcascade.load_model("gemma-3-270m", progress=False)


def test_gemma_full_and_sliding_layers():
    model, tok = _gemma()
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


def _issue3_run(model, tok, n):
    """The cascade issue's setting: 8K-token passkey, needle at 25% depth, budget 1024; the prompts of
    ``kvcascade eval passkey --lengths 8k --depths 0.25 --budgets 1024`` (seed 0), samples 0..n-1."""
    from kvcascade.eval import make_sample, score
    from kvcascade.eval.runner import sample_seed

    found = {"cascade:block=32:cascades=6": 0, "streaming": 0}
    for i in range(n):
        s = make_sample("passkey", tok, 8192, 0.25, seed=sample_seed(0, "passkey", 8192, 0.25, i))
        for spec in found:
            name, _, args = spec.partition(":")
            pargs = dict(a.split("=") for a in args.split(":")) if args else {}
            r = kvcascade.generate(model, tok, s.prompt, policy=name, budget=1024, policy_args=pargs,
                                   max_new_tokens=8, chunk_size=512)
            found[spec] += score(s, r.text)
    return found


def test_cascade_block_variant_beats_streaming_on_one_sample(qwen):
    """One sample of the issue's setting (about 2 minutes on 2 CPU cores): the needle is 6K tokens behind the
    end; streaming's 1020-token window cannot hold it, the cascade's block variant keeps it."""
    found = _issue3_run(*qwen, 1)
    assert found["streaming"] == 0 and found["cascade:block=32:cascades=6"] == 1, found


@pytest.mark.skipif(__import__("os").environ.get("KVCASCADE_SLOW") != "1",
                    reason="10 samples x 2 policies: about 20 minutes on 2 CPU cores; set KVCASCADE_SLOW=1")
def test_cascade_block_variant_beats_streaming_ten_samples(qwen):
    found = _issue3_run(*qwen, 10)
    assert found["cascade:block=32:cascades=6"] > found["streaming"], found


def test_locret_shipped_heads_keep_a_fact_in_held_out_prose(qwen):
    """The shipped heads load for the default model by themselves and keep a needle in New Testament prose (text
    they never saw) that a window of the same budget loses."""
    from kvcascade.eval import make_sample, score
    from kvcascade.texts import kjv_part

    model, tok = qwen
    nt = kjv_part("nt")
    hits = {"locret": 0, "streaming": 0}
    for seed, depth in ((5, 0.3), (6, 0.6)):
        s = make_sample("niah_single:haystack=prose", tok, 3072, depth, seed=seed, prose=nt)
        for pol in hits:
            r = kvcascade.generate(model, tok, s.prompt, policy=pol, budget=512, max_new_tokens=s.max_new_tokens,
                                   chunk_size=512)
            hits[pol] += score(s, r.text)
            assert r.kv_tokens_peak <= 512 + 512 + 100
    assert hits == {"locret": 2, "streaming": 0}, hits


def test_locret_shipped_gemma_heads_load_and_beat_untrained_ones():
    """Gemma-3-270M's shipped heads (its 3 global layers) load by themselves, and on New Testament text (never seen
    in training) keep what the model needs better than untrained heads of the same shape, at a bounded cache."""
    from kvcascade.eval.ppl import streaming_perplexity
    from kvcascade.locret.heads import find_shipped, read_header
    from kvcascade.texts import kjv_part

    model, tok = _gemma()
    path = find_shipped(model)
    assert path is not None and path.name == "gemma-3-270m.safetensors"
    assert read_header(path)["layers"] == [5, 11, 17]
    ids = tok(kjv_part("nt")[:30000]).input_ids[:2048]
    ppl = {}
    for heads in ("shipped", "random"):
        r = streaming_perplexity(model, tok, ids, policy="locret", budget=256, chunk_size=256, progress=False,
                                 policy_args={} if heads == "shipped" else {"heads": "random"})
        assert r["kv_tokens_peak"] <= 256 + 256 + 100
        ppl[heads] = r["ppl"]
    assert ppl["shipped"] < ppl["random"], ppl
