"""One run per run dir: `RUN_DIR/.lock` names the owner (host, pid, SLURM job id) and carries a
heartbeat, rewritten every HEARTBEAT_S by a thread of the owning (main) process.

A second run on the same folder is refused with one line naming the owner. The lock is taken
over when its owner is gone: a dead pid on this host, a heartbeat older than STALE_S (a crashed
node; shared cluster file systems do not always honour flock, so the heartbeat is the test), or
the same SLURM job id (a requeued job continues its own run). `--train.force_unlock` takes it
regardless.
"""
import json
import os
import socket
import threading
import time
from pathlib import Path

from .errors import UserError
from .durable import atomic_write_bytes

LOCK = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 180.0


class RunDirLocked(UserError):
    """Another live run owns this run dir."""


def slurm_job_id():
    """The id a requeue keeps: the array job and task for array elements, else the job id."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(owner):
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    age = time.time() - owner.get("heartbeat", 0)
    return f"host {owner.get('host')}, pid {owner.get('pid')}{job}, heartbeat {age:.0f} s ago"


class RunLock:
    def __init__(self, run_dir, name=LOCK):
        self.path = Path(run_dir) / name
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": slurm_job_id(),
                      "token": f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"}
        self._stop = threading.Event()
        self._thread = None

    def _read(self):
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # missing, or torn by a kill mid-write (it is written by rename, so rarely)

    def _write(self):
        atomic_write_bytes(self.path, json.dumps(dict(self.owner, heartbeat=time.time())).encode())

    def _why_free(self, other, force):
        """Why an existing lock may be taken over, or None if its owner looks alive."""
        if other is None:
            return "unreadable lock"
        if force:
            return "--train.force_unlock"
        if self.owner["slurm_job_id"] and other.get("slurm_job_id") == self.owner["slurm_job_id"]:
            return "same SLURM job (requeued)"
        if other.get("host") == self.owner["host"] and not _pid_alive(int(other.get("pid", -1))):
            return "its process has ended"
        if time.time() - other.get("heartbeat", 0) > STALE_S:
            return f"no heartbeat for over {STALE_S:.0f} s"
        return None

    def acquire(self, force=False):
        """Take the lock or raise RunDirLocked; returns why an old lock was taken over (or None)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        taken_over = None
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # atomic when nobody holds it
            os.close(fd)
        except FileExistsError:
            other = self._read()
            taken_over = self._why_free(other, force)
            if taken_over is None:
                raise RunDirLocked(f"{self.path.parent} is in use by another run ({describe(other)}); wait for it, "
                                   f"use another --train.run_dir, or --train.force_unlock if that run is gone") from None
        self._write()
        time.sleep(0.05)  # two runs taking a free lock at once: the last rename wins, the other sees it
        if (self._read() or {}).get("token") != self.owner["token"]:
            raise RunDirLocked(f"{self.path.parent} was taken by another run starting at the same moment "
                               f"({describe(self._read() or {})})")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="run-dir-heartbeat")
        self._thread.start()
        return taken_over

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            current = self._read()
            if current is not None and current.get("token") != self.owner["token"]:
                return  # taken over (force_unlock): stop writing, the new owner's lock stands
            try:
                self._write()
            except OSError:
                pass  # a full disk must not kill the run from this thread; the next beat retries

    def holder(self):
        """Who holds the lock now, in words."""
        return describe(self._read() or {})

    def release(self):
        self._stop.set()
        if (self._read() or {}).get("token") == self.owner["token"]:
            self.path.unlink(missing_ok=True)
