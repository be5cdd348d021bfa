"""The one training loop, run as users run it: exact resume, real DDP, signals, non-finite
losses, checkpoint safety and W&B offline runs."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    NO_CLUSTERS,
    ROOT,
    TINY,
    assert_same,
    launch2,
    metrics,
    process_running,
    run,
    state_files,
    train_cmd,
    wait_for_step,
)
from wandb_records import history, run_id


@pytest.mark.parametrize("preset,extra", [
    ("gan", ["--model.diffaug", "color", "translation", "cutout", "--model.r1_gamma", "1", "--model.r1_every", "2",
             "--data.hflip"]),
    ("vae", ["--optim.warmup_steps", "30"]),  # the LR still ramps across the resume point
    # BatchNorm in D, DiffAugment, LeCam's running means, ADA's strength, D's decoder
    ("gan-small-data", ["--model.lecam", "0.3", "--model.ada_target", "0.6", "--model.d_reconstruct", "1"]),
])
def test_resume_is_bit_identical(mnist_shards, tmp_path, preset, extra):
    """k steps + resume + k steps == 2k steps: weights, EMA, optimizer, RNG; and the batches,
    epoch and learning rate after the resume point (240 samples / 16 = 15 steps per epoch)."""
    common = ["--train.steps", "40", "--train.log_every", "1", "--train.ckpt_every", "20", "--train.sample_every", "100",
              "--log.wandb", "off", "--data.workers", "2", "--data.shuffle_buffer", "64", *extra]
    run(train_cmd(mnist_shards, tmp_path / "straight", *common, preset=preset), check=True)
    first = run(train_cmd(mnist_shards, tmp_path / "resumed", *common[:-len(extra) or None], "--train.steps", "20",
                          *extra, preset=preset), check=True)
    assert "done at step 20" in first.stdout
    again = run(train_cmd(mnist_shards, tmp_path / "resumed", *common, preset=preset), check=True)
    assert "resumed from" in again.stderr and "checkpoint-0000020" in again.stderr
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == list(range(1, 41))
    def same_run(a, b):  # all but timings and the bytes each session's loader read
        skip = ("perf/", "time/", "data/read_MB")
        assert {k: v for k, v in a.items() if not k.startswith(skip)} == {k: v for k, v in b.items() if not k.startswith(skip)}
    for a, b in zip(straight[20:], resumed[20:]):
        same_run(a, b)
    # the resume point lies inside the second epoch of the data stream, not at a boundary
    loop_state = torch.load(tmp_path / "resumed/checkpoints/checkpoint-0000020/custom_checkpoint_1.pkl",
                            weights_only=False) if preset == "gan" else None
    if loop_state:
        positions = loop_state["data"][0]["positions"]
        assert {p["epoch"] for p in positions.values()} == {1} and all(p["offset"] > 0 for p in positions.values())
    assert straight[19]["data/epoch"] == 1
    assert_same(state_files(tmp_path / "straight/checkpoints/checkpoint-0000040"),
                state_files(tmp_path / "resumed/checkpoints/checkpoint-0000040"))
    if preset == "gan":  # the on-device data path: the same run, and it resumes the workers' checkpoint
        shutil.copytree(tmp_path / "resumed/checkpoints/checkpoint-0000020", tmp_path / "device/checkpoints/checkpoint-0000020")
        run(train_cmd(mnist_shards, tmp_path / "device", *common, "--data.device_data", "on", preset=preset), check=True)
        for a, b in zip(straight[20:], metrics(tmp_path / "device")):
            same_run(a, b)
        assert_same(state_files(tmp_path / "straight/checkpoints/checkpoint-0000040"),
                    state_files(tmp_path / "device/checkpoints/checkpoint-0000040"))
    # the test can fail: another seed gives other weights
    run(train_cmd(mnist_shards, tmp_path / "seed1", *common, "--train.seed", "1", preset=preset), check=True)
    with pytest.raises(AssertionError):
        assert_same(state_files(tmp_path / "straight/checkpoints/checkpoint-0000040"),
                    state_files(tmp_path / "seed1/checkpoints/checkpoint-0000040"))


DDP_CASES = {
    "fp32": ["--train.mixed_precision", "no"],
    "bf16": ["--train.mixed_precision", "bf16"],
    # D runs twice per step (BatchNorm in D), its decoder in the first pass only; LeCam's running
    # means and ADA's strength stay the same on both ranks
    "batchnorm-d-lecam-ada": ["--train.mixed_precision", "no", "--model.arch", "dcgan", "--model.d-batchnorm",
                              "--model.no-spectral-norm", "--model.lecam", "0.3", "--model.diffaug", "color",
                              "translation", "--model.ada_target", "0.6", "--model.ada_kimg", "1",
                              "--model.d_reconstruct", "1"],
    # torch.compile under DDP (tests/test_compile.py: the compiled step itself), the gradients
    # all-reduced as bf16 (--train.ddp_comm_hook): the ranks still agree bit for bit
    "compile-bf16-hook": ["--train.mixed_precision", "no", "--train.compile", "--train.ddp_comm_hook", "bf16"],
}


@pytest.fixture(scope="module")
def ddp_runs(mnist_shards, tmp_path_factory):
    """Every case of DDP_CASES trained under 2 ranks in one launch (tests/train_ranks.py --case)."""
    root = tmp_path_factory.mktemp("ddp-cases")
    cases = [arg for name, extra in DDP_CASES.items() for arg in (
        "--case", name, "--preset", "gan", "--data", str(mnist_shards), "--train.run_dir", str(root / name), *TINY,
        "--train.steps", "6", "--log.wandb", "off", "--train.grad_accum", "2", *extra)]
    proc = run([*launch2(), str(ROOT / "tests" / "train_ranks.py"), str(root / "ranks.json"), *cases], timeout=600)
    report = json.loads((root / "ranks.json").read_text()) if (root / "ranks.json").is_file() else {}
    return root, proc, report


@pytest.mark.parametrize("case", list(DDP_CASES))
def test_ddp_two_processes_keep_identical_weights(ddp_runs, case):
    root, proc, result = ddp_runs[0], ddp_runs[1], ddp_runs[2].get(case)
    assert result, f"the launch stopped before {case}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert result["step"] == 6 and result["world_size"] == 2
    assert result["identical"], result["max_diff"]  # every weight, buffer and EMA weight, bit for bit
    assert all(result["moved"].values()), result["moved"]  # and they trained
    assert (root / case / "samples/step-0000006.png").is_file()
    # train() leaves nothing holding the process group: its gloo threads end with it, not during
    # interpreter exit, where they can abort the process
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [t for t in result["threads_after_destroy"] if "gloo" in t], result["threads_after_destroy"]


ACCUM_CASES = {"gan-alternating-hinge": ("gan", "alternating", "hinge"), "gan-simultaneous-nonsat": ("gan", "simultaneous", "nonsat"),
               "vae": ("vae", "alternating", "hinge")}


@pytest.fixture(scope="module")
def accum_reports(mnist_shards, tmp_path_factory):
    """accum_ranks.py over every case of ACCUM_CASES, as one process and under 2 DDP ranks: one launch each."""
    root, reports = tmp_path_factory.mktemp("accum"), {}
    cases = [arg for name, (preset, update, loss) in ACCUM_CASES.items() for arg in (
        "--case", name, "--preset", preset, "--data", str(mnist_shards), "--k", "3", "--b", "8", "--gan-update", update,
        "--gan-loss", loss)]
    for ranks in (1, 2):
        out = root / f"accum-{ranks}.json"
        proc = run([*(launch2() if ranks == 2 else []), str(ROOT / "tests" / "accum_ranks.py"), str(out), *cases],
                   timeout=600)
        reports[ranks] = proc, json.loads(out.read_text()) if out.is_file() else {}
    return reports


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("case", list(ACCUM_CASES))
def test_grad_accumulation_gives_the_big_batch_gradients(accum_reports, case, ranks):
    """grad_accum 3 at batch 8 == one batch of 24 (48 under 2 ranks), against gradients written out
    from the loss formulas in accum_ranks.py; GAN alternating (hinge): D steps once, then G through
    the updated D; simultaneous (nonsat, the gan preset's): both from one forward, G's gradient out
    of D's one backward pass; under DDP no all-reduce happens before the last micro-batch (no_sync)."""
    proc, reports = accum_reports[ranks]
    report = reports.get(case)
    assert report, f"accum_ranks.py stopped before {case}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    modules = ["D", "G"] if ACCUM_CASES[case][0] == "gan" else ["vae"]
    assert report["steps"] == {m: 1 for m in modules}  # one optimizer step per phase, not one per micro-batch
    for m in modules:
        assert report[f"rel_err_{m}"] < 1e-4, report  # dropping a micro-batch gives ~0.5 here
        if ranks == 2:
            assert report["reduces"][m] and all(r == 3 for r in report["reduces"][m]), report  # the 3rd of 3 only
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_sigterm_saves_then_resume_continues(mnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    # check_every far away: a lone process stops at the step after the signal, not at the next check
    cmd = [sys.executable, *train_cmd(mnist_shards, run_dir, *NO_CLUSTERS, "--train.steps", "100000",
                                      "--train.log_every", "2", "--log.wandb", "off", "--train.ckpt_every", "100000",
                                      "--train.check_every", "5000")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for_step(run_dir, 4, process_running(proc))
    proc.send_signal(signal.SIGTERM)
    logged = metrics(run_dir)[-1]["step"]  # a step the run had finished before the signal
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal" in out and "Traceback" not in err
    step = int(re.search(r"stopped by signal 15 at step (\d+):", out).group(1))
    assert logged <= step < 5000, (logged, step)
    assert (run_dir / f"checkpoints/checkpoint-{step:07d}/meta.json").is_file()
    again = run(train_cmd(mnist_shards, run_dir, *NO_CLUSTERS, "--train.steps", str(step + 3), "--log.wandb", "off"),
                check=True)
    assert f"at step {step}" in again.stderr and f"done at step {step + 3}" in again.stdout


def test_stop_signal_to_one_rank_stops_both(mnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    out = tmp_path / "ranks.json"
    args = ["--preset", "gan", "--data", str(mnist_shards), "--train.run_dir", str(run_dir), *TINY, *NO_CLUSTERS,
            "--train.steps", "100000", "--train.log_every", "2", "--log.wandb", "off", "--train.ckpt_every", "100000",
            "--data.workers", "0"]
    launcher = subprocess.Popen([sys.executable, *launch2(), str(ROOT / "tests" / "train_ranks.py"), str(out), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for_step(run_dir, 4, process_running(launcher))
    ranks = {}
    for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        ranks[env.get("RANK")] = int(pid)
    os.kill(ranks["1"], signal.SIGUSR2)   # only rank 1 hears it
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, err[-3000:]
    result = json.loads(out.read_text())
    assert result["identical"] and result["step"] < 100000
    assert (run_dir / f"checkpoints/checkpoint-{result['step']:07d}/meta.json").is_file()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(mnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    common = ["--log.wandb", "off", "--train.ckpt_every", "2", "--optim.grad_clip", "0", "--data.workers", "0"]
    run(train_cmd(mnist_shards, run_dir, *common, "--train.steps", "4", preset="vae"), check=True)
    proc = run(train_cmd(mnist_shards, run_dir, *common, "--train.steps", "10", "--optim.lr", "30", preset="vae"))
    assert proc.returncode == 3
    errors = [l for l in proc.stderr.splitlines() if "error:" in l]
    # step 6 would have been saved; the message names the last good checkpoint
    assert len(errors) == 1 and "non-finite loss at step 6" in errors[0] and "checkpoint-0000004" in errors[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-0000002", "checkpoint-0000004"]
    # the last good checkpoint still resumes
    ok = run(train_cmd(mnist_shards, run_dir, *common, "--train.steps", "6", preset="vae"), check=True)
    assert "done at step 6" in ok.stdout


def test_torn_checkpoints_ignored_pruning_and_incompatible_config(mnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    common = ["--log.wandb", "off", "--train.ckpt_every", "2", "--train.keep_last", "2", "--data.workers", "0"]
    run(train_cmd(mnist_shards, run_dir, *common, "--train.steps", "6"), check=True)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-0000004", "checkpoint-0000006"]
    (ckpts / "checkpoint-0000099").mkdir()                       # killed before meta.json
    shutil.copytree(ckpts / "checkpoint-0000006", ckpts / ".tmp-checkpoint-0000100")  # killed before rename
    proc = run(train_cmd(mnist_shards, run_dir, *common, "--train.steps", "8"), check=True)
    assert "resumed from" in proc.stderr and "checkpoint-0000006 at step 6" in proc.stderr
    meta = json.loads((ckpts / "checkpoint-0000008/meta.json").read_text())
    assert meta["deepgen_version"] and meta["config"]["train"]["steps"] == 8 and meta["step"] == 8
    proc = run(train_cmd(mnist_shards, run_dir, *common, "--train.steps", "10", "--model.latent_dim", "16"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "incompatible" in line[0] and "model.latent_dim=128" in line[0]


def test_wandb_offline_run_continues_across_resume(mnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    common = ["--train.log_every", "2", "--train.sample_every", "4", "--train.ckpt_every", "4", "--data.workers", "0",
              "--log.project", "deepgen-test"]
    run(train_cmd(mnist_shards, run_dir, *common, "--train.steps", "4"), env={"WANDB_MODE": "offline"}, check=True)
    run(train_cmd(mnist_shards, run_dir, *common, "--train.steps", "8"), env={"WANDB_MODE": "offline"}, check=True)
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2
    assert run_id(files[0]) == run_id(files[1]) == json.loads(
        (run_dir / "checkpoints/checkpoint-0000008/meta.json").read_text())["wandb_run_id"]
    steps = [s for f in files for s, _ in history(f)]
    assert steps == [2, 4, 6, 8]                          # one run, steps only increase
    keys = set().union(*(row.keys() for f in files for _, row in history(f)))
    assert {"train/loss_d", "train/loss_g", "lr/G", "lr/D", "perf/img_per_s", "data/epoch"} <= keys
    assert any(k.startswith("samples") for k in keys)
    assert len(list(run_dir.glob("wandb/offline-run-*/files/media/images/samples_*.png"))) == 2


def test_wandb_without_key_falls_back_offline_with_one_warning(mnist_shards, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HOME=str(tmp_path), WANDB_API_KEY="")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, *train_cmd(mnist_shards, run_dir, *NO_CLUSTERS, "--train.steps", "2", "--data.workers", "0")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("W&B: no API key") == 1
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    # a key that exists but cannot reach the server: offline too, and the key is never shown
    env["WANDB_API_KEY"] = "local-0123456789abcdef0123456789abcdef01234567"
    proc = subprocess.run(cmd[:-4] + ["--train.steps", "3", "--data.workers", "0"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0123456789abcdef" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("preset,extra", [
    ("seed-gan", ["--train.batch_size", "32"]),
    ("seed-vae", []),
    ("gan", ["--model.conditional"]),
    ("gan", ["--model.arch", "deep", "--model.conditional"]),
    ("vae", ["--model.conditional", "--model.likelihood", "bernoulli"]),
    ("seed-vae", ["--model.conditional"]),
    ("gan", ["--model.self_condition", "5"]),
    # bf16 on any CPU: the grid drawn in training is the checkpoint's fp32 one (the sampler drops
    # Accelerate's autocast wrapper); auto: bf16 on AMX, else fp32
    ("gan", ["--train.mixed_precision", "bf16", "--model.g_image_layer", "deconv"]),
    ("gan", ["--train.mixed_precision", "auto"]),
])
def test_presets_train_and_sample(mnist_shards, tmp_path, preset, extra):
    """Each preset trains (every module's weights moved from the initial ones, which are rebuilt
    here from the seed), and its last grid is what a user gets from the checkpoint: the same
    latents and labels through gen.load_generator redraw it pixel for pixel."""
    import numpy as np
    from accelerate.utils import set_seed
    from PIL import Image

    from gen import load_generator
    from gen.config import parse
    from gen.families import build_family
    from gen.sample import save_grid
    from gen.train import train
    cfg = parse(["--preset", preset, "--data", str(mnist_shards), "--train.run_dir", str(tmp_path / "r"),
                 "--model.width", "8", "--train.steps", "3", "--log.wandb", "off", "--data.workers", "0", *extra])
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)  # one precision per process: this worker's earlier runs may differ
    result = train(cfg)
    AcceleratorState._reset_state(True)
    grid = tmp_path / "r/samples/step-0000003.png"
    assert result.step == 3 and grid.is_file()
    assert json.loads((tmp_path / "r/config.json").read_text())["model"]["family"] == cfg.model.family
    set_seed(cfg.train.seed)
    initial = build_family(cfg.model, cfg.optim, (1, 28, 28), 10).modules
    for name, module in result.modules.items():
        moved = [not torch.equal(a, b) for a, b in zip(module.state_dict().values(), initial[name].state_dict().values())]
        assert any(moved), name
    g = load_generator(tmp_path / "r")
    n = cfg.log.num_samples
    save_grid(g.sample(n, seed=cfg.train.seed), tmp_path / "again.png")  # classes in turn, or clusters by size
    shown = np.asarray(Image.open(grid)).astype(int)
    again = np.asarray(Image.open(tmp_path / "again.png")).astype(int)
    # (the loop's copy may run channels_last, the loaded one contiguous: a rounding apart at most)
    assert np.abs(again - shown).max() <= 1 and np.abs(again - shown).mean() < 0.01
    assert shown.std() > 3  # not a blank page


def test_config_presets_overrides_and_short_aliases():
    from gen.config import parse
    cfg = parse(["--preset", "seed-vae", "--data", "d", "--train.batch_size", "256", "--model.conditional"])
    assert (cfg.model.family, cfg.model.latent_dim, cfg.train.batch_size, cfg.data.path, cfg.model.conditional) == \
        ("vae", 2, 256, "d", True)
    short = parse(["--wandb", "off", "--resume", "none", "--mixed_precision", "bf16"])
    long = parse(["--log.wandb", "off", "--train.resume", "none", "--train.mixed-precision", "bf16"])
    assert short == long and (short.log.wandb, short.train.resume, short.train.mixed_precision) == ("off", "none", "bf16")
    assert parse([]).log.wandb == "auto"


def test_seed_ports_match_the_originals():
    """Layer shapes of the Keras models the users started from."""
    from gen import nets
    g, d = nets.SeedGenerator(64), nets.SeedDiscriminator()
    assert [tuple(p.shape) for p in g.parameters()] == [(3136, 64), (3136,), (64, 64, 3, 3), (64,), (64, 32, 3, 3),
                                                        (32,), (32, 1, 3, 3), (1,)]
    assert d.out.in_features == 6 * 6 * 64                 # two 'valid' stride-2 convs: 28 -> 13 -> 6
    enc, dec = nets.SeedEncoder(2), nets.SeedDecoder(2)
    assert enc.out.out_features == 4 and dec.net[0].out_features == 7 * 7 * 32
    z = torch.randn(3, 64)
    assert g(z).shape == (3, 1, 28, 28) and g(z).min() >= -1 and d(g(z)).shape == (3,)


def test_dcgan_generator_image_layer():
    """conv (the gan preset's): the layers its checkpoints hold, a 3x3 conv writing the image from
    a full-size map of `width` channels; deconv (DCGAN's): the last transposed conv writes the
    image, and no activation of full size has more channels than the image."""
    from gen import nets
    conv, deconv = nets.DCGenerator(128, 1, 28, 16), nets.DCGenerator(128, 1, 28, 16, image_layer="deconv")
    assert [tuple(p.shape) for p in conv.parameters()] == [
        (3136, 128), (3136,), (64,), (64,), (64, 32, 4, 4), (32,), (32,), (32,), (32, 16, 4, 4), (16,), (16,), (16,),
        (1, 16, 3, 3), (1,)]
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:]))) for m in deconv.net]
    out = deconv(torch.randn(4, 128))
    for h in hooks:
        h.remove()
    assert out.shape == (4, 1, 28, 28) and out.abs().max() <= 1
    assert max(c for c, *hw in shapes if hw == [28, 28]) == 1 and (32, 14, 14) in shapes
    assert isinstance(deconv.net[-2], torch.nn.ConvTranspose2d)


def test_skip_layer_excitation_is_fastgans_gate():
    """FastGAN's SLE (Liu et al. 2021, their `SEBlock`): the 4 px map gates the 32 px one and the
    8 px map the 64 px one, big * sigmoid(conv1x1(swish(conv4x4(avgpool4(small))))), written out here
    with torch.nn.functional over the generator's own layers; off, the generator is the plain DCGAN G."""
    import torch.nn.functional as F

    from gen import nets
    torch.manual_seed(0)
    G = nets.DCGenerator(128, 3, 64, 8, skip_excitation=True).eval()
    for m in G.modules():  # BatchNorm's running statistics away from 0/1, so a wrong map shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)

    def gate(excite, small, big):
        c1, c2 = excite.gate[1].weight, excite.gate[3].weight
        return big * torch.sigmoid(F.conv2d(F.silu(F.conv2d(F.adaptive_avg_pool2d(small, 4), c1)), c2))

    z = torch.randn(5, 128)
    h, maps = z, []
    for layer in G.net:
        h = layer(h)
        if isinstance(layer, torch.nn.ReLU):  # each level's map ends with a ReLU: 4, 8, 16, 32, 64 px
            if len(maps) in (3, 4):
                h = gate(G.excite[str(len(maps))], maps[len(maps) - 3], h)
            maps.append(h)
    assert [m.shape[-1] for m in maps] == [4, 8, 16, 32, 64]
    with torch.no_grad():
        assert torch.allclose(G(z), h, atol=1e-6) and not torch.allclose(G(z), G.net(z), atol=1e-3)
    plain = nets.DCGenerator(128, 3, 64, 8)
    assert len(plain.excite) == 0 and plain.state_dict().keys() == {k for k in G.state_dict() if "excite" not in k}


def test_self_supervised_d_rebuilds_the_reals_it_sees(mnist_shards):
    """--model.d_reconstruct (FastGAN's self-supervised D): D's gradient in the loop's step equals
    the reference written out here, BCE plus w * MSE(decoder(D's 14 px map of the real batch),
    the real batch average-pooled to 14 px); no decoder without it, the same weights otherwise;
    switching it on over a run without it is refused, a new weight is not."""
    import copy

    import torch.nn.functional as F

    from gen import checkpoint
    from gen.config import parse, to_dict
    from gen.data import make_loader
    from gen.families import build_family
    x = next(iter(make_loader(mnist_shards, 16, workers=0)[0]))["image"]
    same = ["--preset", "gan-small-data", "--data", str(mnist_shards), "--model.width", "8", "--model.diffaug",
            "--model.lecam", "0"]
    cfg = parse([*same, "--model.d_reconstruct", "2.0"])
    torch.manual_seed(0)
    family = build_family(cfg.model, cfg.optim, (1, 28, 28), 0)
    G, D = (copy.deepcopy(family.modules[n]) for n in ("G", "D"))
    got = d_gradients_of_one_step(family, x)

    torch.manual_seed(7)  # the reference: the same noise, D on each set alone (BatchNorm in D)
    fake = G(torch.randn(len(x), cfg.model.latent_dim)).detach()
    middle = D.features[:D.middle](x)
    assert middle.shape[-1] == 14
    rebuilt = D.decoder(middle)
    real_logits, fake_logits = D(x), D(fake)
    bce = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    rec = (rebuilt - F.avg_pool2d(x, 2)).pow(2).mean()
    want = torch.autograd.grad(bce + 2.0 * rec, list(D.parameters()))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), float((g - w).abs().max())
    decoder_grads = [g for (name, _), g in zip(D.named_parameters(), got) if name.startswith("decoder")]
    assert decoder_grads and all(g.abs().sum() > 0 for g in decoder_grads)  # the decoder is trained

    def fresh_d(model_cfg):
        torch.manual_seed(0)
        return build_family(model_cfg, cfg.optim, (1, 28, 28), 0).modules["D"].state_dict()
    plain, with_decoder = fresh_d(parse(same).model), fresh_d(cfg.model)  # off: no decoder, the same D
    assert plain.keys() == {k for k in with_decoder if not k.startswith("decoder")} != with_decoder.keys()
    assert all(torch.equal(v, with_decoder[k]) for k, v in plain.items())

    meta = {"config": to_dict(parse(same)), "shape": [1, 28, 28], "num_classes": 0}
    with pytest.raises(checkpoint.CheckpointError, match="d_reconstruct"):
        checkpoint.check_compatible(meta, to_dict(cfg), (1, 28, 28), 0, "ckpt")
    meta["config"] = to_dict(parse([*same, "--model.d_reconstruct", "1"]))
    assert checkpoint.check_compatible(meta, to_dict(cfg), (1, 28, 28), 0, "ckpt") == ["model.d_reconstruct 1.0 -> 2.0"]


def test_ada_strength_follows_the_sign_of_ds_real_logits():
    """--model.ada_target (ADA, Karras et al. 2020): every 256 real images p moves by
    images / (ada_kimg * 1000) up when E[sign(D(real))] is above the target, down when below,
    within [0, 1] (the formula written out here); each DiffAugment op then acts on a share p of
    the images (counted), none at p = 0, all at p = 1; switching it on over a run without it is
    refused, a new target is not."""
    from gen.augment import diff_augment
    from gen.regularisers import adapt_strength
    ada = torch.tensor([0.5, 0.0, 0.0])
    mostly_real = torch.tensor([1.0] * 40 + [-1.0] * 24)  # r = 0.25 < 0.6: D not overfitting
    for call in range(4):
        adapt_strength(ada, mostly_real, 0.6, 10)
        if call < 3:  # 64, 128, 192 images: not yet
            assert ada[0] == 0.5 and ada[2] == 64 * (call + 1) and ada[1] == 16 * (call + 1)
    assert torch.allclose(ada, torch.tensor([0.5 - 256 / 10_000, 0, 0]))
    for _ in range(4):
        adapt_strength(ada, torch.ones(64), 0.6, 10)  # r = 1 > 0.6: up
    assert torch.allclose(ada, torch.tensor([0.5, 0, 0]))
    ada[0] = 0.99
    for _ in range(4):
        adapt_strength(ada, torch.ones(64), 0.6, 1)
    assert ada[0] == 1.0  # clamped

    torch.manual_seed(0)
    gray = torch.zeros(4000, 3, 8, 8)  # only brightness changes a gray image (saturation, contrast keep it)
    changed = lambda p: float((diff_augment(gray, ("color",), torch.tensor(p)) != gray).flatten(1).any(1).float().mean())  # noqa: E731
    assert changed(0.0) == 0 and changed(1.0) == 1
    assert abs(changed(0.3) - 0.3) < 0.03  # 4 sigma of a binomial share over 4,000 images

    # p is state (a buffer of D): on/off is structural for a resume, another target a loss setting
    from gen import checkpoint
    from gen.config import parse, to_dict
    same = ["--preset", "gan-small-data", "--model.width", "8"]
    cfg = to_dict(parse([*same, "--model.ada_target", "0.6"]))
    meta = {"config": to_dict(parse(same)), "shape": [1, 28, 28], "num_classes": 0}
    with pytest.raises(checkpoint.CheckpointError, match="ada_target"):
        checkpoint.check_compatible(meta, cfg, (1, 28, 28), 0, "ckpt")
    meta["config"] = to_dict(parse([*same, "--model.ada_target", "0.5"]))
    assert checkpoint.check_compatible(meta, cfg, (1, 28, 28), 0, "ckpt") == ["model.ada_target 0.5 -> 0.6"]


def test_mixed_precision_auto_follows_the_cpu():
    """auto = bf16 exactly where the kernel reports AMX tiles (/proc/cpuinfo, read here), else fp32."""
    from gen.train import resolve_precision
    flags = set(" ".join(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split())
    assert resolve_precision("auto", cpu=True) == ("bf16" if "amx_tile" in flags else "no")
    assert [resolve_precision(p, cpu=True) for p in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]


def test_damaged_shards_do_not_stop_training(mnist_shards, tmp_path):
    from helpers import damage
    shards = damage(mnist_shards, tmp_path / "damaged")
    run_dir = tmp_path / "run"
    run(train_cmd(shards, run_dir, "--train.steps", "30", "--train.log_every", "10", "--log.wandb", "off"), check=True)
    assert metrics(run_dir)[-1]["data/skipped"] >= 2


def test_bad_options_are_one_line_errors(mnist_shards, tmp_path):
    proc = run(["-m", "jobs.train", "--data", str(tmp_path / "nowhere"), "--log.wandb", "off"])
    assert proc.returncode == 1 and "python -m data_prep" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(["-m", "jobs.train", "--data", str(mnist_shards), "--train.mixed_precision", "fp8"])
    assert proc.returncode == 2 and "fp8" in proc.stderr


def test_sampling_and_export_read_no_pickle(mnist_shards, tmp_path):
    """Sampling needs only meta.json + sampling.safetensors (a copy holding nothing else works),
    opens no pickle file and unpickles nothing; the export folder holds no pickle and gives the
    same images as the checkpoint it came from."""
    run(train_cmd(mnist_shards, tmp_path / "run", "--train.steps", "4", "--train.ckpt_every", "4", "--log.wandb", "off"),
        check=True)
    ckpt = tmp_path / "run/checkpoints/checkpoint-0000004"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["sampling_weights"] == "sampling.safetensors"
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("meta.json", "sampling.safetensors"):
        shutil.copy(ckpt / name, bare / name)
    record = tmp_path / "audit.json"
    run([str(ROOT / "tests" / "audit_files.py"), str(record), "jobs.sample", str(bare), "--out", str(tmp_path / "s")],
        check=True)
    audit = json.loads(record.read_text())
    assert audit["code"] == 0 and audit["unpickled"] == []
    read_from_ckpt = [f for f in audit["opened"] if f.startswith(str(bare))]
    # meta.json, and the safetensors as bytes for its sha256 (its tensors are mmapped): nothing else
    assert read_from_ckpt and all(f.endswith((".json", ".safetensors")) for f in read_from_ckpt), read_from_ckpt
    assert not [f for f in audit["opened"] if f.endswith((".pkl", ".bin", ".pt"))]
    from PIL import Image
    assert Image.open(tmp_path / "s/samples.png").size[0] > 28

    run(["-m", "jobs.export", str(tmp_path / "run"), "--out", str(tmp_path / "export")], check=True)
    files = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert files == ["README.md", "config.json", "generator.safetensors", "samples.png"], files
    assert "load_generator" in (tmp_path / "export/README.md").read_text()
    import gen
    a = gen.load_generator(tmp_path / "export").sample(8, seed=3)
    b = gen.load_generator(ckpt).sample(8, seed=3)
    assert a.shape == (8, 1, 28, 28) and torch.equal(a, b)
    # the EMA weights are the ones exported: they differ from the raw generator's
    from safetensors.torch import load_file
    raw = load_file(ckpt / "model.safetensors")
    exported = load_file(tmp_path / "export/generator.safetensors")
    assert exported.keys() == raw.keys() and any(not torch.equal(exported[k], raw[k]) for k in raw)
    refused = run(["-m", "jobs.export", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "not an empty folder" in refused.stderr


def test_seed_steps_equal_the_notebook_and_tutorial_steps(mnist_shards):
    """One optimizer step of seed-gan and of seed-vae through the loop's phase runner equals the
    originals' step written out here (Keras notebook: one forward, both losses from the same
    logits, each tape's gradients applied at once with Adam / RMSprop(rho 0.9); TF CVAE tutorial:
    single-sample MC ELBO on binarised pixels): same gradients, same weights after the step.
    seed-gan with --model.one-backward (G's gradient taken from D's one backward pass, rescaled per
    image) must equal the two tapes' gradients too."""
    import copy
    import math

    import torch.nn.functional as F
    from accelerate import Accelerator

    from gen.config import parse
    from gen.data import make_loader
    from gen.families import build_family
    from gen.step import prepare, run_phases
    loader, _, _ = make_loader(mnist_shards, 16, workers=0)
    x = next(iter(loader))["image"]
    acc = Accelerator(cpu=True)
    for preset, extra in (("seed-gan", []), ("seed-gan", ["--model.one-backward"]), ("seed-vae", [])):
        cfg = parse(["--preset", preset, "--data", str(mnist_shards), *extra])
        torch.manual_seed(0)
        family = build_family(cfg.model, cfg.optim, (1, 28, 28), 10)
        if preset == "seed-gan":
            assert family.phases(0)[0].shared == bool(extra)  # the path under test is the one taken
        initial = {n: copy.deepcopy(m) for n, m in family.modules.items()}
        prepared = prepare(acc, family)
        grads = {}
        for n, opt in prepared.optimizers.items():
            opt.optimizer.register_step_pre_hook(
                lambda o, a, k, n=n: grads.__setitem__(n, [None if p.grad is None else p.grad.clone()
                                                           for p in family.modules[n].parameters()]))
        torch.manual_seed(7)
        run_phases(family, prepared, [{"image": x, "label": torch.zeros(len(x), dtype=torch.long)}], 0, acc, 0.0)

        torch.manual_seed(7)  # the same noise, drawn as the originals draw it
        if preset == "seed-gan":
            G, D = initial["G"], initial["D"]
            z = torch.randn(len(x), 64)
            x_gen = G(z)
            logits_x, logits_gen = D(x), D(x_gen)
            bce = F.binary_cross_entropy_with_logits
            disc_loss = bce(logits_x, torch.ones_like(logits_x)) + bce(logits_gen, torch.zeros_like(logits_gen))
            gen_loss = bce(logits_gen, torch.ones_like(logits_gen))
            want = {"G": torch.autograd.grad(gen_loss, list(G.parameters()), retain_graph=True),
                    "D": torch.autograd.grad(disc_loss, list(D.parameters()))}
            optimizers = {"G": torch.optim.Adam(G.parameters(), 1e-3, betas=(0.5, 0.999), eps=1e-7),
                          "D": torch.optim.RMSprop(D.parameters(), 5e-3, alpha=0.9, eps=1e-7)}
        else:
            vae = initial["vae"]
            xb = (x > 0).float()  # np.where(x > .5, 1, 0) on [0, 1] images
            mean, logvar = vae.encoder(xb * 2 - 1)
            z = torch.randn(len(x), 2) * torch.exp(logvar * 0.5) + mean
            x_logit = vae.decoder(z)
            logpx_z = -F.binary_cross_entropy_with_logits(x_logit, xb, reduction="none").sum(dim=[1, 2, 3])
            log_normal = lambda s, m, lv: (-0.5 * ((s - m) ** 2 * torch.exp(-lv) + lv + math.log(2 * math.pi))).sum(1)  # noqa: E731
            loss = -(logpx_z + log_normal(z, torch.zeros_like(z), torch.zeros_like(z)) - log_normal(z, mean, logvar)).mean()
            used = [p for p in vae.parameters() if p is not vae.log_sigma]  # the Bernoulli model has no sigma
            want = {"vae": torch.autograd.grad(loss, used)}
            optimizers = {"vae": torch.optim.Adam(used, 1e-4, betas=(0.9, 0.999), eps=1e-7)}
        for n, ref in want.items():
            got = [g for g, p in zip(grads[n], family.modules[n].parameters())
                   if not (n == "vae" and p is family.modules[n].log_sigma)]
            for g, r in zip(got, ref):
                assert torch.allclose(g, r, rtol=1e-4, atol=1e-6), (preset, n, float((g - r).abs().max()))
            for p_, r in zip([p for p in initial[n].parameters() if not (n == "vae" and p is initial[n].log_sigma)], ref):
                p_.grad = r
            optimizers[n].step()
            # a first RMSprop/Adam step is ~lr * sign(g): tiny gradients make it sensitive to float noise,
            # so the weights agree to a small share of one step (the gradients above agree to 1e-4)
            for a, b in zip(family.modules[n].state_dict().values(), initial[n].state_dict().values()):
                lr = cfg.optim.lr_d if n == "D" else cfg.optim.lr
                assert (a - b).abs().max() < 0.01 * lr, (preset, n, float((a - b).abs().max()))



def d_gradients_of_one_step(family, x):
    """D's gradients in the loop's own step (gen.step.run_phases) on batch x, with noise seed 7,
    read just before D's optimizer steps."""
    from accelerate import Accelerator

    from gen.step import prepare, run_phases
    prepared = prepare(Accelerator(cpu=True), family)
    got = {}
    prepared.optimizers["D"].optimizer.register_step_pre_hook(
        lambda o, a, k: got.__setitem__("D", [p.grad.clone() for p in family.modules["D"].parameters()]))
    torch.manual_seed(7)
    run_phases(family, prepared, [{"image": x, "label": torch.zeros(len(x), dtype=torch.long)}], 1, Accelerator(cpu=True),
               0.0)
    return got["D"]


def test_batchnorm_discriminator_sees_reals_and_fakes_apart(mnist_shards):
    """--model.d-batchnorm (DCGAN's D): D's step equals the DCGAN reference written out here, D
    run once on the reals and once on the fakes so that each batch is normalised by its own
    statistics; the one-pass form (reals and fakes normalised together) gives other gradients."""
    import copy

    import torch.nn.functional as F

    from gen.config import parse
    from gen.data import make_loader
    from gen.families import build_family
    x = next(iter(make_loader(mnist_shards, 16, workers=0)[0]))["image"]
    cfg = parse(["--preset", "gan", "--data", str(mnist_shards), "--model.self_condition", "0", "--model.arch", "dcgan",
                 "--model.d-batchnorm",
                 "--model.no-spectral-norm", "--model.gan_loss", "nonsat", "--model.r1_gamma", "0", "--model.width", "8"])
    torch.manual_seed(0)
    family = build_family(cfg.model, cfg.optim, (1, 28, 28), 10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in family.modules["D"].modules())
    G, D = (copy.deepcopy(family.modules[n]) for n in ("G", "D"))
    got = d_gradients_of_one_step(family, x)

    torch.manual_seed(7)  # the reference: the same noise, D on each set alone, BCE on logits
    with torch.no_grad():
        fake = G(torch.randn(len(x), cfg.model.latent_dim))
    loss = F.softplus(-D(x)).mean() + F.softplus(D(fake)).mean()
    want = torch.autograd.grad(loss, list(D.parameters()))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), float((g - w).abs().max())
    real_logits, fake_logits = D(torch.cat([x, fake])).chunk(2)  # one pass: batch statistics shared
    one_pass = torch.autograd.grad(F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean(), list(D.parameters()))
    assert max(float((a - b).abs().max()) for a, b in zip(one_pass, want)) > 1e-3


def test_lecam_regulariser_is_the_papers_and_its_means_are_state(mnist_shards):
    """--model.lecam (Tseng et al. 2021): D's gradient equals the reference written out here, BCE
    plus lambda * (mean (D(x) - a_fake)^2 + mean (D(G(z)) - a_real)^2) with the running means
    before this batch, which then move 1 % toward this batch's means; the means are a buffer of D
    (in checkpoints); switching LeCam on over a run without it is refused, a new weight is not."""
    import copy

    import torch.nn.functional as F

    from gen import checkpoint
    from gen.config import parse, to_dict
    from gen.data import make_loader
    from gen.families import build_family
    x = next(iter(make_loader(mnist_shards, 16, workers=0)[0]))["image"]
    cfg = parse(["--preset", "gan-small-data", "--data", str(mnist_shards), "--model.width", "8", "--model.diffaug",
                 "--model.lecam", "0.5"])
    torch.manual_seed(0)
    family = build_family(cfg.model, cfg.optim, (1, 28, 28), 0)
    means = family.modules["D"].lecam_means
    means.copy_(torch.tensor([0.7, -0.4]))
    assert "lecam_means" in family.modules["D"].state_dict()
    G, D = (copy.deepcopy(family.modules[n]) for n in ("G", "D"))
    got = d_gradients_of_one_step(family, x)

    torch.manual_seed(7)  # the reference: the same noise, D on each set alone (BatchNorm in D)
    fake = G(torch.randn(len(x), cfg.model.latent_dim)).detach()
    real_logits, fake_logits = D(x), D(fake)
    bce = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    lecam = (real_logits - (-0.4)).pow(2).mean() + (fake_logits - 0.7).pow(2).mean()
    want = torch.autograd.grad(bce + 0.5 * lecam, list(D.parameters()))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), float((g - w).abs().max())
    without = torch.autograd.grad(F.softplus(-D(x)).mean() + F.softplus(D(fake)).mean(), list(D.parameters()))
    assert max(float((a - b).abs().max()) for a, b in zip(without, want)) > 1e-3  # the term is there
    expected = 0.99 * torch.tensor([0.7, -0.4]) + 0.01 * torch.stack([real_logits.mean(), fake_logits.mean()]).detach()
    assert torch.allclose(means, expected, atol=1e-6), (means, expected)

    # the running means are state: on/off is structural, another weight is a loss setting
    same = ["--preset", "gan-small-data", "--model.width", "8", "--model.diffaug"]
    meta = {"config": to_dict(parse([*same, "--model.lecam", "0"])), "shape": [1, 28, 28], "num_classes": 0}
    with pytest.raises(checkpoint.CheckpointError, match="lecam"):
        checkpoint.check_compatible(meta, to_dict(cfg), (1, 28, 28), 0, "ckpt")
    meta["config"] = to_dict(parse([*same, "--model.lecam", "0.1"]))
    assert checkpoint.check_compatible(meta, to_dict(cfg), (1, 28, 28), 0, "ckpt") == ["model.lecam 0.1 -> 0.5"]
