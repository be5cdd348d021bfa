"""Weights & Biases, main process only: decide the mode once (online needs a key and a network,
else offline with one warning), and keep the run id with the checkpoints so a resumed or
requeued job continues the same run. The key is read by wandb itself and never printed here."""
import logging
import netrc
import os
from pathlib import Path

from .cli import reachable

log = logging.getLogger("gen.tracking")


def _has_api_key():
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc")).authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


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
    if not reachable("api.wandb.ai"):
        log.warning("W&B: api.wandb.ai unreachable: logging offline; upload later with `wandb sync RUN_DIR/wandb/offline-run-*`")
        return "offline"
    return "online"


def new_run_id():
    # 8 lowercase alphanumerics, the form wandb's own ids take
    import secrets
    import string
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def start(accelerator, cfg, config_dict, state):
    """W&B for a training run (main process), or None when off: the same run id across resumes
    (kept in the checkpointed state). Returns the mode."""
    mode = wandb_mode(cfg.log.wandb)
    if mode:
        state.wandb_run_id = state.wandb_run_id or new_run_id()
        init(accelerator, cfg, config_dict, state.wandb_run_id, mode)
    return mode


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


def score_table(sets, keys):
    """[[set name, score, ...]] of {name: scores} for the keys the first set has."""
    keys = [k for k in keys if k in next(iter(sets.values()))]
    return ["set", *keys], [[name] + [scores.get(k) for k in keys] for name, scores in sets.items()]


def log_table(key, sets, init):
    """One W&B run (wandb.init(**init)): {name: scores} as the Table `key`, gen.evaluation's scores."""
    import wandb

    from .evaluation import SCORES
    columns, rows = score_table(sets, [k for k, *_ in SCORES])
    run = wandb.init(**init, settings=wandb.Settings(silent=True))
    run.log({key: wandb.Table(columns=columns, data=rows)})
    return run


def log_eval_to_run(run_dir, meta, results):
    """Summary values and a table in the run's own W&B run (same id), when it has one."""
    run_id = meta.get("wandb_run_id")
    cfg = meta["config"]
    mode = wandb_mode(cfg["log"]["wandb"]) if run_id else None
    if not mode:
        return None
    run = log_table("eval/table", {"this run": results["model"], **results["floors"]}, dict(
        id=run_id, resume="allow", project=cfg["log"]["project"], dir=str(Path(run_dir).resolve()), mode=mode))
    run.summary.update({f"eval/{k}": v for k, v in results["model"].items() if isinstance(v, float)})
    run.finish()
    return mode


def log_compare_table(facts, out):
    """The report's metrics table as a W&B Table, in the runs' project (when their W&B is on)."""
    on = [f for f in facts if f["wandb_run_id"]]
    mode = wandb_mode(on[0]["config"]["log"]["wandb"]) if on else None
    if not mode:
        return None
    sets = {**{f["name"]: f["results"]["model"] for f in facts}, **facts[0]["results"]["floors"]}
    log_table("compare/table", sets, dict(project=on[0]["config"]["log"]["project"], job_type="compare",
                                          name=Path(out).stem, mode=mode, dir=str(Path(out).resolve().parent))).finish()
    return mode
