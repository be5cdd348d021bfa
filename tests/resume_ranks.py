"""Under 2 DDP ranks: one preset trained 4 steps straight, and 2 steps then resumed to 4 in the
same processes (a new Run reading the checkpoint, as a requeued job does); rank 0 writes whether
the resumed run's step-4 checkpoint equals the straight run's, tensor for tensor.

    accelerate launch ... tests/resume_ranks.py OUT.json ROOT --preset vae --data SHARDS ...
"""
import json
import sys
from pathlib import Path

import torch

from gen.config import parse
from gen.train import train
from helpers import assert_same, state_files

out, root, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
for name, steps in (("straight", 4), ("resumed", 2), ("resumed", 4)):
    result = train(parse([*args, "--train.run_dir", str(root / name), "--train.steps", str(steps)]),
                   keep_process_group=True)
torch.distributed.barrier()
if torch.distributed.get_rank() == 0:
    try:
        assert_same(state_files(root / "straight/checkpoints/checkpoint-0000004"),
                    state_files(root / "resumed/checkpoints/checkpoint-0000004"))
        same = ""
    except AssertionError as e:
        same = str(e) or "differs"
    json.dump({"step": result.step, "world_size": torch.distributed.get_world_size(), "differs": same}, open(out, "w"))
torch.distributed.destroy_process_group()
