"""Plot perplexity per position bucket from ppl JSON files (scripts/ppl.py output) into a PNG.

Example: python scripts/plot_ppl.py docs/results/ppl_kjv_full_gpu.json --out docs/results/ppl_kjv_full_gpu.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smooth", type=int, default=8, help="moving average over this many buckets")
    a = ap.parse_args()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for f in a.files:
        for r in json.load(open(f))["rows"]:
            b, k = r["ppl_per_bucket"], a.smooth
            sm = [sum(b[max(0, i - k + 1):i + 1]) / len(b[max(0, i - k + 1):i + 1]) for i in range(len(b))]
            xs = [(i + 1) * r["bucket"] / 1000 for i in range(len(b))]
            ax.plot(xs, sm, label=f"{r.get('spec', r['policy'])}: {r['ppl']:.2f} overall")
    ax.axvline(32.768, color="grey", ls=":", lw=1)
    ax.text(34, ax.get_ylim()[1] * 0.97, "model window (32K)", color="grey", va="top", fontsize=8)
    ax.set_xlabel("position in the text (thousand tokens)")
    ax.set_ylabel(f"perplexity (per {r['bucket'] // 1024}K bucket, moving avg)")
    ax.set_title(f"Streaming perplexity, KJV Bible, budget {r['params'].get('budget')} ({r['machine']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
