"""A run directory's layout, in one place: every module that reads or writes a run's files
asks RunDir for the path.

    RUN/config.json                      the run's full config (the loop writes it at start)
    RUN/.lock                            the owning process and its heartbeat (gen.runlock)
    RUN/metrics.jsonl                    one JSON record per logged step (training and --eval.every)
    RUN/samples/step-NNNNNNN.png         the training-time grids
    RUN/checkpoints/checkpoint-NNNNNNN/  complete checkpoints (gen.checkpoint); damaged ones are
                                         renamed damaged-checkpoint-NNNNNNN
    RUN/latent_prior/step-NNNNNNN.safetensors  VAE mixtures fitted for checkpoints that predate
                                         latent_prior.safetensors (gen.latent_prior)
    RUN/eval/metrics.json                jobs.evaluate's scores
    RUN/final/                           jobs.sample's figures
    RUN/slurm/JOBID/                     submitit's logs (slurm.submit)
"""
import json
import re
from pathlib import Path

from .shard_format import atomic_write_bytes

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{7})$")


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

    def grid(self, step):
        return self.samples / f"step-{step:07d}.png"

    def checkpoint(self, step):
        return self.checkpoint_root / f"checkpoint-{step:07d}"

    def latent_prior(self, step):
        return self.path / "latent_prior" / f"step-{step:07d}.safetensors"

    def checkpoints(self):
        """Complete checkpoints (those with a meta.json), newest first: [(step, path)]."""
        found = []
        if self.checkpoint_root.is_dir():
            for p in self.checkpoint_root.iterdir():
                m = CHECKPOINT_RE.match(p.name)
                if m and (p / "meta.json").is_file():
                    found.append((int(m.group(1)), p))
        return sorted(found, reverse=True)

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
