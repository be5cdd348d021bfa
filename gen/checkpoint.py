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

Besides Accelerate's training state (which resume needs, and which holds pickles), every
checkpoint has `sampling.safetensors`: the weights sampling uses (the EMA copy when one is kept),
named in meta.json. Sampling, evaluation and export read only meta.json and that file
(gen/artifacts.py), so no pickle is ever loaded from a checkpoint someone else wrote.

Here: writing (save), verifying and pruning checkpoints, and the resume policy (plan_resume,
check_compatible)."""
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import gather_object
from safetensors.torch import save_file

from . import __version__
from .config import from_dict
from .errors import UserError, one_line
from .run_dir import RunDir
from .durable import fsync_path, sha256_file

log = logging.getLogger("gen.checkpoint")

SAMPLING_WEIGHTS = "sampling.safetensors"
LATENT_PRIOR = "latent_prior.safetensors"  # a VAE's ex-post latent mixture (gen.latent_prior)
EXPORT_CONFIG = "config.json"


class CheckpointError(UserError):
    """A checkpoint cannot be used: incompatible config, torn or missing."""


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


@dataclass
class ResumePlan:
    """What a run starting in a run dir does with what it finds there (plan_resume)."""
    checkpoint: str | None = None   # the checkpoint to load; None: a fresh start
    aside: dict | None = None       # RunDir.move_aside's arguments, or None: nothing to move aside
    why: str = ""                   # the warning line that says what is moved aside and why
    branch: bool = False            # continues an older checkpoint: a new W&B run, not the old one's


def plan_resume(run_dir, resume):
    """The rule for an existing run dir, the same for every entry point (the README's "What
    survives what"); nothing is written here but damaged checkpoints set aside (auto):
    - auto: the newest checkpoint that verifies (each damaged newer one set aside with one warning
      line); none there: a fresh start, and an earlier run's files, which have no checkpoint to
      continue from (killed before its first), are moved aside.
    - none: a fresh start; refused in one line where the run dir holds checkpoints.
    - restart: a fresh start; the earlier run's files are moved aside into RUN/replaced-DATE/.
    - PATH: that checkpoint (refused in one line if it does not verify); newer checkpoints in its
      run dir are another timeline from there on, and are moved aside with their grids.
    Raises CheckpointError for a refusal."""
    rd = RunDir(run_dir)
    found = rd.checkpoints()
    names = ", ".join(p.name for _, p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    leftovers = rd.leftovers()
    if resume == "restart":
        return ResumePlan(aside={} if leftovers else None, why=f"--train.resume restart: the earlier run's files "
                          f"({', '.join(leftovers)}) are moved aside")
    if resume in ("none", "", None):
        if found:
            raise CheckpointError(
                f"--train.resume none: {rd} holds checkpoints of an earlier run ({names}); continue it with "
                "--train.resume auto, start over with --train.resume restart (its files are moved aside into "
                f"{rd}/replaced-DATE/, not deleted), or use another --train.run_dir")
        return ResumePlan(aside={} if leftovers else None, why=_no_checkpoint_why(leftovers))
    if resume == "auto":
        for _, path in found:
            why = verify(path)
            if why is None:
                return ResumePlan(str(path))
            aside = set_aside(path, why)
            log.warning("skipped checkpoint %s: %s; moved aside to %s", path.name, why, aside.name)
        leftovers = rd.leftovers()  # (the damaged ones stay: a restart moves them with the rest)
        return ResumePlan(aside={} if leftovers else None, why=_no_checkpoint_why(leftovers))
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"--train.resume {resume}: not a complete deepgen checkpoint (no meta.json)")
    why = verify(path)
    if why:
        raise CheckpointError(f"--train.resume {resume}: damaged checkpoint: {why}")
    own = RunDir.of(path).path.resolve() == rd.path.resolve()
    if not own and found:
        raise CheckpointError(f"--train.resume {resume}: {rd} holds checkpoints of another run ({names}); continue "
                              "it in an empty --train.run_dir, or move those aside with --train.resume restart first")
    step = read_meta(path)["step"]
    newer = [p.name for s, p in rd.checkpoints(all_kinds=True) if s > step] if own else []
    if newer:
        return ResumePlan(str(path), aside={"newer_than": step}, branch=True,
                          why=f"--train.resume {path.name}: the newer checkpoints ({', '.join(newer)}) are another "
                              "timeline from here; they, their grids and a copy of metrics.jsonl are moved aside")
    return ResumePlan(str(path))


def _no_checkpoint_why(leftovers):
    return (f"an earlier run left {', '.join(leftovers)} but no checkpoint to continue from: a fresh start; "
            "they are moved aside")


def read_meta(path):
    return json.loads((Path(path) / "meta.json").read_text())


# model settings that only change the losses, not what a checkpoint holds: a run may resume with
# other values (a stronger R1 after a divergence, say), and says so in one warning line
LOSS_SETTINGS = ("gan_loss", "gan_update", "one_backward", "r1_gamma", "r1_every", "diffaug", "beta",
                 "kl_warmup_steps", "kl", "binarize", "ema_decay", "lecam", "d_reconstruct",
                 "ada_target", "ada_kimg")
# loss settings whose 0 also removes state (the EMA copy, LeCam's averages, D's decoder, ADA's strength)
ON_OFF = ("ema_decay", "lecam", "d_reconstruct", "ada_target")


def check_compatible(meta, config_dict, shape, num_classes, path):
    """One-line CheckpointError when the checkpoint holds other modules or optimizers than this run
    builds (architecture, image shape, class count, D's optimizer, EMA on or off); returns the
    loss settings that differ, as "name old -> new" strings. `path` is where it was read from
    (meta's own path is where it was written: the folder may have moved)."""
    saved = from_dict(meta["config"])  # keys added since: their defaults
    model = config_dict["model"]
    structural, changed = [], []
    for k, v in model.items():
        old = getattr(saved.model, k)
        if _norm(old) == _norm(v):
            continue
        if k in LOSS_SETTINGS and not (k in ON_OFF and (old == 0) != (v == 0)):
            changed.append(f"model.{k} {old!r} -> {v!r}")
        else:
            structural.append(f"model.{k}={old!r} (this run: {v!r})")
    if saved.optim.optimizer_d != config_dict["optim"]["optimizer_d"]:
        structural.append(f"optim.optimizer_d={saved.optim.optimizer_d!r} (this run: {config_dict['optim']['optimizer_d']!r})")
    if list(meta.get("shape", shape)) != list(shape):
        structural.append(f"image shape {meta['shape']} (this run: {list(shape)})")
    if meta.get("num_classes", num_classes) != num_classes:
        structural.append(f"{meta['num_classes']} classes (this run's data: {num_classes})")
    if structural:
        raise CheckpointError(f"checkpoint {path} is incompatible with this config: {'; '.join(structural[:3])}. "
                              "Use a new --train.run_dir or the checkpoint's settings")
    return changed


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
            meta = write_sampled(tmp, sampler(), dict(meta, step=step, path=str(final)))
    except Exception as e:  # a full disk: OSError, torch's RuntimeError ("file write failed"), SafetensorError
        error = one_line(e)
    errors = _all_errors(accelerator, error)  # also: every rank's files are written before they are sealed
    if not errors and accelerator.is_main_process:
        try:
            seal(tmp, meta)
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
        for old in prunable(run_dir, step, keep_last):
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-checkpoint-*"):  # torn by an earlier kill
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return str(final)


def write_sampled(folder, g, meta):
    """What sampler `g` samples into `folder`: its module's weights (sampling.safetensors) and a
    VAE's latent mixture (latent_prior.safetensors). Returns meta naming them."""
    write_weights(g.module, folder / SAMPLING_WEIGHTS)
    meta = dict(meta, deepgen_version=__version__, sampling_weights=SAMPLING_WEIGHTS, batch_stats=g.meta["batch_stats"])
    if g.prior is not None:
        write_tensors(g.prior, folder / LATENT_PRIOR)
        meta["latent_prior"] = LATENT_PRIOR
    return meta


def seal(folder, meta):
    """Durable before visible: every file, then meta.json with their sizes and sha256s, then the
    folder itself on disk, before the caller renames it into place."""
    for p in folder.iterdir():
        fsync_path(p)
    with open(folder / "meta.json", "w") as f:
        json.dump(sealed(dict(meta, files=file_records(folder))), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(folder)


def save_best(run_dir, g, meta):
    """--eval.keep_best: what `g` samples, alone (no training state), as RUN/checkpoints/best: a
    folder every command reads as a checkpoint (jobs.sample/evaluate/export), never pruned. The
    new one is complete before it replaces the old; a kill between the two renames leaves the old
    one as checkpoints/.old-best."""
    best = RunDir(run_dir).best
    tmp, old = best.with_name(".tmp-best"), best.with_name(".old-best")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seal(tmp, write_sampled(tmp, g, meta))
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    fsync_path(best.parent)
    shutil.rmtree(old, ignore_errors=True)
    return best


def prunable(run_dir, step, keep_last):
    """The checkpoints to prune after writing the one of `step`: the oldest of those before it,
    beyond keep_last in all. Never the one just written, nor a later one (another timeline's)."""
    older = [path for s, path in checkpoints(run_dir) if s < step]
    return older[max(keep_last, 1) - 1:]


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
