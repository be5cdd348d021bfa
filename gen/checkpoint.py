"""Checkpoint folders `run_dir/checkpoints/checkpoint-{step:07d}`, written by accelerator.save_state
into a temporary folder that is renamed only when complete (a kill leaves the previous ones
intact). `meta.json` inside (deepgen version, config, step, W&B run id) marks a complete one.

This module is the only reader of checkpoints. Besides Accelerate's training state (which
resume needs, and which holds pickles), every checkpoint has `sampling.safetensors`: the
weights sampling uses (the EMA copy when one is kept), named in meta.json. Sampling,
evaluation and export read only meta.json and that file, so no pickle is ever loaded from a
checkpoint someone else wrote. An export folder (`python -m jobs.export`) holds the same two
things under shareable names: `config.json` and `generator.safetensors` / `vae.safetensors`."""
import json
import os
import re
import shutil
from pathlib import Path

from . import __version__

CKPT_RE = re.compile(r"^checkpoint-(\d{7})$")
SAMPLING_WEIGHTS = "sampling.safetensors"
LATENT_PRIOR = "latent_prior.safetensors"  # a VAE's ex-post latent mixture (gen.latent_prior)
EXPORT_CONFIG = "config.json"


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


def check_compatible(meta, config_dict, shape, path):
    """One-line error when the checkpoint's model or data shape differs from this run's. `path`
    is where it was read from (meta's own path is where it was written: the folder may have moved)."""
    saved_model, model = meta["config"]["model"], config_dict["model"]
    diffs = [f"model.{k}={saved_model.get(k)!r} (this run: {v!r})" for k, v in model.items()
             if k in saved_model and _norm(saved_model.get(k)) != _norm(v)]
    if list(meta.get("shape", shape)) != list(shape):
        diffs.append(f"image shape {meta['shape']} (this run: {list(shape)})")
    if diffs:
        raise CheckpointError(f"checkpoint {path} is incompatible with this config: {'; '.join(diffs[:3])}. "
                              "Use a new --train.run_dir or the checkpoint's settings")


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def save(accelerator, run_dir, step, meta, keep_last, sampler):
    """Every rank calls this (save_state writes per-rank RNG states). `sampler()` (called on the
    main process: gen.sample.sampler_for) gives what is sampled: its module goes to
    sampling.safetensors, a VAE's latent mixture to latent_prior.safetensors. Returns the final path.

    The new checkpoint is complete and renamed before any old one is pruned, so a kill at any
    moment leaves at least the newest complete checkpoint (disk use peaks at keep_last + 1).
    A failed write (disk full) removes the partial folder and raises one CheckpointError on
    every rank, naming the path and the space needed."""
    from accelerate.utils import gather_object
    root = Path(run_dir) / "checkpoints"
    final = root / f"checkpoint-{step:07d}"
    tmp = root / f".tmp-checkpoint-{step:07d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            g = sampler()
            write_weights(g.module, tmp / SAMPLING_WEIGHTS)
            meta = dict(meta, deepgen_version=__version__, step=step, path=str(final), sampling_weights=SAMPLING_WEIGHTS,
                        batch_stats=g.meta["batch_stats"])
            if g.prior is not None:
                write_tensors(g.prior, tmp / LATENT_PRIOR)
                meta["latent_prior"] = LATENT_PRIOR
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
    except Exception as e:  # a full disk: OSError, torch's RuntimeError ("file write failed"), SafetensorError
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    errors = [m for m in gather_object([error]) if m] if accelerator.num_processes > 1 else [m for m in [error] if m]
    if errors:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(write_failure(root, tmp, errors[0]))
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in checkpoints(run_dir)[max(keep_last, 1):]:  # the newest (this one) is never pruned
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-checkpoint-*"):  # torn by an earlier kill
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return str(final)


def folder_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_failure(root, tmp, error):
    """One line for a checkpoint that could not be written: disk full (with the space needed,
    judged from the previous checkpoint) or another write error."""
    free = shutil.disk_usage(root).free
    previous = checkpoints(root.parent)
    needed = folder_bytes(previous[0][1]) if previous else None
    full = "No space" in error or "write failed" in error or (needed is not None and free < needed)
    keep = f"previous checkpoint {previous[0][1]} is intact" if previous else "no earlier checkpoint"
    if full:
        need = f"about {needed / 2**20:.1f} MiB" if needed else "more space"
        return (f"disk full: cannot write checkpoint {tmp.name[5:]} in {root} ({free / 2**20:.1f} MiB free, it needs "
                f"{need}); {keep}, the partial one was removed. Free space or move --train.run_dir, then resume")
    return f"cannot write checkpoint {tmp.name[5:]} in {root}: {error}; {keep}, the partial one was removed"


def write_tensors(tensors, path):
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def write_weights(module, path):
    write_tensors(module.state_dict(), path)


def find_weights(path):
    """(meta, weights file) of a checkpoint folder, a run dir (its newest checkpoint) or an export folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run dir, checkpoint or export folder")
    if (path / "meta.json").is_file():
        meta = read_meta(path)
    elif (path / EXPORT_CONFIG).is_file() and "sampling_weights" in json.loads((path / EXPORT_CONFIG).read_text()):
        meta = json.loads((path / EXPORT_CONFIG).read_text())
    else:
        found = checkpoints(path)
        if not found:
            raise CheckpointError(f"{path}: no complete checkpoint (checkpoints/checkpoint-*/meta.json) or export (config.json)")
        return find_weights(found[0][1])
    if "sampling_weights" not in meta or not (path / meta["sampling_weights"]).is_file():
        raise CheckpointError(f"{path}: no sampling weights (written by an older deepgen?); "
                              "train one more checkpoint with `--train.resume auto` to write them")
    return meta, path / meta["sampling_weights"]


def load_sampling_module(path, device="cpu"):
    """(family, module in eval mode, config, meta, saved latent prior or None), rebuilt from meta
    and the safetensors files alone: nothing is unpickled."""
    from safetensors.torch import load_file

    from .config import from_dict
    from .families import build_family
    meta, weights = find_weights(path)
    cfg = from_dict(meta["config"])
    family = build_family(cfg.model, cfg.optim, tuple(meta["shape"]), meta.get("num_classes", 0))
    module = family.modules[family.ema_target]
    module.load_state_dict(load_file(str(weights)))
    prior_file = weights.parent / meta["latent_prior"] if meta.get("latent_prior") else None
    prior = load_file(str(prior_file)) if prior_file and prior_file.is_file() else None
    return family, module.to(device).eval(), cfg, meta, prior


def export_weights(path, dest):
    """The sampling weights as `generator.safetensors` (GAN) or `vae.safetensors`, and
    `config.json`, into the folder dest. Returns (weights file name, meta)."""
    meta, weights = find_weights(path)
    name = "generator.safetensors" if meta["config"]["model"]["family"] == "gan" else "vae.safetensors"
    shutil.copyfile(weights, Path(dest) / name)
    keys = ("config", "shape", "num_classes", "class_names", "step", "deepgen_version", "batch_stats")
    shared = {k: meta[k] for k in keys if k in meta}
    if meta.get("latent_prior") and (weights.parent / meta["latent_prior"]).is_file():
        shutil.copyfile(weights.parent / meta["latent_prior"], Path(dest) / LATENT_PRIOR)
        shared["latent_prior"] = LATENT_PRIOR
    (Path(dest) / EXPORT_CONFIG).write_text(json.dumps(dict(shared, sampling_weights=name), indent=1))
    return name, meta


def run_dir_of(path):
    """The run dir of a run dir or checkpoint folder; an export folder is its own."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return path  # an export folder
