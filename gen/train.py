"""The one training loop for every model family.

    python -m jobs.train --preset gan --data data/mnist --train.steps 2000
    accelerate launch --num_processes 2 -m jobs.train --preset vae --data data/pokemon
    accelerate launch --cpu --num_processes 2 -m jobs.train --preset gan --data data/mnist

Reads top to bottom: setup, data shape, model family, prepare, EMA and state, resume, data,
tracking, then one loop. A family (families.py) supplies its modules, optimizers and train_step;
everything else - devices, DDP, accumulation, mixed precision, checkpoints, signals, logging -
is here, once.
"""
import json
import logging
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from tqdm import tqdm

from . import checkpoint, tracking
from .config import to_dict
from .data import make_loader, read_manifest
from .ema import EMA
from .families import build_family
from .sample import save_grid

log = logging.getLogger("gen.train")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class NonFiniteLoss(Exception):
    """A loss became NaN or inf; nothing was saved after the last good checkpoint."""


@dataclass
class TrainResult:
    step: int
    run_dir: str
    checkpoint: str | None        # newest checkpoint written or resumed from
    stopped_by: int | None = None  # the signal that stopped the run early, if any
    modules: dict | None = None    # the trained modules (unwrapped from DDP), for programmatic use
    ema: object = None


class TrainState:
    """Step, data position and W&B run id: checkpointed with the models (register_for_checkpointing)."""

    def __init__(self):
        self.step, self.data, self.wandb_run_id = 0, None, None

    def state_dict(self):
        return {"step": self.step, "data": self.data, "wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, d):
        self.step, self.data, self.wandb_run_id = d["step"], d["data"], d["wandb_run_id"]


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


def agree(accelerator, *flags):
    """Flags OR-ed over all ranks (one collective), so every rank stops or fails at the same step."""
    if accelerator.num_processes == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([[float(f) for f in flags]], device=accelerator.device)
    return [bool(v) for v in accelerator.gather(t).amax(dim=0).tolist()]


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


def write_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg, keep_process_group=False):
    # Setup: one Accelerator for devices, DDP, accumulation and mixed precision.
    # (DDP warns once per process that a 1x1 conv's grad layout differs from its bucket: harmless)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    tc = cfg.train
    config_dict = to_dict(cfg)
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
                              # without a GPU, Accelerate only forms a (gloo) process group when told cpu=True
                              cpu=tc.cpu or not torch.cuda.is_available(), log_with=None if cfg.log.wandb == "off" else "wandb")
    set_seed(tc.seed, device_specific=True)  # each rank its own noise; DDP makes the weights equal
    run_dir = Path(tc.run_dir)
    if accelerator.is_main_process:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_dict, indent=1))
    accelerator.wait_for_everyone()

    # Data shape and classes from the shards' manifest.
    manifest = read_manifest(cfg.data.path)
    shape = (manifest["channels"], manifest["image_size"], manifest["image_size"])
    num_classes = len(manifest.get("class_names") or [])

    # Model family: modules and optimizers, prepared together.
    family = build_family(cfg.model, cfg.optim, shape, num_classes)
    names = list(family.modules)
    prepared = accelerator.prepare(*family.modules.values(), *family.optimizers.values())
    family.modules = dict(zip(names, prepared[:len(names)]))
    family.optimizers = dict(zip(names, prepared[len(names):]))
    modules = list(family.modules.values())

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
        checkpoint.check_compatible(meta, config_dict, shape)
        accelerator.load_state(last_ckpt)
        if accelerator.is_main_process:
            log.info("resumed from %s at step %d", last_ckpt, state.step)

    # Data: this rank's share of the shards, continuing exactly where the checkpoint left off.
    loader, _, position = make_loader(
        cfg.data.path, tc.batch_size, seed=tc.seed, rank=accelerator.process_index,
        world_size=accelerator.num_processes, workers=cfg.data.workers, split=cfg.data.split,
        shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled, cache_mb=cfg.data.cache_mb,
        tracker_state=data_position_for_rank(state.data, accelerator), pin_memory=accelerator.device.type == "cuda")

    # Tracking: W&B on the main process, same run id across resumes; metrics.jsonl beside it.
    mode = tracking.wandb_mode(cfg.log.wandb) if accelerator.is_main_process else None
    if mode:
        state.wandb_run_id = state.wandb_run_id or tracking.new_run_id()
        tracking.init(accelerator, cfg, config_dict, state.wandb_run_id, mode)
    gen = torch.Generator().manual_seed(tc.seed)  # fixed latents: the same grid every time
    fixed_z = torch.randn(cfg.log.num_samples, cfg.model.latent_dim, generator=gen).to(accelerator.device)
    fixed_labels = (torch.arange(cfg.log.num_samples) % max(num_classes, 1)).to(accelerator.device)

    def sample_grid(step):
        module = ema.module if ema else accelerator.unwrap_model(family.modules[family.ema_target])
        was_training = module.training
        module.eval()
        images = family.generate(module, fixed_z, fixed_labels)
        module.train(was_training)
        grid = save_grid(images, run_dir / "samples" / f"step-{step:07d}.png")
        if mode:
            tracking.log_image(accelerator, "samples", grid, step)

    def save(step):
        nonlocal last_ckpt
        state.data = gather_object([position.state_dict()])  # every rank's stream position, by rank
        last_ckpt = checkpoint.save(accelerator, run_dir, step, {"config": config_dict, "shape": list(shape),
                                                                 "num_classes": num_classes,
                                                                 "wandb_run_id": state.wandb_run_id}, tc.keep_last)

    # The loop: one optimizer step per iteration, grad_accum micro-batches each.
    images_per_step = tc.batch_size * tc.grad_accum * accelerator.num_processes
    bar = tqdm(total=tc.steps, initial=state.step, disable=not accelerator.is_main_process, dynamic_ncols=True,
               unit="step", mininterval=1.0)
    data_iter = iter(loader)
    window_t, window_steps, sums = time.perf_counter(), 0, {}
    stopped_by = None
    try:
        with StopSignals() as stop:
            while state.step < tc.steps:
                for group_name, opt in family.optimizers.items():
                    for group in opt.param_groups:
                        group["lr"] = family.base_lr[group_name] * lr_factor(state.step, cfg)
                for _ in range(tc.grad_accum):
                    batch = next(data_iter)
                    position.update(batch["position"])
                    batch = {"image": batch["image"].to(accelerator.device, non_blocking=True),
                             "label": batch["label"].to(accelerator.device, non_blocking=True)}
                    with accelerator.accumulate(*modules):
                        losses = family.train_step(batch, state.step, accelerator)
                if ema:
                    ema.update(accelerator.unwrap_model(family.modules[family.ema_target]), state.step)
                state.step += 1
                step = state.step
                finite = bool(torch.stack([v.float() for v in losses.values()]).isfinite().all())
                stop_now, nonfinite = agree(accelerator, stop.signum is not None, not finite)
                if nonfinite:
                    values = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                    raise NonFiniteLoss(f"non-finite loss at step {step} ({values}); nothing saved after it. "
                                        f"Last good checkpoint: {last_ckpt or 'none'}. Try a lower --optim.lr or "
                                        f"--train.mixed_precision no")
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.item()
                window_steps += 1
                bar.update(1)

                if step % tc.log_every == 0 or step == tc.steps:
                    elapsed = time.perf_counter() - window_t
                    metrics = {f"train/{k}": v / window_steps for k, v in sums.items()}
                    metrics.update({f"lr/{n}": family.base_lr[n] * lr_factor(step - 1, cfg) for n in names})
                    metrics.update({"perf/img_per_s": images_per_step * window_steps / elapsed,
                                    "perf/ms_per_step": 1000 * elapsed / window_steps,
                                    "data/epoch": position.epoch, "data/skipped": position.skipped})
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
                if step % tc.ckpt_every == 0 or step == tc.steps or stop_now:
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
        family.modules, modules, prepared, data_iter, loader = plain_modules, None, None, None, None
        accelerator.free_memory()  # drops Accelerate's references, then gc.collect()
        if keep_process_group:  # the caller still talks to the other ranks
            for tracker in accelerator.trackers:
                tracker.finish()
        else:
            accelerator.end_training()
    return TrainResult(state.step, str(run_dir), last_ckpt, stopped_by, plain_modules, ema)
