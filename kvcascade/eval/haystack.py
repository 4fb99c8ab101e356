"""Prompts of an exact token length with needles at chosen depths.

A haystack is a list of small text units (single noise sentences, or clauses of real prose). ``fit_length``
finds how many units make a prompt of the requested token length (within 0.5%, or one unit for short
prompts) by measuring with the model's own tokenizer. Needles go between units, at ``depth`` (fraction of
the haystack: 0 = start, 1 = end).
"""

from __future__ import annotations

import re
from functools import lru_cache

from ..errors import KVCascadeError

NOISE = ["The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ", "There and back again. "]


def ntok(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


@lru_cache(maxsize=4)
def prose_units(text: str) -> tuple[str, ...]:
    """Clauses of a prose text (a few words each), in order; KJV verse numbers and chapter titles removed."""
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if not s or re.fullmatch(r"[1-3]?\s?[A-Za-z ]+ \d+", s):  # "Genesis 1", "1 Kings 3"
            continue
        lines.append(re.sub(r"^\d+\s+", "", s))
    flat = " ".join(lines)
    parts = re.split(r"(?<=[.,;:!?])\s+", flat)
    units = tuple(p + " " for p in parts if p)
    if len(units) < 10:
        raise KVCascadeError("the prose haystack text is too short (fewer than 10 clauses)")
    return units


def take_units(units, n: int, offset: int = 0) -> list[str]:
    """``n`` units starting at ``offset``, wrapping around."""
    L = len(units)
    return [units[(offset + i) % L] for i in range(n)]


def insert_needles(units: list[str], needles: list[tuple[float, str]]) -> tuple[list[str], list[int]]:
    """Insert each ``(depth, text)`` between units; returns the new list and each needle's index in it."""
    n = len(units)
    slots = sorted(((min(n, max(0, round(d * n))), k) for k, (d, _) in enumerate(needles)))
    out, where, prev = [], [0] * len(needles), 0
    for slot, k in slots:
        out.extend(units[prev:slot])
        where[k] = len(out)
        out.append(needles[k][1])
        prev = slot
    out.extend(units[prev:])
    return out, where


def fit_length(tokenizer, length: int, build, unit_tokens: float, fixed_tokens: int = 0, tol: float = 0.005,
               max_iter: int = 8):
    """Find ``n`` such that ``build(n)`` (-> prompt text, anything) has about ``length`` tokens.

    Returns ``(n, tokens, result of build(n))``. Secant steps on the measured token counts."""
    if length <= fixed_tokens:
        raise KVCascadeError(f"length {length} is too short for this task (its fixed text alone is {fixed_tokens} tokens)")
    n = max(1, round((length - fixed_tokens) / max(unit_tokens, 1e-6)))
    best = None
    prev = None
    for _ in range(max_iter):
        built = build(n)
        t = len(tokenizer(built[0]).input_ids)
        if best is None or abs(t - length) < abs(best[1] - length):
            best = (n, t, built)
        if abs(t - length) <= tol * length:
            break
        slope = unit_tokens
        if prev is not None and prev[0] != n:
            slope = max((t - prev[1]) / (n - prev[0]), 1e-3)
        step = round((length - t) / slope)
        if step == 0:
            break
        prev = (n, t)
        n = max(1, n + step)
    return best
