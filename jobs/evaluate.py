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
import time
from pathlib import Path

ROWS = [("fid", "FID", "{:.3f}"), ("kid_mean", "KID", "{:.4f}"), ("precision", "precision", "{:.3f}"),
        ("recall", "recall", "{:.3f}"), ("density", "density", "{:.3f}"), ("coverage", "coverage", "{:.3f}"),
        ("legibility", "legibility", "{:.3f}"), ("class_min", "rarest class", "{:.3f}"),
        ("class_max", "commonest class", "{:.3f}")]


def table(results):
    """The console table: the run beside real-vs-real, blurred real and noise."""
    cols = [("this run", results["model"])] + [(k.replace("_", " "), v) for k, v in results["floors"].items()]
    lines = [f"{'':16}" + "".join(f"{name:>18}" for name, _ in cols)]
    for key, label, fmt in ROWS:
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


def run_dir_of(path):
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return path  # an export folder


def log_to_wandb(run_dir, meta, results):
    """Summary values and a table in the run's own W&B run (same id), when it has one."""
    from gen import tracking
    run_id = meta.get("wandb_run_id")
    cfg = meta["config"]
    mode = tracking.wandb_mode(cfg["log"]["wandb"]) if run_id else None
    if not mode:
        return None
    import wandb
    run = wandb.init(id=run_id, resume="allow", project=cfg["log"]["project"], dir=str(Path(run_dir).resolve()),
                     mode=mode, settings=wandb.Settings(silent=True))
    run.summary.update({f"eval/{k}": v for k, v in results["model"].items() if isinstance(v, float)})
    columns = ["set"] + [k for k, _, _ in ROWS if k in results["model"]]
    rows = [["this run"] + [results["model"].get(k) for k in columns[1:]]]
    rows += [[name] + [s.get(k) for k in columns[1:]] for name, s in results["floors"].items()]
    run.log({"eval/table": wandb.Table(columns=columns, data=rows)})
    run.finish()
    return mode


def evaluate_run(run, data=None, n=10000, space="auto", seed=0, inception_weights=None, truncation=None,
                 device="cpu"):
    """Score a run and write RUN/eval/metrics.json; returns (results, evaluator, sampler)."""
    from gen.features import find_inception_weights
    from gen.metrics import Evaluator
    from gen.sample import load_generator
    from gen.shard_format import atomic_write_json
    g = load_generator(run, device=device)
    data = data or g.config.data.path
    if space == "auto":
        space = "inception" if find_inception_weights(inception_weights) else "domain"
    t0 = time.perf_counter()
    ev = Evaluator(data, n=n, space=space, seed=seed, inception_weights=inception_weights, device=device)
    t1 = time.perf_counter()
    model = ev.score(g.sample(ev.n, seed=seed + 1000, truncation=truncation))
    results = {"run": str(run), "step": g.meta.get("step"), "data": str(data), "n": ev.n, "requested_n": n, "space": ev.space,
               "seed": seed, "truncation": truncation, "model": model, "floors": ev.floors,
               "domain_net": ev.domain_info, "seconds": {"setup": round(t1 - t0, 1),
                                                         "sample_and_score": round(time.perf_counter() - t1, 1)}}
    out = run_dir_of(run) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", results)
    return results, ev, g


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir (newest checkpoint), a checkpoint folder or an export folder")
    p.add_argument("--data", default=None, help="real shards (default: the run's data.path)")
    p.add_argument("--n", type=int, default=10000, help="samples, and real images per set (warns below 2048)")
    p.add_argument("--space", choices=("auto", "domain", "inception"), default="auto")
    p.add_argument("--inception-weights", default=None, help="FID Inception weights file (pt_inception-2015-12-05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truncation", type=float, default=None, help="GAN truncation threshold")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--no-wandb", action="store_true", help="do not log to the run's W&B run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from gen.checkpoint import CheckpointError
    from gen.shard_format import DataError
    try:
        results, ev, g = evaluate_run(args.run, args.data, args.n, args.space, args.seed, args.inception_weights,
                                      args.truncation, args.device)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = run_dir_of(args.run) / "eval"
    model = results["model"]
    print(f"{Path(args.run)} at step {results['step']}: n={ev.n}, features: {ev.space}")
    print(table(results))
    if ev.labeled:
        names = ev.domain_info.get("class_names") or []
        hist = ", ".join(f"{n}:{v:.3f}" for n, v in zip(names, model["class_hist"]))
        print(f"predicted classes of the samples: {hist}")
    print(f"-> {out / 'metrics.json'}")
    if not args.no_wandb and log_to_wandb(run_dir_of(args.run), g.meta, results):
        print("logged to the run's W&B run (summary eval/*, table eval/table)")
    return 0


def _cuda():
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
