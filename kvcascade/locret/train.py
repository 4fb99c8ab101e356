"""``kvcascade train locret``: training data from what a fresh machine has, and the training loop.

Data (:func:`make_examples`), three kinds, all in the model's chat template (prefix = system + user turn,
answer = the assistant turn):

* ``kjv``: a contiguous span of the King James **Old Testament** (the New Testament is held out: evaluate
  prose haystacks on ``kjv:nt``), with a question about it; the answer is the model's own greedy reply;
* ``code``: Python source files installed with the package's dependencies (torch, transformers, numpy, the
  standard library), joined; a question about a function or class in it; the model's own reply;
* ``needles``: a made-up fact ("Filed under ... : the storage locker of Orla Brandt uses the combination
  4417-2093.") hidden in Old Testament or code filler, asked at the end; the gold answer, teacher-forced.
  Names, wording and value formats differ from every eval template (passkey, RULER's "special magic").

Answers are generated in batches with the stock model (its own attention and cache, left padding).

Training (:func:`train`) follows the official recipe (``shared/docs/locret.md`` 1.4): labels inside the step
(:mod:`kvcascade.locret.labels`), frozen backbone, Smooth-L1 (beta 1) averaged over tokens, layers and heads,
plus ``0.0025 * sum over layers`` of the adjacent-token MSE (the code's weighting), AdamW (lr 5e-4, betas
0.9/0.95, weight decay 0.01), linear warmup over 2/3 of the steps then linear decay, gradients clipped by value
at 0.5, batch 1. Deviation: head weights are kept in float32 (bf16 autocast on CUDA). The run checkpoints
every ``checkpoint_every`` steps (``OUT.ckpt``) and resumes from it; the data is cached next to it
(``OUT.data.pt``), so a second session continues where the first stopped.
"""

from __future__ import annotations

import math
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import KVCascadeError
from ..texts import python_sources
from .heads import ProjectionTap, RetainingHeads
from .labels import labels_and_features

KINDS = ("kjv", "code", "needles")
SMOOTH_WEIGHT = 0.0025

SYSTEM = "You are a helpful assistant."
KJV_QUESTIONS = [
    "Summarize the passage above in three sentences.",
    "Who are the people named in the passage above, and what does each of them do?",
    "What happens at the end of the passage above?",
    "List the places mentioned in the passage above.",
    "What is the main event described in the passage above?",
    "Quote one verse from the passage above that mentions a number, and explain it.",
]
CODE_QUESTIONS = [
    "Explain what `{name}` in the code above does.",
    "Where is `{name}` defined in the code above, and what arguments does it take?",
    "Write a one-paragraph summary of the code above.",
    "Which functions in the code above call `{name}`?",
]
_FIRST = ("Orla Brandt Ivo Kessler Maren Holt Teodor Vance Ilse Marrow Kasimir Dean Odile Frank Soren Pike Livia "
          "Crane Emeric Stroud Henrike Lowe Anselm Rook").split()
_THINGS = ["storage locker", "bicycle lock", "garden gate", "tool chest", "attic safe", "boathouse door"]


def _needle(rng: random.Random) -> tuple[str, str, str]:
    name = f"{rng.choice(_FIRST[0::2])} {rng.choice(_FIRST[1::2])}"
    thing = rng.choice(_THINGS)
    code = f"{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}"
    fact = f"Filed under household notes: the {thing} of {name} uses the combination {code}. "
    question = f"What combination does the {thing} of {name} use?"
    answer = f"The {thing} of {name} uses the combination {code}."
    return fact, question, answer


def _chat_prefix(tokenizer, user: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):  # a base model: the plain text, then a newline
        return tokenizer(user + "\n").input_ids
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # newer releases return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _span(tokenizer, text: str, rng: random.Random, n_tokens: int) -> str:
    """About ``n_tokens`` tokens of ``text`` from a random place, cut at line boundaries."""
    chars = int(n_tokens * 3.6)
    start = rng.randrange(0, max(1, len(text) - chars))
    start = text.find("\n", start) + 1
    piece = text[start:start + chars]
    ids = tokenizer(piece, add_special_tokens=False).input_ids[:n_tokens]
    return tokenizer.decode(ids)


def make_examples(model, tokenizer, n: int, *, kinds=KINDS, min_prefix: int = 2048, max_prefix: int = 8192,
                  answer_tokens: int = 64, batch: int = 16, seed: int = 0, progress: bool = True,
                  data_paths: list[str] | None = None) -> list[dict]:
    """``n`` examples ``{"ids": [...], "prefix": P, "kind": ...}`` (see the module docstring)."""
    from ..texts import kjv_part
    from ..progress import progress_bar

    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise KVCascadeError(f"unknown training data kind '{bad[0]}' (kinds: {', '.join(KINDS)})")
    rng = random.Random(seed)
    ot = kjv_part("ot")
    texts = []
    for p in data_paths or []:  # extra plain-text files the user names: used like the King James spans
        try:
            texts.append(Path(p).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise KVCascadeError(f"cannot read training data '{p}': {getattr(e, 'strerror', None) or e}") from None
    files = python_sources() if "code" in kinds or "needles" in kinds else []
    plan = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        plan.append((kind, rng.randint(min_prefix, max_prefix)))
    examples: list[dict] = []
    pending = []  # (prefix ids, kind) waiting for a generated answer
    bar = progress_bar(total=n, desc="locret data", unit="ex", enabled=progress)

    def code_text(n_tok):
        parts, size = [], 0
        while size < n_tok * 4:
            f = rng.choice(files)
            try:
                t = f.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            parts.append(f"# file: {f.name}\n{t}")
            size += len(t)
        return _span(tokenizer, "\n".join(parts), rng, n_tok)

    for kind, n_tok in plan:
        if kind == "needles":
            filler = code_text(n_tok) if rng.random() < 0.5 else _span(tokenizer, ot, rng, n_tok)
            fact, question, answer = _needle(rng)
            cut = rng.randrange(len(filler) + 1)
            cut = filler.rfind("\n", 0, cut) + 1
            user = filler[:cut] + fact + filler[cut:] + "\n\n" + question
            prefix = _chat_prefix(tokenizer, user)
            ans = tokenizer(answer, add_special_tokens=False).input_ids
            examples.append({"ids": prefix + ans, "prefix": len(prefix), "kind": kind})
            bar.update(1)
            continue
        if kind == "kjv":
            source = rng.choice(texts) if texts and rng.random() < 0.5 else ot
            user = _span(tokenizer, source, rng, n_tok) + "\n\n" + rng.choice(KJV_QUESTIONS)
        else:
            body = code_text(n_tok)
            names = re.findall(r"^\s*(?:def|class) ([A-Za-z_][A-Za-z0-9_]*)", body, flags=re.M)
            q = rng.choice(CODE_QUESTIONS)
            user = body + "\n\n" + q.format(name=rng.choice(names) if names else "the first function")
        pending.append((_chat_prefix(tokenizer, user), kind))
        if len(pending) >= batch:
            examples += _answer(model, tokenizer, pending, answer_tokens)
            bar.update(len(pending))
            pending = []
    if pending:
        examples += _answer(model, tokenizer, pending, answer_tokens)
        bar.update(len(pending))
    bar.close()
    rng.shuffle(examples)
    return examples


@torch.no_grad()
def _answer(model, tokenizer, items, answer_tokens: int) -> list[dict]:
    """Greedy answers of the stock model for a batch of prefixes (left padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    L = max(len(p) for p, _ in items)
    ids = torch.full((len(items), L), pad, dtype=torch.long)
    mask = torch.zeros((len(items), L), dtype=torch.long)
    for i, (p, _) in enumerate(items):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                         max_new_tokens=answer_tokens, do_sample=False, pad_token_id=pad)
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    eos = {tokenizer.eos_token_id} | set(cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos])
    res = []
    for (p, kind), row in zip(items, out[:, L:].tolist()):
        ans = []
        for t in row:
            ans.append(t)
            if t in eos:
                break
        if len(ans) >= 4:
            res.append({"ids": p + ans, "prefix": len(p), "kind": kind})
    return res


def loss_fn(heads: RetainingHeads, feats: dict, labels: dict) -> tuple[torch.Tensor, dict]:
    """The official loss: mean Smooth-L1 over layers, heads and tokens + 0.0025 * sum_l MSE(adjacent scores)."""
    reg, smooth = [], []
    for layer in heads.layers:
        s = heads.score(layer, feats[layer]).t()  # [H, P]
        y = labels[layer].float()
        reg.append(F.smooth_l1_loss(s, y, beta=1.0))
        if s.shape[1] > 1:
            smooth.append(F.mse_loss(s[:, :-1], s[:, 1:]))
    r = torch.stack(reg).mean()
    sm = torch.stack(smooth).sum() if smooth else torch.zeros((), device=r.device)
    return r + SMOOTH_WEIGHT * sm, {"reg": float(r.detach()), "smooth": float(sm.detach())}


def topk_overlap(heads: RetainingHeads, feats: dict, labels: dict, frac: float = 0.1) -> float:
    """Share of the label's top 10% units per (layer, head) that the heads also rank in their top 10%."""
    hits, total = 0, 0
    with torch.no_grad():
        for layer in heads.layers:
            s = heads.score(layer, feats[layer]).t()
            y = labels[layer].float()
            k = max(1, int(frac * y.shape[1]))
            a = torch.topk(s, k, dim=1).indices
            b = torch.topk(y, k, dim=1).indices
            for h in range(y.shape[0]):
                hits += len(set(a[h].tolist()) & set(b[h].tolist()))
                total += k
    return hits / max(1, total)


def _lr_lambda(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def train(model, tokenizer, out: str | Path, *, model_name: str = "", steps: int = 3000, width: int = 256,
          examples: int | None = None, kinds=KINDS, max_prefix: int = 8192, min_prefix: int = 2048,
          answer_tokens: int = 64, gen_batch: int = 16, lr: float = 5e-4, seed: int = 0,
          checkpoint_every: int = 200, held_out: int = 32, progress: bool = True, data_paths=None,
          time_limit_s: float | None = None) -> dict:
    """Train retaining heads for ``model``; write ``out`` (safetensors). Resumable (see the module docstring).

    Returns a summary: steps done, final loss, top-10% overlap on held-out examples (trained and untrained)."""
    out = Path(out)
    if steps < 1 or width < 1:
        raise KVCascadeError(f"steps and width must be >= 1 (got steps={steps}, width={width})")
    if not 256 <= min_prefix <= max_prefix:
        raise KVCascadeError(f"need 256 <= min prefix <= max prefix (got {min_prefix}, {max_prefix})")
    out.parent.mkdir(parents=True, exist_ok=True)
    data_file = out.with_name(out.name + ".data.pt")
    ckpt_file = out.with_name(out.name + ".ckpt")
    n_examples = examples or steps
    t_start = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(False)
    examples_list, data_secs = [], 0.0
    if data_file.exists():
        data = torch.load(data_file)
        if data.get("model") != model_name or data.get("seed") != seed:
            raise KVCascadeError(f"'{data_file}' holds data for another run (model {data.get('model')!r}, seed "
                                 f"{data.get('seed')}); move it away or use another --out")
        examples_list, data_secs = data["examples"], data.get("seconds", 0.0)
    # made in blocks, each saved at once: an interrupted run keeps what it made and continues from there
    block = 256
    want = n_examples + held_out
    while len(examples_list) < want:
        k = len(examples_list) // block
        examples_list = examples_list[: k * block]
        target = min(block, want - k * block)
        t_block = time.perf_counter()
        made = make_examples(model, tokenizer, target, kinds=tuple(kinds), min_prefix=min_prefix,
                             max_prefix=max_prefix, answer_tokens=answer_tokens, batch=gen_batch,
                             seed=seed * 100_003 + k, progress=progress, data_paths=data_paths)
        if not made:
            raise KVCascadeError("the model wrote no usable answers (all under 4 tokens); check the model")
        while len(made) < target:  # answers under 4 tokens were dropped: repeat some of the block's examples
            made += made[: target - len(made)]
        examples_list += made
        data_secs += time.perf_counter() - t_block
        tmp = data_file.with_name(data_file.name + ".tmp")
        torch.save({"model": model_name, "examples": examples_list, "seed": seed, "seconds": data_secs}, tmp)
        tmp.replace(data_file)
        if time_limit_s is not None and time.perf_counter() - t_start > time_limit_s and len(examples_list) < want:
            return {"steps_done": 0, "steps": steps, "finished": False, "examples_made": len(examples_list),
                    "checkpoint": str(data_file)}
    if len(examples_list) <= held_out:
        raise KVCascadeError(f"only {len(examples_list)} training examples were made; need more than {held_out}")
    held, train_set = examples_list[:held_out], examples_list[held_out:]
    gen_s = data_secs

    device = model.device
    heads = RetainingHeads.for_model(model, width=width, model_name=model_name, seed=seed).to(device)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = (2 * steps) // 3
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_lambda(s, steps, warmup))
    start, history = 0, []
    if ckpt_file.exists():
        ck = torch.load(ckpt_file)
        if ck.get("model") != model_name or ck.get("width") != width or ck.get("steps") != steps:
            raise KVCascadeError(f"'{ckpt_file}' is a checkpoint of another run (model {ck.get('model')!r}, width "
                                 f"{ck.get('width')}, steps {ck.get('steps')}); move it away or use another --out")
        heads.load_state_dict(ck["heads"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start, history = ck["step"], ck.get("history", [])
        t_start -= ck.get("elapsed", 0.0)  # seconds spent before the interruption count too
        print(f"kvcascade train: resuming at step {start} of {steps} from {ckpt_file}", file=sys.stderr)
    tap = ProjectionTap(model, heads.layers)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()

    def labels_for(ex, layers):
        P = min(ex["prefix"], max_prefix)  # the official recipe truncates the prefix (and its labels)
        ids = torch.tensor([ex["ids"][:P] + ex["ids"][ex["prefix"]:]], device=device)
        return labels_and_features(model, tap, ids, P, layers)

    def held_out_overlap(h):
        vals = []
        for ex in held[:held_out]:
            labels, feats = labels_for(ex, h.layers)
            with autocast:
                vals.append(topk_overlap(h, feats, labels))
        return sum(vals) / max(1, len(vals))

    from ..progress import progress_bar

    bar = progress_bar(total=steps, initial=start, desc="locret train", unit="step", enabled=progress)
    def epoch_order(epoch: int) -> list[int]:  # derived from the step, so a resumed run sees the same order
        order = list(range(len(train_set)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        return order

    step = start
    stopped = False
    order = epoch_order(step // len(train_set))
    try:
        while step < steps:
            if step % len(train_set) == 0:
                order = epoch_order(step // len(train_set))
            labels, feats = labels_for(train_set[order[step % len(train_set)]], heads.layers)
            with autocast:
                loss, parts = loss_fn(heads, feats, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(heads.parameters(), 0.5)
            opt.step()
            sched.step()
            step += 1
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise KVCascadeError(f"the training loss became {lv} at step {step}; try a lower --lr")
            history.append({"step": step, "loss": lv, **parts})
            bar.update(1)
            bar.set_postfix_str(f"loss {lv:.3f}", refresh=False)
            if step % checkpoint_every == 0 or step == steps:
                _save_ckpt(ckpt_file, heads, opt, sched, step, history, model_name, width, steps,
                           time.perf_counter() - t_start)
            if time_limit_s is not None and time.perf_counter() - t_start > time_limit_s and step < steps:
                _save_ckpt(ckpt_file, heads, opt, sched, step, history, model_name, width, steps,
                           time.perf_counter() - t_start)
                stopped = True
                break
    finally:
        bar.close()
    if stopped:
        tap.close()
        return {"steps_done": step, "steps": steps, "finished": False, "checkpoint": str(ckpt_file)}
    heads.eval()
    overlap = held_out_overlap(heads)
    random_overlap = held_out_overlap(RetainingHeads.for_model(model, width=width, seed=seed + 7).to(device))
    tap.close()
    first = sum(h["loss"] for h in history[:50]) / max(1, len(history[:50]))
    last = sum(h["loss"] for h in history[-50:]) / max(1, len(history[-50:]))
    kinds_count = {k: sum(1 for e in train_set if e["kind"] == k) for k in KINDS}
    meta = {"trained": {"steps": steps, "lr": lr, "width": width, "max_prefix": max_prefix, "seed": seed,
                        "examples": len(train_set), "kinds": kinds_count, "held_out": len(held),
                        "loss_first50": first, "loss_last50": last, "topk10_overlap_held_out": overlap,
                        "topk10_overlap_random_heads": random_overlap, "data_seconds": gen_s,
                        "seconds": time.perf_counter() - t_start, "device": _device_name(device),
                        "date": time.strftime("%Y-%m-%d"), "text": "KJV Old Testament, installed Python sources, "
                        "synthetic needles (no New Testament)"}}
    heads.save(out, bf16=True, **meta)  # bf16 on disk (the official master weights are bf16): 14 MB at width 256
    ckpt_file.unlink(missing_ok=True)
    return {"steps_done": step, "steps": steps, "finished": True, "out": str(out), **meta["trained"]}


def _save_ckpt(path, heads, opt, sched, step, history, model_name, width, steps, elapsed=0.0):
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"heads": heads.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                "history": history, "model": model_name, "width": width, "steps": steps, "elapsed": elapsed}, tmp)
    tmp.replace(path)


def _device_name(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU, torch {torch.__version__}"


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
