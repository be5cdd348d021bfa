"""Issue 38's FID curves in one figure, from the bench JSONs in docs/: each change to
`gan-small-data` beside the preset over training seeds 1 and 2 (CPU, width 16, batch 32, side by
side), the longer seed-0 CPU runs, and the H200 run. Curve points are jobs.train's --eval.every
(one sample set of n=368); each line's last point is the bench's final score (3 sample sets).

    python bench/pokemon_curves.py --out docs/quality-pokemon-curves.png
"""
import argparse
import json
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
# name: (seed 1's JSON, seed 2's JSON); the first is the preset, drawn black
CHANGES = {
    "preset (LeCam 0.3)": ("30min-side-by-side-s1-lecam", "side-by-side-s2-lecam"),
    "no LeCam": ("30min-side-by-side-s1-base", "side-by-side-s2-base"),
    "LeCam 0.1": ("lecam01-s1", "lecam01-s2"),
    "LeCam 1.0": ("lecam1-s1", "lecam1-s2"),
    "bf16": ("bf16-s1", "bf16-s2"),
    "skip-layer excitation": ("sle-s1", "sle-s2"),
    "ADA p": ("ada-s1", "ada-s2"),
    "self-supervised D": ("rec-s1", "rec-s2"),
    "D lr half": ("dhalf-s1", "dhalf-s2"),
    "G lr 2x": ("glr2x-s1", "glr2x-s2"),
    "3x lr": ("lr3x-s1", "lr3x-s2"),
    "cosine lr": ("cosine-s1", "cosine-s2"),
    "longer EMA": ("ema-longer-s1", "ema-longer-s2"),
    "shorter EMA": ("ema-shorter-s1", "ema-shorter-s2"),
    "batch 16": ("batch16-s1", "batch16-s2"),
}
LONG_CPU = {"no LeCam, 30 min alone": "30min-2026-12-05", "LeCam 0.3, 30 min": "30min-lecam-s0",
            "bf16, 30 min": "30min-s0-fp32-vs-bf16-bf16"}
# seed 2's first pair was stopped by SIGTERM after step 3,000's evaluation; its JSON keeps the planned 160k
STOPPED = {"side-by-side-s2-base": 96_032, "side-by-side-s2-lecam": 96_288}


def load(name, images=None):
    runs = json.loads((DOCS / f"quality-pokemon-{name}.json").read_text())
    run = [r for r in runs if r["label"] == "gan-small-data" and (images is None or r["images"] == images)][-1]
    return dict(run, images=STOPPED.get(name, run["images"]), per_step=run["images"] // run["steps"])


def line(ax, run, label, floor, scale=1e3, **style):
    """`floor`: the panel's real-vs-real FID; a run scored by another domain encoder (its own floor
    differs) says so in its label, since its FIDs are in another feature space."""
    xs = [step * run["per_step"] / scale for step, _ in run["fid_curve"]] + [run["images"] / scale]
    ys = [fid for _, fid in run["fid_curve"]] + [run["scores"]["model"]["fid"]]
    own = run["floor"]["fid"]
    other = f" (another encoder: floor {own:.2f})" if abs(own - floor) > 0.01 else ""
    ax.plot(xs, ys, marker="o", ms=3, label=f"{label}: {ys[-1]:.2f}{other}", **style)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DOCS / "quality-pokemon-curves.png"))
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    fig, axes = plt.subplots(1, 4, figsize=(22, 5.5))
    colours = plt.get_cmap("tab20")
    floors = [load(CHANGES["preset (LeCam 0.3)"][0])["floor"]["fid"]] * 3 + [load("h200")["floor"]["fid"]]
    for col, seed in enumerate((1, 2)):
        for i, (label, names) in enumerate(CHANGES.items()):
            style = dict(lw=3, color="black") if i == 0 else dict(lw=1.3, color=colours(i))
            line(axes[col], load(names[col]), label, floors[col], **style)
        axes[col].set_title(f"seed {seed}: each change alone (CPU, 1 core each)")
    for label, name in LONG_CPU.items():
        line(axes[2], load(name), label, floors[2])
    line(axes[2], load("30min", images=224_000), "no LeCam, 2026-11-30's machine", floors[2])
    axes[2].set_title("seed 0, CPU: the longer runs")
    line(axes[3], load("h200"), "width 64, batch 64, no LeCam", floors[3], scale=1e6)
    axes[3].set_title("NVIDIA H200, 8 minutes (2026-11-30)")
    for i, (ax, floor) in enumerate(zip(axes, floors)):
        ax.axhline(floor, ls="--", color="grey")
        ax.text(0.02, 0.07, f"real vs real {floor:.2f}", color="grey", transform=ax.transAxes)
        if i < 3:  # issue 38's CPU target: half of 2026-12-05's re-measured 5.75
            ax.axhline(2.9, ls=":", color="red")
            ax.text(0.02, 0.15, "CPU target 2.9", color="red", transform=ax.transAxes)
        ax.set_yscale("log")
        ax.set_ylim(2, 60)
        ax.yaxis.set_major_locator(FixedLocator([2, 3, 4, 6, 10, 20, 40]))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("millions of images seen" if i == 3 else "thousands of images seen")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("domain FID (log scale)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
