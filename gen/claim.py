"""A run dir taken for one run before anything is written in it: its lock (gen.runlock), what to
resume (gen.checkpoint.plan_resume: the rule for an existing run dir), and whether that checkpoint
holds the modules this run builds (check_compatible). Only then are an earlier run's files moved
aside and config.json written, so a refused run leaves the run dir as it found it (a folder it
created itself is removed again). `Claim.resume` then loads the checkpoint it chose."""
import json
import logging
from dataclasses import dataclass

from accelerate.utils import broadcast_object_list

from . import checkpoint
from .durable import atomic_write_bytes
from .errors import UserError, one_line
from .run_dir import RunDir
from .runlock import RunLock

log = logging.getLogger("gen.train")


@dataclass
class Claim:
    checkpoint: str | None     # to resume from; None: a fresh start
    branch: bool               # it is older than checkpoints moved aside: a new W&B run
    lock: RunLock | None       # held by the main process until the run ends

    def resume(self, accelerator, state, run_dir):
        """Load the checkpoint chosen, if any, into what the accelerator registered (state among
        them). A branch off an older checkpoint (newer ones were moved aside) starts a new W&B
        run: the old one has logged past this step."""
        if not self.checkpoint:
            return
        try:
            accelerator.load_state(self.checkpoint)
        except Exception as e:  # a checkpoint written before checksums were recorded, damaged
            raise checkpoint.CheckpointError(f"cannot load checkpoint {self.checkpoint}: {one_line(e)}") from None
        if self.branch:
            state.wandb_run_id = None
        if accelerator.is_main_process:
            log.info("resumed from %s at step %d", self.checkpoint, state.step)
            run_dir.truncate_metrics(state.step)


def claim_run_dir(accelerator, train_cfg, config_dict, shape, num_classes):
    """On every rank: the Claim; a refusal (RunDirLocked, CheckpointError) is raised on every rank."""
    outcome = [None]
    lock = None
    if accelerator.is_main_process:
        run_dir = RunDir(train_cfg.run_dir)
        created = not run_dir.path.exists()
        lock = RunLock(run_dir.path)
        try:
            outcome = [_claim(run_dir, lock, train_cfg, config_dict, shape, num_classes)]
        except (UserError, OSError) as e:
            lock.release()  # (only a lock it took)
            if created and run_dir.path.is_dir() and not any(run_dir.path.iterdir()):
                run_dir.path.rmdir()
            outcome = [e if isinstance(e, UserError) else UserError(f"cannot use the run dir {run_dir}: {e}")]
    broadcast_object_list(outcome)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    plan = outcome[0]
    return Claim(plan.checkpoint, plan.branch, lock)


def _claim(run_dir, lock, tc, config_dict, shape, num_classes):
    why = lock.acquire(force=tc.force_unlock)
    if why:
        log.warning("took over the run dir lock of an earlier run (%s)", why)
    plan = checkpoint.plan_resume(run_dir.path, tc.resume)
    if plan.checkpoint:
        meta = checkpoint.read_meta(plan.checkpoint)
        changed = checkpoint.check_compatible(meta, config_dict, shape, num_classes, plan.checkpoint)
        if changed:
            log.warning("resuming from step %d with changed loss settings: %s", meta["step"], "; ".join(changed))
    if plan.aside is not None:
        dest = run_dir.move_aside(**plan.aside)
        log.warning("%s, into %s", plan.why, dest)
    run_dir.samples.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir.config, json.dumps(config_dict, indent=1).encode())
    return plan
