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
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs, gather_object, set_seed
from tqdm import tqdm

from . import checkpoint, tracking
from .claim import claim_run_dir
from .config import to_dict, validate
from .data import TrainingBatches, load_real
from .ema import EMA
from .families import build_family
from .latent_prior import FIT_IMAGES
from .evaluation import TrainingEvaluation
from .monitor import Monitor, NonFiniteLoss, TrainingDiverged, status_line  # noqa: F401 (their home for callers)
from .run_dir import RunDir
from .sample import StepSampler, save_grid
from .shard_format import read_manifest
from .step import learning_rates, prepare, run_phases, set_learning_rates

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
        self.accelerator, self.precision = make_accelerator(cfg)
        set_seed(tc.seed, device_specific=True)  # each rank its own noise; DDP makes the weights equal
        self.main = self.accelerator.is_main_process
        # data shape and classes from the shards' manifest; the family checks the image size
        self.manifest = read_manifest(cfg.data.path)
        self.shape = (self.manifest["channels"], self.manifest["image_size"], self.manifest["image_size"])
        self.num_classes = len(self.manifest.get("class_names") or [])
        self.meta = {"shape": list(self.shape), "num_classes": self.num_classes,
                     "class_names": self.manifest.get("class_names")}  # a checkpoint's, with the config
        self.family = build_family(cfg.model, cfg.optim, self.shape, self.num_classes, mixed_precision=self.precision)
        self.run_dir = RunDir(tc.run_dir)
        self.claim = self.prepared = self.ema = self.batches = self.bar = self.evaluation = None
        self.last_ckpt = self.stopped_by = self.mode = self.monitor = None

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
        self.prepared = prepare(acc, self.family, compile_mode=tc.compile_mode if tc.compile else None)
        # EMA and the loop's own state are checkpointed with the models
        if cfg.model.ema_decay > 0:
            self.ema = EMA(self.family.modules[self.family.ema_target], cfg.model.ema_decay)
            acc.register_for_checkpointing(self.ema)
        self.state = TrainState()
        acc.register_for_checkpointing(self.state)
        self.claim.resume(acc, self.state, self.run_dir)
        self.open_data()
        # W&B on the main process, the same run id across resumes; metrics.jsonl beside it
        self.mode = tracking.start(acc, cfg, self.config_dict, self.state) if self.main else None
        if cfg.eval.every > 0 and self.main:  # under its own RNG, as above
            with torch.random.fork_rng(devices=self.rng_devices):
                self.evaluation = TrainingEvaluation(cfg, acc.device)
        self.bar = tqdm(total=tc.steps, initial=self.state.step, disable=not self.main, dynamic_ncols=True,
                        unit="step", mininterval=1.0)
        self.monitor = Monitor(acc, self.family, self.state, tc.batch_size * tc.grad_accum * acc.num_processes)
        self.sampler = StepSampler(self.family, cfg, self.meta, acc.device, self.rng_devices)

    def open_data(self):
        """This rank's share of the shards, continuing exactly where the checkpoint left off."""
        acc = self.accelerator
        self.batches = TrainingBatches(self.cfg, acc, self.manifest, self.state.data, self.memory_format)
        # every rank says where it stands: the first place to look when one rank hangs or lags
        log.info("rank %d/%d on %s (%s, precision %s): %s", acc.process_index, acc.num_processes, socket.gethostname(),
                 acc.device, self.precision, self.batches.describe(acc.num_processes))

    def optimizer_step(self):
        """One optimizer step per phase over grad_accum micro-batches, the EMA, the step count;
        the losses are summed on the device (no host sync)."""
        set_learning_rates(self.prepared, self.family, self.state.step, self.cfg)
        if self.cfg.train.compile:  # CUDA graphs (reduce-overhead): a new step may reuse the last one's memory
            torch.compiler.cudagraph_mark_step_begin()
        micro_batches = [self.batches.next() for _ in range(self.cfg.train.grad_accum)]
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
        position = self.batches.position
        record = self.monitor.metrics(step, learning_rates(self.family, step - 1, self.cfg), position)
        if self.main:
            self.bar.set_postfix({"img/s": f"{record['perf/img_per_s']:.0f}"}, refresh=False)
            self.bar.write(status_line(step, self.cfg.train.steps, position.epoch, record))
            self.run_dir.append_metrics({"step": step, **record})
        if self.mode:
            self.accelerator.log(record, step=step)

    def sampler_at(self, step):
        """What is sampled at this step: the EMA weights (or the live ones) as gen.sample.StepSampler makes them."""
        return self.sampler.at(step, self.ema.module if self.ema else self.family.modules[self.family.ema_target])

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
        """--eval.every (gen.evaluation.TrainingEvaluation): console, metrics.jsonl, W&B."""
        if not self.evaluation:
            return
        with self.monitor.paused(), torch.random.fork_rng(devices=self.rng_devices):
            record, line = self.evaluation(step, self.sampler_at(step), self.state,
                                           dict(self.meta, config=self.config_dict), self.run_dir.path)
        self.bar.write(line)
        self.run_dir.append_metrics(record)
        if self.mode:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def save(self, step):
        with self.monitor.paused():
            self.monitor.count_elapsed()  # the wall time up to here is the checkpoint's
            self.state.data = gather_object([self.batches.position.state_dict()])  # every rank's stream position, by rank
            meta = dict(self.meta, config=self.config_dict, wandb_run_id=self.state.wandb_run_id)
            self.last_ckpt = checkpoint.save(self.accelerator, self.run_dir.path, step, meta, self.cfg.train.keep_last,
                                             lambda: self.sampler_at(step))

    def stopped(self, signum):
        self.stopped_by = signum or signal.SIGTERM  # another rank got it
        if self.main:
            self.bar.write(f"stop signal: checkpoint saved at step {self.step} -> {self.last_ckpt}")

    def close(self, keep_process_group):
        try:
            if self.bar:
                self.bar.close()
            if self.prepared:
                self.prepared, self.batches = None, None
                release(self.accelerator, keep_process_group)
        finally:
            if self.claim and self.claim.lock:
                self.claim.lock.release()

    def result(self):
        return TrainResult(self.step, str(self.run_dir), self.last_ckpt, self.stopped_by, self.family.modules, self.ema)


class TrainState:
    """Step, data position, W&B run id, the run's wall time and its best FID: checkpointed with the models
    (register_for_checkpointing)."""

    def __init__(self):
        self.step, self.data, self.wandb_run_id, self.elapsed, self.best_fid = 0, None, None, 0.0, float("inf")

    def state_dict(self):
        return {"step": self.step, "data": self.data, "wandb_run_id": self.wandb_run_id, "elapsed": self.elapsed,
                "best_fid": self.best_fid}

    def load_state_dict(self, d):
        self.step, self.data, self.wandb_run_id = d["step"], d["data"], d["wandb_run_id"]
        self.elapsed, self.best_fid = d.get("elapsed", 0.0), d.get("best_fid", float("inf"))


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


def make_accelerator(cfg):
    """(Accelerator, the precision it runs): without a GPU, Accelerate forms a (gloo) process group
    only when told cpu=True."""
    tc = cfg.train
    cpu = tc.cpu or not torch.cuda.is_available()
    precision = resolve_precision(tc.mixed_precision, cpu)
    return Accelerator(mixed_precision=precision, log_with=None if cfg.log.wandb == "off" else "wandb", cpu=cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(
                           bucket_cap_mb=tc.ddp_bucket_mb, comm_hook=DDPCommunicationHookType(tc.ddp_comm_hook))]), precision


def release(accelerator, keep_process_group):
    """Drop the DDP wrappers (they own the process group) and the loader's workers while Python is
    fully alive: a gloo thread freeing the last tensor during interpreter exit aborts the process
    ("terminate called without an active exception")."""
    accelerator.free_memory()  # drops Accelerate's references, then gc.collect()
    if keep_process_group:  # the caller still talks to the other ranks
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()


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
