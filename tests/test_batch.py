"""Batched generation: several prompts decoded together give the answers of one prompt at a time."""

import pytest
import torch

from kvcascade.engine import generate

from .conftest import tiny_model


class _Tok:
    eos_token_id = 1

    def __call__(self, text):
        class R:
            input_ids = [2 + (ord(c) % 90) for c in text]
        return R()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + int(i) % 26) for i in ids)


MODEL = tiny_model("qwen2", layers=3)
PROMPTS = [[(7 * i + 3 * j) % 90 + 2 for j in range(n)] for i, n in enumerate((70, 53, 91, 64))]


def _solo(prompts, **kw):
    return [generate(MODEL, _Tok(), p, **kw) for p in prompts]


@pytest.mark.parametrize("policy,args", [("streaming", {"budget": 24}), ("h2o", {"budget": 24}),
                                         ("tova", {"budget": 24}), ("snapkv", {"budget": 32, "policy_args": {"window": 8}}),
                                         ("locret", {"budget": 24, "policy_args": {"heads": "random", "local": 2,
                                                                                   "stabilizers": 8, "decode_window": 1}})])
def test_batched_equals_one_at_a_time(policy, args):
    kw = dict(policy=policy, max_new_tokens=12, chunk_size=16, stop_on_eos=False, **args)
    solo = _solo(PROMPTS, **kw)
    batch = generate(MODEL, _Tok(), PROMPTS, **kw)
    assert [r.token_ids for r in batch] == [r.token_ids for r in solo]
    assert [r.prompt_tokens for r in batch] == [len(p) for p in PROMPTS]
    assert max(r.decode_batch for r in batch) >= 2  # rows really decoded together
    assert all(r.kv_bytes_full == s.kv_bytes_full for r, s in zip(batch, solo))


def test_text_prompts_batch_through_generate():
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "a long time ago in a galaxy far far away " * 3]
    kw = dict(policy="streaming", budget=24, max_new_tokens=8, chunk_size=16, stop_on_eos=False)
    batch = generate(MODEL, _Tok(), texts, **kw)
    solo = [generate(MODEL, _Tok(), t, **kw) for t in texts]
    assert [r.token_ids for r in batch] == [r.token_ids for r in solo]
    assert batch[0].decode_batch == 2


def test_rows_that_cannot_join_run_alone_with_the_same_answers():
    kw = dict(policy="full", max_new_tokens=6, chunk_size=16, stop_on_eos=False)
    solo = _solo(PROMPTS[:3], **kw)
    batch = generate(MODEL, _Tok(), PROMPTS[:3], **kw)  # full caches of different lengths: never alike
    assert [r.token_ids for r in batch] == [r.token_ids for r in solo]
    assert [r.decode_batch for r in batch] == [1, 1, 1]


def test_cascade_rows_run_alone_with_the_same_answers():
    """The cascade's schedule follows each sequence's arrival times, so its rows are never batched (``batchable``)."""
    kw = dict(policy="cascade", budget=24, max_new_tokens=6, chunk_size=16, stop_on_eos=False)
    prompts = [PROMPTS[0], PROMPTS[0][:-3] + [5, 6, 7]]  # same length, same cache sizes: alike but for their tokens
    solo = _solo(prompts, **kw)
    batch = generate(MODEL, _Tok(), prompts, **kw)
    assert [r.token_ids for r in batch] == [r.token_ids for r in solo]
    assert [r.decode_batch for r in batch] == [1, 1]


def test_rows_finish_at_different_times():
    kw = dict(policy="streaming", budget=24, max_new_tokens=15, chunk_size=16, stop_on_eos=True)
    solo = _solo(PROMPTS, **kw)
    batch = generate(MODEL, _Tok(), PROMPTS, **kw)
    assert [r.token_ids for r in batch] == [r.token_ids for r in solo]
    assert [r.finish_reason for r in batch] == [r.finish_reason for r in solo]


def test_sampling_rows_keep_their_own_generators():
    kw = dict(policy="streaming", budget=24, max_new_tokens=10, chunk_size=16, temperature=0.9, seed=5,
              stop_on_eos=False)
    solo = _solo(PROMPTS, **kw)
    batch = generate(MODEL, _Tok(), PROMPTS, **kw)
    assert [r.token_ids for r in batch] == [r.token_ids for r in solo]
    assert batch[0].decode_batch == 4
