"""The standard passkey-retrieval prompt (Mohtashami & Jaggi 2023; used by StreamingLLM and the cascade paper).

A five-digit key hides at a chosen depth in repeated filler ("The grass is green. The sky is blue. ...");
the model must repeat it. Prompts are built to a target length in tokens of the given tokenizer; the same
``seed`` gives the same key.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


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
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = NEEDLE.format(key=key)

    def ntok(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False).input_ids)

    per_filler = ntok(FILLER * 8) / 8
    overhead = ntok(INTRO) + ntok(needle) + ntok(QUESTION)
    n_fill = max(1, round((length - overhead) / per_filler))
    before = round(n_fill * depth)
    text_before = INTRO + FILLER * before
    prompt = text_before + needle + FILLER * (n_fill - before) + QUESTION
    return PasskeySample(prompt=prompt, answer=key, depth=depth, needle_token=ntok(text_before),
                         tokens=len(tokenizer(prompt).input_ids))


def score_passkey(answer_text: str, key: str) -> float:
    """1.0 if the first number in the answer is the key, else 0.0."""
    m = re.search(r"\d+", answer_text)
    return float(m is not None and m.group(0) == key)
