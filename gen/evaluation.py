"""Score a trained run as it is sampled: load it (gen.sample.load_generator, the one sampling
policy), sample, score against the real data (gen.metrics.Evaluator) and write RUN/eval/metrics.json.
Used by jobs.evaluate, the report (jobs.compare) and bench/quality.py.

    results, evaluator, sampler = evaluate_run("runs/mnist-gan", n=10000, space="domain")
"""
import time

from . import checkpoint
from . import features as feats
from .metrics import Evaluator, scores
from .run_dir import RunDir
from .sample import load_generator
from .durable import atomic_write_json

# the scores every table shows, in order: (key, label, format, better)
SCORES = [("fid", "FID", "{:.3f}", "↓"), ("kid_mean", "KID", "{:.4f}", "↓"), ("precision", "precision", "{:.3f}", "↑"),
          ("recall", "recall", "{:.3f}", "↑"), ("density", "density", "{:.3f}", "↑"),
          ("coverage", "coverage", "{:.3f}", "↑"), ("legibility", "legibility", "{:.3f}", "↑"),
          ("class_min", "rarest class", "{:.3f}", "↑"), ("class_max", "commonest class", "{:.3f}", "")]


def seed_spread(ev, g, seed, seeds, first, truncation=None):
    """FID and KID of `seeds` sample sets (sample seeds seed+1000, +1001, ...; `first` is the first
    one's scores) as {"fid_seeds": [...], "fid_range": [lo, hi], likewise kid}: the noise two
    models or checkpoints are held against (a difference inside it is no difference)."""
    fids, kids = [first["fid"]], [first["kid_mean"]]
    for i in range(1, seeds):
        s = scores(ev.real_f, ev.embed(g.sample(ev.n, seed=seed + 1000 + i, truncation=truncation)), ev.seed,
                   with_prdc=False)
        fids.append(s["fid"])
        kids.append(s["kid_mean"])
    return {"fid_seeds": fids, "fid_range": [min(fids), max(fids)], "kid_seeds": kids, "kid_range": [min(kids), max(kids)]}


def score_sampler(ev, g, seed=0, seeds=3, truncation=None):
    """{"model": scores of what is sampled, with the spread over `seeds` sample seeds} and, for a
    VAE, its prior's name and the scores of the same decoder from N(0, I). Also the samples scored
    first (seed + 1000)."""
    out = {}
    if g.is_vae:  # scored as sampled (the ex-post latent mixture), and beside it from N(0, I)
        prior, g.prior = g.prior, None
        out["model_normal_prior"] = ev.score(g.sample(ev.n, seed=seed + 1000))
        g.prior = prior
        out["prior"] = g.prior_name
    samples = g.sample(ev.n, seed=seed + 1000, truncation=truncation)
    out["model"] = ev.score(samples)
    out["model"].update(seed_spread(ev, g, seed, seeds, out["model"], truncation))
    return out, samples


def evaluate_run(run, data=None, n=10000, space="auto", seed=0, inception_weights=None, truncation=None,
                 device="cpu", seeds=3):
    """Score a run and write RUN/eval/metrics.json; returns (results, evaluator, sampler)."""
    g = load_generator(run, device=device, data=data)
    data = data or g.config.data.path
    if space == "auto":
        space = "inception" if feats.find_inception_weights(inception_weights) else "domain"
    t0 = time.perf_counter()
    ev = Evaluator(data, n=n, space=space, seed=seed, inception_weights=inception_weights, device=device)
    t1 = time.perf_counter()
    scored, _ = score_sampler(ev, g, seed, seeds, truncation)
    results = {"run": str(run), "step": g.meta.get("step"), "data": str(data), "n": ev.n, "requested_n": n, "space": ev.space,
               "seed": seed, "seeds": seeds, "truncation": truncation, **scored, "floors": ev.floors,
               "domain_net": ev.domain_info, "seconds": {"setup": round(t1 - t0, 1),
                                                         "sample_and_score": round(time.perf_counter() - t1, 1)}}
    out = RunDir.of(run).eval_metrics
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    return results, ev, g


class TrainingEvaluation:
    """--eval.every: FID/KID (and legibility) of what a training run samples, against the real
    features computed once (at construction, under the caller's RNG fork); with --eval.keep_best,
    the sampled model at the lowest FID so far kept as RUN/checkpoints/best (checkpoint.save_best)."""

    def __init__(self, cfg, device):
        e = cfg.eval
        self.seed, self.keep_best = e.seed, e.keep_best
        self.evaluator = Evaluator(cfg.data.path, n=e.n, space=e.space, seed=e.seed, device=device,
                                   split=cfg.data.split, with_prdc=False)

    def __call__(self, step, g, state, meta, run_dir):
        """(the metrics record, the console line) of sampler g at this step."""
        ev = self.evaluator
        result = ev.score(g.sample(ev.n, seed=self.seed))
        record = {"step": step, "time/elapsed_s": state.elapsed,
                  **{f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}}
        line = (f"eval at step {step}: FID {result['fid']:.3f} (real vs real {ev.floors['real_vs_real']['fid']:.3f})"
                + (f", legibility {result['legibility']:.3f}" if "legibility" in result else "") + f" [{ev.space}]")
        if self.keep_best and result["fid"] < state.best_fid:
            state.best_fid = record["eval/best_fid"] = result["fid"]
            checkpoint.save_best(run_dir, g, dict(meta, step=step, fid=result["fid"], space=ev.space))
            line += " (best so far: checkpoints/best)"
        return record, line
