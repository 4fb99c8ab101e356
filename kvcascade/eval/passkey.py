"""The standard passkey-retrieval prompt (Mohtashami & Jaggi 2023; used by StreamingLLM and the cascade paper).

A five-digit key hides at a chosen depth in repeated filler ("The grass is green. The sky is blue. ...");
the model must repeat it. Prompts are built to a target length in tokens of the given tokenizer; the same
``seed`` gives the same key. (The generator lives in :mod:`kvcascade.eval.tasks` as the ``passkey`` task.)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import KVCascadeError
from .tasks import score_first_number
from .tasks import passkey as _passkey


@dataclass
class PasskeySample:
    prompt: str
    answer: str
    depth: float  # requested depth (0 = start, 1 = end)
    needle_token: int  # token index where the needle starts
    tokens: int  # prompt length in tokens


def make_passkey(tokenizer, length: int, depth: float, seed: int = 0) -> PasskeySample:
    """A passkey prompt of about ``length`` tokens with the needle at ``depth`` (fraction of the filler)."""
    if not 0.0 <= depth <= 1.0:
        raise KVCascadeError(f"depth must be in [0, 1], got {depth}")
    s = _passkey(tokenizer, int(length), depth, seed)
    return PasskeySample(prompt=s.prompt, answer=s.answers[0], depth=depth, needle_token=s.needle_token, tokens=s.tokens)


def score_passkey(answer_text: str, key: str) -> float:
    """1.0 if the first number in the answer is the key, else 0.0."""
    return score_first_number(answer_text, [key])
