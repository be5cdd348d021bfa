"""The one training loop for every model family.

    python -m jobs.train --preset gan --data data/mnist --train.steps 2000
    accelerate launch --num_processes 2 -m jobs.train --preset vae --data data/pokemon
    accelerate launch --cpu --num_processes 2 -m jobs.train --preset gan --data data/mnist

`train` is the loop, one screen; `Run` owns everything around a step (set-up and resume, the
checks, logging, sampling, evaluation, checkpoints, clean-up); `run_phases` is one optimizer
step. A family (families.py) supplies plain modules, optimizers and phases (the losses of one
micro-batch per trained module); devices, DDP, gradient accumulation, mixed precision,
checkpoints, signals and logging are here, once.

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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object, set_seed
from tqdm import tqdm

from . import checkpoint, clusters, tracking
from .augment import random_mirror
from .config import to_dict, validate
from .data import make_loader, to_float
from .ema import EMA
from .errors import TrainingFailed, one_line
from .families import build_family
from .features import load_real
from .latent_prior import FIT_IMAGES
from .metrics import Evaluator
from .run_dir import RunDir
from .runlock import RunDirLocked, RunLock
from .sample import sampler_for, save_grid
from .shard_format import atomic_write_bytes, read_manifest

log = logging.getLogger("gen.train")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
DIVERGED_CHECKS = 3


class NonFiniteLoss(TrainingFailed):
    """A loss became NaN or inf; nothing was saved after the last good checkpoint."""


class TrainingDiverged(TrainingFailed):
    """The losses blew up without becoming NaN (a GAN whose D wins outright) for DIVERGED_CHECKS checks."""


def train(cfg, keep_process_group=False, on_step=None):
    """Train to cfg.train.steps (resuming per cfg.train.resume). `on_step(step)` is called after each
    optimizer step (a profiler's step(), bench/profile_step.py); the loop never depends on it."""
    validate(cfg)  # impossible values fail here, before any folder is created
    tc, ev = cfg.train, cfg.eval
    run = Run(cfg)  # accelerator, model family, the run dir's lock
    try:
        run.start()  # devices and DDP, EMA, resume, data, tracking
        with StopSignals() as stop:
            while run.step < tc.steps:
                run.optimizer_step()  # grad_accum micro-batches through every phase, then EMA
                step = run.step
                if on_step:
                    on_step(step)
                save_now = due(step, tc.ckpt_every, tc.steps)
                # alone, a signal needs no collective: stop at once (a slow CPU step x check_every can
                # outlast SLURM's warning); ranks agree on it at the next check
                signalled_alone = stop.signum is not None and run.accelerator.num_processes == 1
                stop_now = run.check(stop.signum) if save_now or signalled_alone or step % tc.check_every == 0 else False
                if due(step, tc.log_every, tc.steps):
                    run.log(step)
                if due(step, tc.sample_every, tc.steps):
                    run.sample_grid(step)
                if ev.every > 0 and due(step, ev.every, tc.steps):
                    run.evaluate(step)
                if save_now or stop_now:
                    run.save(step)
                if stop_now:
                    run.stopped(stop.signum)
                    break
    finally:
        run.close(keep_process_group)
    return run.result()


def due(step, every, last):
    return step % every == 0 or step == last


@dataclass
class TrainResult:
    step: int
    run_dir: str
    checkpoint: str | None        # newest checkpoint written or resumed from
    stopped_by: int | None = None  # the signal that stopped the run early, if any
    modules: dict | None = None    # the trained (plain) modules, for programmatic use
    ema: object = None


class Run:
    """One training run. Every rank makes one; the main process also owns the run dir (its lock,
    metrics.jsonl, grids), W&B and the evaluator."""

    def __init__(self, cfg):
        # (DDP warns once per process that a 1x1 conv's grad layout differs from its bucket: harmless)
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.cfg, tc = cfg, cfg.train
        self.config_dict = to_dict(cfg)
        # without a GPU, Accelerate only forms a (gloo) process group when told cpu=True
        cpu = tc.cpu or not torch.cuda.is_available()
        self.precision = resolve_precision(tc.mixed_precision, cpu)
        self.accelerator = acc = Accelerator(
            mixed_precision=self.precision, log_with=None if cfg.log.wandb == "off" else "wandb", cpu=cpu,
            kwargs_handlers=[DistributedDataParallelKwargs(bucket_cap_mb=tc.ddp_bucket_mb)],
            **({"dynamo_backend": "inductor"} if tc.compile else {}))
        set_seed(tc.seed, device_specific=True)  # each rank its own noise; DDP makes the weights equal
        self.main = acc.is_main_process
        # data shape and classes from the shards' manifest; the family checks the image size
        self.manifest = read_manifest(cfg.data.path)
        self.shape = (self.manifest["channels"], self.manifest["image_size"], self.manifest["image_size"])
        self.num_classes = len(self.manifest.get("class_names") or [])
        self.family = build_family(cfg.model, cfg.optim, self.shape, self.num_classes, mixed_precision=self.precision)
        self.prepared = self.ema = self.loader = self.data_iter = self.bar = self.evaluator = None
        self.last_ckpt = self.stopped_by = self.mode = None
        self.sampler_cache, self.mixture_size, self.fit_images = {}, None, None
        # the run dir is owned by this run alone (a lock with a heartbeat), taken by the main process
        self.run_dir, self.lock, refused = RunDir(tc.run_dir), None, [None]
        if self.main:
            self.lock = RunLock(self.run_dir.path)
            try:
                why = self.lock.acquire(force=tc.force_unlock)
                if why:
                    log.warning("took over the run dir lock of an earlier run (%s)", why)
                self.run_dir.samples.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(self.run_dir.config, json.dumps(self.config_dict, indent=1).encode())
            except RunDirLocked as e:
                refused, self.lock = [str(e)], None
        broadcast_object_list(refused)
        if refused[0]:
            raise RunDirLocked(refused[0])

    @property
    def step(self):
        return self.state.step

    def start(self):
        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        self.memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        for m in self.family.modules.values():
            m.to(memory_format=self.memory_format)
        self.rng_devices = [acc.device] if acc.device.type == "cuda" else []
        self.last_ckpt = self.find_checkpoint()
        if clusters.count(cfg.model) and not self.last_ckpt:  # a resumed run loads its clusters with its weights
            with torch.random.fork_rng(devices=self.rng_devices):
                self.family.fit_data(load_real(cfg.data.path, cfg.data.split, limit=FIT_IMAGES, seed=tc.seed)[0])
        self.prepared = prepare(acc, self.family)
        # EMA and the loop's own state are checkpointed with the models
        if cfg.model.ema_decay > 0:
            self.ema = EMA(self.family.modules[self.family.ema_target], cfg.model.ema_decay)
            acc.register_for_checkpointing(self.ema)
        self.state = TrainState()
        acc.register_for_checkpointing(self.state)
        self.resume()
        self.open_data()
        # W&B on the main process, the same run id across resumes; metrics.jsonl beside it
        self.mode = tracking.wandb_mode(cfg.log.wandb) if self.main else None
        if self.mode:
            self.state.wandb_run_id = self.state.wandb_run_id or tracking.new_run_id()
            tracking.init(acc, cfg, self.config_dict, self.state.wandb_run_id, self.mode)
        # what is sampled, and the evaluator, are set up under their own RNG: the training stream
        # is the same with them or without
        if cfg.model.family == "vae" and self.main:
            with torch.random.fork_rng(devices=self.rng_devices):
                self.fit_images = load_real(cfg.data.path, cfg.data.split, limit=FIT_IMAGES, seed=tc.seed)
        if cfg.eval.every > 0 and self.main:
            with torch.random.fork_rng(devices=self.rng_devices):
                self.evaluator = Evaluator(cfg.data.path, n=cfg.eval.n, space=cfg.eval.space, seed=cfg.eval.seed,
                                           device=acc.device, split=cfg.data.split, with_prdc=False)
        self.bar = tqdm(total=tc.steps, initial=self.state.step, disable=not self.main, dynamic_ncols=True,
                        unit="step", mininterval=1.0)
        self.images_per_step = tc.batch_size * tc.grad_accum * acc.num_processes
        self.window_t, self.window_steps, self.sums = time.perf_counter(), 0, {}
        self.check_sums, self.check_steps, self.diverged_checks = {}, 0, 0  # losses since the last check
        self.first_bad_step = torch.zeros((), dtype=torch.long, device=acc.device)  # 0: all finite so far

    def find_checkpoint(self):
        """The checkpoint to resume from: the newest complete one (chosen once, on the main
        process) or the one --train.resume names; None for a fresh run."""
        found = [checkpoint.resolve_resume(self.run_dir.path, self.cfg.train.resume) if self.main else None]
        broadcast_object_list(found)
        return found[0]

    def resume(self):
        """Load the checkpoint find_checkpoint chose, if any."""
        acc = self.accelerator
        if not self.last_ckpt:
            return
        meta = checkpoint.read_meta(self.last_ckpt)
        checkpoint.check_compatible(meta, self.config_dict, self.shape, self.last_ckpt)
        try:
            acc.load_state(self.last_ckpt)
        except Exception as e:  # a checkpoint written before checksums were recorded, damaged
            raise checkpoint.CheckpointError(f"cannot load checkpoint {self.last_ckpt}: {one_line(e)}") from None
        if self.main:
            log.info("resumed from %s at step %d", self.last_ckpt, self.state.step)
            self.run_dir.truncate_metrics(self.state.step)

    def open_data(self):
        """This rank's share of the shards, continuing exactly where the checkpoint left off."""
        cfg, acc, d = self.cfg, self.accelerator, self.cfg.data
        on_device = data_on_device(d.device_data, acc.device, self.manifest, d.split)
        self.loader, self.stream, self.position = make_loader(
            d.path, cfg.train.batch_size, seed=cfg.train.seed, rank=acc.process_index, world_size=acc.num_processes,
            workers=d.workers, split=d.split, shuffle_buffer=d.shuffle_buffer, resampled=d.resampled,
            cache_mb=d.cache_mb, tracker_state=data_position_for_rank(self.state.data, acc),
            pin_memory=acc.device.type == "cuda", device=acc.device if on_device else None)
        self.data_iter = iter(self.loader.loader)  # uint8 batches
        # every rank says where it stands: the first place to look when one rank hangs or lags
        log.info("rank %d/%d on %s (%s, precision %s): %d shards (%d indexed), %d loader slots, %s", acc.process_index,
                 acc.num_processes, socket.gethostname(), acc.device, self.precision, len(self.stream.urls),
                 len(self.stream.index.indexed), acc.num_processes * max(1, d.workers),
                 "decoded split on the device" if on_device else f"{d.workers} worker processes")

    def micro_batch(self):
        batch = next(self.data_iter)
        self.position.update(batch["position"])
        device = self.accelerator.device
        image = to_float(batch["image"].to(device, non_blocking=True))  # uint8 crosses the bus
        if self.cfg.data.hflip:
            image = random_mirror(image)
        return {"image": image.contiguous(memory_format=self.memory_format),
                "label": batch["label"].to(device, non_blocking=True)}

    def lr(self, name, step):
        return self.family.base_lr[name] * lr_factor(step, self.cfg)

    def optimizer_step(self):
        """One optimizer step per phase over grad_accum micro-batches, the EMA, the step count;
        the losses are summed on the device (no host sync)."""
        for name, opt in self.prepared.optimizers.items():
            for group in opt.param_groups:
                group["lr"] = self.lr(name, self.state.step)
        micro_batches = [self.micro_batch() for _ in range(self.cfg.train.grad_accum)]
        losses = run_phases(self.family, self.prepared, micro_batches, self.state.step, self.accelerator,
                            self.cfg.optim.grad_clip)
        if self.ema:
            self.ema.update(self.family.modules[self.family.ema_target], self.state.step)
        self.state.step += 1
        # remember the first step with a non-finite loss
        finite = torch.stack([v.float() for v in losses.values()]).isfinite().all()
        self.first_bad_step = torch.where(finite | (self.first_bad_step > 0), self.first_bad_step, self.state.step)
        self.losses = losses
        add_into(self.sums, losses)
        add_into(self.check_sums, losses)
        self.window_steps += 1
        self.check_steps += 1
        self.bar.update(1)

    def check(self, signum):
        """One host sync and one collective: whether to stop (a signal on any rank), or fail (a
        non-finite loss, or losses diverging DIVERGED_CHECKS checks in a row)."""
        means = {k: v / self.check_steps for k, v in self.check_sums.items()}
        stop_now, bad_step, diverging = agree(self.accelerator, signum is not None, self.first_bad_step,
                                              self.family.diverging(means))
        self.diverged_checks = self.diverged_checks + 1 if diverging else 0
        self.check_sums, self.check_steps = {}, 0
        last_good = f"Last good checkpoint: {self.last_ckpt or 'none'}"
        if self.diverged_checks >= DIVERGED_CHECKS:
            values = ", ".join(f"{k}={float(v):.3g}" for k, v in means.items())
            raise TrainingDiverged(
                f"training diverged: {self.family.divergence_text} in {DIVERGED_CHECKS} checks in a row, up to "
                f"step {self.step} ({values}); nothing saved after it. {last_good}. "
                "Try lower learning rates (--optim.lr_d, --optim.lr) or a stronger --model.r1_gamma")
        if bad_step:
            values = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.losses, torch.stack(
                [v.float() for v in self.losses.values()]).tolist()))
            raise NonFiniteLoss(f"non-finite loss at step {bad_step} (step {self.step}: {values}); nothing saved "
                                f"after it. {last_good}. Try a lower --optim.lr or --train.mixed_precision no")
        return stop_now

    def log(self, step):
        """Means since the last log, speed and data position: console, metrics.jsonl, W&B."""
        elapsed = time.perf_counter() - self.window_t
        means = torch.stack([v.float() for v in self.sums.values()]).div(self.window_steps).tolist()  # one sync
        metrics = {f"train/{k}": v for k, v in zip(self.sums, means)}
        metrics.update({f"lr/{n}": self.lr(n, step - 1) for n in self.family.modules})
        self.state.elapsed += elapsed
        p = self.position
        metrics.update({"perf/img_per_s": self.images_per_step * self.window_steps / elapsed,
                        "perf/ms_per_step": 1000 * elapsed / self.window_steps, "time/elapsed_s": self.state.elapsed,
                        "data/images_seen": step * self.images_per_step, "data/epoch": p.epoch,
                        "data/skipped": p.skipped, "data/read_MB": p.bytes_read / 2**20})
        if self.main:
            self.bar.set_postfix({"img/s": f"{metrics['perf/img_per_s']:.0f}"}, refresh=False)
            line = " ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items() if k.startswith("train/"))
            self.bar.write(f"step {step}/{self.cfg.train.steps} | epoch {p.epoch} | {line} | "
                           f"{metrics['perf/ms_per_step']:.1f} ms/step | {metrics['perf/img_per_s']:.0f} img/s")
            self.run_dir.append_metrics({"step": step, **metrics})
        if self.mode:
            self.accelerator.log(metrics, step=step)
        self.window_t, self.window_steps, self.sums = time.perf_counter(), 0, {}

    def sampler_at(self, step):
        """What is sampled at this step (gen.sample.sampler_for, the one policy): the EMA weights
        with BatchNorm statistics of their own, and a VAE's latent mixture; made at most once per
        step for the grid, the evaluation and the checkpoint together, under its own RNG."""
        if step not in self.sampler_cache:
            self.sampler_cache.clear()
            tc = self.cfg.train
            # a VAE's mixture size is chosen (~15 s on a CPU) where a checkpoint is written; grids and
            # evaluations in between refit that size to the current weights (~2 s)
            choose = step % tc.ckpt_every == 0 or step == tc.steps or self.mixture_size is None
            module = self.ema.module if self.ema else self.family.modules[self.family.ema_target]
            meta = {"shape": list(self.shape), "num_classes": self.num_classes,
                    "class_names": self.manifest.get("class_names")}
            with torch.random.fork_rng(devices=self.rng_devices):
                g = sampler_for(self.family, module, self.cfg, meta, self.accelerator.device, self.fit_images,
                                seed=tc.seed, components=None if choose else self.mixture_size)
            if g.prior is not None:
                self.mixture_size = len(g.prior["weights"])
            self.sampler_cache[step] = g
        return self.sampler_cache[step]

    def sample_grid(self, step):
        """The grid of fixed latents (and labels 0, 1, ... for a conditional model)."""
        if not self.main:
            return
        n = self.cfg.log.num_samples
        images = self.sampler_at(step).sample(n, seed=self.cfg.train.seed)  # labels: Sampler.default_labels
        grid = save_grid(images, self.run_dir.grid(step))
        if self.mode:
            tracking.log_image(self.accelerator, "samples", grid, step)

    def evaluate(self, step):
        """--eval.every: FID/KID (and legibility) of what is sampled, against the features of the
        real data computed once."""
        if not self.evaluator:
            return
        ev, seed = self.evaluator, self.cfg.eval.seed
        with torch.random.fork_rng(devices=self.rng_devices):
            scores = ev.score(self.sampler_at(step).sample(ev.n, seed=seed))
        record = {"step": step, "time/elapsed_s": self.state.elapsed,
                  **{f"eval/{k}": v for k, v in scores.items() if isinstance(v, float)}}
        self.bar.write(f"eval at step {step}: FID {scores['fid']:.3f} (real vs real {ev.floors['real_vs_real']['fid']:.3f})"
                       + (f", legibility {scores['legibility']:.3f}" if "legibility" in scores else "") + f" [{ev.space}]")
        self.run_dir.append_metrics(record)
        if self.mode:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def save(self, step):
        self.state.data = gather_object([self.position.state_dict()])  # every rank's stream position, by rank
        meta = {"config": self.config_dict, "shape": list(self.shape), "num_classes": self.num_classes,
                "class_names": self.manifest.get("class_names"), "wandb_run_id": self.state.wandb_run_id}
        self.last_ckpt = checkpoint.save(self.accelerator, self.run_dir.path, step, meta, self.cfg.train.keep_last,
                                         lambda: self.sampler_at(step))

    def stopped(self, signum):
        self.stopped_by = signum or signal.SIGTERM  # another rank got it
        if self.main:
            self.bar.write(f"stop signal: checkpoint saved at step {self.step} -> {self.last_ckpt}")

    def close(self, keep_process_group):
        """Drop the DDP wrappers (they own the process group) and the loader's workers while Python
        is fully alive: a gloo thread freeing the last tensor during interpreter exit aborts the
        process ("terminate called without an active exception"). Then release the run dir."""
        try:
            if self.bar:
                self.bar.close()
            if self.prepared:
                self.prepared, self.data_iter, self.loader = None, None, None
                self.accelerator.free_memory()  # drops Accelerate's references, then gc.collect()
                if keep_process_group:  # the caller still talks to the other ranks
                    for tracker in self.accelerator.trackers:
                        tracker.finish()
                else:
                    self.accelerator.end_training()
        finally:
            if self.lock:
                self.lock.release()

    def result(self):
        return TrainResult(self.step, str(self.run_dir), self.last_ckpt, self.stopped_by, self.family.modules, self.ema)


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


# ----------------------------------------------------------------------------- one optimizer step

@dataclass
class Prepared:
    """The family's modules and optimizers as the accelerator wrapped them (device, DDP, precision):
    `nets` is the view the phases run through; the family keeps the plain modules."""
    nets: dict
    optimizers: dict


def prepare(accelerator, family):
    names = list(family.modules)
    wrapped = accelerator.prepare(*family.modules.values(), *(family.optimizers[n] for n in names))
    return Prepared(dict(zip(names, wrapped[:len(names)])), dict(zip(names, wrapped[len(names):])))


def run_phases(family, prepared, micro_batches, step, accelerator, max_norm):
    """One optimizer step for each of the family's phases, each over all k micro-batches: every
    loss divided by k (the mean over k*b samples), DDP's gradient reduction skipped (no_sync) on
    all but the last micro-batch, then one clip, step and zero_grad per trained module.
    Returns each metric's mean over the micro-batches, as device tensors."""
    sums, k = {}, len(micro_batches)
    for phase in family.phases(step):
        trained = [prepared.nets[n] for n in phase.names]
        with frozen([family.modules[n] for n in phase.frozen]):
            for i, batch in enumerate(micro_batches):
                with ExitStack() as stack:
                    if i < k - 1:
                        for net in trained:
                            stack.enter_context(accelerator.no_sync(net))
                    losses, metrics = phase.loss(batch, step, prepared.nets)
                    if phase.shared:  # one loss into all the phase's modules
                        accelerator.backward(losses["shared"] / k, inputs=[
                            p for name in phase.names for p in family.modules[name].parameters()])
                    else:
                        for j, name in enumerate(phase.names):  # each loss into its own module's weights only
                            accelerator.backward(losses[name] / k, **({} if len(phase.names) == 1 else {
                                "inputs": list(family.modules[name].parameters()),
                                "retain_graph": j < len(phase.names) - 1}))
                add_into(sums, metrics)
        for name in phase.names:
            if max_norm > 0:
                accelerator.clip_grad_norm_(prepared.nets[name].parameters(), max_norm)
            prepared.optimizers[name].step()
            prepared.optimizers[name].zero_grad(set_to_none=True)
    return {name: v / k for name, v in sums.items()}


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


def add_into(sums, metrics):
    """Sum device tensors by name (no host sync)."""
    for k, v in metrics.items():
        sums[k] = sums[k] + v if k in sums else v


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


# ----------------------------------------------------------------------------- data set-up

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


def resolve_precision(setting, cpu):
    """TrainConfig.mixed_precision with auto resolved: bf16 where the device has bf16 units (a CUDA
    GPU that supports it; a CPU with AMX tiles, whose oneDNN convolutions run bf16 natively; on
    other CPUs bf16 is emulated and slower than fp32), else no. Never fp16: it needs a loss scaler."""
    if setting != "auto":
        return setting
    if not cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return "bf16" if amx() else "no"


def data_on_device(setting, device, manifest, split, share=0.05):
    """Whether the decoded split lives on the device (DataConfig.device_data)."""
    if setting != "auto":
        return setting == "on"
    if device.type != "cuda":
        return False  # on CPU, worker processes overlap decode with the step
    split_bytes = manifest["splits"][split]["count"] * manifest["channels"] * manifest["image_size"] ** 2
    return split_bytes <= share * torch.cuda.get_device_properties(device).total_memory
