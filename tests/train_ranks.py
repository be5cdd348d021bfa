"""Run under 2 DDP processes: train, then rank 0 records whether every rank holds the same
weights (and which precision and world size it ran with), and which threads outlive the process
group (gloo threads alive at interpreter exit can abort it)."""
import json
import os
import sys

import torch

from gen.config import parse
from gen.train import train

out, args = sys.argv[1], sys.argv[2:]
result = train(parse(args), keep_process_group=True)
flat = torch.cat([p.detach().float().flatten() for m in result.modules.values() for p in m.parameters()])
digests = [None, None]
torch.distributed.all_gather_object(digests, [float(flat.sum()), float(flat.abs().sum()), flat.numel(),
                                              torch.distributed.get_world_size()])
rank = torch.distributed.get_rank()
torch.distributed.destroy_process_group()
threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
if rank == 0:
    identical = all(torch.equal(torch.tensor(d), torch.tensor(digests[0])) for d in digests)
    json.dump({"digests": digests, "identical": identical, "step": result.step,
               "threads_after_destroy": threads}, open(out, "w"))
