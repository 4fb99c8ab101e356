"""``summary.md`` and PNG plots from an eval folder's ``results.jsonl`` (``kvcascade report DIR`` rebuilds them).

Tables: mean score by policy x length, one per task and budget (``full`` appears in every budget's table);
time and KV memory by policy x length; perplexity by policy x budget. Plots: score vs length per policy,
depth x length heatmaps for needle tasks, perplexity vs position.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

from ..errors import KVCascadeError


def _fmt_len(n: int) -> str:
    if n == 0:
        return "all"
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _policy_order(rows):
    seen = []
    for r in rows:
        if r["policy"] not in seen:
            seen.append(r["policy"])
    return sorted(seen, key=lambda p: (p != "full", seen.index(p)))


def _cells(rows, task, budget):
    """{(policy, length): [rows]} for one task and budget (full rows join every budget)."""
    out = defaultdict(list)
    for r in rows:
        if r["task"] == task and (r["budget"] == budget or r["budget"] is None):
            out[(r["policy"], r["length"])].append(r)
    return out


REQUIRED = {"task": str, "policy": str, "length": int}


def check_rows(rows: list[dict], where) -> None:
    """Refuse rows that are not kvcascade eval rows, naming the first bad one."""
    for n, r in enumerate(rows, 1):
        for key, kind in REQUIRED.items():
            if not isinstance(r.get(key), kind):
                raise KVCascadeError(f"{where}: row {n} has no valid '{key}' field; not a kvcascade eval row")
        for key in ("budget", "depth", "sample"):
            if key not in r:
                raise KVCascadeError(f"{where}: row {n} has no '{key}' field; not a kvcascade eval row")
        if not r.get("error"):
            if not isinstance(r.get("score"), (int, float)):
                raise KVCascadeError(f"{where}: row {n} has no numeric score; not a kvcascade eval row")
            if r["task"].split(":")[0] == "ppl":
                need = ("ppl", "ppl_per_bucket", "bucket", "kv_bytes_peak", "seconds")
            else:
                need = ("prefill_s", "kv_bytes_peak")
            missing = [k for k in need if k not in r]
            if missing:
                raise KVCascadeError(f"{where}: row {n} ({r['task']}) lacks {', '.join(missing)}; not a kvcascade "
                                     "eval row")


def _failures(rows: list[dict]) -> list[str]:
    bad = [r for r in rows if r.get("error")]
    if not bad:
        return []
    lines = [f"## Failed rows ({len(bad)}; rerun the same command to try them again)", "",
             "| task | policy | budget | length | depth | sample | error |", "|---|---|---|---|---|---|---|"]
    for r in bad:
        err = str(r["error"]).replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {r['task']} | {r['policy']} | {r['budget']} | {_fmt_len(r['length'])} | {r['depth']} | "
                     f"{r['sample']} | {err} |")
    return lines + [""]


def summary_markdown(rows: list[dict]) -> str:
    failures = _failures(rows)
    rows = [r for r in rows if not r.get("error")]
    lines = ["# kvcascade eval summary", ""]
    models = sorted({r.get("model", "") for r in rows})
    machines = sorted({r.get("machine", "") for r in rows})
    lines += [f"- model: {', '.join(models)}", f"- machine: {'; '.join(machines)}", f"- rows: {len(rows)}",
              "- score: mean over samples (passkey: first number equals the key; RULER tasks: string_match_all, "
              "the share of expected answers found); (n) = samples", ""]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for task in tasks:
        trows = [r for r in rows if r["task"] == task]
        lengths = sorted({r["length"] for r in trows})
        policies = _policy_order(trows)
        budgets = sorted({r["budget"] for r in trows if r["budget"] is not None}) or [None]
        lines.append(f"## {task}")
        lines.append("")
        if task.split(":")[0] == "ppl":
            lines.append("Perplexity over the whole text (lower is better); columns: tokens read.")
            lines.append("")
            lines.append("| policy | budget | " + " | ".join(_fmt_len(L) for L in lengths) + " | KV peak MiB | seconds |")
            lines.append("|---|---|" + "---|" * (len(lengths) + 2))
            for pol in policies:
                for b in sorted({r["budget"] for r in trows if r["policy"] == pol}, key=lambda x: x or 0):
                    rs = {r["length"]: r for r in trows if r["policy"] == pol and r["budget"] == b}
                    cells = [f"{rs[L]['ppl']:.3f}" if L in rs else "-" for L in lengths]
                    last = rs[max(rs)]
                    lines.append(f"| {pol} | {b if b is not None else '-'} | " + " | ".join(cells) +
                                 f" | {last['kv_bytes_peak'] / 2**20:.1f} | {last['seconds']:.1f} |")
            lines.append("")
            continue
        for b in budgets:
            cells = _cells(trows, task, b)
            lines.append(f"### budget {b if b is not None else '(none)'}: score")
            lines.append("")
            lines.append("| policy | " + " | ".join(_fmt_len(L) for L in lengths) + " | mean |")
            lines.append("|---|" + "---|" * (len(lengths) + 1))
            for pol in policies:
                rs_all = [r for L in lengths for r in cells.get((pol, L), [])]
                if not rs_all:
                    continue
                row = []
                for L in lengths:
                    rs = cells.get((pol, L), [])
                    row.append(f"{_mean(r['score'] for r in rs):.0%} ({len(rs)})" if rs else "-")
                lines.append(f"| {pol} | " + " | ".join(row) + f" | {_mean(r['score'] for r in rs_all):.0%} |")
            lines.append("")
        lines.append("### time and memory: mean prefill seconds / KV cache peak MiB")
        lines.append("")
        lines.append("| policy | budget | " + " | ".join(_fmt_len(L) for L in lengths) + " |")
        lines.append("|---|---|" + "---|" * len(lengths))
        for pol in policies:
            for b in sorted({r["budget"] for r in trows if r["policy"] == pol}, key=lambda x: x or 0):
                row = []
                for L in lengths:
                    rs = [r for r in trows if r["policy"] == pol and r["budget"] == b and r["length"] == L]
                    row.append(f"{_mean(r['prefill_s'] for r in rs):.1f} s / {_mean(r['kv_bytes_peak'] for r in rs) / 2**20:.0f}"
                               if rs else "-")
                lines.append(f"| {pol} | {b if b is not None else '-'} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines + failures) + "\n"


def _plots(out: Path, rows: list[dict]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("kvcascade: matplotlib is not installed; summary.md written without plots "
              "(pip install 'kvcascade[plot]')", file=sys.stderr)
        return []
    files = []
    for task in dict.fromkeys(r["task"] for r in rows):
        trows = [r for r in rows if r["task"] == task]
        name = task.split(":")[0]
        policies = _policy_order(trows)
        if name == "ppl":
            fig, ax = plt.subplots(figsize=(8, 4.5))
            for pol in policies:
                for r in trows:
                    if r["policy"] != pol or r["length"] != max(x["length"] for x in trows if x["policy"] == pol):
                        continue
                    xs = [(i + 0.5) * r["bucket"] for i in range(len(r["ppl_per_bucket"]))]
                    ax.plot(xs, r["ppl_per_bucket"], label=f"{pol} b={r['budget']} ({r['ppl']:.2f})", lw=1)
            ax.set_xlabel("position in the text (tokens)")
            ax.set_ylabel(f"perplexity per {_fmt_len(trows[0]['bucket'])} bucket")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
            ax.set_title(f"{task}: streaming perplexity vs position")
            f = f"{_safe(task)}_vs_position.png"
            fig.tight_layout()
            fig.savefig(out / f, dpi=110)
            plt.close(fig)
            files.append(f)
            files += _ppl_vs_kv(out, plt, task, trows, policies)
            continue
        lengths = sorted({r["length"] for r in trows})
        budgets = sorted({r["budget"] for r in trows if r["budget"] is not None}) or [None]
        for b in budgets:
            cells = _cells(trows, task, b)
            fig, ax = plt.subplots(figsize=(7, 4.2))
            for pol in policies:
                pts = [(L, _mean(r["score"] for r in cells[(pol, L)])) for L in lengths if cells.get((pol, L))]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pol,
                            ls="--" if pol == "full" else "-")
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [_fmt_len(L) for L in lengths])
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel("score")
            ax.set_title(f"{task}, budget {b}")
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            f = f"{_safe(task)}_score_vs_length_b{b}.png"
            fig.savefig(out / f, dpi=110)
            plt.close(fig)
            files.append(f)
            depths = sorted({r["depth"] for r in trows if r["depth"] is not None})
            if not depths:
                continue
            pols = [p for p in policies if any(cells.get((p, L)) for L in lengths)]
            ncol = min(4, len(pols))
            nrow = (len(pols) + ncol - 1) // ncol
            fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False)
            for k, pol in enumerate(pols):
                ax = axes[k // ncol][k % ncol]
                grid = [[_mean(r["score"] for r in cells.get((pol, L), []) if r["depth"] == d) for L in lengths]
                        for d in depths]
                ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
                ax.set_xticks(range(len(lengths)), [_fmt_len(L) for L in lengths], fontsize=6)
                ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=6)
                ax.set_title(pol, fontsize=8)
            for k in range(len(pols), nrow * ncol):
                axes[k // ncol][k % ncol].axis("off")
            fig.suptitle(f"{task}, budget {b}: score by depth (rows) x length (columns); white = not run", fontsize=9)
            fig.tight_layout()
            f = f"{_safe(task)}_depth_heatmap_b{b}.png"
            fig.savefig(out / f, dpi=110)
            plt.close(fig)
            files.append(f)
    return files


def _ppl_vs_kv(out: Path, plt, task: str, trows: list[dict], policies: list[str]) -> list[str]:
    """Perplexity against KV memory held, one point per policy and budget, a panel per text length: the trade-off
    a compression method makes (written when a length has two points or more)."""
    lengths = [L for L in sorted({r["length"] for r in trows})
               if len({(r["policy"], r["budget"]) for r in trows if r["length"] == L}) > 1]
    if not lengths:
        return []
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 4.5), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        for pol in policies:
            for r in trows:
                if r["policy"] != pol or r["length"] != L:
                    continue
                x, y = r["kv_bytes_peak"] / 2 ** 20, r["ppl"]
                ax.scatter([x], [y], s=18, marker="s" if pol == "full" else "o")
                short = ":".join(a.split("=")[0] + "=" + Path(a.split("=", 1)[1]).name if "=" in a and "/" in a else a
                                 for a in pol.split(":"))  # a file argument by its name
                label = short if r["budget"] is None else f"{short} b={r['budget']}"
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.margins(x=0.3)
        ax.set_xlabel("KV cache held at peak (MiB)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{task} at {_fmt_len(L)}: perplexity vs KV memory")
    fig.tight_layout()
    f = f"{_safe(task)}_vs_kv.png"
    fig.savefig(out / f, dpi=110)
    plt.close(fig)
    return [f]


def write_report(out_dir, rows: list[dict] | None = None) -> list[str]:
    """Write ``summary.md`` and the plots into ``out_dir``; return the file names written."""
    from .runner import read_rows, unique_rows

    out = Path(out_dir)
    if rows is None:
        if not out.is_dir():
            raise KVCascadeError(f"'{out}' is not a folder")
        rows = read_rows(out, unique=True)
    else:
        rows = unique_rows(rows, out / "results.jsonl")
    if not rows:
        raise KVCascadeError(f"no results in '{out}' (expected {out}/results.jsonl from kvcascade eval)")
    check_rows(rows, out / "results.jsonl")
    (out / "summary.md").write_text(summary_markdown(rows))
    return ["summary.md", *_plots(out, [r for r in rows if not r.get("error")])]
