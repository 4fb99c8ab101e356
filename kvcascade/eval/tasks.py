"""Long-context tasks, generated locally: the passkey test and RULER-style synthetic tasks (Hsieh et al. 2024,
"RULER: What's the Real Context Size of Your Long-Context Language Models?"), with RULER's scoring.

Every generator takes ``(tokenizer, length, depth, seed)`` and returns a :class:`Sample` whose prompt has
``length`` tokens (within 0.5%, or one haystack unit for short prompts) under that tokenizer. The same seed
gives the same prompt; the runner derives the seed from (run seed, task, length, depth, sample index), never
from the policy, so every policy answers the same prompts.

Task specs take options like policy specs: ``niah_single:haystack=prose:value=uuid``.

| task | what hides | RULER default we follow | options |
|---|---|---|---|
| ``passkey`` | a 5-digit key in noise | (Mohtashami & Jaggi 2023) | |
| ``niah_single`` | 1 key -> 1 value | niah_single_1 (noise, numbers) | haystack, value |
| ``niah_multikey`` | 4 keys, 1 asked (3 distractors) | niah_multikey_1 (prose, numbers) | haystack, value, keys |
| ``niah_multivalue`` | 1 key with 4 values | niah_multivalue (prose, numbers) | haystack, value, values |
| ``niah_multiquery`` | 4 keys, all asked | niah_multiquery (prose, numbers) | haystack, value, queries |
| (all needle tasks) | | | query_first (1: the question also before the text, Locret-Q) |
| ``vt`` | a chain of 5 variable assignments (4 hops) in noise | vt (1 chain, 4 hops) | hops, chains |
| ``cwe`` | 10 words x 30 among words x 3 | cwe (freq 30 / 3) | |
| ``fwe`` | the 3 most frequent coded words (Zipf, alpha 2) | fwe (alpha 2) | alpha |

Haystacks: ``noise`` repeats "The grass is green. The sky is blue. ..."; ``prose`` is real text (the King
James Bible shipped with the package by default; any text via ``prose=``). Depth is where the (first asked)
needle sits in the haystack; the other needles sit at seeded random depths. Deviation from RULER: ``cwe``
draws its words from pronounceable pseudo-words (so a 1M-token list never runs out of distinct words) and
RULER's few-shot example is left out of every prompt.
"""

from __future__ import annotations

import random
import re
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field

from ..errors import KVCascadeError
from .haystack import NOISE, fit_length, insert_needles, ntok, prose_units, take_units


@dataclass
class Sample:
    task: str
    prompt: str
    answers: list[str]
    tokens: int  # prompt length in tokens (special tokens included, as the engine feeds it)
    depth: float | None  # where the (first asked) needle sits, None for tasks without one
    needle_token: int | None  # token index where that needle starts
    max_new_tokens: int
    metric: str = "all"  # "all": RULER string_match_all; "first_number": passkey
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- scoring (RULER's metrics)

def string_match_all(pred: str, refs: list[str]) -> float:
    """RULER's ``string_match_all``: the fraction of references found in the prediction (case-insensitive)."""
    p = pred.lower()
    return sum(r.lower() in p for r in refs) / len(refs)


def string_match_part(pred: str, refs: list[str]) -> float:
    """RULER's ``string_match_part``: 1 if any reference is found in the prediction."""
    p = pred.lower()
    return float(max(r.lower() in p for r in refs))


def score_first_number(pred: str, refs: list[str]) -> float:
    m = re.search(r"\d+", pred)
    return float(m is not None and m.group(0) == refs[0])


METRICS = {"all": string_match_all, "part": string_match_part, "first_number": score_first_number}


def score(sample_or_metric, pred: str, refs: list[str] | None = None) -> float:
    if isinstance(sample_or_metric, Sample):
        return METRICS[sample_or_metric.metric](pred, sample_or_metric.answers)
    return METRICS[sample_or_metric](pred, refs)


# ---------------------------------------------------------------- vocabularies

_ADJ = ("ambitious brave calm clever curious eager fancy gentle glossy grumpy happy hollow icy jolly kind lively "
        "lucky mighty nervous odd polite proud quiet rapid rusty shiny silent silly smooth sour spicy steady "
        "sticky swift tall tender tidy tiny upbeat vast wary wicked wise witty young zany zealous bold crisp "
        "damp dusty").split()
_NOUN = ("apple badger barn beacon bison canyon castle cedar comet compass crater dolphin dragon falcon fern "
         "forest garden glacier harbor hammer island jaguar kettle ladder lantern lemon magnet meadow mirror "
         "monkey needle oasis orchard otter panther pebble piano pillow quartz rabbit river rocket saddle "
         "scarf spider tiger tulip violin walrus wizard").split()
_CONS, _VOW = "bdfgklmnprstvz", "aeiou"


def _key_words(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample(range(len(_ADJ) * len(_NOUN)), n)
    return [f"{_ADJ[p // len(_NOUN)]}-{_NOUN[p % len(_NOUN)]}" for p in pairs]


def _value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise KVCascadeError(f"value must be number or uuid, got '{kind}'")


def _pseudo_words(rng: random.Random, n: int, syllables: int = 3) -> list[str]:
    """``n`` distinct pronounceable pseudo-words (consonant-vowel syllables)."""
    out, seen = [], set()
    while len(out) < n:
        w = "".join(rng.choice(_CONS) + rng.choice(_VOW) for _ in range(syllables))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


# ---------------------------------------------------------------- haystack tasks

def _haystack(kind: str, prose: str | None):
    if kind == "noise":
        return NOISE
    if kind == "prose":
        if prose is None:
            from ..texts import kjv_text

            prose = kjv_text()
        return prose_units(prose)
    raise KVCascadeError(f"haystack must be noise or prose, got '{kind}'")


def _needle_prompt(tokenizer, length: int, head: str, tail: str, needles: list[tuple[float, str]], units,
                   offset: int) -> tuple[str, int, int, dict]:
    """Fit a haystack of ``units`` (from ``offset``) with ``needles`` between ``head`` and ``tail`` to ``length``
    tokens; returns (prompt, tokens, token index of needle 0, {haystack_start, haystack_end})."""
    def build(n):
        parts, where = insert_needles(take_units(units, n, offset), needles)
        return head + "".join(parts) + tail, parts, where

    sample_units = take_units(units, 64, offset)
    unit_tokens = ntok(tokenizer, "".join(sample_units)) / len(sample_units)
    fixed = ntok(tokenizer, head + tail + "".join(t for _, t in needles))
    n, tokens, (prompt, parts, where) = fit_length(tokenizer, length, build, unit_tokens, fixed)
    needle_token = len(tokenizer(head + "".join(parts[:where[0]])).input_ids)
    span = {"haystack_start": len(tokenizer(head).input_ids), "haystack_end": tokens - ntok(tokenizer, tail)}
    return prompt, tokens, needle_token, span


PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n\n")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def _query_head(query_first, question: str, head: str) -> str:
    """Query-aware prompts (``query_first=1``; Locret-Q in the Locret paper): the question also before the text."""
    return f"{question.strip()}\n\n{head}" if int(query_first) else head


def passkey(tokenizer, length, depth=0.5, seed=0, prose=None, query_first=0) -> Sample:
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    head = _query_head(query_first, "What is the pass key?", PASSKEY_INTRO)
    prompt, tokens, nt, span = _needle_prompt(tokenizer, length, head, PASSKEY_QUESTION,
                                              [(depth, PASSKEY_NEEDLE.format(key=key))], NOISE, 0)
    return Sample("passkey", prompt, [key], tokens, depth, nt, max_new_tokens=8, metric="first_number", meta=span)


NIAH_HEAD = ("Some special magic {tv} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {tv} afterwards.\n")
NIAH_NEEDLE = "One of the special magic {tv} for {key} is: {value}. "
NIAH_TAIL = ("\nWhat are all the special magic {tv} for {query} mentioned in the provided text? "
             "The special magic {tv} for {query} mentioned in the provided text are")


def _niah(name, tokenizer, length, depth, seed, prose, haystack, value, keys, values, queries,
          query_first=0) -> Sample:
    keys, values, queries = int(keys), int(values), int(queries)
    if not (1 <= queries <= keys):
        raise KVCascadeError(f"{name}: queries must be between 1 and keys ({keys}), got {queries}")
    rng = random.Random(seed)
    tv = {"number": "numbers", "uuid": "uuids"}.get(value)
    if tv is None:
        raise KVCascadeError(f"value must be number or uuid, got '{value}'")
    names = _key_words(rng, keys)
    vals = {k: [_value(rng, value) for _ in range(values)] for k in names}
    asked = names[:queries]
    needles = [(k, v) for k in names for v in vals[k]]
    rng.shuffle(needles)
    # the first asked needle goes to `depth`; the rest at seeded random depths
    first = next(i for i, (k, _) in enumerate(needles) if k == asked[0])
    needles.insert(0, needles.pop(first))
    placed = [(depth if i == 0 else rng.random(), NIAH_NEEDLE.format(tv=tv, key=k, value=v))
              for i, (k, v) in enumerate(needles)]
    query = asked[0] if queries == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
    units = _haystack(haystack, prose)
    offset = rng.randrange(len(units)) if haystack == "prose" else 0
    question = f"What are all the special magic {tv} for {query} mentioned in the provided text?"
    prompt, tokens, nt, span = _needle_prompt(tokenizer, length, _query_head(query_first, question,
                                                                             NIAH_HEAD.format(tv=tv)),
                                              NIAH_TAIL.format(tv=tv, query=query), placed, units, offset)
    answers = [v for k in asked for v in vals[k]]
    # RULER allows 128 new tokens; we allow 16 plus 16 per expected number (32 per uuid): an answer that lists
    # the values promptly scores the same, and decoding (most of a short run's time) costs less
    per = 16 if value == "number" else 32
    return Sample(name, prompt, answers, tokens, depth, nt, max_new_tokens=min(128, 16 + per * len(answers)),
                  meta={"haystack": haystack, "value": value, "keys": keys, "values": values, "queries": queries,
                        **span})


def niah_single(tokenizer, length, depth=0.5, seed=0, prose=None, haystack="noise", value="number", query_first=0):
    return _niah("niah_single", tokenizer, length, depth, seed, prose, haystack, value, 1, 1, 1, query_first)


def niah_multikey(tokenizer, length, depth=0.5, seed=0, prose=None, haystack="prose", value="number", keys=4, query_first=0):
    return _niah("niah_multikey", tokenizer, length, depth, seed, prose, haystack, value, keys, 1, 1, query_first)


def niah_multivalue(tokenizer, length, depth=0.5, seed=0, prose=None, haystack="prose", value="number", values=4, query_first=0):
    return _niah("niah_multivalue", tokenizer, length, depth, seed, prose, haystack, value, 1, values, 1, query_first)


def niah_multiquery(tokenizer, length, depth=0.5, seed=0, prose=None, haystack="prose", value="number", queries=4, query_first=0):
    return _niah("niah_multiquery", tokenizer, length, depth, seed, prose, haystack, value, queries, 1, queries, query_first)


VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_TAIL = ("\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: According "
           "to the chain(s) of variable assignment in the text above, {n} variables are assgined the value {value}, "
           "they are: ")


def vt(tokenizer, length, depth=None, seed=0, prose=None, hops=4, chains=1) -> Sample:
    """Variable tracking: ``VAR A = 12345``, ``VAR B = VAR A``, ... hidden in noise; name every variable holding
    the first chain's value. The chain's statements sit in order at seeded random depths."""
    hops, chains = int(hops), int(chains)
    rng = random.Random(seed)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    used: set[str] = set()

    def var():
        while True:
            v = "".join(rng.choice(letters) for _ in range(5))
            if v not in used:
                used.add(v)
                return v

    statements, answers, first_value = [], [], None
    for c in range(chains):
        value = str(rng.randint(10000, 99999))
        names = [var() for _ in range(hops + 1)]
        chain = [f"VAR {names[0]} = {value}. "] + [f"VAR {names[i + 1]} = VAR {names[i]}. " for i in range(hops)]
        depths = sorted(rng.random() for _ in chain)
        statements += list(zip(depths, chain))
        if c == 0:
            answers, first_value = names, value
    prompt, tokens, _, _ = _needle_prompt(tokenizer, length, VT_HEAD, VT_TAIL.format(value=first_value, n=hops + 1),
                                       statements, NOISE, 0)
    return Sample("vt", prompt, answers, tokens, None, None, max_new_tokens=30, meta={"hops": hops, "chains": chains})


CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
CWE_TAIL = "\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words that appear most often in the list are:"


def cwe(tokenizer, length, depth=None, seed=0, prose=None, common=10, freq_common=30, freq_rare=3) -> Sample:
    """Common words extraction: ``common`` words appear ``freq_common`` times each among many words that appear
    ``freq_rare`` times, in a numbered list; name the common ones."""
    common, freq_common, freq_rare = int(common), int(freq_common), int(freq_rare)
    rng = random.Random(seed)
    item = ntok(tokenizer, " ".join(f"{i + 100}. {w}" for i, w in enumerate(_pseudo_words(rng, 64)))) / 64
    head_tail = ntok(tokenizer, CWE_HEAD + CWE_TAIL)
    # short prompts: the common words appear less often (never below freq_rare + 1), as fits half the prompt
    freq_common = max(freq_rare + 1, min(freq_common, int((length - head_tail) / 2 / (item * common))))

    def build(n_rare):
        r = random.Random(seed + 1)
        words = _pseudo_words(r, common + n_rare)
        items = words[:common] * freq_common + words[common:] * freq_rare
        r.shuffle(items)
        body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return CWE_HEAD + body + CWE_TAIL, words[:common]

    per = item * freq_rare
    fixed = head_tail + int(item * common * freq_common)
    if length <= fixed:
        raise KVCascadeError(f"cwe needs more than {fixed} tokens (its {common} common words x {freq_common})")
    _, tokens, (prompt, answers) = fit_length(tokenizer, length, build, per, fixed)
    return Sample("cwe", prompt, answers, tokens, None, None, max_new_tokens=120,
                  meta={"common": common, "freq_common": freq_common, "freq_rare": freq_rare})


FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. ")
FWE_TAIL = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
            "frequently appeared words in the above coded text? Answer: According to the coded text above, the "
            "three most frequently appeared words are:")


def fwe(tokenizer, length, depth=None, seed=0, prose=None, alpha=2.0, vocab=1000) -> Sample:
    """Frequent words extraction: coded words drawn from a Zipf law (exponent ``alpha``) over ``vocab`` words,
    separated by ``....``; name the three most frequent."""
    alpha, vocab = float(alpha), int(vocab)
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) for _ in range(vocab)]
    weights = [1.0 / (k + 1) ** alpha for k in range(vocab)]

    def build(n):
        r = random.Random(seed + 1)
        seq = r.choices(words, weights=weights, k=n)
        counts = Counter(seq).most_common()
        top = [w for w, _ in counts[:3]]
        body = " .... ".join(" ".join(seq[i:i + 10]) for i in range(0, n, 10))
        return FWE_HEAD + body + FWE_TAIL, top, counts[:4]

    per = ntok(tokenizer, " ".join(words[:100])) / 100
    fixed = ntok(tokenizer, FWE_HEAD + FWE_TAIL)
    _, tokens, (prompt, top, counts) = fit_length(tokenizer, length, build, per, fixed)
    if len(counts) >= 4 and counts[2][1] == counts[3][1]:
        top = top[:2]  # a tie for third place: only the clear top two are scored
    return Sample("fwe", prompt, top, tokens, None, None, max_new_tokens=50, meta={"alpha": alpha, "vocab": vocab})


TASKS = {f.__name__: f for f in (passkey, niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt, cwe, fwe)}
RULER = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]
DEPTH_TASKS = {"passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"}


# numeric task options: (type, smallest allowed value)
_NUMERIC_OPTIONS = {"keys": (int, 1), "values": (int, 1), "queries": (int, 1), "hops": (int, 1), "chains": (int, 1),
                    "common": (int, 1), "freq_common": (int, 2), "freq_rare": (int, 1), "vocab": (int, 4),
                    "alpha": (float, 1e-6)}
_CHOICE_OPTIONS = {"haystack": ("noise", "prose"), "value": ("number", "uuid"), "query_first": ("0", "1")}


def _check_option(task: str, key: str, value) -> None:
    if key in _NUMERIC_OPTIONS:
        kind, low = _NUMERIC_OPTIONS[key]
        try:
            v = kind(value)
        except (TypeError, ValueError):
            v = None
        if v is None or v != v or v < low:  # v != v: NaN
            what = "a whole number" if kind is int else "a number"
            raise KVCascadeError(f"task {task}: option {key} must be {what} >= {low:g}, got '{value}'")
    if key in _CHOICE_OPTIONS and str(value) not in _CHOICE_OPTIONS[key]:
        raise KVCascadeError(f"task {task}: option {key} must be one of {', '.join(_CHOICE_OPTIONS[key])}, got '{value}'")


def parse_task_spec(spec: str) -> tuple[str, dict]:
    from ..policies import parse_policy_spec

    import inspect

    name, args = parse_policy_spec(spec)
    if name not in TASKS and name != "ppl":
        raise KVCascadeError(f"unknown task '{name}'; known: {', '.join(['ppl', *TASKS])} (and 'ruler' for all RULER tasks)")
    if args:
        known = [] if name == "ppl" else list(inspect.signature(TASKS[name]).parameters)[5:]
        bad = [k for k in args if k not in known]
        if bad:
            raise KVCascadeError(f"bad option '{bad[0]}' for task {name}; it takes: {', '.join(known) or 'none'}")
        for k, v in args.items():
            _check_option(name, k, v)
        if name == "cwe" and int(args.get("freq_common", 30)) <= int(args.get("freq_rare", 3)):
            raise KVCascadeError("task cwe: freq_common must be larger than freq_rare")
    return name, args


def make_sample(spec: str, tokenizer, length: int, depth: float | None = 0.5, seed: int = 0,
                prose: str | None = None) -> Sample:
    """A sample of task ``spec`` (e.g. ``"niah_single:value=uuid"``) with ``length`` tokens."""
    name, args = parse_task_spec(spec)
    if name == "ppl":
        raise KVCascadeError("ppl is not a prompt task; use kvcascade.eval.streaming_perplexity")
    if name in DEPTH_TASKS:
        if depth is None or not 0.0 <= float(depth) <= 1.0:
            raise KVCascadeError(f"depth must be in [0, 1], got {depth}")
        depth = float(depth)
    else:
        depth = None
    if int(length) < 16:
        raise KVCascadeError(f"length must be at least 16 tokens, got {length}")
    try:
        s = TASKS[name](tokenizer, int(length), depth, seed, prose, **args)
    except KVCascadeError:
        raise
    except TypeError as e:
        raise KVCascadeError(f"bad option for task {name}: {e}") from None
    except ValueError as e:
        raise KVCascadeError(f"bad option value for task {name}: {e}") from None
    s.task = spec
    return s
