"""The engine and the transformers hand-off: cache argument, attention implementation left as found, hand-off
checks, chunking, streamed text, warnings and bad sampling input."""

import warnings

import pytest
import torch

import kvcascade
from kvcascade import make_policy
from kvcascade.cache import ATTN_IMPLEMENTATION, CompressedCache
from kvcascade.compat import cache_argument
from kvcascade.engine import PastWindowWarning, StreamDecoder, chunk_bounds, generate, prefill
from kvcascade.errors import KVCascadeError

from .conftest import make_tiny_tokenizer, tiny_model


def test_cache_argument_is_the_one_the_installed_transformers_takes(arch):
    import inspect

    model = tiny_model(arch)
    name = cache_argument(model)
    assert name in inspect.signature(type(model).forward).parameters


def test_update_accepts_every_release_calling_convention():
    model = tiny_model("llama")
    cache = CompressedCache(model, make_policy("full"))
    k = torch.zeros(1, 2, 3, 16)
    for call in (lambda: cache.update(k, k, 0), lambda: cache.update(k, k, 0, {"cache_position": None}),
                 lambda: cache.update(k, k, 0, kwargs={"position_ids": None})):
        assert call()[0] is k
        kvcascade.cache._pending.item = None
    cache.release()


def test_generate_leaves_the_model_as_it_found_it(tiny_model_dir):
    """After generate, the model has its own attention implementation back and a padded batch computes as before."""
    model, tok = kvcascade.load_model(str(tiny_model_dir), device="cpu", progress=False)
    model.set_attn_implementation("sdpa")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 7, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    generate(model, tok, "w1 w2 w3 w4 w5 w6 w7 w8", policy="streaming", budget=6, policy_args={"sinks": 2},
             max_new_tokens=3, chunk_size=4)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before)


def test_decode_step_time_is_the_median_step(tiny_model_dir, monkeypatch):
    """decode_step_s is the median time between decoded tokens (the steady rate a benchmark reports beside the
    whole decode's, which counts the first steps' compiles and graph captures): one slow step does not move it."""
    import kvcascade.engine as engine

    model, tok = kvcascade.load_model(str(tiny_model_dir), device="cpu", progress=False)
    # prefill from 0 to 1, then tokens taken at 1, 11 (a 10 s step), 11.5, ..., 13; the end at 13.5
    clock = iter([0.0, 1.0, 1.0, 11.0, 11.5, 12.0, 12.5, 13.0, 13.5])
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(clock, 99.0))
    s = engine.Session(model, tok, [5, 6, 7, 8], make_policy("full"), max_new_tokens=6, chunk_size=4,
                       stop_on_eos=False)
    while not s.step():
        pass
    r = s.result()
    s.close()
    assert r.new_tokens == 6 and r.decode_step_s == 0.5 and r.decode_s == 12.5
    one = generate(model, tok, "w1 w2", policy="full", max_new_tokens=1)
    assert one.decode_step_s == 0.0


def test_cache_release_and_context_manager():
    model = tiny_model("qwen2")
    model.set_attn_implementation("eager")
    with CompressedCache(model, make_policy("full")) as cache:
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION
        cache.forward(model, torch.tensor([[1, 2, 3]]))
    assert model.config._attn_implementation == "eager"
    # a released cache switches the model again for its next forward
    out = cache.forward(model, torch.tensor([[4]]))
    assert out.logits.shape[1] == 1 and cache.layers[0].seen == 4
    cache.release()
    assert model.config._attn_implementation == "eager"


def test_a_missed_hand_off_fails_loudly():
    """If the model's attention is switched away while a cache is in use, the cache must not silently miss tokens."""
    model = tiny_model("llama")
    cache = CompressedCache(model, make_policy("full"))
    cache.forward(model, torch.tensor([[1, 2, 3]]))
    model.set_attn_implementation("eager")
    from kvcascade.compat import model_forward

    with pytest.raises(KVCascadeError, match="attention implementation is 'eager'"):
        with torch.no_grad():
            model_forward(model, torch.tensor([[4]]), cache, cache.next_position_ids(1))
    assert cache.layers[0].seen == 3


def test_chunk_bounds():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(10, 4, last_min=3) == [(0, 4), (4, 7), (7, 10)]
    assert chunk_bounds(10, 4, last_min=6) == [(0, 4), (4, 10)]
    assert chunk_bounds(10, 4, last_min=32) == [(0, 10)]
    assert chunk_bounds(3, 4, last_min=32) == [(0, 3)]
    assert chunk_bounds(8, 4, last_min=4) == [(0, 4), (4, 8)]
    for n in range(1, 40):
        for c in (1, 3, 8):
            for m in (0, 1, 5, 50):
                b = chunk_bounds(n, c, m)
                assert b[0][0] == 0 and b[-1][1] == n and all(x[1] == y[0] for x, y in zip(b, b[1:]))
                assert all(e > s for s, e in b) and b[-1][1] - b[-1][0] >= min(m, n)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
def test_snapkv_scores_with_the_whole_observation_window_whatever_the_chunking(name):
    """The last prompt chunk shorter than the observation window: the selection is still made from the last
    ``window`` queries' attention, the same tokens as with the prompt in one chunk."""
    model = tiny_model("qwen2", layers=2)
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(5)).tolist()
    kept = []
    for chunk in (70, 32, 16):  # 70 = 32 + 32 + 6: a 6-token last chunk, window 12
        with CompressedCache(model, make_policy(name, 24, window=12, kernel=3)) as cache:
            prefill(model, cache, ids, chunk)
            kept.append([layer.pos.clone() for layer in cache.layers])
    for other in kept[1:]:
        for a, b in zip(kept[0], other):
            assert torch.equal(a, b)


def byte_tokenizer(path):
    """A byte-level BPE tokenizer without merges: every UTF-8 byte is one token (multi-byte characters split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {"<eos>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(alphabet))}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    fast.save_pretrained(str(path))
    return fast


def test_stream_decoder_never_splits_a_character(tmp_path):
    tok = byte_tokenizer(tmp_path)
    text = "héllo wörld: 世界 🙂 ok"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text)  # multi-byte characters are split across tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push(t) for t in ids] + [dec.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_streamed_pieces_join_to_the_answer(tmp_path):
    """Through generate: on_token pieces add up to the result text (random bytes included)."""
    tok = byte_tokenizer(tmp_path / "tok")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512)).eval()
    with torch.no_grad():  # make multi-byte UTF-8 lead and continuation bytes likely
        hi = [i for ch, i in tok.get_vocab().items() if i > 0 and ord(ch) >= 0x80]
        model.lm_head.weight[hi] += 0.5 * model.lm_head.weight[hi].norm(dim=-1, keepdim=True)
    pieces = []
    r = generate(model, tok, "héllo 世界", policy="full", max_new_tokens=40, on_token=pieces.append,
                 temperature=1.0, seed=3, stop_on_eos=False)
    assert r.new_tokens == 40
    assert "".join(pieces) == r.text


def test_past_window_warning_for_original_positions(tiny_model_dir):
    model, tok = kvcascade.load_model(str(tiny_model_dir), device="cpu", progress=False)
    model.config.max_position_embeddings = 32
    prompt = " ".join(f"w{i % 60}" for i in range(48))
    kvcascade.engine._WARNED.clear()
    with pytest.warns(PastWindowWarning, match="runs past the model's window"):
        generate(model, tok, prompt, policy="h2o", budget=16, max_new_tokens=1, chunk_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PastWindowWarning)
        kvcascade.engine._WARNED.clear()
        generate(model, tok, prompt, policy="streaming", budget=16, max_new_tokens=1, chunk_size=16)  # in-cache
        generate(model, tok, prompt, policy="h2o", budget=16, max_new_tokens=1, chunk_size=16,
                 policy_args={"positions": "cache"})


@pytest.mark.parametrize("kw,msg", [
    ({"temperature": float("nan")}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"top_p": float("nan")}, "top_p"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_sampling_input(tmp_path, kw, msg):
    tok = make_tiny_tokenizer(tmp_path)
    model = tiny_model("llama")
    with pytest.raises(KVCascadeError, match=msg):
        generate(model, tok, "w1 w2", policy="full", **kw)


def test_budget_given_twice_is_an_error():
    with pytest.raises(KVCascadeError, match="given twice"):
        make_policy("streaming", 64, budget=50)
    assert make_policy("streaming", budget=50).budget == 50  # once, either way, is fine
    assert make_policy("streaming", 50).budget == 50


def test_query_goes_before_the_context(tiny_model_dir):
    model, tok = kvcascade.load_model(str(tiny_model_dir), device="cpu", progress=False)
    plain = generate(model, tok, "w1 w2 w3 w4", policy="full", max_new_tokens=2)
    q = generate(model, tok, "w1 w2 w3 w4", policy="full", max_new_tokens=2, query="w9 w8")
    assert q.prompt_tokens == plain.prompt_tokens + len(tok("w9 w8\n\n", add_special_tokens=False).input_ids)
    from kvcascade.engine import with_query

    assert with_query("context. question?", " question? ") == "question?\n\ncontext. question?"
    with pytest.raises(KVCascadeError, match="query is empty"):
        generate(model, tok, "w1", policy="full", query="  ")
    with pytest.raises(KVCascadeError, match="text prompts"):
        generate(model, tok, [1, 2, 3], policy="full", query="w1")


def test_interleaved_caches_on_one_model():
    """Two caches in use at once (a server's requests): releasing one leaves the other working; the model gets
    its own attention back when the last is released."""
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    a = CompressedCache(model, make_policy("full"))
    b = CompressedCache(model, make_policy("streaming", 8, sinks=2))
    a.forward(model, torch.tensor([[1, 2, 3]]))
    b.forward(model, torch.tensor([[4, 5]]))
    a.release()
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    b.forward(model, torch.tensor([[6]]))
    assert b.layers[0].seen == 3
    b.release()
    assert model.config._attn_implementation == "eager"


def test_stop_strings_and_finish_reason(tiny_model_dir):
    model, tok = kvcascade.load_model(str(tiny_model_dir), device="cpu", progress=False)
    full = generate(model, tok, "w1 w2 w3", policy="full", max_new_tokens=12, stop_on_eos=False)
    assert full.finish_reason == "length" and len(full.text) >= 12
    stop = full.text[8:12]
    at = full.text.find(stop)
    pieces = []
    r = generate(model, tok, "w1 w2 w3", policy="full", max_new_tokens=12, stop_on_eos=False, stop=[stop, "zzz"],
                 on_token=pieces.append)
    assert r.finish_reason == "stop" and r.text == full.text[:at]
    assert "".join(pieces) == r.text and stop not in "".join(pieces)  # nothing of the stop string was streamed


def test_sessions_interleave_like_one_at_a_time(tiny_model_dir):
    from kvcascade.engine import Session, tokenize

    model, tok = kvcascade.load_model(str(tiny_model_dir), device="cpu", progress=False)
    prompts = ["w1 w2 w3 w4 w5 w6 w7 w8 w9", "w10 w11", "w3 w3 w3 w3"]
    alone = [generate(model, tok, p, policy="streaming", budget=6, policy_args={"sinks": 2}, max_new_tokens=6,
                      chunk_size=3, stop_on_eos=False).text for p in prompts]
    sessions = [Session(model, tok, tokenize(tok, p), make_policy("streaming", 6, sinks=2), max_new_tokens=6,
                        chunk_size=3, stop_on_eos=False) for p in prompts]
    while not all(s.done for s in sessions):
        for s in sessions:
            s.step()
    assert [s.result().text for s in sessions] == alone
    for s in sessions:
        s.close()


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_rotary_tables_equal_the_models_rotary_and_are_made_once(arch):
    """A decode step with in-cache positions reads cos/sin from one kept table per layer type and capacity: the slices
    equal what the model's rotary module gives for those positions, the table is made once, and a range past the
    capacity is computed directly (and not kept)."""
    model = tiny_model(arch, layers=2)
    cache = CompressedCache(model, make_policy("streaming", 24))
    prefill(model, cache, list(range(5, 45)), 16)
    layer = cache.layers[-1]
    like = layer.keys
    for start, count in [(0, layer.capacity), (3, 7), (layer.capacity - 1, 1), (0, 1)]:
        cos, sin = cache._rope_at(layer, start, count, like)
        ref_cos, ref_sin = cache.rotary(layer.idx, torch.arange(start, start + count).view(1, -1), like)
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert len(cache._rope_memo) == 1
    cos, _ = cache._rope_at(layer, layer.capacity - 2, 5, like)  # past the capacity: computed, not kept
    assert cos.shape[1] == 5 and len(cache._rope_memo) == 1
    cache.release()


@pytest.mark.parametrize("policy,budget", [("full", None), ("streaming", 6), ("cascade", 10)])
def test_greedy_decoding_run_ahead_gives_what_step_by_step_gives(tiny_model_dir, policy, budget):
    """Session._step_ahead (greedy on a GPU: the next step is launched with the token still on the device) against
    the step that reads the token first: the same tokens, text, pieces, finish reason and cache numbers, whether the
    answer ends by length, a stop string or EOS (where a step was already launched for the ending token)."""
    from kvcascade.engine import Session, tokenize

    model, tok = kvcascade.load_model(str(tiny_model_dir), device="cpu", progress=False)
    ids = tokenize(tok, "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12")

    def run(ahead, eos=(), stop=()):
        pieces = []
        s = Session(model, tok, ids, make_policy(policy, budget), max_new_tokens=10, chunk_size=4, stop_on_eos=False,
                    stop=list(stop), on_token=pieces.append)
        s.pipelined = ahead  # (on its own only on a GPU, greedy, graphs on)
        s.eos = set(eos)
        while not s.step():
            pass
        r = s.result().to_dict()
        s.close()
        for k in ("prefill_s", "decode_s", "decode_step_s"):
            r.pop(k)
        return r, pieces

    base, _ = run(False)
    assert base["finish_reason"] == "length" and base["new_tokens"] == 10
    text = base["text"]
    cases = [{}, {"eos": [base["token_ids"][4]]}, {"stop": [text[len(text) // 2:len(text) // 2 + 2]]}]
    for kw in cases:
        (a, pa), (b, pb) = run(False, **kw), run(True, **kw)
        assert a == b and pa == pb, kw
    assert run(True, **cases[1])[0]["finish_reason"] == "stop"
