"""Checkpoint folders `run_dir/checkpoints/checkpoint-{step:07d}`, written by accelerator.save_state
into a temporary folder that is renamed only when complete (a kill leaves the previous ones
intact). `meta.json` inside (deepgen version, config, step, W&B run id) marks a complete one."""
import json
import os
import re
import shutil
from pathlib import Path

from . import __version__

CKPT_RE = re.compile(r"^checkpoint-(\d{7})$")


class CheckpointError(Exception):
    """A checkpoint cannot be used: incompatible config, torn or missing."""


def checkpoints(run_dir):
    """Complete checkpoints under run_dir, newest first: [(step, path)]."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = CKPT_RE.match(p.name)
            if m and (p / "meta.json").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def resolve_resume(run_dir, resume):
    """The checkpoint folder to resume from, or None. `auto`: newest complete one in run_dir."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        found = checkpoints(run_dir)
        return str(found[0][1]) if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"--train.resume {resume}: not a complete deepgen checkpoint (no meta.json)")
    return str(path)


def read_meta(path):
    return json.loads((Path(path) / "meta.json").read_text())


def check_compatible(meta, config_dict, shape):
    """One-line error when the checkpoint's model or data shape differs from this run's."""
    saved_model, model = meta["config"]["model"], config_dict["model"]
    diffs = [f"model.{k}={saved_model.get(k)!r} (this run: {v!r})" for k, v in model.items()
             if k in saved_model and _norm(saved_model.get(k)) != _norm(v)]
    if list(meta.get("shape", shape)) != list(shape):
        diffs.append(f"image shape {meta['shape']} (this run: {list(shape)})")
    if diffs:
        raise CheckpointError(f"checkpoint {meta['path']} is incompatible with this config: {'; '.join(diffs[:3])}. "
                              "Use a new --train.run_dir or the checkpoint's settings")


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def save(accelerator, run_dir, step, meta, keep_last):
    """Every rank calls this (save_state writes per-rank RNG states). Returns the final path."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"checkpoint-{step:07d}"
    tmp = root / f".tmp-checkpoint-{step:07d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        # prune before writing, so keep_last bounds the disk used at every moment
        for _, old in checkpoints(run_dir)[max(keep_last - 1, 0):]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = dict(meta, deepgen_version=__version__, step=step, path=str(final))
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for stale in root.glob(".tmp-checkpoint-*"):  # torn by an earlier kill
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return str(final)
