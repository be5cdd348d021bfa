"""The GAN-vs-VAE report (python -m jobs.compare): one self-contained HTML page per comparison.

For each run: sample grid, interpolations, reconstructions (VAEs), the metrics table beside the
real-vs-real, blurred and noise floors (evaluated again where RUN/eval/metrics.json is missing or
was made with another n, feature space or checkpoint), training curves (losses; FID against steps
and wall time when the run had --eval.every), images seen, wall time, images/s, parameter
counts, and a summary written from the measured numbers. Images are embedded as data URIs.
"""
import base64
import html
import io
import json
from pathlib import Path

from .evaluation import SCORES, evaluate_run
from .families import build_family
from .run_dir import RunDir
from .sample import load_generator, write_figures



def data_uri(path_or_bytes):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    kind = "gif" if data[:3] == b"GIF" else "png"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def curves_png(name, rows):
    """Losses against steps; FID against steps and wall time (when evaluated during training)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [r for r in rows if any(k.startswith("train/") for k in r)]
    evals = [r for r in rows if "eval/fid" in r]
    fig, axes = plt.subplots(1, 3 if evals else 1, figsize=(13 if evals else 5, 3.2), dpi=90, squeeze=False)
    ax = axes[0][0]
    for key in sorted({k for r in train for k in r if k.startswith("train/")}):
        ax.plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r], label=key[6:])
    ax.set(xlabel="step", title=f"{name}: losses")
    ax.legend(fontsize=7)
    if evals:
        axes[0][1].plot([r["step"] for r in evals], [r["eval/fid"] for r in evals], "o-")
        axes[0][1].set(xlabel="step", ylabel="FID", title="FID during training")
        axes[0][2].plot([r["time/elapsed_s"] / 60 for r in evals], [r["eval/fid"] for r in evals], "o-")
        axes[0][2].set(xlabel="wall time (min)", ylabel="FID", title="FID vs wall time")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run_facts(run, args, tmp):
    """Everything the report shows about one run."""
    g = load_generator(run)
    run_dir = RunDir.of(run)
    saved = run_dir.eval_metrics
    results = json.loads(saved.read_text()) if saved.is_file() else None
    if not results or results.get("requested_n") != args.n or not results.get("space", "").startswith(args.space) \
            or results.get("step") != g.meta.get("step") or (args.data and results.get("data") != str(args.data)):
        results, _, _ = evaluate_run(run, args.data, args.n, args.space, args.seed)
    out = Path(tmp) / run_dir.path.name
    write_figures(g, out, seed=args.seed)
    family = build_family(g.config.model, g.config.optim, g.shape, g.num_classes)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in family.modules.items()}
    rows = run_dir.read_metrics()
    last = next((r for r in reversed(rows) if "data/images_seen" in r), {})
    speeds = [r["perf/img_per_s"] for r in rows if "perf/img_per_s" in r]
    elbo = next((r["train/elbo"] for r in reversed(rows) if "train/elbo" in r), None)
    return {"name": run_dir.path.name, "run": str(run), "family": g.config.model.family, "arch": g.config.model.arch,
            "g": g, "results": results, "images": {p.stem + p.suffix: p for p in sorted(out.iterdir())},
            "params": params, "step": g.meta.get("step"), "images_seen": last.get("data/images_seen"),
            "wall_s": last.get("time/elapsed_s"), "img_per_s": sum(speeds) / len(speeds) if speeds else None,
            "elbo": elbo, "curves": curves_png(run_dir.path.name, rows), "wandb_run_id": g.meta.get("wandb_run_id"),
            "config": g.meta["config"]}


def summary(facts):
    """Plain sentences from the measured numbers."""
    def model(f, k):
        return f["results"]["model"].get(k)
    lines = []
    floor = facts[0]["results"]["floors"]["real_vs_real"]["fid"]
    best = min(facts, key=lambda f: model(f, "fid"))
    others = ", ".join(f"{f['name']} {model(f, 'fid'):.2f}" for f in facts if f is not best)
    lines.append(f"Closest to the real data (lowest FID): {best['name']} with {model(best, 'fid'):.2f} "
                 f"(real vs real: {floor:.2f}; {others}).")
    sharp = max(facts, key=lambda f: model(f, "precision"))
    lines.append(f"Most realistic individual samples (precision, share of samples inside the real manifold): "
                 f"{sharp['name']} ({model(sharp, 'precision'):.3f}).")
    cover = max(facts, key=lambda f: model(f, "coverage"))
    lines.append(f"Covers most of the real data (coverage / recall): {cover['name']} "
                 f"({model(cover, 'coverage'):.3f} / {model(cover, 'recall'):.3f}).")
    if all(model(f, "legibility") is not None for f in facts):
        real = facts[0]["results"]["floors"]["real_vs_real"]["legibility"]
        leg = max(facts, key=lambda f: model(f, "legibility"))
        rare = max(facts, key=lambda f: model(f, "class_min"))
        lines.append(f"Most legible: {leg['name']} ({model(leg, 'legibility'):.3f} of samples classified with p ≥ 0.9; "
                     f"held-out real images: {real:.3f}). Most even over the classes: {rare['name']} "
                     f"(rarest class {model(rare, 'class_min'):.3f} of samples; uniform would be "
                     f"{1 / len(model(rare, 'class_hist')):.3f}).")
    vaes = [f for f in facts if f["family"] == "vae"]
    for f in vaes:
        lines.append(f"{f['name']} is a VAE: it gives a likelihood bound (training ELBO "
                     f"{f['elbo']:.1f} nats per image) and reconstructions; a GAN gives neither." if f["elbo"] is not None
                     else f"{f['name']} is a VAE: it gives a likelihood bound and reconstructions.")
    return lines


def fmt(v, spec="{:,.0f}"):
    return "–" if v is None else spec.format(v)


def render(facts, args):
    e = html.escape
    first = facts[0]["results"]
    cols = [(f["name"], f["results"]["model"]) for f in facts] + \
           [(k.replace("_", " "), v) for k, v in first["floors"].items()]
    head = "".join(f"<th>{e(n)}</th>" for n, _ in cols)
    body = ""
    for key, label, spec, better in SCORES:
        if key not in first["model"]:
            continue
        cells = "".join(f"<td>{'' if s.get(key) is None else spec.format(s[key])}</td>" for _, s in cols)
        body += f"<tr><th>{e(f'{label} {better}'.strip())}</th>{cells}</tr>"
    facts_rows = "".join(
        f"<tr><th>{e(f['name'])}</th><td>{e(f['family'])} ({e(f['arch'])})</td><td>{fmt(f['step'])}</td>"
        f"<td>{fmt(f['images_seen'])}</td><td>{fmt(f['wall_s'] and f['wall_s'] / 60, '{:.1f} min')}</td>"
        f"<td>{fmt(f['img_per_s'])}</td><td>{', '.join(f'{k} {v:,}' for k, v in f['params'].items())}</td></tr>"
        for f in facts)
    panels = ""
    for f in facts:
        imgs = f["images"]
        figures = [(n, imgs[n]) for n in ("samples.png", "interpolations.gif", "reconstructions.png", "manifold.png",
                                          "latent_scatter.png", "classes.png") if n in imgs]
        drawn = f", latents from the {f['g'].prior_name}" if f["g"].is_vae else ""
        panels += f"<section class='run'><h3>{e(f['name'])} <small>{e(f['family'])}, step {f['step']}{e(drawn)}</small></h3>"
        panels += "".join(f"<figure><img alt='{e(n)}' src='{data_uri(p)}'><figcaption>{e(n)}</figcaption></figure>"
                          for n, p in figures)
        panels += "</section>"
    curves = "".join(f"<img class='curve' alt='curves {e(f['name'])}' src='{data_uri(f['curves'])}'>" for f in facts)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>deepgen: {' vs '.join(e(f['name']) for f in facts)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;max-width:1500px;color:#222}}table{{border-collapse:collapse;margin:8px 0 20px}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}th{{background:#f4f4f4}}.runs{{display:flex;gap:24px;flex-wrap:wrap}}
.run{{flex:1;min-width:420px}}figure{{display:inline-block;margin:4px}}figure img{{image-rendering:pixelated;max-width:460px}}
figcaption{{font-size:12px;color:#666}}.curve{{max-width:100%;display:block;margin:6px 0}}li{{margin:4px 0}}</style></head><body>
<h1>Is there a difference? {' vs '.join(e(f['name']) for f in facts)}</h1>
<h2>Summary</h2><ul>{''.join(f'<li>{e(l)}</li>' for l in summary(facts))}</ul>
<h2>Samples</h2><div class="runs">{panels}</div>
<h2>Metrics</h2><p>{first['n']:,} samples per set against {e(first['data'])}; features: {e(first['space'])}.
Floors: real vs real (two disjoint halves of the real data), blurred real, noise.</p>
<table><tr><th></th>{head}</tr>{body}</table>
<h2>Training</h2><table><tr><th>run</th><th>model</th><th>steps</th><th>images seen</th><th>wall time</th><th>images/s</th><th>parameters</th></tr>{facts_rows}</table>
{curves}
<script>window.addEventListener('load',()=>{{const i=[...document.images];document.body.dataset.imagesLoaded=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;}});</script>
</body></html>"""
