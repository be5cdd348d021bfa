"""Images/s and peak GPU memory of the real training loop over batch sizes, precisions and compile
modes, all in one process (imports and the CUDA context paid once): what fills a card, and what
torch.compile and CUDA graphs buy at each batch.

    python bench/gpu_sweep.py --data /tmp/poke64 --presets gan-small-data gan vae --batch-sizes 64 256 1024 \\
        --precisions bf16 no --compile off default reduce-overhead --steps 60 --out sweep.json
    python bench/gpu_sweep.py --data data/mnist --tiny          # CPU smoke test

Each cell trains `--steps` optimizer steps with `jobs.train`'s loop (gen.train.train, no checkpoints
or grids in between) and reads the loop's own `perf/img_per_s` over the second half (warm:
after compilation and cuDNN autotuning) and `perf/gpu_peak_MB`. Prints a table per preset with
each cell's images/s, its ratio to the same batch eager, and the share of the card's peak (from
the FLOPs per image `bench/profile_step.py` counts, when --flops-json gives them)."""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cell(data, preset, batch, precision, compile_mode, steps, width, workdir, extra):
    from accelerate.state import AcceleratorState

    from gen.config import parse
    from gen.run_dir import RunDir
    from gen.train import train
    run_dir = Path(workdir) / f"{preset}-{batch}-{precision}-{compile_mode}"
    args = ["--preset", preset, "--data", str(data), "--train.run_dir", str(run_dir), "--train.steps", str(steps),
            "--train.batch_size", str(batch), "--train.mixed_precision", precision, "--log.wandb", "off",
            "--train.resume", "restart", "--train.log_every", str(steps // 2), "--train.sample_every", str(10 * steps),
            "--train.ckpt_every", str(10 * steps), *(["--model.width", str(width)] if width else []), *extra]
    if compile_mode != "off":
        args += ["--train.compile", "--train.compile_mode", compile_mode]
    AcceleratorState._reset_state(True)
    t0 = time.perf_counter()
    try:
        train(parse(args))
    except Exception as e:  # an out-of-memory batch, a mode the card or torch refuses: a row that says so
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    rows = [r for r in RunDir(run_dir).read_metrics() if "perf/img_per_s" in r]
    return {"img_per_s": rows[-1]["perf/img_per_s"], "gpu_peak_MB": rows[-1].get("perf/gpu_peak_MB"),
            "wall_s": time.perf_counter() - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--presets", nargs="+", default=["gan-small-data", "gan", "vae"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256, 1024])
    p.add_argument("--precisions", nargs="+", default=["bf16"])
    p.add_argument("--compile", nargs="+", default=["off", "default"], dest="compile_modes",
                   help="off, default, reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--width", type=int, default=None, help="default: each preset's own")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for the share")
    p.add_argument("--flops-json", nargs="*", default=[], help="bench/profile_step.py --out files (FLOPs per image)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test")
    p.add_argument("--out", default=None)
    p.add_argument("extra", nargs="*", help="more train overrides, e.g. --data.workers 6")
    args = p.parse_args()
    if args.tiny:
        args.presets, args.batch_sizes, args.precisions, args.compile_modes = ["gan"], [16, 32], ["no"], ["off"]
        args.steps, args.width = 6, 8
        args.extra += ["--data.workers", "0"]
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    flops = {}
    for f in args.flops_json:
        if Path(f).is_file():
            d = json.loads(Path(f).read_text())
            flops[d["preset"]] = d["flops_per_image"]["step"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for batch in args.batch_sizes:
                for precision in args.precisions:
                    for mode in args.compile_modes:
                        r = cell(args.data, preset, batch, precision, mode, args.steps, args.width, tmp, args.extra)
                        r.update(preset=preset, batch=batch, precision=precision, compile=mode)
                        results.append(r)
                        print(json.dumps(r), flush=True)
    print(f"\n{device}")
    print("| preset | batch | precision | compile | img/s | vs eager, same batch | TFLOP/s | share of peak | GPU peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['preset']} | {r['batch']} | {r['precision']} | {r['compile']} | {r['error']} | | | | |")
            continue
        eager = next((e for e in results if e["preset"] == r["preset"] and e["batch"] == r["batch"]
                      and e["precision"] == r["precision"] and e["compile"] == "off" and "img_per_s" in e), None)
        tflops = r["img_per_s"] * flops[r["preset"]] / 1e12 if r["preset"] in flops else None
        share = f"{tflops / args.peak_tflops:.1%}" if tflops and args.peak_tflops else "-"
        print(f"| {r['preset']} | {r['batch']} | {r['precision']} | {r['compile']} | {r['img_per_s']:,.0f} | "
              f"{r['img_per_s'] / eager['img_per_s']:.2f}x | {tflops or 0:.1f} | {share} | "
              f"{r['gpu_peak_MB'] or 0:,.0f} |" if eager else "| - |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "results": results}, indent=1))


if __name__ == "__main__":
    main()
