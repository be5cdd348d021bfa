"""Small data sets on the accelerator: the decoded split kept there as uint8, batches gathered by
sample id (`make_loader(..., device=...)`, `--data.device_data`)."""
import numpy as np
import torch

from .shard_format import DecodeError


class DeviceData:
    """A small decoded split kept on `device` as uint8, batches gathered there by sample id. It
    runs the same logical-worker streams as the DataLoader would (`ShardStream.batches` on ids)
    and interleaves them in the DataLoader's round-robin order, so batches, positions and resume
    are the CPU path's; no worker processes, no host-to-device copy per batch. For training's
    infinite streams (a finite stream's last batches may be ordered differently)."""

    def __init__(self, stream, device):
        self.stream, self.device = stream, torch.device(device)
        n, c, s = stream.num_samples, stream.channels, stream.size
        images = torch.zeros((n, c, s, s), dtype=torch.uint8)
        labels = torch.full((n,), -1, dtype=torch.long)
        self.keys, self.valid = [None] * n, np.zeros(n, dtype=bool)
        for sample_id, decoded in stream.reader.decode_split():
            if not isinstance(decoded, DecodeError):
                images[sample_id], labels[sample_id], self.keys[sample_id] = decoded
                self.valid[sample_id] = True
        self.images, self.labels = images.to(self.device), labels.to(self.device)

    def _resolve(self, sample_id):
        return sample_id if self.valid[sample_id] else DecodeError(f"corrupt sample id {sample_id} skipped")

    def _gather(self, ids):
        index = torch.tensor(ids, device=self.device)
        return {"image": self.images.index_select(0, index), "label": self.labels.index_select(0, index),
                "key": [self.keys[i] for i in ids]}

    def __iter__(self):
        w = self.stream.num_workers
        streams = [self.stream.batches((p + self.stream.rotation) % w, self._resolve, self._gather) for p in range(w)]
        while streams:
            for s in list(streams):
                try:
                    yield next(s)
                except StopIteration:
                    streams.remove(s)
