"""A labeled grid of real samples (`python -m data_prep preview`)."""
import io
import math
from pathlib import Path

from PIL import Image, ImageDraw

from gen.durable import atomic_write_bytes
from gen.shard_format import read_manifest, split_shards


def preview(root, out, n=64, split=None):
    """A labeled grid of the first `n` real samples of a split, saved as PNG."""
    import webdataset as wds  # here, not at the top: it imports torch, which writing shards does not need
    manifest = read_manifest(root)
    split = split or ("train" if "train" in manifest["splits"] else next(iter(manifest["splits"])))
    names = manifest.get("class_names")
    samples = []
    urls = [path for path, _ in split_shards(root, split, manifest)]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        samples.append(sample)
        if len(samples) == n:
            break
    cell = max(64, manifest["image_size"])
    label_h = 14 if names else 0
    cols = math.ceil(math.sqrt(len(samples)))
    rows = math.ceil(len(samples) / cols)
    grid = Image.new("RGB", (cols * (cell + 2), rows * (cell + label_h + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, sample in enumerate(samples):
        img = Image.open(io.BytesIO(sample["png"])).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
        x, y = (i % cols) * (cell + 2), (i // cols) * (cell + label_h + 2)
        grid.paste(img, (x, y))
        if names and "cls" in sample:
            draw.text((x + 2, y + cell), names[int(sample["cls"])][:cell // 6], fill=(0, 0, 0))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return len(samples)
