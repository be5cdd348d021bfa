"""Nothing lost, part 2: checkpoints that survive a node crash and bit rot (damage found by the
recorded sizes and sha256s, resume falling back to the previous checkpoint and continuing it
bit for bit, one line from sampling and export), fsync of every file and folder before the
rename, and data_prep run by several tasks into one folder at once."""
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from helpers import ROOT, assert_same, make_idx_dir, run, state_files, train_cmd

DAMAGES = ("truncate", "zero-fill", "bit-flip")


def damage_file(path, how, seed=0):
    data = bytearray(path.read_bytes())
    if how == "truncate":  # what a node crash or an interrupted copy leaves
        data = data[:len(data) // 2]
    elif how == "zero-fill":  # blocks allocated but never written
        data = bytearray(len(data))
    else:  # bit rot: one bit somewhere in the file
        i = random.Random(seed).randrange(len(data))
        data[i] ^= 1 << random.Random(seed + 1).randrange(8)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def twenty_steps(tmp_path_factory, mnist_shards):
    """A GAN trained 20 steps with checkpoints at 10 and 20 (the issue's reproduction)."""
    run_dir = tmp_path_factory.mktemp("durable") / "run"
    cmd = train_cmd(mnist_shards, run_dir, "--train.steps", "20", "--train.ckpt_every", "10", "--train.keep_last", "3",
                    "--log.wandb", "off")
    run(cmd, check=True)
    return run_dir, cmd


def test_every_kind_of_damage_to_every_file_is_found(twenty_steps, tmp_path):
    from gen.checkpoint import checkpoints, plan_resume, verify
    run_dir, _ = twenty_steps
    ckpt = run_dir / "checkpoints/checkpoint-0000020"
    assert verify(ckpt) is None
    names = sorted(p.name for p in ckpt.iterdir())
    assert {"meta.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "sampling.safetensors",
            "custom_checkpoint_0.pkl"} <= set(names)
    for name in names:
        for how in DAMAGES:
            copy = tmp_path / f"{name}-{how}"
            shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
            damage_file(copy / "checkpoints/checkpoint-0000020" / name, how)
            why = verify(copy / "checkpoints/checkpoint-0000020")
            assert why and name in why, (name, how, why)
            # resume auto takes the previous checkpoint and keeps the damaged one aside
            assert plan_resume(copy, "auto").checkpoint == str(copy / "checkpoints/checkpoint-0000010")
            assert [s for s, _ in checkpoints(copy)] == [10]
            assert (copy / "checkpoints/damaged-checkpoint-0000020" / name).is_file()
            shutil.rmtree(copy)


@pytest.mark.parametrize("name,how", [("model.safetensors", "truncate"), ("optimizer.bin", "bit-flip"),
                                      ("random_states_0.pkl", "zero-fill")])
def test_resume_falls_back_and_continues_bit_for_bit(twenty_steps, tmp_path, name, how):
    """The uninterrupted run's checkpoint 20 is the reference: the run that fell back to 10 and
    trained again to 20 must write exactly it."""
    run_dir, cmd = twenty_steps
    reference = state_files(run_dir / "checkpoints/checkpoint-0000020")
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for f in (copy / "checkpoints/checkpoint-0000020").glob("*.safetensors" if name.endswith(".safetensors") else name):
        damage_file(f, how)
    proc = run([str(copy) if a == str(run_dir) else a for a in cmd], check=True)
    skipped = [l for l in proc.stderr.splitlines() if "skipped checkpoint" in l]
    assert len(skipped) == 1 and "checkpoint-0000020" in skipped[0] and "Traceback" not in proc.stderr, proc.stderr
    assert "resumed from" in proc.stderr and "checkpoint-0000010" in proc.stderr
    assert_same(state_files(copy / "checkpoints/checkpoint-0000020"), reference)
    assert (copy / "checkpoints/damaged-checkpoint-0000020/DAMAGED.txt").is_file()


def test_damaged_checkpoint_or_export_is_one_line_for_every_command(twenty_steps, tmp_path):
    run_dir, cmd = twenty_steps
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    run(["-m", "jobs.export", str(copy), "--out", str(tmp_path / "export")], check=True)
    export_cfg = json.loads((tmp_path / "export/config.json").read_text())
    assert set(export_cfg["files"]) == {"generator.safetensors"} and "meta_sha256" in export_cfg
    ckpt = copy / "checkpoints/checkpoint-0000020"
    damage_file(ckpt / "sampling.safetensors", "bit-flip")
    damage_file(tmp_path / "export/generator.safetensors", "truncate")
    for args in (["-m", "jobs.sample", str(ckpt), "--out", str(tmp_path / "s")],
                 ["-m", "jobs.export", str(ckpt), "--out", str(tmp_path / "e2")],
                 ["-m", "jobs.evaluate", str(ckpt), "--n", "50", "--no-wandb", "--seeds", "1"],
                 ["-m", "jobs.sample", str(tmp_path / "export"), "--out", str(tmp_path / "s2")]):
        proc = run(args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: damaged"), (args, proc.stderr)
        assert "sampling.safetensors" in lines[0] or "generator.safetensors" in lines[0]
    # a run dir: its newest checkpoint that verifies, with one line about the one skipped
    proc = run(["-m", "jobs.sample", str(copy), "--out", str(tmp_path / "s3")], check=True)
    assert "skipped damaged checkpoint checkpoint-0000020" in proc.stderr
    # an explicit --train.resume of a damaged checkpoint is refused in one line
    proc = run([*cmd[:cmd.index("--train.run_dir") + 1], str(tmp_path / "new"), *cmd[cmd.index("--train.run_dir") + 2:],
                "--train.resume", str(ckpt)])
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: --train.resume"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_file_and_folder_of_a_checkpoint_is_fsynced_before_the_rename(mnist_shards, tmp_path, monkeypatch):
    """os.fsync traced (the path of each descriptor synced, in order) while jobs.train runs in this process."""
    run_dir = tmp_path / "run"
    synced, real = [], os.fsync

    def traced(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", traced)
    run(train_cmd(mnist_shards, run_dir, "--train.steps", "3", "--train.ckpt_every", "3", "--log.wandb", "off"), check=True)
    monkeypatch.undo()
    root = run_dir.resolve() / "checkpoints"
    final = root / "checkpoint-0000003"
    tmp = root / ".tmp-checkpoint-0000003"
    for f in final.iterdir():
        assert str(tmp / f.name) in synced, f.name
    # the folder before the rename (its names), and the parent after it (the rename)
    assert str(tmp) in synced and str(root) in synced
    assert synced.index(str(tmp / "meta.json")) < synced.index(str(tmp)) < synced.index(str(root))


def test_concurrent_preps_into_one_folder_all_succeed(digits, tmp_path):
    """Every task of a multi-task job runs the prep line: four at once, started at random offsets,
    twice over; each exits 0 and the folder verifies."""
    idx = make_idx_dir(tmp_path / "idx", digits, 1500, 300)
    rng = random.Random(0)
    for attempt in range(2):
        out = tmp_path / f"shards{attempt}"
        procs = []
        for delay in sorted(rng.uniform(0, 0.6) for _ in range(4)):
            time.sleep(delay - (procs[-1][0] if procs else 0))
            procs.append((delay, subprocess.Popen([sys.executable, "-m", "data_prep", "mnist", "--source", str(idx),
                                                   "--out", str(out), "--shard-size", "200"], cwd=ROOT, text=True,
                                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        for _, proc in procs:
            log, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0 and "Traceback" not in log, log
        assert run(["-m", "data_prep", "verify", str(out)]).returncode == 0
        assert not list(out.glob(".*.partial")) and not (out / ".prep.lock").exists()
