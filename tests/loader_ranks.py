"""Run under 2 processes (conftest.launch2): every rank reads one epoch of the
shards (epoch mode) and rank 0 writes which sample keys each rank saw."""
import json
import sys

from accelerate import Accelerator
from accelerate.utils import gather_object

from gen.data import make_loader

shards, workers, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
acc = Accelerator(cpu=True)
loader, _, _ = make_loader(shards, batch_size=7, seed=1, rank=acc.process_index, world_size=acc.num_processes,
                           workers=workers, epochs=1, shuffle_buffer=50)
keys = [k for batch in loader for k in batch["key"]]
everyone = gather_object([keys])
if acc.is_main_process:
    with open(out, "w") as f:
        json.dump(everyone, f)
acc.end_training()  # the process group (and its gloo threads) ends here, not during interpreter exit
