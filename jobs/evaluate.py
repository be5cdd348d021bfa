"""Score a trained run's samples against the real shards, beside the floors of the same features.

    python -m jobs.evaluate runs/mnist-gan                      # data from the run's config
    python -m jobs.evaluate runs/mnist-gan --data data/mnist --n 10000 --space domain
    python -m jobs.evaluate runs/poke-gan --space inception --inception-weights /shared/weights-inception-2015-12-05-6726825d.pth

Feature spaces: `domain` (a network trained on the real shards, offline: a classifier for
labeled data, else contrastive) and `inception` (FID's standard Inception-v3). `auto` (the
default) uses Inception when its weights are on disk, else domain. Results go to
RUN/eval/metrics.json, the console and, when the run logs to W&B, its summary and a table.
"""
import argparse
import logging
import sys
from pathlib import Path

from gen.cli import command


def table(results):
    """The console table: the run beside real-vs-real, blurred real and noise."""
    cols = [("this run", results["model"])] + ([("N(0, I) prior", results["model_normal_prior"])]
                                               if "model_normal_prior" in results else [])
    cols += [(k.replace("_", " "), v) for k, v in results["floors"].items()]
    lines = [f"{'':16}" + "".join(f"{name:>18}" for name, _ in cols)]
    from gen.evaluation import SCORES
    for key, label, fmt, _ in SCORES:
        if key not in results["model"]:
            continue
        cells = []
        for _, scores in cols:
            v = scores.get(key)
            text = "" if v is None else fmt.format(v)
            if key == "kid_mean" and v is not None:
                text += f"±{scores['kid_std']:.4f}"
            cells.append(f"{text:>18}")
        lines.append(f"{label:16}" + "".join(cells))
    return "\n".join(lines)


@command
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir (newest checkpoint), a checkpoint folder or an export folder")
    p.add_argument("--data", default=None, help="real shards (default: the run's data.path)")
    p.add_argument("--n", type=int, default=10000, help="samples, and real images per set (warns below 2048)")
    p.add_argument("--space", choices=("auto", "domain", "inception"), default="auto")
    p.add_argument("--inception-weights", default=None, help="FID Inception weights file (pt_inception-2015-12-05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=3, help="sample sets for FID/KID's spread (first: --seed's)")
    p.add_argument("--truncation", type=float, default=None, help="GAN truncation threshold")
    p.add_argument("--device", default=None, help="default: cuda when there is a GPU, else cpu")
    p.add_argument("--no-wandb", action="store_true", help="do not log to the run's W&B run")
    args = p.parse_args(argv)
    from gen.evaluation import evaluate_run  # after parsing: --help and usage errors without importing torch
    args.device = args.device or ("cuda" if _cuda() else "cpu")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from gen.run_dir import RunDir
    from gen.tracking import log_eval_to_run
    results, ev, g = evaluate_run(args.run, args.data, args.n, args.space, args.seed, args.inception_weights,
                                  args.truncation, args.device, max(1, args.seeds))
    out = RunDir.of(args.run).eval_metrics
    model = results["model"]
    print(f"{Path(args.run)} at step {results['step']}: n={ev.n}, features: {ev.space}"
          + (f"; VAE latents from the {results['prior']}" if "prior" in results else ""))
    print(table(results))
    if len(model.get("fid_seeds", [])) > 1:
        lo, hi = model["fid_range"]
        print(f"FID over {len(model['fid_seeds'])} sample seeds: {lo:.3f}-{hi:.3f}; KID {model['kid_range'][0]:.4f}-"
              f"{model['kid_range'][1]:.4f} (differences inside these are noise)")
    if ev.labeled:
        names = ev.domain_info.get("class_names") or []
        hist = ", ".join(f"{n}:{v:.3f}" for n, v in zip(names, model["class_hist"]))
        print(f"predicted classes of the samples: {hist}")
    print(f"-> {out}")
    if not args.no_wandb and log_eval_to_run(RunDir.of(args.run).path, g.meta, results):
        print("logged to the run's W&B run (summary eval/*, table eval/table)")
    return 0


def _cuda():
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
