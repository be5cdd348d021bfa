"""A folder to share a trained model: weights (safetensors), config, a sample grid and a README.

    python -m jobs.export runs/poke-gan --out exports/poke-gan
    python -c "import gen; g = gen.load_generator('exports/poke-gan'); print(g.sample(4).shape)"

Nothing in the folder needs unpickling: loading it cannot run code. The folder is written
under a temporary name and renamed when complete.
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

from gen.errors import UserError
from gen.cli import command

README = """# {name}

A {what} trained with deepgen ({step} steps, {size}px, {channels} channel(s){classes}).

![samples](samples.png)

Files: `{weights}` (weights, safetensors: safe to load, no pickle) and `config.json` (the full
training config, image shape and classes).

```python
import gen                                      # pip install deepgen
g = gen.load_generator("{name}")               # or load_generator("{name}", device="cuda")
images = g.sample(16, seed=0)                   # (16, {channels}, {size}, {size}) in [-1, 1]
```

or from the command line: `python -m jobs.sample {name} --n 64`.
"""


@command
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir (newest checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True, help="new folder to write")
    p.add_argument("--n", type=int, default=64, help="images in the README's sample grid")
    args = p.parse_args(argv)
    from gen.artifacts import export_weights
    from gen.sample import load_generator, save_grid
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder")
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weights, meta = export_weights(args.run, tmp)
        g = load_generator(tmp)  # the grid comes from the exported files themselves
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    save_grid(g.sample(args.n, seed=0), tmp / "samples.png")
    c, size, _ = g.shape
    names = g.class_names
    (tmp / "README.md").write_text(README.format(
        name=out.name, what="VAE" if g.is_vae else "GAN generator", step=meta.get("step", "?"), size=size,
        channels=c, weights=weights, classes=f", {len(names)} classes" if names else ""))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    print(f"exported {weights}, config.json, samples.png, README.md -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
