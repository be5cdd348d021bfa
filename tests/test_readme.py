"""The README's commands run as written (issue 39): every fenced bash command is found here and,
by what it needs, run for real (every `--help`, `data_prep verify/preview/index`: in a shell, in a
folder holding the shards it names), parsed and validated as jobs.train parses it (every training
command, also those after `--` and under `accelerate launch`), or dry-run (every slurm.submit
command: the sbatch script it would submit). Every module and bench script it names exists."""
import importlib.util
import re
import shlex
import shutil
import subprocess

import pytest

from helpers import ROOT

README = (ROOT / "README.md").read_text()


def commands():
    """Every command line in the README's ```bash blocks: continuation lines joined, comments cut."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            for part in line.split(" && "):
                if part:
                    found.append(part.strip())
    return found


ALL = commands()


def training_args(command):
    """The jobs.train arguments of a command: after `-m jobs.train`, or after slurm.submit's `--`."""
    words = shlex.split(command.replace("$USER", "me"))
    if "jobs.train" in words:
        return words[words.index("jobs.train") + 1:]
    if "slurm.submit" in words and "--" in words:
        return words[words.index("--") + 1:]
    return None


def test_the_readme_has_the_commands_this_test_checks():
    assert sum(training_args(c) is not None for c in ALL) >= 8
    assert sum("slurm.submit" in c for c in ALL) >= 3
    assert sum("--help" in c for c in ALL) >= 3


@pytest.mark.parametrize("command", [c for c in ALL if training_args(c) is not None])
def test_every_training_command_parses_and_validates(command):
    from gen.config import parse, validate
    args = [a for a in training_args(command) if a != "--help"]
    validate(parse(args))  # an unknown option or an impossible value raises (SystemExit / ConfigError)


def test_every_slurm_command_dry_runs(tmp_path, capsys, monkeypatch):
    import slurm.submit
    grid = re.search(r"with `grid.yaml` such as `(\{.*?\})`", README).group(1)  # the README's own example grid
    (tmp_path / "grid.yaml").write_text(grid)
    monkeypatch.chdir(tmp_path)
    for command in [c for c in ALL if "slurm.submit" in c]:
        words = shlex.split(command.replace("$USER", "me"))
        argv = words[words.index("slurm.submit") + 1:]
        split = argv.index("--") if "--" in argv else len(argv)
        argv = [a for a in argv[:split] if a != "--dry-run"] + ["--dry-run"] + argv[split:]
        assert slurm.submit.main(argv) == 0, command
        out = capsys.readouterr().out
        assert "#SBATCH" in out, command
        if "--array" in argv:
            assert "# 4 job(s)" in out  # 2 presets x 2 learning rates


def test_every_named_module_and_script_exists():
    for command in ALL:
        for module in re.findall(r"-m ([\w.]+)", command):
            assert importlib.util.find_spec(module) is not None, command
        for script in re.findall(r"(bench/[\w.]+\.(?:py|sh))", command):
            assert (ROOT / script).is_file(), command


def test_help_and_shard_commands_run_as_written(mnist_shards, tmp_path):
    """In a folder where every data/NAME the command names holds shards, each runs in bash."""
    run_here = [c for c in ALL if c.endswith("--help") or re.match(r"python -m data_prep (verify|preview|index) ", c)]
    assert len(run_here) >= 6, run_here
    for command in run_here:
        for data in re.findall(r"\bdata/[\w-]+", command):
            if not (tmp_path / data).exists():
                shutil.copytree(mnist_shards, tmp_path / data)
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, command
    assert (tmp_path / "grid.png").is_file()  # the preview the README names
