"""A run directory's layout, in one place: every module that reads or writes a run's files
asks RunDir for the path.

    RUN/config.json                      the run's full config (the loop writes it at start)
    RUN/.lock                            the owning process and its heartbeat (gen.runlock)
    RUN/metrics.jsonl                    one JSON record per logged step (training and --eval.every)
    RUN/samples/step-NNNNNNN.png         the training-time grids
    RUN/checkpoints/checkpoint-NNNNNNN/  complete checkpoints (gen.checkpoint); damaged ones are
                                         renamed damaged-checkpoint-NNNNNNN
    RUN/checkpoints/best/                --eval.keep_best: what was sampled at the lowest FID
                                         (weights, no training state), never pruned
    RUN/latent_prior/step-NNNNNNN-KEY.safetensors  VAE mixtures fitted for checkpoints that predate
                                         latent_prior.safetensors, or for other shards (gen.latent_prior)
    RUN/eval/metrics.json                jobs.evaluate's scores
    RUN/final/                           jobs.sample's figures
    RUN/slurm/JOBID/                     submitit's logs (slurm.submit)
    RUN/replaced-YYYYmmdd-HHMMSS/        an earlier run's files, moved aside by a run that started
                                         over (--train.resume restart) or branched from an older
                                         checkpoint; the same layout, so every command reads it
"""
import json
import re
import time
from pathlib import Path

from .durable import atomic_write_bytes

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{7})$")
GRID_RE = re.compile(r"^step-(\d{7})\.png$")
# what one run writes into its run dir (the lock and the SLURM logs belong to the job, not the run)
RUN_FILES = ("config.json", "metrics.jsonl", "samples", "checkpoints", "wandb", "eval", "final", "latent_prior")


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    @classmethod
    def of(cls, path):
        """The run dir of a run dir or a checkpoint folder; an export folder is its own."""
        path = Path(path)
        if path.parent.name == "checkpoints" and not (path / "checkpoints").is_dir():
            return cls(path.parent.parent)
        return cls(path)

    @staticmethod
    def kind(path):
        """What a path is: "checkpoint" (a folder with meta.json), "run" (a run dir: checkpoints/,
        or the config.json a run writes at start), "export" (config.json naming sampling weights),
        "missing", or None (something else)."""
        path = Path(path)
        if not path.exists():
            return "missing"
        if (path / "meta.json").is_file():
            return "checkpoint"
        if (path / "checkpoints").is_dir():
            return "run"
        if not (path / "config.json").is_file():
            return None
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):  # damaged: an export's if weights lie beside it
            return "export" if any(path.glob("*.safetensors")) else None
        if isinstance(config, dict) and "sampling_weights" in config:
            return "export"
        return "run" if isinstance(config, dict) and "train" in config else None

    def __fspath__(self):
        return str(self.path)

    def __str__(self):
        return str(self.path)

    config = property(lambda self: self.path / "config.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    samples = property(lambda self: self.path / "samples")
    checkpoint_root = property(lambda self: self.path / "checkpoints")
    eval_metrics = property(lambda self: self.path / "eval" / "metrics.json")
    final = property(lambda self: self.path / "final")
    slurm_logs = property(lambda self: self.path / "slurm" / "%j")

    best = property(lambda self: self.checkpoint_root / "best")  # --eval.keep_best: the sampled model at the best FID

    def grid(self, step):
        return self.samples / f"step-{step:07d}.png"

    def checkpoint(self, step):
        return self.checkpoint_root / f"checkpoint-{step:07d}"

    def latent_prior(self, step, key):
        return self.path / "latent_prior" / f"step-{step:07d}-{key}.safetensors"

    def checkpoints(self, all_kinds=False):
        """Complete checkpoints (those with a meta.json), newest first: [(step, path)]. all_kinds:
        also incomplete ones and those set aside as damaged."""
        found = []
        if self.checkpoint_root.is_dir():
            for p in self.checkpoint_root.iterdir():
                m = CHECKPOINT_RE.match(p.name.removeprefix("damaged-").split(".")[0] if all_kinds else p.name)
                if m and (all_kinds or (p / "meta.json").is_file()):
                    found.append((int(m.group(1)), p))
        return sorted(found, reverse=True)

    def leftovers(self):
        """The files an earlier run left here (RUN_FILES that exist), by name."""
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def move_aside(self, names=None, newer_than=None):
        """Move an earlier run's files into a new RUN/replaced-YYYYmmdd-HHMMSS/ (same layout, kept,
        never deleted); returns it. `names`: those of RUN_FILES (default: all there are).
        `newer_than=step`: only the checkpoints and grids after that step, and a copy of
        metrics.jsonl (the timeline an earlier checkpoint branches off)."""
        dest = self.path / time.strftime("replaced-%Y%m%d-%H%M%S")
        n = 1
        while dest.exists():
            dest, n = dest.with_name(f"{dest.name.split('.')[0]}.{n}"), n + 1
        aside = RunDir(dest)
        if newer_than is None:
            dest.mkdir()
            for name in self.leftovers() if names is None else names:
                (self.path / name).rename(dest / name)
            return dest
        aside.checkpoint_root.mkdir(parents=True)
        aside.samples.mkdir()
        for step, path in self.checkpoints(all_kinds=True):
            if step > newer_than:
                path.rename(aside.checkpoint_root / path.name)
        best_meta = self.best / "meta.json"
        if best_meta.is_file() and json.loads(best_meta.read_text()).get("step", 0) > newer_than:
            self.best.rename(aside.best)
        for grid in self.samples.glob("step-*.png") if self.samples.is_dir() else ():
            m = GRID_RE.match(grid.name)
            if m and int(m.group(1)) > newer_than:
                grid.rename(aside.samples / grid.name)
        for name in ("config.json", "metrics.jsonl"):
            if (self.path / name).is_file():
                atomic_write_bytes(dest / name, (self.path / name).read_bytes())
        return dest

    def read_metrics(self):
        """The records of metrics.jsonl, in order ([] before the first log)."""
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def append_metrics(self, record):
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, last_step):
        """Drop records past `last_step` (written after the checkpoint a run resumes from), so a
        resumed run's metrics.jsonl holds each step once."""
        rows = self.read_metrics()
        kept = [r for r in rows if r.get("step", 0) <= last_step]
        if len(kept) != len(rows):
            atomic_write_bytes(self.metrics, "".join(json.dumps(r) + "\n" for r in kept).encode())
