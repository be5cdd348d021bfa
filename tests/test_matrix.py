"""Every preset on every path (issue 37): {1 process, 2 DDP ranks} x {train a few steps, resume,
sample, export, evaluate}. Each cell exits 0 and writes its files; the resumed run equals an
uninterrupted one tensor for tensor (the independent reference: a run done another way). The
presets come from gen.config.PRESETS, so a preset added later is in the matrix by itself."""
import json
import shutil

import pytest

from helpers import ROOT, TINY, assert_same, launch2, run, state_files
from gen.config import PRESETS

ARGS = [*TINY, "--log.wandb", "off", "--data.workers", "0", "--train.ckpt_every", "2", "--train.sample_every", "2"]
EVAL_ENV = {"DEEPGEN_DOMAIN_STEPS": "20", "DEEPGEN_DOMAIN_BATCH": "16"}


@pytest.fixture(scope="module")
def domain_cache(tmp_path_factory):
    """One domain network for every evaluate cell (the shards are the same)."""
    return tmp_path_factory.mktemp("domain-cache")


def use_paths(run_dir, tmp_path, domain_cache, monkeypatch, capsys):
    """sample, export and evaluate, as a user runs them (jobs.X.main), on a trained run dir."""
    import jobs.evaluate
    import jobs.export
    import jobs.sample
    monkeypatch.setenv("DEEPGEN_CACHE", str(domain_cache))
    for k, v in EVAL_ENV.items():
        monkeypatch.setenv(k, v)
    assert jobs.sample.main([str(run_dir), "--out", str(tmp_path / "samples"), "--n", "16", "--steps", "3"]) == 0
    assert (tmp_path / "samples/samples.png").is_file() and (tmp_path / "samples/interpolations.gif").is_file()
    assert jobs.export.main([str(run_dir), "--out", str(tmp_path / "export"), "--n", "4"]) == 0
    assert {"config.json", "samples.png", "README.md"} <= {p.name for p in (tmp_path / "export").iterdir()}
    assert jobs.evaluate.main([str(run_dir), "--n", "40", "--seeds", "1", "--space", "domain", "--no-wandb"]) == 0
    scores = json.loads((run_dir / "eval/metrics.json").read_text())
    assert scores["step"] == 4 and scores["model"]["fid"] > 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_one_process(preset, mnist_shards, tmp_path, domain_cache, monkeypatch, capsys):
    from accelerate.state import AcceleratorState

    import jobs.train
    common = ["--preset", preset, "--data", str(mnist_shards), *ARGS]
    for name, steps in (("straight", 4), ("resumed", 2), ("resumed", 4)):
        AcceleratorState._reset_state(True)
        assert jobs.train.main([*common, "--train.run_dir", str(tmp_path / name), "--train.steps", str(steps)]) == 0
    assert_same(state_files(tmp_path / "straight/checkpoints/checkpoint-0000004"),
                state_files(tmp_path / "resumed/checkpoints/checkpoint-0000004"))
    assert (tmp_path / "resumed/samples/step-0000004.png").is_file()
    use_paths(tmp_path / "resumed", tmp_path, domain_cache, monkeypatch, capsys)


@pytest.fixture(scope="module")
def two_rank_runs(mnist_shards, tmp_path_factory):
    """Every preset trained, resumed and compared under 2 DDP ranks in one launch (tests/resume_ranks.py)."""
    root = tmp_path_factory.mktemp("two-ranks")
    proc = run([*launch2(), str(ROOT / "tests" / "resume_ranks.py"), str(root / "ranks.json"), str(root),
                ",".join(sorted(PRESETS)), "--data", str(mnist_shards), *ARGS], timeout=600)
    report = json.loads((root / "ranks.json").read_text()) if (root / "ranks.json").is_file() else {}
    return root, proc, report


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_two_ddp_ranks(preset, two_rank_runs, tmp_path, domain_cache, monkeypatch, capsys):
    root, proc, report = two_rank_runs
    assert preset in report, f"the launch stopped before {preset}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert report[preset] == {"step": 4, "world_size": 2, "differs": ""}, report[preset]
    run_dir = tmp_path / "resumed"
    shutil.copytree(root / preset / "resumed", run_dir)
    use_paths(run_dir, tmp_path, domain_cache, monkeypatch, capsys)
