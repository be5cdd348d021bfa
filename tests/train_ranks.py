"""Run under 2 DDP processes: train, then rank 0 records whether every rank holds the same
weights, buffers (BatchNorm's running statistics aside) and EMA weights, tensor for tensor (and which precision and world size it ran
with), whether training moved them from the initial weights (rebuilt here from the seed), and
which threads outlive the process group (gloo threads alive at interpreter exit can abort it).

    accelerate launch ... tests/train_ranks.py OUT.json ARGS...                        one run
    accelerate launch ... tests/train_ranks.py OUT.json --case A ARGS... --case B ARGS...   one run per case

Several cases share one launch (the processes start and import torch once): each is a run of its
own with its own precision (Accelerate's per-run state is reset between them, the process group
kept); OUT.json maps each case to its record, written after each case, so a failure later names
the cases done. With no --case the record is OUT.json itself."""
import json
import os
import sys

import torch
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from gen.config import parse
from gen.families import build_family
from gen.shard_format import read_manifest
from gen.train import train
from helpers import split_cases


def record(args):
    """Train one case and compare the ranks; rank 0's record (None on the other ranks)."""
    cfg = parse(args)
    AcceleratorState._reset_state(False)  # this case's precision; the process group stays
    result = train(cfg, keep_process_group=True)
    modules = {**result.modules, **({"ema": result.ema.module} if result.ema else {})}
    # every weight and buffer but BatchNorm's running statistics, which each rank updates from its own
    # batches (DDP broadcasts rank 0's before each forward; rank 0's are the ones saved)
    flat = torch.cat([t.detach().float().flatten() for m in modules.values() for k, t in m.state_dict().items()
                      if "running_" not in k and "num_batches_tracked" not in k])
    gathered = [torch.empty_like(flat) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, flat)
    if torch.distributed.get_rank() != 0:
        return None
    manifest = read_manifest(cfg.data.path)
    set_seed(cfg.train.seed)  # rank 0's initial weights, which DDP gives every rank
    initial = build_family(cfg.model, cfg.optim, (manifest["channels"], manifest["image_size"], manifest["image_size"]),
                           len(manifest.get("class_names") or [])).modules
    moved = {n: any(not torch.equal(a.float(), b.float()) for a, b in zip(m.state_dict().values(),
                                                                           initial[n].state_dict().values()))
             for n, m in result.modules.items()}
    return {"world_size": torch.distributed.get_world_size(), "numel": flat.numel(),
            "identical": all(torch.equal(t, flat) for t in gathered),
            "max_diff": max(float((t - flat).abs().max()) for t in gathered), "moved": moved, "step": result.step}


out, report = sys.argv[1], {}


def write():  # the record of one run, or one per case
    json.dump(report if None not in report else report[None], open(out, "w"))


for name, args in split_cases(sys.argv[2:]):
    rec = record(args)
    if rec is not None:
        report[name] = rec
        write()  # after each case: a failure later names the cases done
rank = torch.distributed.get_rank()
torch.distributed.destroy_process_group()
threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
if rank == 0:
    for rec in report.values():
        rec["threads_after_destroy"] = threads
    write()
