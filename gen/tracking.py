"""Weights & Biases, main process only: decide the mode once (online needs a key and a network,
else offline with one warning), and keep the run id with the checkpoints so a resumed or
requeued job continues the same run. The key is read by wandb itself and never printed here."""
import logging
import netrc
import os
import socket
from pathlib import Path

log = logging.getLogger("gen.tracking")


def _has_api_key():
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc")).authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def _reachable(host="api.wandb.ai", port=443, timeout=3.0):
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def wandb_mode(setting):
    """'online' | 'offline' | None (off), from --log.wandb and WANDB_MODE."""
    if setting == "off":
        return None
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("disabled", "off"):
        return None
    if env == "offline" or setting == "offline":
        return "offline"
    if not _has_api_key():
        log.warning("W&B: no API key (run `wandb login` or set WANDB_API_KEY): logging offline; "
                    "upload later with `wandb sync RUN_DIR/wandb/offline-run-*`")
        return "offline"
    if not _reachable():
        log.warning("W&B: api.wandb.ai unreachable: logging offline; upload later with `wandb sync RUN_DIR/wandb/offline-run-*`")
        return "offline"
    return "online"


def new_run_id():
    # 8 lowercase alphanumerics, the form wandb's own ids take
    import secrets
    import string
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def init(accelerator, cfg, config_dict, run_id, mode):
    """Start (or continue, same id) the W&B run through Accelerate's tracker."""
    name = cfg.log.name or Path(cfg.train.run_dir).name
    accelerator.init_trackers(cfg.log.project, config=config_dict, init_kwargs={"wandb": {
        "id": run_id, "resume": "allow", "name": name, "group": cfg.log.group, "mode": mode,
        "dir": str(Path(cfg.train.run_dir).resolve())}})


def log_image(accelerator, key, image_chw, step):
    """image_chw: float tensor in [0, 1]."""
    tracker = accelerator.get_tracker("wandb", unwrap=True)
    import wandb
    array = (image_chw.clamp(0, 1).permute(1, 2, 0).mul(255).round().byte().cpu().numpy())
    tracker.log({key: wandb.Image(array)}, step=step)
