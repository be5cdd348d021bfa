"""Under 2 DDP ranks, for each preset named: trained 4 steps straight, and 2 steps then resumed to 4
in the same processes (a new Run reading the checkpoint, as a requeued job does); rank 0 writes
whether each resumed run's step-4 checkpoint equals the straight run's, tensor for tensor. One
launch for every preset: the processes start (and import torch) once.

    accelerate launch ... tests/resume_ranks.py OUT.json ROOT gan,vae --data SHARDS ...
"""
import json
import sys
from pathlib import Path

import torch

from gen.config import parse
from gen.train import train
from helpers import assert_same, state_files

out, root, presets, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(","), sys.argv[4:]
report = {}
for preset in presets:
    for name, steps in (("straight", 4), ("resumed", 2), ("resumed", 4)):
        result = train(parse(["--preset", preset, *args, "--train.run_dir", str(root / preset / name),
                              "--train.steps", str(steps)]), keep_process_group=True)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        try:
            assert_same(state_files(root / preset / "straight/checkpoints/checkpoint-0000004"),
                        state_files(root / preset / "resumed/checkpoints/checkpoint-0000004"))
            differs = ""
        except AssertionError as e:
            differs = str(e) or "differs"
        report[preset] = {"step": result.step, "world_size": torch.distributed.get_world_size(), "differs": differs}
        Path(out).write_text(json.dumps(report))  # after each preset: a failure later names the ones done
torch.distributed.destroy_process_group()
