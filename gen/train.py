"""The one training loop for every model family.

    python -m jobs.train --preset gan --data data/mnist --train.steps 2000
    accelerate launch --num_processes 2 -m jobs.train --preset vae --data data/pokemon
    accelerate launch --cpu --num_processes 2 -m jobs.train --preset gan --data data/mnist

Reads top to bottom: setup, data shape, model family, prepare, EMA and state, resume, data,
tracking, then one loop. A family (families.py) supplies its modules, optimizers and phases
(the loss of one micro-batch per optimizer); everything else - devices, DDP, gradient
accumulation, mixed precision, checkpoints, signals, logging - is here, once.

The step never waits for the GPU: losses stay on the device, and finiteness and stop signals
are checked (one host sync, one collective) every --train.check_every steps and always
before a checkpoint is written, so a non-finite loss never reaches a checkpoint.
"""
import json
import logging
import math
import signal
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object, set_seed
from tqdm import tqdm

from . import checkpoint, tracking
from .augment import random_mirror
from .config import to_dict, validate
from .data import make_loader, read_manifest, to_float
from .ema import EMA
from .families import build_family
from .features import load_real
from .latent_prior import FIT_IMAGES
from .runlock import RunDirLocked, RunLock
from .sample import sampler_for, save_grid
from .shard_format import atomic_write_bytes

log = logging.getLogger("gen.train")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class NonFiniteLoss(Exception):
    """A loss became NaN or inf; nothing was saved after the last good checkpoint."""


class TrainingDiverged(Exception):
    """The losses blew up without becoming NaN (a GAN whose D wins outright) for DIVERGED_CHECKS checks."""


DIVERGED_CHECKS = 3


@dataclass
class TrainResult:
    step: int
    run_dir: str
    checkpoint: str | None        # newest checkpoint written or resumed from
    stopped_by: int | None = None  # the signal that stopped the run early, if any
    modules: dict | None = None    # the trained modules (unwrapped from DDP), for programmatic use
    ema: object = None


class TrainState:
    """Step, data position, W&B run id and training wall time: checkpointed with the models
    (register_for_checkpointing)."""

    def __init__(self):
        self.step, self.data, self.wandb_run_id, self.elapsed = 0, None, None, 0.0

    def state_dict(self):
        return {"step": self.step, "data": self.data, "wandb_run_id": self.wandb_run_id, "elapsed": self.elapsed}

    def load_state_dict(self, d):
        self.step, self.data, self.wandb_run_id = d["step"], d["data"], d["wandb_run_id"]
        self.elapsed = d.get("elapsed", 0.0)


class StopSignals:
    """Records SIGTERM/SIGUSR2 instead of dying mid-step; the loop stops at the next step
    boundary. The previous handlers (e.g. submitit's requeue) are restored afterwards."""

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        for s in STOP_SIGNALS:
            self.previous[s] = signal.signal(s, self._record)
        return self

    def _record(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def lr_factor(step, cfg):
    warm = min(1.0, (step + 1) / cfg.optim.warmup_steps) if cfg.optim.warmup_steps > 0 else 1.0
    if cfg.optim.schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, cfg.train.steps) / cfg.train.steps))
    return warm


def agree(accelerator, stop, first_bad_step, diverging):
    """(stop, first non-finite step or 0, diverging), OR-ed / max-ed over all ranks with one
    collective, so every rank stops or fails at the same step. The only host sync of a check."""
    device = first_bad_step.device
    flags = torch.stack([torch.tensor(float(stop), device=device), first_bad_step.float(),
                         diverging.float().to(device) if diverging is not None else torch.zeros((), device=device)])
    if accelerator.num_processes > 1:
        flags = accelerator.gather(flags[None].to(accelerator.device)).amax(dim=0)
    stop_now, bad_step, diverged = flags.tolist()
    return bool(stop_now), int(bad_step), bool(diverged)


@contextmanager
def frozen(modules):
    """Weights that need no gradient in a phase (G's phase does not train D: stylegan2-ada's
    requires_grad_(False)), so no weight-gradient work is done for them."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def prepare_family(accelerator, family):
    """Wrap the family's modules and optimizers with the accelerator (DDP, device, precision), in
    place; `family.plain` keeps the unwrapped modules."""
    names = list(family.modules)
    prepared = accelerator.prepare(*family.modules.values(), *family.optimizers.values())
    family.modules = dict(zip(names, prepared[:len(names)]))
    family.optimizers = dict(zip(names, prepared[len(names):]))


def add_into(sums, metrics):
    """Sum device tensors by name (no host sync)."""
    for k, v in metrics.items():
        sums[k] = sums[k] + v if k in sums else v


def run_phases(family, micro_batches, step, accelerator, max_norm):
    """One optimizer step for each of the family's phases, each over all micro-batches.
    Returns each metric's mean over the micro-batches, as device tensors."""
    sums = {}
    for phase in family.phases(step):
        modules = [family.modules[n] for n in phase.names]
        with frozen([family.plain[n] for n in phase.frozen]):
            for batch in micro_batches:
                with accelerator.accumulate(*modules):  # DDP's no_sync on all but the last micro-batch
                    losses, metrics = phase.loss(batch, step, accelerator)
                    if not isinstance(losses, dict):
                        losses = {phase.name: losses}
                    for i, name in enumerate(phase.names):  # divided by grad_accum: the mean over k*b samples
                        accelerator.backward(losses[name], **({} if len(losses) == 1 else {
                            "inputs": list(family.plain[name].parameters()), "retain_graph": i < len(losses) - 1}))
                    for name, module in zip(phase.names, modules):
                        if max_norm > 0 and accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(module.parameters(), max_norm)
                        opt = family.optimizers[name]
                        opt.step()  # Accelerate steps (and zeroes) only on the last micro-batch,
                        opt.zero_grad(set_to_none=True)  # so zeroing after the step keeps the earlier ones
                add_into(sums, metrics)
    return {k: v / len(micro_batches) for k, v in sums.items()}


def data_position_for_rank(saved, accelerator):
    """This rank's saved stream position. A checkpoint from another world size cannot continue
    the same streams: restart the saved epoch on the new split, with a warning."""
    if not saved:
        return None
    if len(saved) == accelerator.num_processes:
        return saved[accelerator.process_index]
    epoch = min(p["epoch"] for p in saved[0]["positions"].values()) if saved[0]["positions"] else 0
    if accelerator.is_main_process:
        log.warning("checkpoint was written by %d processes, this run has %d: the data stream restarts at epoch %d",
                    len(saved), accelerator.num_processes, epoch)
    workers = saved[0]["num_workers"]
    return {"positions": {w: {"epoch": epoch, "offset": 0, "skipped": 0} for w in range(workers)},
            "batches": 0, "num_workers": workers}


def data_on_device(setting, device, manifest, split, share=0.05):
    """Whether the decoded split lives on the device (DataConfig.device_data)."""
    if setting != "auto":
        return setting == "on"
    if device.type != "cuda":
        return False  # on CPU, worker processes overlap decode with the step
    split_bytes = manifest["splits"][split]["count"] * manifest["channels"] * manifest["image_size"] ** 2
    return split_bytes <= share * torch.cuda.get_device_properties(device).total_memory


def truncate_jsonl(path, last_step):
    """Drop records past `last_step` (written after the checkpoint a run resumes from), so a
    resumed run's metrics.jsonl holds each step once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


def write_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg, keep_process_group=False, on_step=None):
    """Train to cfg.train.steps (resuming per cfg.train.resume). `on_step(step)` is called after each
    optimizer step (a profiler's step(), bench/profile_step.py); the loop never depends on it."""
    # Setup: one Accelerator for devices, DDP, accumulation and mixed precision.
    # (DDP warns once per process that a 1x1 conv's grad layout differs from its bucket: harmless)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    validate(cfg)  # impossible values fail here, before any folder is created
    tc = cfg.train
    config_dict = to_dict(cfg)
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
                              # without a GPU, Accelerate only forms a (gloo) process group when told cpu=True
                              cpu=tc.cpu or not torch.cuda.is_available(), log_with=None if cfg.log.wandb == "off" else "wandb",
                              kwargs_handlers=[DistributedDataParallelKwargs(bucket_cap_mb=tc.ddp_bucket_mb)],
                              **({"dynamo_backend": "inductor"} if tc.compile else {}))
    set_seed(tc.seed, device_specific=True)  # each rank its own noise; DDP makes the weights equal

    # Data shape and classes from the shards' manifest; the family checks the image size.
    manifest = read_manifest(cfg.data.path)
    shape = (manifest["channels"], manifest["image_size"], manifest["image_size"])
    num_classes = len(manifest.get("class_names") or [])
    family = build_family(cfg.model, cfg.optim, shape, num_classes)

    # Run dir: owned by this run alone (a lock with a heartbeat), taken by the main process.
    run_dir = Path(tc.run_dir)
    lock, refused = None, [None]
    if accelerator.is_main_process:
        lock = RunLock(run_dir)
        try:
            why = lock.acquire(force=tc.force_unlock)
            if why:
                log.warning("took over the run dir lock of an earlier run (%s)", why)
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(run_dir / "config.json", json.dumps(config_dict, indent=1).encode())
        except RunDirLocked as e:
            refused = [str(e)]
    broadcast_object_list(refused)
    if refused[0]:
        raise RunDirLocked(refused[0])
    try:
        return _train(cfg, accelerator, config_dict, manifest, shape, num_classes, family, run_dir, keep_process_group,
                      on_step)
    finally:
        if lock:
            lock.release()


def _train(cfg, accelerator, config_dict, manifest, shape, num_classes, family, run_dir, keep_process_group, on_step):
    tc = cfg.train

    # Model family: modules and optimizers, prepared together.
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    for m in family.modules.values():
        m.to(memory_format=memory_format)
    names = list(family.modules)
    prepare_family(accelerator, family)

    # EMA and the loop's own state are checkpointed with the models.
    ema = None
    if cfg.model.ema_decay > 0:
        ema = EMA(accelerator.unwrap_model(family.modules[family.ema_target]), cfg.model.ema_decay)
        accelerator.register_for_checkpointing(ema)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    # Resume: the newest complete checkpoint, chosen once on the main process.
    resume = [checkpoint.resolve_resume(run_dir, tc.resume) if accelerator.is_main_process else None]
    broadcast_object_list(resume)
    last_ckpt = resume[0]
    if last_ckpt:
        meta = checkpoint.read_meta(last_ckpt)
        checkpoint.check_compatible(meta, config_dict, shape, last_ckpt)
        try:
            accelerator.load_state(last_ckpt)
        except Exception as e:  # a checkpoint written before checksums were recorded, damaged
            raise checkpoint.CheckpointError(f"cannot load checkpoint {last_ckpt}: {checkpoint.one_line(e)}") from None
        if accelerator.is_main_process:
            log.info("resumed from %s at step %d", last_ckpt, state.step)
            truncate_jsonl(run_dir / "metrics.jsonl", state.step)

    # Data: this rank's share of the shards, continuing exactly where the checkpoint left off.
    on_device = data_on_device(cfg.data.device_data, accelerator.device, manifest, cfg.data.split)
    loader, stream, position = make_loader(
        cfg.data.path, tc.batch_size, seed=tc.seed, rank=accelerator.process_index,
        world_size=accelerator.num_processes, workers=cfg.data.workers, split=cfg.data.split,
        shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled, cache_mb=cfg.data.cache_mb,
        tracker_state=data_position_for_rank(state.data, accelerator), pin_memory=accelerator.device.type == "cuda",
        device=accelerator.device if on_device else None)
    # every rank says where it stands: the first place to look when one rank hangs or lags
    log.info("rank %d/%d on %s (%s): %d shards (%d indexed), %d loader slots, %s", accelerator.process_index,
             accelerator.num_processes, socket.gethostname(), accelerator.device, len(stream.urls),
             len(stream.index.indexed), accelerator.num_processes * max(1, cfg.data.workers),
             "decoded split on the device" if on_device else f"{cfg.data.workers} worker processes")

    # Tracking: W&B on the main process, same run id across resumes; metrics.jsonl beside it.
    mode = tracking.wandb_mode(cfg.log.wandb) if accelerator.is_main_process else None
    if mode:
        state.wandb_run_id = state.wandb_run_id or tracking.new_run_id()
        tracking.init(accelerator, cfg, config_dict, state.wandb_run_id, mode)
    # What is sampled (gen.sample.sampler_for, the one policy): the EMA weights with BatchNorm
    # statistics of their own (and a VAE's latent mixture, fitted on training images loaded once),
    # made at most once per step for the grid, the evaluation and the checkpoint together; under
    # its own RNG, so the training stream is the same with it or without.
    rng_devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    sampler_meta = {"shape": list(shape), "num_classes": num_classes, "class_names": manifest.get("class_names")}
    fit_images, made, mixture_size = None, {}, {}
    if cfg.model.family == "vae" and accelerator.is_main_process:
        with torch.random.fork_rng(devices=rng_devices):
            fit_images = load_real(cfg.data.path, cfg.data.split, limit=FIT_IMAGES, seed=tc.seed)

    def sampler_at(step):
        if step not in made:
            made.clear()
            # a VAE's mixture size is chosen (~15 s on a CPU) where a checkpoint is written; grids and
            # evaluations in between refit that size to the current weights (~2 s)
            choose = step % tc.ckpt_every == 0 or step == tc.steps or not mixture_size
            with torch.random.fork_rng(devices=rng_devices):
                made[step] = sampler_for(family, ema.module if ema else family.plain[family.ema_target], cfg,
                                         sampler_meta, accelerator.device, fit_images, seed=tc.seed,
                                         components=None if choose else mixture_size["k"])
            if made[step].prior is not None:
                mixture_size["k"] = len(made[step].prior["weights"])
        return made[step]

    fixed_labels = torch.arange(cfg.log.num_samples) % max(num_classes, 1)

    def sample_grid(step):
        images = sampler_at(step).sample(cfg.log.num_samples, seed=tc.seed, labels=fixed_labels)  # fixed latents
        grid = save_grid(images, run_dir / "samples" / f"step-{step:07d}.png")
        if mode:
            tracking.log_image(accelerator, "samples", grid, step)

    # Evaluation during training (--eval.every): real features once, then FID/KID of what is sampled.
    evaluator = None
    if cfg.eval.every > 0 and accelerator.is_main_process:
        from .metrics import Evaluator
        with torch.random.fork_rng(devices=rng_devices):
            evaluator = Evaluator(cfg.data.path, n=cfg.eval.n, space=cfg.eval.space, seed=cfg.eval.seed,
                                  device=accelerator.device, split=cfg.data.split, with_prdc=False)

    def evaluate(step):
        g = sampler_at(step)
        with torch.random.fork_rng(devices=rng_devices):
            scores = evaluator.score(g.sample(evaluator.n, seed=cfg.eval.seed))
        record = {"step": step, "time/elapsed_s": state.elapsed, **{f"eval/{k}": v for k, v in scores.items()
                                                                     if isinstance(v, float)}}
        bar.write(f"eval at step {step}: FID {scores['fid']:.3f} (real vs real {evaluator.floors['real_vs_real']['fid']:.3f})"
                  + (f", legibility {scores['legibility']:.3f}" if "legibility" in scores else "") + f" [{evaluator.space}]")
        write_jsonl(run_dir / "metrics.jsonl", record)
        if mode:
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def save(step):
        nonlocal last_ckpt
        state.data = gather_object([position.state_dict()])  # every rank's stream position, by rank
        last_ckpt = checkpoint.save(accelerator, run_dir, step, {"config": config_dict, "shape": list(shape),
                                                                 "num_classes": num_classes,
                                                                 "class_names": manifest.get("class_names"),
                                                                 "wandb_run_id": state.wandb_run_id},
                                    tc.keep_last, lambda: sampler_at(step))

    def to_device(batch):
        position.update(batch["position"])
        image = to_float(batch["image"].to(accelerator.device, non_blocking=True))  # uint8 crosses the bus
        if cfg.data.hflip:
            image = random_mirror(image)
        return {"image": image.contiguous(memory_format=memory_format),
                "label": batch["label"].to(accelerator.device, non_blocking=True)}

    # The loop: one optimizer step per iteration, grad_accum micro-batches each.
    images_per_step = tc.batch_size * tc.grad_accum * accelerator.num_processes
    bar = tqdm(total=tc.steps, initial=state.step, disable=not accelerator.is_main_process, dynamic_ncols=True,
               unit="step", mininterval=1.0)
    data_iter = iter(loader.loader)  # uint8 batches
    window_t, window_steps, sums = time.perf_counter(), 0, {}
    check_sums, check_steps, diverged_checks = {}, 0, 0  # losses since the last check, for divergence
    first_bad_step = torch.zeros((), dtype=torch.long, device=accelerator.device)  # 0: all finite so far
    stopped_by = None
    try:
        with StopSignals() as stop:
            while state.step < tc.steps:
                for group_name, opt in family.optimizers.items():
                    for group in opt.param_groups:
                        group["lr"] = family.base_lr[group_name] * lr_factor(state.step, cfg)
                micro_batches = [to_device(next(data_iter)) for _ in range(tc.grad_accum)]
                losses = run_phases(family, micro_batches, state.step, accelerator, cfg.optim.grad_clip)
                if ema:
                    ema.update(family.plain[family.ema_target], state.step)
                state.step += 1
                step = state.step
                # on the device: remember the first step with a non-finite loss, sum losses for the log
                finite = torch.stack([v.float() for v in losses.values()]).isfinite().all()
                first_bad_step = torch.where(finite | (first_bad_step > 0), first_bad_step, step)
                add_into(sums, losses)
                add_into(check_sums, losses)
                window_steps += 1
                check_steps += 1
                bar.update(1)
                if on_step:
                    on_step(step)

                save_now = step % tc.ckpt_every == 0 or step == tc.steps
                stop_now = False
                if save_now or step % tc.check_every == 0:
                    check_means = {k: v / check_steps for k, v in check_sums.items()}
                    stop_now, bad_step, diverging = agree(accelerator, stop.signum is not None, first_bad_step,
                                                          family.diverging(check_means))
                    diverged_checks = diverged_checks + 1 if diverging else 0
                    check_sums, check_steps = {}, 0
                    if diverged_checks >= DIVERGED_CHECKS:
                        values = ", ".join(f"{k}={float(v):.3g}" for k, v in check_means.items())
                        raise TrainingDiverged(
                            f"training diverged: {family.divergence_text} in {DIVERGED_CHECKS} checks in a row, up to "
                            f"step {step} ({values}); nothing saved after it. Last good checkpoint: {last_ckpt or 'none'}. "
                            "Try lower learning rates (--optim.lr_d, --optim.lr) or a stronger --model.r1_gamma")
                    if bad_step:
                        values = ", ".join(f"{k}={v:.4g}" for k, v in zip(losses, torch.stack(
                            [v.float() for v in losses.values()]).tolist()))
                        raise NonFiniteLoss(f"non-finite loss at step {bad_step} (step {step}: {values}); nothing saved "
                                            f"after it. Last good checkpoint: {last_ckpt or 'none'}. Try a lower "
                                            f"--optim.lr or --train.mixed_precision no")
                if step % tc.log_every == 0 or step == tc.steps:
                    elapsed = time.perf_counter() - window_t
                    means = torch.stack([v.float() for v in sums.values()]).div(window_steps).tolist()  # one sync per log
                    metrics = {f"train/{k}": v for k, v in zip(sums, means)}
                    metrics.update({f"lr/{n}": family.base_lr[n] * lr_factor(step - 1, cfg) for n in names})
                    state.elapsed += elapsed
                    metrics.update({"perf/img_per_s": images_per_step * window_steps / elapsed,
                                    "perf/ms_per_step": 1000 * elapsed / window_steps,
                                    "time/elapsed_s": state.elapsed, "data/images_seen": step * images_per_step,
                                    "data/epoch": position.epoch, "data/skipped": position.skipped,
                                    "data/read_MB": position.bytes_read / 2**20})
                    if accelerator.is_main_process:
                        bar.set_postfix({"img/s": f"{metrics['perf/img_per_s']:.0f}"}, refresh=False)
                        line = " ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items() if k.startswith("train/"))
                        bar.write(f"step {step}/{tc.steps} | epoch {position.epoch} | {line} | "
                                  f"{metrics['perf/ms_per_step']:.1f} ms/step | {metrics['perf/img_per_s']:.0f} img/s")
                        write_jsonl(run_dir / "metrics.jsonl", {"step": step, **metrics})
                    if mode:
                        accelerator.log(metrics, step=step)
                    window_t, window_steps, sums = time.perf_counter(), 0, {}
                if accelerator.is_main_process and (step % tc.sample_every == 0 or step == tc.steps):
                    sample_grid(step)
                if evaluator and (step % cfg.eval.every == 0 or step == tc.steps):
                    evaluate(step)
                if save_now or stop_now:
                    save(step)
                if stop_now:
                    stopped_by = stop.signum or signal.SIGTERM  # another rank got it
                    if accelerator.is_main_process:
                        bar.write(f"stop signal: checkpoint saved at step {step} -> {last_ckpt}")
                    break
    finally:
        bar.close()
        # Drop the DDP wrappers (they own the process group) and the loader's workers while Python
        # is fully alive: a gloo thread freeing the last tensor during interpreter exit aborts
        # the process ("terminate called without an active exception").
        plain_modules = {n: accelerator.unwrap_model(m) for n, m in family.modules.items()}
        family.modules, data_iter, loader, micro_batches = plain_modules, None, None, None
        accelerator.free_memory()  # drops Accelerate's references, then gc.collect()
        if keep_process_group:  # the caller still talks to the other ranks
            for tracker in accelerator.trackers:
                tracker.finish()
        else:
            accelerator.end_training()
    return TrainResult(state.step, str(run_dir), last_ckpt, stopped_by, plain_modules, ema)
