"""The artifacts a user samples from, read without unpickling anything: a checkpoint folder's
meta.json and sampling weights, a run dir's newest checkpoint that verifies, or an export folder
(`python -m jobs.export`: `config.json` and `generator.safetensors` / `vae.safetensors`, with the
same checksums). What a path is, RunDir.kind says.

    meta, weights = find_weights("runs/mnist-gan")      # verified against the recorded sha256s
    family, module, cfg, meta, prior = load_sampling_module("exports/poke-gan")
"""
import json
import logging
import shutil
from pathlib import Path

from safetensors.torch import load_file

from .checkpoint import (EXPORT_CONFIG, LATENT_PRIOR, CheckpointError, checkpoints, file_records, read_meta, sealed,
                         verify)
from .config import from_dict
from .errors import one_line
from .families import build_family
from .run_dir import RunDir

log = logging.getLogger("gen.checkpoint")


def find_weights(path):
    """(meta, weights file) of a checkpoint folder, a run dir (its newest checkpoint that verifies)
    or an export folder; the files read are verified against their recorded sizes and sha256s."""
    path = Path(path)
    kind = RunDir.kind(path)
    if kind == "missing":
        raise CheckpointError(f"{path}: no such run dir, checkpoint or export folder")
    if kind == "run":
        found = checkpoints(path)
        if not found:
            raise CheckpointError(f"{path}: this run has no checkpoint yet (one is written every --train.ckpt_every "
                                  "steps and at the end)")
        for _, ckpt in found:
            why = verify(ckpt, names=_sampling_files(ckpt))
            if why is None:
                return find_weights(ckpt)
            log.warning("skipped damaged checkpoint %s: %s", ckpt.name, why)
        raise CheckpointError(f"{path}: every checkpoint is damaged (newest: {verify(found[0][1])})")
    if kind is None:
        raise CheckpointError(f"{path}: not a run dir, checkpoint or export folder (no checkpoints/, meta.json or "
                              f"{EXPORT_CONFIG})")
    export = kind == "export"
    meta_name = EXPORT_CONFIG if export else "meta.json"
    why = verify(path, meta_name, names=())
    if why:
        raise CheckpointError(f"damaged {kind}: {why}")
    meta = json.loads((path / meta_name).read_text())
    if "sampling_weights" not in meta or not (path / meta["sampling_weights"]).is_file():
        raise CheckpointError(f"{path}: no sampling weights (written by an older deepgen?); "
                              "train one more checkpoint with `--train.resume auto` to write them")
    why = verify(path, meta_name, names=_sampling_files(path, meta))
    if why:
        raise CheckpointError(f"damaged {kind}: {why}")
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
