"""What the loop watches between steps: the losses since the last check and the last log, the
clocks, and what is done with them. A check is one host sync and one collective (stop signals,
non-finite losses, divergence); a log is the means since the last one, the speed and the data
position (console, metrics.jsonl, W&B). Time spent sampling, evaluating and saving is kept out of
the images/s figure, and the run's wall time is counted up to every checkpoint, so a resumed run
loses none of it."""
import time
from contextlib import contextmanager

import torch

from .errors import TrainingFailed
from .step import add_into

DIVERGED_CHECKS = 3


class NonFiniteLoss(TrainingFailed):
    """A loss became NaN or inf; nothing was saved after the last good checkpoint."""


class TrainingDiverged(TrainingFailed):
    """The losses blew up without becoming NaN (a GAN whose D wins outright) for DIVERGED_CHECKS checks."""


class Monitor:
    def __init__(self, accelerator, family, state, images_per_step):
        self.accelerator, self.family, self.state, self.images_per_step = accelerator, family, state, images_per_step
        self.device = accelerator.device
        self.sums, self.window_steps, self.check_sums, self.check_steps, self.diverged_checks = {}, 0, {}, 0, 0
        self.first_bad_step = torch.zeros((), dtype=torch.long, device=self.device)  # 0: all finite so far
        self.losses = {}
        self.window_t = self.elapsed_t = time.perf_counter()
        self.paused_s = 0.0  # in this window: sampling, evaluating, saving

    def add(self, losses, step):
        """After each optimizer step, on the device (no sync): sums, and the first non-finite step."""
        finite = torch.stack([v.float() for v in losses.values()]).isfinite().all()
        self.first_bad_step = torch.where(finite | (self.first_bad_step > 0), self.first_bad_step, step)
        self.losses = losses
        add_into(self.sums, losses)
        add_into(self.check_sums, losses)
        self.window_steps += 1
        self.check_steps += 1

    @contextmanager
    def paused(self):
        """Work between steps that is not training: kept out of images/s (not out of the wall time)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def count_elapsed(self):
        """Add the wall time since the last count to the run's (checkpointed) elapsed time."""
        now = time.perf_counter()
        self.state.elapsed += now - self.elapsed_t
        self.elapsed_t = now

    def check(self, signum, last_ckpt):
        """Whether to stop (a signal on any rank); raises NonFiniteLoss or TrainingDiverged."""
        means = {k: v / self.check_steps for k, v in self.check_sums.items()}
        stop_now, bad_step, diverging = agree(self.accelerator, signum is not None, self.first_bad_step,
                                              self.family.diverging(means))
        self.diverged_checks = self.diverged_checks + 1 if diverging else 0
        self.check_sums, self.check_steps = {}, 0
        last_good = f"Last good checkpoint: {last_ckpt or 'none'}"
        if self.diverged_checks >= DIVERGED_CHECKS:
            values = ", ".join(f"{k}={float(v):.3g}" for k, v in means.items())
            raise TrainingDiverged(
                f"training diverged: {self.family.divergence_text} in {DIVERGED_CHECKS} checks in a row, up to "
                f"step {self.state.step} ({values}); nothing saved after it. {last_good}. "
                "Try lower learning rates (--optim.lr_d, --optim.lr) or a stronger --model.r1_gamma")
        if bad_step:
            values = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.losses, torch.stack(
                [v.float() for v in self.losses.values()]).tolist()))
            raise NonFiniteLoss(f"non-finite loss at step {bad_step} (step {self.state.step}: {values}); nothing saved "
                                f"after it. {last_good}. Try a lower --optim.lr or --train.mixed_precision no")
        return stop_now

    def metrics(self, step, lrs, position):
        """The log record: loss means since the last log (one sync), learning rates, speed over the
        training time of the window, wall time, data position; starts a new window."""
        self.count_elapsed()
        train_s = max(time.perf_counter() - self.window_t - self.paused_s, 1e-9)
        means = torch.stack([v.float() for v in self.sums.values()]).div(self.window_steps).tolist()
        record = {f"train/{k}": v for k, v in zip(self.sums, means)}
        record.update({f"lr/{n}": v for n, v in lrs.items()})
        record.update({"perf/img_per_s": self.images_per_step * self.window_steps / train_s,
                       "perf/ms_per_step": 1000 * train_s / self.window_steps, "time/elapsed_s": self.state.elapsed,
                       "data/images_seen": step * self.images_per_step, "data/epoch": position.epoch,
                       "data/skipped": position.skipped, "data/read_MB": position.bytes_read / 2**20})
        if self.device.type == "cuda":  # what to ask SLURM for (--mem-gb is the host's; this is the GPU's)
            record["perf/gpu_peak_MB"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.window_t, self.paused_s, self.window_steps, self.sums = time.perf_counter(), 0.0, 0, {}
        return record


def status_line(step, steps, epoch, record):
    losses = " ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in record.items() if k.startswith("train/"))
    return (f"step {step}/{steps} | epoch {epoch} | {losses} | {record['perf/ms_per_step']:.1f} ms/step | "
            f"{record['perf/img_per_s']:.0f} img/s")


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
