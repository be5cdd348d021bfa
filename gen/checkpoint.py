"""Checkpoint folders `run_dir/checkpoints/checkpoint-{step:07d}`, written by accelerator.save_state
into a temporary folder that is renamed only when complete (a kill leaves the previous ones
intact). `meta.json` inside (deepgen version, config, step, W&B run id) marks a complete one.

Durable before visible: every file and the folder are fsynced before the rename, the parent after
it, so a node crash or power loss cannot leave a renamed folder of empty or partial files.
meta.json records each file's size and sha256 (and its own checksum); `verify` checks them, so
bit rot, an interrupted copy or a quota hit is found before anything is loaded. `--train.resume
auto` takes the newest checkpoint that verifies and moves a damaged one aside
(`damaged-checkpoint-NNNNNNN`, kept, never deleted); sampling, evaluation and export name the
damaged file in one line.

This module is the only reader of checkpoints. Besides Accelerate's training state (which
resume needs, and which holds pickles), every checkpoint has `sampling.safetensors`: the
weights sampling uses (the EMA copy when one is kept), named in meta.json. Sampling,
evaluation and export read only meta.json and that file, so no pickle is ever loaded from a
checkpoint someone else wrote. An export folder (`python -m jobs.export`) holds the same two
things under shareable names: `config.json` and `generator.safetensors` / `vae.safetensors`."""
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from . import __version__
from .config import from_dict
from .errors import UserError, one_line
from .families import build_family
from .run_dir import RunDir
from .shard_format import sha256_file

log = logging.getLogger("gen.checkpoint")

SAMPLING_WEIGHTS = "sampling.safetensors"
LATENT_PRIOR = "latent_prior.safetensors"  # a VAE's ex-post latent mixture (gen.latent_prior)
EXPORT_CONFIG = "config.json"


class CheckpointError(UserError):
    """A checkpoint cannot be used: incompatible config, torn or missing."""


def fsync_path(path):
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_records(folder, skip=("meta.json",)):
    """{name: {"size", "sha256"}} of every file in `folder` (flat, as save_state writes it)."""
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name not in skip}


def _meta_checksum(meta):
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sealed(meta):
    """meta with its own checksum (a flipped bit in meta.json is found like one in any other file)."""
    return dict(meta, meta_sha256=_meta_checksum(meta))


def verify(folder, meta_name="meta.json", names=None):
    """None if the checkpoint (or export) folder is intact, else one line naming the first damaged
    file and how. `names`: only those files (and the meta). Folders written before checksums
    were recorded only need a readable meta."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / meta_name).read_text())
    except FileNotFoundError:
        return f"{folder / meta_name}: missing"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{folder / meta_name}: unreadable ({type(e).__name__})"
    if not isinstance(meta, dict):
        return f"{folder / meta_name}: not a deepgen meta file"
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_checksum(meta):
        return f"{folder / meta_name}: checksum mismatch (the file was changed or damaged)"
    for name, want in (meta.get("files") or {}).items():
        if names is not None and name not in names:
            continue
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path}: {size:,} bytes, {want['size']:,} expected (truncated or incomplete)"
        if sha256_file(path) != want["sha256"]:
            return f"{path}: sha256 mismatch (damaged)"
    return None


def set_aside(path, why):
    """Rename a damaged checkpoint to damaged-checkpoint-NNNNNNN (kept for inspection, no longer
    resumed from or pruned). Returns the new path."""
    path = Path(path)
    dest = path.with_name(f"damaged-{path.name}")
    n = 1
    while dest.exists():
        dest, n = path.with_name(f"damaged-{path.name}.{n}"), n + 1
    os.replace(path, dest)
    (dest / "DAMAGED.txt").write_text(why + "\n")
    return dest


def checkpoints(run_dir):
    """Complete checkpoints under run_dir, newest first: [(step, path)]."""
    return RunDir(run_dir).checkpoints()


def resolve_resume(run_dir, resume):
    """The checkpoint folder to resume from, or None. `auto`: the newest one in run_dir that
    verifies; each damaged newer one is set aside with one warning line. A named one that does
    not verify is a CheckpointError."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        for _, path in checkpoints(run_dir):
            why = verify(path)
            if why is None:
                return str(path)
            aside = set_aside(path, why)
            log.warning("skipped checkpoint %s: %s; moved aside to %s", path.name, why, aside.name)
        return None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"--train.resume {resume}: not a complete deepgen checkpoint (no meta.json)")
    why = verify(path)
    if why:
        raise CheckpointError(f"--train.resume {resume}: damaged checkpoint: {why}")
    return str(path)


def read_meta(path):
    return json.loads((Path(path) / "meta.json").read_text())


def check_compatible(meta, config_dict, shape, path):
    """One-line error when the checkpoint's model or data shape differs from this run's. `path`
    is where it was read from (meta's own path is where it was written: the folder may have moved)."""
    saved_model, model = from_dict(meta["config"]).model, config_dict["model"]  # keys added since: their defaults
    diffs = [f"model.{k}={getattr(saved_model, k)!r} (this run: {v!r})" for k, v in model.items()
             if _norm(getattr(saved_model, k)) != _norm(v)]
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
    root, final = RunDir(run_dir).checkpoint_root, RunDir(run_dir).checkpoint(step)
    tmp = root / f".tmp-{final.name}"
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
    except Exception as e:  # a full disk: OSError, torch's RuntimeError ("file write failed"), SafetensorError
        error = one_line(e)
    errors = _all_errors(accelerator, error)  # also: every rank's files are written before they are sealed
    if not errors and accelerator.is_main_process:
        try:  # durable before visible: every file, meta.json and the folder on disk before the rename
            for p in tmp.iterdir():
                fsync_path(p)
            with open(tmp / "meta.json", "w") as f:
                json.dump(sealed(dict(meta, files=file_records(tmp))), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            fsync_path(tmp)
        except Exception as e:
            error = one_line(e)
    errors = errors or _all_errors(accelerator, error)
    if errors:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(write_failure(root, tmp, errors[0]))
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
        for _, old in checkpoints(run_dir)[max(keep_last, 1):]:  # the newest (this one) is never pruned
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-checkpoint-*"):  # torn by an earlier kill
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return str(final)


def _all_errors(accelerator, error):
    """Every rank's error (a collective: all ranks call it), or []."""
    found = gather_object([error]) if accelerator.num_processes > 1 else [error]
    return [m for m in found if m]


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
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def write_weights(module, path):
    write_tensors(module.state_dict(), path)


def find_weights(path):
    """(meta, weights file) of a checkpoint folder, a run dir (its newest checkpoint that verifies)
    or an export folder; the files read are verified against their recorded sizes and sha256s."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run dir, checkpoint or export folder")
    # an export folder: config.json and no checkpoints (a run dir has a config.json too)
    export = not (path / "meta.json").exists() and not RunDir(path).checkpoint_root.is_dir() and (path / EXPORT_CONFIG).is_file()
    if export or (path / "meta.json").exists():
        meta_name = EXPORT_CONFIG if export else "meta.json"
        why = verify(path, meta_name, names=())
        if why:
            raise CheckpointError(f"damaged {'export' if export else 'checkpoint'}: {why}")
        meta = json.loads((path / meta_name).read_text())
        if export and "sampling_weights" not in meta:
            raise CheckpointError(f"{path}: {EXPORT_CONFIG} is not a deepgen export's")
    else:
        found = checkpoints(path)
        if not found:
            raise CheckpointError(f"{path}: no complete checkpoint (checkpoints/checkpoint-*/meta.json) or export (config.json)")
        for _, ckpt in found:
            why = verify(ckpt, names=_sampling_files(ckpt))
            if why is None:
                return find_weights(ckpt)
            log.warning("skipped damaged checkpoint %s: %s", ckpt.name, why)
        raise CheckpointError(f"{path}: every checkpoint is damaged (newest: {verify(found[0][1])})")
    if "sampling_weights" not in meta or not (path / meta["sampling_weights"]).is_file():
        raise CheckpointError(f"{path}: no sampling weights (written by an older deepgen?); "
                              "train one more checkpoint with `--train.resume auto` to write them")
    why = verify(path, meta_name, names=_sampling_files(path, meta))
    if why:
        raise CheckpointError(f"damaged {'export' if export else 'checkpoint'}: {why}")
    return meta, path / meta["sampling_weights"]


def _sampling_files(folder, meta=None):
    """The files sampling reads from a checkpoint or export folder."""
    if meta is None:
        try:
            meta = read_meta(folder)
        except (OSError, ValueError):
            return ()
    return tuple(meta[k] for k in ("sampling_weights", "latent_prior") if meta.get(k))


def load_sampling_module(path, device="cpu"):
    """(family, module in eval mode, config, meta, saved latent prior or None), rebuilt from meta
    and the safetensors files alone: nothing is unpickled."""
    meta, weights = find_weights(path)
    cfg = from_dict(meta["config"])
    family = build_family(cfg.model, cfg.optim, tuple(meta["shape"]), meta.get("num_classes", 0), sampling_only=True)
    module = family.modules[family.ema_target]
    prior_file = weights.parent / meta["latent_prior"] if meta.get("latent_prior") else None
    try:
        module.load_state_dict(load_file(str(weights)))
        prior = load_file(str(prior_file)) if prior_file and prior_file.is_file() else None
    except Exception as e:  # SafetensorError, or a size mismatch, in a folder written without checksums
        raise CheckpointError(f"cannot load the sampling weights in {weights.parent}: {one_line(e)}") from None
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
    files = {n: r for n, r in file_records(dest).items() if n in (name, LATENT_PRIOR)}  # the checksums travel
    (Path(dest) / EXPORT_CONFIG).write_text(json.dumps(sealed(dict(shared, sampling_weights=name, files=files)), indent=1))
    return name, meta
