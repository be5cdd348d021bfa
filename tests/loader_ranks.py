"""Run under 2 processes (conftest.launch2): every rank reads one epoch of the shards (epoch
mode) and rank 0 writes which sample keys each rank saw.

    accelerate launch ... tests/loader_ranks.py OUT.json --case NAME SHARDS WORKERS [--case ...]

The cases share one launch (the processes start and import torch once); OUT.json maps each case
to [rank 0's keys, rank 1's keys]."""
import json
import sys

from accelerate import Accelerator
from accelerate.utils import gather_object

from gen.data import make_loader
from helpers import split_cases

out, report = sys.argv[1], {}
acc = Accelerator(cpu=True)
for name, (shards, workers) in split_cases(sys.argv[2:]):
    loader, _, _ = make_loader(shards, batch_size=7, seed=1, rank=acc.process_index, world_size=acc.num_processes,
                               workers=int(workers), epochs=1, shuffle_buffer=50)
    report[name] = gather_object([[k for batch in loader for k in batch["key"]]])
if acc.is_main_process:
    with open(out, "w") as f:
        json.dump(report, f)
acc.end_training()  # the process group (and its gloo threads) ends here, not during interpreter exit
