"""Evaluation as a user runs it: metrics against independent computations, floors in the right
order, a worse run scoring worse, every written file decoding, and the GAN-vs-VAE report
rendered in headless Chromium with every image loaded."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import built_once, make_mnist_shards, run, train_cmd

# a short domain classifier keeps CI fast; the README default trains 600 steps of 128. Small batches
# learn more per CPU-second here: 300 of 16 reach held-out accuracy 0.976 and real digits'
# legibility 0.876 (the floors test asks >= 0.85) in ~10 CPU-s; 400 of 16: 0.976 and 0.902 in 14 s;
# 250: 0.974 and 0.848; 150 of 128: 0.984 and 0.900 in 36 s
DOMAIN = {"DEEPGEN_DOMAIN_STEPS": "300", "DEEPGEN_DOMAIN_BATCH": "16"}
# the tests of the two shared runs spread over the xdist workers: the first to need a run builds
# it (built_once), and each test has its own copy (in one group they were the suite's longest chain)
on_shared_runs = pytest.mark.shared_runs


@pytest.fixture(scope="session")
def eval_env(tmp_path_factory, digits):
    """2,000 real train digits + 500 test as shards, and a cache folder for the domain network
    (built once, shared by the workers)."""
    root = built_once(tmp_path_factory, "eval", lambda folder: make_mnist_shards(folder, digits, 2000, 500, shard_size=500))
    return root / "shards", {"DEEPGEN_CACHE": str(root / "cache"), **DOMAIN}, root


def _own_copy(tmp_path_factory, eval_env, tmp_path, name, *train_args, preset="gan"):
    """A run trained once per session (train_args), copied into this test's folder: tests write
    evaluations, samples and W&B runs into it, and run side by side on xdist workers."""
    shards, env, _ = eval_env
    shared = built_once(tmp_path_factory, name, lambda folder: run(
        train_cmd(shards, folder / "run", *train_args, preset=preset), env=env, check=True))
    return Path(shutil.copytree(shared / "run", tmp_path / name))


@pytest.fixture
def gan_run(tmp_path_factory, eval_env, tmp_path):
    """A small GAN with checkpoints at steps 20 and 200, evaluated during training."""
    return _own_copy(tmp_path_factory, eval_env, tmp_path, "gan-run", "--train.steps", "200", "--train.batch_size", "32",
                     "--model.width", "16", "--train.ckpt_every", "20", "--train.keep_last", "20",
                     "--train.log_every", "20", "--eval.every", "100", "--eval.n", "300", "--eval.keep_best",
                     "--log.wandb", "offline")


def test_fid_and_kid_agree_with_scipy_and_numpy():
    from scipy import linalg

    from gen.metrics import fid, kid
    g = torch.Generator().manual_seed(0)
    a = torch.randn(600, 16, generator=g) @ torch.randn(16, 16, generator=g)
    b = torch.randn(500, 16, generator=g) @ torch.randn(16, 16, generator=g) + 0.3
    x, y = a.double().numpy(), b.double().numpy()
    mu1, mu2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert abs(fid(a, b) - expected) / expected < 1e-3
    # KID on one subset holding every sample: the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3
    n = 500
    x, y = x[:n], y[:n]
    k = lambda p, q: (p @ q.T / x.shape[1] + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    mmd = (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    mean, _ = kid(a[:n], b[:n], subsets=1, subset_size=n)
    assert abs(mean - mmd) / abs(mmd) < 1e-3


@on_shared_runs
def test_floors_order_and_same_seed_same_metrics(eval_env, gan_run):
    shards, env, _ = eval_env
    proc = run(["-m", "jobs.evaluate", str(gan_run), "--n", "500", "--no-wandb"], env=env, check=True)
    first = json.loads((gan_run / "eval/metrics.json").read_text())
    assert "features: domain classifier" in proc.stdout and "real vs real" in proc.stdout
    assert first["n"] == 500 and first["space"].startswith("domain classifier") and first["step"] == 200
    assert first["domain_net"]["held_out_accuracy"] >= 0.9  # the short net here; the default's reaches >= 0.99
    floors = first["floors"]
    rr, blur, noise = (floors[k]["fid"] for k in ("real_vs_real", "blurred_real", "noise"))
    assert rr < 0.1 * blur and blur < noise, floors
    assert floors["real_vs_real"]["precision"] > 0.8 and floors["noise"]["precision"] == 0
    # FID over 3 sample seeds: the first is --seed's own, the others are other samples
    model = first["model"]
    assert len(model["fid_seeds"]) == 3 and model["fid_seeds"][0] == model["fid"] and "FID over 3 sample seeds" in proc.stdout
    assert model["fid_range"] == [min(model["fid_seeds"]), max(model["fid_seeds"])] and len(set(model["fid_seeds"])) == 3
    assert 0.85 <= floors["real_vs_real"]["legibility"] <= 1.0  # 0.876 with the short net
    # the same seed gives the same metrics (a domain network trained again from scratch is the same
    # network: test_domain_network_trains_the_same_from_scratch)
    run(["-m", "jobs.evaluate", str(gan_run), "--n", "500", "--no-wandb", "--seeds", "1"], env=env, check=True)
    again = json.loads((gan_run / "eval/metrics.json").read_text())
    assert again["model"]["fid_seeds"] == [first["model"]["fid"]] and again["floors"] == first["floors"]
    one_seed = lambda model: {k: v for k, v in model.items() if not k.endswith(("_seeds", "_range"))}  # noqa: E731
    assert one_seed(again["model"]) == one_seed(first["model"])
    # (other sample sets give other numbers, so the check can fail: the 3 seeds' FIDs differ, above)


def test_domain_network_trains_the_same_from_scratch(eval_env, tmp_path, monkeypatch):
    """Deleting the cache must not change any score: the network is trained again bit for bit."""
    from gen.features import domain_net
    shards, _, _ = eval_env
    monkeypatch.setenv("DEEPGEN_DOMAIN_STEPS", "8")  # enough to differ if not seeded
    monkeypatch.setenv("DEEPGEN_DOMAIN_BATCH", "16")
    nets = []
    for cache in ("a", "b"):
        monkeypatch.setenv("DEEPGEN_CACHE", str(tmp_path / cache))
        nets.append(domain_net(shards, progress=False))
        assert len(list((tmp_path / cache / "domain").glob("*.safetensors"))) == 1  # trained, not loaded
    (a, info_a), (b, info_b) = nets
    assert info_a == info_b and info_a["kind"] == "classifier"
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@on_shared_runs
def test_scores_go_to_the_runs_own_wandb_run(eval_env, gan_run):
    """Offline W&B: evaluation continues the training run (same id) with a summary and a table;
    the training curve has eval/fid at the evaluation steps."""
    from wandb_records import history, records, run_id
    _, env, _ = eval_env
    before = set(gan_run.glob("wandb/offline-run-*"))
    proc = run(["-m", "jobs.evaluate", str(gan_run), "--n", "300", "--seeds", "1"], env=env, check=True)
    assert "logged to the run's W&B run" in proc.stdout
    new = sorted(set(gan_run.glob("wandb/offline-run-*")) - before)
    train_file = next(next(iter(before)).glob("run-*.wandb"))
    eval_file = next(new[0].glob("run-*.wandb"))
    assert run_id(eval_file) == run_id(train_file)
    assert [step for step, items in history(train_file) if "eval/fid" in items] == [100, 200]
    summary_keys = {i.key for r in records(eval_file) if r.WhichOneof("record_type") == "summary"
                    for i in r.summary.update}
    logged = {k for _, items in history(eval_file) for k in items}
    assert "eval/fid" in summary_keys and any(k.startswith("eval/table") for k in logged), (summary_keys, logged)


@on_shared_runs
def test_a_shorter_run_scores_worse(eval_env, gan_run):
    shards, env, _ = eval_env
    fids = {}
    for step in (20, 200):
        ckpt = gan_run / f"checkpoints/checkpoint-{step:07d}"
        run(["-m", "jobs.evaluate", str(ckpt), "--n", "500", "--no-wandb", "--seeds", "1"], env=env, check=True)
        fids[step] = json.loads((gan_run / "eval/metrics.json").read_text())["model"]["fid"]
    assert fids[200] < 0.7 * fids[20], fids


@on_shared_runs
def test_eval_during_training_leaves_the_training_stream_unchanged(eval_env, gan_run, tmp_path):
    shards, env, _ = eval_env
    rows = [json.loads(l) for l in (gan_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fid" in r]
    assert [r["step"] for r in evals] == [100, 200] and all(r["eval/fid"] > 0 and r["time/elapsed_s"] > 0 for r in evals)
    assert evals[1]["eval/fid"] < evals[0]["eval/fid"]
    # the same run without --eval.every: bit-identical weights 20 steps after the first evaluation
    run(train_cmd(shards, tmp_path / "plain", "--train.steps", "120", "--train.batch_size", "32", "--model.width", "16",
                  "--train.ckpt_every", "20", "--train.keep_last", "20", "--train.log_every", "20", "--log.wandb", "off"),
        env=env, check=True)
    from safetensors.torch import load_file
    for name in ("model.safetensors", "model_1.safetensors", "sampling.safetensors"):
        a = load_file(gan_run / "checkpoints/checkpoint-0000120" / name)
        b = load_file(tmp_path / "plain/checkpoints/checkpoint-0000120" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


@on_shared_runs
def test_keep_best_keeps_the_lowest_fid_beside_the_last(eval_env, gan_run, tmp_path, monkeypatch):
    """--eval.keep_best: RUN/checkpoints/best holds what was sampled at the lowest FID of the curve;
    read back the way users read it, it scores that FID again; the last checkpoint is still the last."""
    from gen.metrics import Evaluator
    from gen.run_dir import RunDir
    from gen.sample import load_generator
    shards, env, _ = eval_env
    curve = {r["step"]: r["eval/fid"] for r in RunDir(gan_run).read_metrics() if "eval/fid" in r}
    best = gan_run / "checkpoints/best"
    meta = json.loads((best / "meta.json").read_text())
    assert meta["step"] == min(curve, key=curve.get) and meta["fid"] == min(curve.values())
    assert RunDir(gan_run).checkpoints()[0][0] == 200  # the newest checkpoint is the last step's, not the best's
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ev = Evaluator(shards, n=300, space="domain", seed=0, with_prdc=False)
    again = ev.score(load_generator(best).sample(300, seed=0))["fid"]  # as the training loop sampled it
    assert abs(again - meta["fid"]) < 1e-3 * meta["fid"], (again, meta["fid"])
    run(["-m", "jobs.sample", str(best), "--out", str(tmp_path / "s")], env=env, check=True)
    assert (tmp_path / "s/samples.png").is_file()


@pytest.fixture
def vae_run(tmp_path_factory, eval_env, tmp_path):
    """The TF-tutorial VAE (2-D latent), briefly."""
    return _own_copy(tmp_path_factory, eval_env, tmp_path, "vae-run", "--train.steps", "150", "--train.log_every", "25",
                     "--log.wandb", "offline", "--train.batch_size", "32", preset="seed-vae")


@on_shared_runs
def test_every_written_file_decodes(eval_env, gan_run, vae_run, tmp_path):
    from PIL import Image
    _, env, _ = eval_env
    run(["-m", "jobs.sample", str(gan_run), "--out", str(tmp_path / "g"), "--npz", str(tmp_path / "g.npz"),
         "--n", "1200", "--truncation", "1.0"], env=env, check=True)
    arr = np.load(tmp_path / "g.npz")["arr_0"]
    assert arr.shape == (1200, 28, 28, 1) and arr.dtype == np.uint8
    # 1,200 different images with strokes in them (this 200-step GAN's digits are still faint)
    flat = arr.reshape(1200, -1)
    assert len(np.unique(flat, axis=0)) == 1200 and flat.std(axis=1).mean() > 5
    assert Image.open(tmp_path / "g/samples.png").size == (16 * 30 + 2, 16 * 30 + 2)  # 256 of 1200, 16 per row
    gif = Image.open(tmp_path / "g/interpolations.gif")
    assert gif.n_frames == 2 * 10 - 2  # 10 steps forward, then back without repeating the ends
    assert gif.size == (4 * (8 * 30 + 2), 4 * 32)  # one row of 8 paths, enlarged 4x to be watchable
    run(["-m", "jobs.sample", str(vae_run), "--out", str(tmp_path / "v")], env=env, check=True)
    for name in ("samples.png", "interpolations.png", "reconstructions.png", "manifold.png", "latent_scatter.png"):
        with Image.open(tmp_path / "v" / name) as im:
            im.load()
            assert min(im.size) > 28, name
    assert Image.open(tmp_path / "v/manifold.png").size == (20 * 30 + 2, 20 * 30 + 2)
    refused = run(["-m", "jobs.sample", str(vae_run), "--truncation", "1"], env=env)
    assert refused.returncode == 1 and "GANs" in refused.stderr


def test_conditional_model_writes_a_grid_per_class(eval_env, tmp_path):
    shards, env, _ = eval_env
    run(train_cmd(shards, tmp_path / "c", "--train.steps", "2", "--model.conditional", "--log.wandb", "off"),
        env=env, check=True)
    run(["-m", "jobs.sample", str(tmp_path / "c"), "--out", str(tmp_path / "s")], env=env, check=True)
    from PIL import Image

    from gen.sample import load_generator, save_grid
    shown = np.asarray(Image.open(tmp_path / "s/classes.png"))
    assert shown.shape[:2] == (10 * 30 + 2, 10 * 30 + 2)  # 10 classes x 10
    # row c is class c: the same latents (jobs.sample's seed + 3) given label c in row c redraw it
    # pixel for pixel; the same latents with the rows' labels rotated by one do not
    g = load_generator(tmp_path / "c")
    z = g.latents(100, seed=3)
    for shift, same in ((0, True), (1, False)):
        labels = (torch.arange(10).repeat_interleave(10) + shift) % 10
        save_grid(g.generate(z, labels), tmp_path / f"by-hand-{shift}.png", nrow=10)
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"by-hand-{shift}.png")), shown) == same, shift


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (.ci/install installs it)")
@on_shared_runs
def test_gan_vs_vae_report_renders_with_every_image(eval_env, gan_run, vae_run, tmp_path):
    _, env, _ = eval_env
    report = tmp_path / "report.html"
    proc = run(["-m", "jobs.compare", str(gan_run), str(vae_run), "--n", "200", "--out", str(report)],
               env=env, check=True)
    assert "Closest to the real data" in proc.stdout and "is a VAE" in proc.stdout
    page = report.read_text()
    assert "real vs real" in page and "src='data:image/" in page and "file://" not in page
    chrome = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    dom = subprocess.run([*chrome, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[:500]
    ok, total = int(loaded.group(1)), int(loaded.group(2))
    # GAN: samples, interpolations; VAE: + reconstructions, manifold, latent scatter; a curve each
    assert total >= 9 and ok == total, loaded.group(0)
    shot = tmp_path / "report.png"
    subprocess.run([*chrome, f"--screenshot={shot}", "--window-size=1400,2400", report.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1400) and pixels.std() > 20  # not a blank page


@on_shared_runs
def test_inception_space_runs_from_a_local_weights_file(eval_env, gan_run, tmp_path):
    """No network here, so no real FID weights: a file in torch-fidelity's format holding the
    network's random initial weights exercises the whole offline path (--inception-weights)."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    with mock.patch("torch.load", return_value={}), mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), weights)
    _, env, _ = eval_env
    proc = run(["-m", "jobs.evaluate", str(gan_run), "--n", "16", "--inception-weights", str(weights), "--no-wandb",
                "--seeds", "1"],
               env=env, check=True)
    result = json.loads((gan_run / "eval/metrics.json").read_text())
    assert result["space"].startswith("inception-v3 pool3 (2048-d)") and "inception-v3" in proc.stdout
    assert result["floors"]["real_vs_real"]["fid"] < result["floors"]["noise"]["fid"]


def test_unlabeled_data_gets_a_contrastive_domain_network(tmp_path, monkeypatch):
    """The Pokémon (no classes): a SimCLR-style encoder is trained; real vs real sits below
    blurred real and noise; no legibility is claimed without labels."""
    from helpers import POKEMON_ZIP

    from gen.metrics import Evaluator
    if not POKEMON_ZIP.is_file():
        pytest.skip(f"{POKEMON_ZIP} not found")
    run(["-m", "data_prep", "folder", str(POKEMON_ZIP), "--out", str(tmp_path / "poke"), "--size", "32"], check=True)
    monkeypatch.setenv("DEEPGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DEEPGEN_DOMAIN_STEPS", "30")
    monkeypatch.setenv("DEEPGEN_DOMAIN_BATCH", "32")
    ev = Evaluator(tmp_path / "poke", n=400, space="domain", progress=False)
    # (30 steps of 32: real vs real 1.18, blurred 29.9, noise 393 in 7.7 CPU-s; of 128: 1.24, 12.6, 135 in 25.6 s)
    assert ev.domain_info["kind"] == "contrastive" and ev.space.startswith("domain contrastive")
    floors = ev.floors
    assert floors["real_vs_real"]["fid"] < 0.5 * floors["blurred_real"]["fid"] < floors["noise"]["fid"], floors
    assert "legibility" not in floors["real_vs_real"]


def test_latent_mixture_recovers_a_known_mixture():
    from gen.latent_prior import fit, sample
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[4.0, 0.0, 1.0], [-3.0, 2.0, 0.0]])
    tril = torch.tensor([[[1.0, 0, 0], [0.5, 0.5, 0], [0, 0, 0.2]], [[0.3, 0, 0], [0, 2.0, 0], [0.1, 0.1, 1.0]]])
    weights = torch.tensor([0.7, 0.3])
    truth = {"weights": weights, "means": means, "scale_tril": tril}
    prior = fit(sample(truth, 6000, g), components=2)
    covs = tril @ tril.transpose(1, 2)
    order = [int((prior["means"] - m).norm(dim=1).argmin()) for m in means]  # fitted component of each true one
    assert sorted(order) == [0, 1]
    fitted_covs = prior["scale_tril"] @ prior["scale_tril"].transpose(1, 2)
    for k, j in enumerate(order):
        assert (prior["means"][j] - means[k]).abs().max() < 0.1
        assert (fitted_covs[j] - covs[k]).abs().max() < 0.1 * covs[k].abs().max()
        assert abs(prior["weights"][j] - weights[k]) < 0.02
    # draws from the fit have the true mixture's moments (written out)
    drawn = sample(prior, 40000, g)
    mean = (weights[:, None] * means).sum(0)
    second = (weights[:, None, None] * (covs + means[:, :, None] * means[:, None, :])).sum(0)
    total = second - torch.outer(mean, mean)
    assert (drawn.mean(0) - mean).abs().max() < 0.05
    assert (torch.cov(drawn.T) - total).abs().max() < 0.03 * total.abs().max()


def test_latent_mixture_size_is_chosen_by_held_out_likelihood():
    """Five well-separated Gaussians get five components; 400 draws of one Gaussian in 16-d get
    one (more would memorise the points: the failure that held-out likelihood guards against)."""
    from gen.latent_prior import choose_components, sample
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        truth = {"weights": torch.full((5,), 0.2), "means": torch.randn(5, 8, generator=g) * 6,
                 "scale_tril": torch.eye(8).repeat(5, 1, 1) * torch.rand(5, 1, 1, generator=g).add(0.5)}
        assert choose_components(sample(truth, 3000, g), seed=seed) == 5
        assert choose_components(torch.randn(400, 16, generator=g), seed=seed) == 1


@on_shared_runs
def test_vae_samples_from_its_expost_mixture_by_default(eval_env, vae_run, tmp_path, monkeypatch):
    from gen.data import load_real, to_float
    from gen.sample import load_generator
    shards, env, _ = eval_env
    proc = run(["-m", "jobs.sample", str(vae_run), "--out", str(tmp_path / "v")], env=env, check=True)
    assert "latents from ex-post mixture" in proc.stdout
    ckpt = sorted((vae_run / "checkpoints").glob("checkpoint-*"))[-1]
    assert (ckpt / "latent_prior.safetensors").is_file()  # fitted by the training loop, saved with the weights
    g = load_generator(vae_run)
    assert g.prior is not None and not (vae_run / "latent_prior").exists()  # nothing fitted again
    x, labels = load_real(shards, "train", seed=0)
    z = g.encode(to_float(x), labels)  # the aggregate posterior's means, the mixture's target
    drawn = g.latents(20000, seed=1)
    assert (drawn.mean(0) - z.mean(0)).abs().max() < 0.1 * z.std(0).max()
    assert (torch.cov(drawn.T) - torch.cov(z.T)).abs().max() < 0.1 * torch.cov(z.T).abs().max()
    normal = run(["-m", "jobs.sample", str(vae_run), "--prior", "normal", "--out", str(tmp_path / "n")], env=env, check=True)
    assert "N(0, I)" in normal.stdout
    ev = run(["-m", "jobs.evaluate", str(vae_run), "--n", "300", "--no-wandb", "--seeds", "1"], env=env, check=True)
    assert "N(0, I) prior" in ev.stdout and "ex-post mixture" in ev.stdout
    results = json.loads((vae_run / "eval/metrics.json").read_text())
    # each column is scored on the latents it names: rescored here from latents drawn by hand, the
    # mixture's own draw for "model" and torch.randn for the N(0, I) column (same sample seed, 1000)
    from gen.latent_prior import sample as mixture_sample
    from gen.metrics import Evaluator
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    scorer = Evaluator(str(shards), n=300, space="domain", seed=0, progress=False)
    n = results["n"]
    by_hand = {"model": mixture_sample(g.prior, n, torch.Generator().manual_seed(1000)),
               "model_normal_prior": torch.randn(n, g.latent_dim, generator=torch.Generator().manual_seed(1000))}
    fids = {col: scorer.score(g.generate(z))["fid"] for col, z in by_hand.items()}
    for col, fid in fids.items():
        assert abs(results[col]["fid"] - fid) < 1e-6 * max(1.0, fid), (col, results[col]["fid"], fid)
    assert abs(fids["model"] - fids["model_normal_prior"]) > 0.01 * fids["model"]  # the priors differ in what they give


@on_shared_runs
def test_report_pictures_and_table_come_from_one_sampler(eval_env, vae_run, tmp_path, monkeypatch):
    """The report's VAE grid is drawn from the same latent mixture its metrics were scored on
    (it used to show N(0, I) samples beside mixture scores)."""
    import argparse

    from PIL import Image

    from gen.report import run_facts
    from gen.sample import load_generator, save_grid
    _, env, _ = eval_env
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = argparse.Namespace(n=300, space="domain", seed=0, data=None)
    facts = run_facts(str(vae_run), args, tmp_path)
    assert facts["results"]["prior"] == facts["g"].prior_name and facts["g"].prior is not None
    shown = np.asarray(Image.open(facts["images"]["samples.png"]))
    for prior, same in (("auto", True), ("normal", False)):
        save_grid(load_generator(vae_run, prior=prior).sample(64, seed=0), tmp_path / f"{prior}.png")
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{prior}.png")), shown) == same, prior


def test_small_data_preset_at_128px_trains_samples_scores_and_reports(tmp_path):
    """128 px is a first-class size for gan-small-data (the Pokémon zip is 128 px): it trains, samples,
    evaluates, and the report shows it (images embedded at 128 px)."""
    import base64
    import io

    from PIL import Image

    from helpers import make_color_folder
    make_color_folder(tmp_path / "images", 24, size=128)
    run(["-m", "data_prep", "folder", str(tmp_path / "images"), "--out", str(tmp_path / "shards"), "--size", "128"],
        check=True)
    # (the contrastive encoder on 2 batches of 16: on 128 of 128 px images it took 13 s)
    env = {"DEEPGEN_CACHE": str(tmp_path / "cache"), "DEEPGEN_DOMAIN_STEPS": "2", "DEEPGEN_DOMAIN_BATCH": "16"}
    run(train_cmd(tmp_path / "shards", tmp_path / "run", "--train.steps", "2", "--train.batch_size", "8",
                  "--model.width", "16", "--log.wandb", "off", preset="gan-small-data"), env=env, check=True)
    run(["-m", "jobs.sample", str(tmp_path / "run"), "--out", str(tmp_path / "s"), "--n", "16"], env=env, check=True)
    assert Image.open(tmp_path / "s/samples.png").size == (4 * 130 + 2, 4 * 130 + 2)  # 16 tiles of 128 px
    # the report scores the run as jobs.evaluate does (RUN/eval/metrics.json)
    run(["-m", "jobs.compare", str(tmp_path / "run"), "--n", "16", "--out", str(tmp_path / "report.html")], env=env,
        check=True)
    assert json.loads((tmp_path / "run/eval/metrics.json").read_text())["model"]["fid"] > 0
    html = (tmp_path / "report.html").read_text()
    sizes = {Image.open(io.BytesIO(base64.b64decode(b))).size[0]
             for b in re.findall(r"src='data:image/png;base64,([^']+)'", html)}
    assert any(w >= 4 * 128 for w in sizes), sizes  # a sample grid of 128 px images
