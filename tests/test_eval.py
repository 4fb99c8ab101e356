"""Task generators and streaming perplexity."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvcascade.eval import make_passkey, score_passkey
from kvcascade.eval.ppl import streaming_perplexity
from kvcascade.policies import parse_policy_spec
from kvcascade.errors import KVCascadeError

from .conftest import make_tiny_tokenizer, reference_logits, tiny_model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_full_cache_perplexity_equals_the_stock_model(tok):
    model = tiny_model("qwen2")
    ids = torch.randint(0, 90, (120,), generator=torch.Generator().manual_seed(0))
    logits = reference_logits(model, ids.view(1, -1))[0]
    expected = math.exp(float(F.cross_entropy(logits[:-1], ids[1:])))
    got = streaming_perplexity(model, tok, ids.tolist(), policy="full", chunk_size=16, bucket=50, progress=False)
    assert got["ppl"] == pytest.approx(expected, rel=1e-4)
    assert len(got["ppl_per_bucket"]) == 3 and got["tokens"] == 120


def test_perplexity_under_a_budget_holds_the_budget(tok):
    model = tiny_model("llama")
    ids = torch.randint(0, 90, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    got = streaming_perplexity(model, tok, ids, policy="cascade", budget=36, policy_args={"cascades": 2},
                               chunk_size=16, progress=False)
    assert got["kv_tokens_peak"] <= 36 + 16 and math.isfinite(got["ppl"])


def test_perplexity_needs_two_tokens(tok):
    with pytest.raises(KVCascadeError, match="at least two tokens"):
        streaming_perplexity(tiny_model("llama"), tok, [3], policy="full", progress=False)


@pytest.mark.parametrize("length,depth", [(300, 0.0), (600, 0.5), (1000, 0.25), (2000, 1.0)])
def test_passkey_length_and_depth(length, depth):
    class WordTok:  # one token per word: lengths and depths are easy to check
        def __call__(self, s, add_special_tokens=True):
            return type("E", (), {"input_ids": s.split()})()

    t = WordTok()
    s = make_passkey(t, length, depth, seed=3)
    assert abs(s.tokens - length) <= max(0.01 * length, 25)  # within 1% or one filler sentence
    assert s.answer in s.prompt and score_passkey(f" {s.answer}. ", s.answer) == 1.0
    frac = s.needle_token / s.tokens
    assert abs(frac - depth) < 0.05 + 25 / length
    assert make_passkey(t, length, depth, seed=3).prompt == s.prompt  # same seed, same prompt
    assert len({make_passkey(t, length, depth, seed=k).answer for k in range(5)}) > 1  # seeds change the key


def test_score_passkey():
    assert score_passkey(" 12345. Remember it.", "12345") == 1.0
    assert score_passkey(" 1234", "12345") == 0.0
    assert score_passkey(" the key", "12345") == 0.0


def test_policy_spec():
    assert parse_policy_spec("cascade:block=16:cascades=8") == ("cascade", {"block": "16", "cascades": "8"})
    assert parse_policy_spec("streaming") == ("streaming", {})
    with pytest.raises(KVCascadeError):
        parse_policy_spec("cascade:block")
