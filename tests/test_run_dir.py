"""An existing run dir, as users meet it (issue 37): starting fresh where checkpoints exist, a
refused run, branching off an older checkpoint, a run dir with no checkpoint yet, resuming with
another class count or optimizer, the VAE mixture cache and other shards, and the clocks.
Each of these lost or mixed up work before the rule in gen/checkpoint.plan_resume."""
import json
import time

import pytest
import torch

from helpers import TINY, assert_same, make_mnist_shards, run, state_files
from gen.durable import sha256_file

COMMON = ["--log.wandb", "off", "--data.workers", "0"]


def train_in_process(shards, run_dir, *extra, preset="gan"):
    """jobs.train's main in this process: (exit code, stderr)."""
    import jobs.train
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    return jobs.train.main(["--preset", preset, "--data", str(shards), "--train.run_dir", str(run_dir), *TINY, *COMMON,
                            *extra])


def files_of(folder):
    """{relative path: sha256} of every file under folder: what a refused run must leave as it was."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_starting_fresh_over_checkpoints_refuses_or_moves_the_old_run_aside(mnist_shards, tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    old = ["--train.steps", "30", "--train.ckpt_every", "10", "--train.keep_last", "2"]
    assert train_in_process(mnist_shards, run_dir, *old) == 0
    before = files_of(run_dir)
    capsys.readouterr()
    # the command: --train.resume none over checkpoints 20 and 30 ran, announced checkpoint-0000010
    # and pruned it at once, leaving the old run's metrics for a later `auto` to continue
    new = ["--train.resume", "none", "--train.steps", "10", "--train.seed", "5", "--train.ckpt_every", "10",
           "--train.keep_last", "2"]
    assert train_in_process(mnist_shards, run_dir, *new) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "checkpoint-0000030" in lines[0] and "--train.resume restart" in lines[0], lines
    assert files_of(run_dir) == before  # nothing written, nothing deleted
    # "yes, start over": the old run moved aside whole, the new one has the checkpoint it announced
    assert train_in_process(mnist_shards, run_dir, *new[2:], "--train.resume", "restart") == 0
    assert "done at step 10" in capsys.readouterr().out and "moved aside" in caplog.text
    assert (run_dir / "checkpoints/checkpoint-0000010/meta.json").is_file()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["checkpoint-0000010"]
    aside, = run_dir.glob("replaced-*")
    assert files_of(aside) == before  # every file of the old run, byte for byte
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [10]
    # the restarted run is the run a fresh run dir gives (the old files play no part in it)
    assert train_in_process(mnist_shards, tmp_path / "fresh", *new[2:]) == 0
    assert_same(state_files(run_dir / "checkpoints/checkpoint-0000010"),
                state_files(tmp_path / "fresh/checkpoints/checkpoint-0000010"))
    # the old run is still a run: it samples
    import jobs.sample
    assert jobs.sample.main([str(aside), "--out", str(tmp_path / "old-samples")]) == 0


def test_a_refused_run_writes_nothing(mnist_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_in_process(mnist_shards, run_dir, "--train.steps", "4") == 0
    before = files_of(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    capsys.readouterr()
    # another width: refused in one line, and config.json still says what was trained
    assert train_in_process(mnist_shards, run_dir, "--train.steps", "30", "--model.width", "16") == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "incompatible" in lines[0] and "model.width=8" in lines[0]
    assert files_of(run_dir) == before and not (run_dir / ".lock").exists()
    assert json.loads((run_dir / "config.json").read_text()) == config
    # a refusal in a run dir that did not exist leaves no folder behind
    assert train_in_process(mnist_shards, tmp_path / "new", "--train.resume", str(tmp_path / "nowhere")) == 1
    assert not (tmp_path / "new").exists()


def test_resuming_an_older_checkpoint_keeps_the_newer_timeline_apart(mnist_shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    every = ["--train.ckpt_every", "2", "--train.sample_every", "2", "--train.log_every", "2", "--train.keep_last", "2"]
    assert train_in_process(mnist_shards, run_dir, "--train.steps", "6", *every) == 0
    newer = {p: sha256_file(run_dir / "checkpoints" / p / "model.safetensors") for p in ["checkpoint-0000006"]}
    older = run_dir / "checkpoints/checkpoint-0000004"
    # back to step 4 with a stronger R1 (a loss setting: allowed, and said), on to 8
    assert train_in_process(mnist_shards, run_dir, "--train.steps", "8", *every, "--train.resume", str(older),
                            "--model.r1_gamma", "1") == 0
    assert "another timeline" in caplog.text and "model.r1_gamma 0.1 -> 1.0" in caplog.text
    aside, = run_dir.glob("replaced-*")
    assert {p: sha256_file(aside / "checkpoints" / p / "model.safetensors") for p in newer} == newer
    assert (aside / "samples/step-0000006.png").is_file()
    steps_aside = [json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()]
    assert steps_aside == [2, 4, 6]
    # this timeline: 4 (resumed from) kept, 6 and 8 its own; pruning kept 2 of them and never the new one
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-0000006", "checkpoint-0000008"]
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]


def test_pruning_never_removes_the_new_checkpoint_nor_a_later_one(tmp_path):
    from gen.checkpoint import prunable
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 30):
        (root / f"checkpoint-{step:07d}").mkdir(parents=True)
        (root / f"checkpoint-{step:07d}/meta.json").write_text("{}")
    names = lambda paths: sorted(p.name for p in paths)  # noqa: E731
    assert names(prunable(tmp_path, 6, keep_last=2)) == ["checkpoint-0000002"]  # 4 and 6 kept, 30 is not this run's
    assert names(prunable(tmp_path, 6, keep_last=1)) == ["checkpoint-0000002", "checkpoint-0000004"]
    assert names(prunable(tmp_path, 2, keep_last=1)) == []


def test_a_run_without_a_checkpoint_yet_says_so(mnist_shards, tmp_path, capsys, caplog):
    import jobs.export
    import jobs.sample
    from gen.config import parse
    from gen.train import train

    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt
    cfg = parse(["--preset", "gan", "--data", str(mnist_shards), "--train.run_dir", str(tmp_path / "run"), *TINY,
                 *COMMON, "--train.steps", "100", "--train.ckpt_every", "50"])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=interrupt)
    assert (tmp_path / "run/config.json").is_file() and not (tmp_path / "run/checkpoints").exists()
    capsys.readouterr()
    assert jobs.sample.main([str(tmp_path / "run")]) == 1
    assert jobs.export.main([str(tmp_path / "run"), "--out", str(tmp_path / "e")]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 2 and all("this run has no checkpoint yet" in line for line in lines), lines
    # and the next start moves that run's leftovers aside (they have no checkpoint to continue from)
    assert train_in_process(mnist_shards, tmp_path / "run", "--train.steps", "2") == 0
    assert "no checkpoint to continue from" in caplog.text
    assert (next((tmp_path / "run").glob("replaced-*")) / "config.json").is_file()


def test_another_class_count_or_optimizer_is_incompatible_not_damaged(mnist_shards, digits, tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "two-classes"
    x, y = digits
    for i in range(64):
        (folder / f"c{y[i] % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(folder / f"c{y[i] % 2}" / f"{i}.png")
    run(["-m", "data_prep", "folder", str(folder), "--out", str(tmp_path / "two"), "--size", "28", "--grayscale"],
        check=True)
    run_dir = tmp_path / "run"
    assert train_in_process(mnist_shards, run_dir, "--train.steps", "2", "--model.conditional") == 0
    capsys.readouterr()
    assert train_in_process(tmp_path / "two", run_dir, "--train.steps", "4", "--model.conditional") == 1
    line, = error_lines(capsys.readouterr().err)
    assert "incompatible" in line and "10 classes (this run's data: 2)" in line
    assert train_in_process(mnist_shards, run_dir, "--train.steps", "4", "--model.conditional",
                            "--optim.optimizer_d", "rmsprop") == 1
    line, = error_lines(capsys.readouterr().err)
    assert "incompatible" in line and "optim.optimizer_d='adam'" in line


def test_a_vae_mixture_for_other_shards_is_fitted_on_those(mnist_shards, digits, tmp_path):
    from gen import latent_prior
    from gen.data import load_real
    from gen.sample import load_generator
    others = [make_mnist_shards(tmp_path / f"other{i}", (digits[0][1000 * i:], digits[1][1000 * i:]), 240, 60,
                                shard_size=120) for i in (1, 2)]
    assert train_in_process(mnist_shards, tmp_path / "run", "--train.steps", "2", preset="vae") == 0
    own = load_generator(tmp_path / "run").prior  # the checkpoint's own mixture
    for other in others:  # each set of other shards gets a mixture of its own (was: the first one's, cached by step)
        got = load_generator(tmp_path / "run", data=other).prior
        g = load_generator(tmp_path / "run", prior="normal")
        x, labels = load_real(other, "train", limit=latent_prior.FIT_IMAGES, seed=0)
        reference = latent_prior.fit_on(g, x, labels, seed=0)  # fitted directly on those images
        assert torch.allclose(got["means"], reference["means"])
    assert_same(own, load_generator(tmp_path / "run", data=mnist_shards).prior)


def test_images_per_second_leave_out_sampling_and_the_wall_time_reaches_the_checkpoint(mnist_shards, tmp_path,
                                                                                        monkeypatch):
    import gen.train
    slow = 1.0
    real_save_grid = gen.train.save_grid

    def slow_grid(*args, **kwargs):
        time.sleep(slow)
        return real_save_grid(*args, **kwargs)
    monkeypatch.setattr(gen.train, "save_grid", slow_grid)
    run_dir = tmp_path / "run"
    assert train_in_process(mnist_shards, run_dir, "--train.steps", "4", "--train.sample_every", "1",
                            "--train.log_every", "2", "--train.ckpt_every", "4") == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["perf/ms_per_step"] < 1000 * slow for r in rows), rows  # a grid a step would make it >= 1000
    state = torch.load(run_dir / "checkpoints/checkpoint-0000004/custom_checkpoint_1.pkl", weights_only=False)
    assert state["elapsed"] >= 4 * slow  # every grid up to the checkpoint, the last one included


def test_slurm_task_takes_the_users_resume_first_and_auto_on_every_requeue(monkeypatch):
    from slurm.task import TrainTask
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    first = TrainTask(["--preset", "gan", "--train.resume", "restart"])
    assert first.argv()[-2:] == ["--train.resume", "restart"]  # the user's choice, as on the command line
    assert first.checkpoint().function.argv()[-2:] == ["--train.resume", "auto"]  # submitit's requeue
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM's own requeue starts the original task again
    assert first.argv()[-2:] == ["--train.resume", "auto"]
