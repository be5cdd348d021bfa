"""The one training loop for every model family.

    python -m jobs.train --preset gan --data data/mnist --train.steps 2000
    accelerate launch --num_processes 2 -m jobs.train --preset vae --data data/pokemon
    accelerate launch --cpu --num_processes 2 -m jobs.train --preset gan --data data/mnist

`train` is the loop, one screen; `Run` owns everything around a step (set-up and resume,
sampling, evaluation, checkpoints, clean-up); gen/step.py is one optimizer step, gen/monitor.py
the checks and logs between steps, gen/claim.py the run dir taken before anything is written.
A family (families.py) supplies plain modules, optimizers, phases (the losses of one micro-batch
per trained module) and its own data-dependent set-up; devices, DDP, gradient accumulation,
mixed precision, checkpoints, signals and logging are here and in those modules, once.

The step never waits for the GPU: losses stay on the device, and finiteness and stop signals
are checked (one host sync, one collective) every --train.check_every steps and always
before a checkpoint is written, so a non-finite loss never reaches a checkpoint.
"""
import logging
import signal
import socket
import warnings
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from tqdm import tqdm

from . import checkpoint, tracking
from .augment import random_mirror
from .claim import claim_run_dir
from .config import to_dict, validate
from .data import data_on_device, data_position_for_rank, load_real, make_loader, to_float
from .ema import EMA
from .errors import one_line
from .families import build_family
from .latent_prior import FIT_IMAGES
from .metrics import Evaluator
from .monitor import Monitor, NonFiniteLoss, TrainingDiverged, status_line  # noqa: F401 (their home for callers)
from .run_dir import RunDir
from .sample import sampler_for, save_grid
from .shard_format import read_manifest
from .step import lr_factor, prepare, run_phases

log = logging.getLogger("gen.train")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


def train(cfg, keep_process_group=False, on_step=None):
    """Train to cfg.train.steps (resuming per cfg.train.resume). `on_step(step)` is called after each
    optimizer step (a profiler's step(), bench/profile_step.py); the loop never depends on it."""
    validate(cfg)  # impossible values fail here, before any folder is created
    tc, ev = cfg.train, cfg.eval
    run = Run(cfg)  # accelerator, model family
    try:
        run.start()  # the run dir, devices and DDP, EMA, resume, data, tracking
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
        self.run_dir = RunDir(tc.run_dir)
        self.claim = self.prepared = self.ema = self.loader = self.data_iter = self.bar = self.evaluator = None
        self.last_ckpt = self.stopped_by = self.mode = self.monitor = None
        self.sampler_cache = {}

    @property
    def step(self):
        return self.state.step

    def start(self):
        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        # the run dir: taken (lock, resume plan, compatibility) before anything is written in it
        self.claim = claim_run_dir(acc, tc, self.config_dict, self.shape, self.num_classes)
        self.last_ckpt = self.claim.checkpoint
        self.rng_devices = [acc.device] if acc.device.type == "cuda" else []
        # the family's data-dependent set-up, under its own RNG: the training stream is the same
        with torch.random.fork_rng(devices=self.rng_devices):
            self.family.prepare(lambda: load_real(cfg.data.path, cfg.data.split, limit=FIT_IMAGES, seed=tc.seed),
                                fresh=self.last_ckpt is None, main=self.main)
        self.memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        for m in self.family.modules.values():
            m.to(memory_format=self.memory_format)
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
        if cfg.eval.every > 0 and self.main:  # under its own RNG, as above
            with torch.random.fork_rng(devices=self.rng_devices):
                self.evaluator = Evaluator(cfg.data.path, n=cfg.eval.n, space=cfg.eval.space, seed=cfg.eval.seed,
                                           device=acc.device, split=cfg.data.split, with_prdc=False)
        self.bar = tqdm(total=tc.steps, initial=self.state.step, disable=not self.main, dynamic_ncols=True,
                        unit="step", mininterval=1.0)
        self.monitor = Monitor(acc, self.family, self.state, tc.batch_size * tc.grad_accum * acc.num_processes)

    def resume(self):
        """Load the checkpoint the claim chose, if any. A branch off an older checkpoint (newer ones
        were moved aside) starts a new W&B run: the old one has logged past this step."""
        if not self.last_ckpt:
            return
        try:
            self.accelerator.load_state(self.last_ckpt)
        except Exception as e:  # a checkpoint written before checksums were recorded, damaged
            raise checkpoint.CheckpointError(f"cannot load checkpoint {self.last_ckpt}: {one_line(e)}") from None
        if self.claim.branch:
            self.state.wandb_run_id = None
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
        self.monitor.add(losses, self.state.step)
        self.bar.update(1)

    def check(self, signum):
        return self.monitor.check(signum, self.last_ckpt)

    def log(self, step):
        """Means since the last log, speed and data position: console, metrics.jsonl, W&B."""
        record = self.monitor.metrics(step, {n: self.lr(n, step - 1) for n in self.family.modules}, self.position)
        if self.main:
            self.bar.set_postfix({"img/s": f"{record['perf/img_per_s']:.0f}"}, refresh=False)
            self.bar.write(status_line(step, self.cfg.train.steps, self.position.epoch, record))
            self.run_dir.append_metrics({"step": step, **record})
        if self.mode:
            self.accelerator.log(record, step=step)

    def sampler_at(self, step):
        """What is sampled at this step (gen.sample.sampler_for, the one policy): the EMA weights
        with BatchNorm statistics of their own, and the family's latent prior; made at most once
        per step for the grid, the evaluation and the checkpoint together, under its own RNG."""
        if step not in self.sampler_cache:
            self.sampler_cache.clear()
            tc = self.cfg.train
            module = self.ema.module if self.ema else self.family.modules[self.family.ema_target]
            meta = {"shape": list(self.shape), "num_classes": self.num_classes,
                    "class_names": self.manifest.get("class_names")}
            with torch.random.fork_rng(devices=self.rng_devices):
                self.sampler_cache[step] = sampler_for(self.family, module, self.cfg, meta, self.accelerator.device,
                                                       seed=tc.seed, choose=step % tc.ckpt_every == 0 or step == tc.steps)
        return self.sampler_cache[step]

    def sample_grid(self, step):
        """The grid of fixed latents (and labels: the family's sample_labels)."""
        if not self.main:
            return
        with self.monitor.paused():
            grid = save_grid(self.sampler_at(step).sample(self.cfg.log.num_samples, seed=self.cfg.train.seed),
                             self.run_dir.grid(step))
            if self.mode:
                tracking.log_image(self.accelerator, "samples", grid, step)

    def evaluate(self, step):
        """--eval.every: FID/KID (and legibility) of what is sampled, against the features of the
        real data computed once."""
        if not self.evaluator:
            return
        ev = self.evaluator
        with self.monitor.paused(), torch.random.fork_rng(devices=self.rng_devices):
            scores = ev.score(self.sampler_at(step).sample(ev.n, seed=self.cfg.eval.seed))
        record = {"step": step, "time/elapsed_s": self.state.elapsed,
                  **{f"eval/{k}": v for k, v in scores.items() if isinstance(v, float)}}
        self.bar.write(f"eval at step {step}: FID {scores['fid']:.3f} (real vs real {ev.floors['real_vs_real']['fid']:.3f})"
                       + (f", legibility {scores['legibility']:.3f}" if "legibility" in scores else "") + f" [{ev.space}]")
        self.run_dir.append_metrics(record)
        if self.mode:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def save(self, step):
        with self.monitor.paused():
            self.monitor.count_elapsed()  # the wall time up to here is the checkpoint's
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
            if self.claim and self.claim.lock:
                self.claim.lock.release()

    def result(self):
        return TrainResult(self.step, str(self.run_dir), self.last_ckpt, self.stopped_by, self.family.modules, self.ema)


class TrainState:
    """Step, data position, W&B run id and the run's wall time: checkpointed with the models
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
