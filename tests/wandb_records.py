"""Read the records of an offline W&B run file (`run-ID.wandb`) without network or wandb's
service: a 7-byte header, then LevelDB log blocks of 32 KiB holding protobuf `Record`s."""
import json
import struct

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += room  # zero-filled rest of block
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def history(path):
    """[(step, {key: value})] of the run file's history rows."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            rows.append((int(items.get("_step", -1)), items))
    return rows


def run_id(path):
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            return r.run.run_id
    return None
