#!/usr/bin/env bash
# The GPU step, measured in one call (issue 36), on a GPU machine from the repo root with the
# Pokémon zip at .gpu/ and wheels at .whl/ (machines without network):
#   bash bench/gpu_step.sh [OUT_DIR]        # ~8-9 min on an H200; PROFILE_ONLY=1: the profiles alone (~3 min)
# 0. the card (nvidia-smi) and the estimate of each preset's memory (bench/gpu_memory_estimate.py);
# 1. bench/profile_step.py per preset at 64 px, bf16, its own batch and width: top kernels, launches
#    per step, FLOPs per image, TFLOP/s, the loop against a bare PyTorch step of the same nets;
# 2. bench/gpu_sweep.py: images/s and peak memory of the real loop over batch sizes (64 -> 1024),
#    eager vs torch.compile vs CUDA graphs (reduce-overhead), bf16 and fp32 (TF32), with the share
#    of the card's peak from step 1's FLOPs;
# 3. (SKIP_FP16 unset) fp16 with its grad scaler: finite losses, the scaler in the checkpoint, k + k vs 2k.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu-out}}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 WANDB_MODE=disabled DEEPGEN_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -m data_prep folder .gpu/pokemon-819-128px.zip --out /tmp/poke64 --size 64 2>&1 | tail -1
python3 bench/gpu_memory_estimate.py --size 64 > "$OUT/memory-estimate.txt" 2>&1
if [ -z "${SKIP_PROFILE:-}" ]; then
  for preset in gan-small-data gan vae; do
    python3 bench/profile_step.py --preset "$preset" --data /tmp/poke64 --precision bf16 --steps 80 --warmup 30 \
        --out "$OUT/profile-$preset.json" 2>&1 | grep -v "step/s" | tee "$OUT/profile-$preset.txt" | tail -4
  done
fi
[ -n "${PROFILE_ONLY:-}" ] && exit 0
if [ -z "${SKIP_SWEEP:-}" ]; then
  # what fills the card: the small-data preset over batches and compile modes, the others at two batches
  python3 bench/gpu_sweep.py --data /tmp/poke64 --presets gan-small-data --batch-sizes 64 256 1024 \
      --precisions bf16 --compile off default reduce-overhead --steps 60 --peak-tflops ${PEAK_TFLOPS:-989} \
      --flops-json "$OUT"/profile-*.json --out "$OUT/sweep-small-data.json" -- --data.workers 6 2>&1 | tee "$OUT/sweep-small-data.txt" | tail -12
  python3 bench/gpu_sweep.py --data /tmp/poke64 --presets gan vae --batch-sizes 128 1024 --precisions bf16 \
      --compile off default --steps 60 --peak-tflops ${PEAK_TFLOPS:-989} --flops-json "$OUT"/profile-*.json \
      --out "$OUT/sweep-gan-vae.json" -- --data.workers 6 2>&1 | tee "$OUT/sweep-gan-vae.txt" | tail -10
  python3 bench/gpu_sweep.py --data /tmp/poke64 --presets gan-small-data --batch-sizes 256 --precisions no \
      --compile off --steps 60 --out "$OUT/sweep-fp32.json" -- --data.workers 6 2>&1 | tail -4 | tee "$OUT/sweep-fp32.txt"
fi
[ -n "${SKIP_FP16:-}" ] && exit 0
# fp16: 2k steps straight vs k + resume + k
common=(--preset gan-small-data --data /tmp/poke64 --train.batch_size 128 --train.mixed_precision ${PRECISION:-fp16} --log.wandb off
        --train.log_every 10 --train.ckpt_every 40 --train.sample_every 1000 --data.workers 4)
python3 -m jobs.train "${common[@]}" --train.run_dir /tmp/fp16-a --train.steps 80 > "$OUT/fp16-a.log" 2>&1; echo "fp16 straight exit $?"
python3 -m jobs.train "${common[@]}" --train.run_dir /tmp/fp16-b --train.steps 40 > "$OUT/fp16-b1.log" 2>&1; echo "fp16 first half exit $?"
python3 -m jobs.train "${common[@]}" --train.run_dir /tmp/fp16-b --train.steps 80 > "$OUT/fp16-b2.log" 2>&1; echo "fp16 resumed exit $?"
python3 - <<'PY' 2>&1 | tee "$OUT/fp16.txt"
import json, math, torch
from pathlib import Path
from safetensors.torch import load_file
a, b = Path("/tmp/fp16-a/checkpoints/checkpoint-0000080"), Path("/tmp/fp16-b/checkpoints/checkpoint-0000080")
rows = [json.loads(l) for l in Path("/tmp/fp16-a/metrics.jsonl").read_text().splitlines()]
print("losses finite:", all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("train/")))
print("scaler in checkpoint:", sorted(p.name for p in a.iterdir() if "scaler" in p.name))
for ck in (Path("/tmp/fp16-b/checkpoints/checkpoint-0000040"), a, b):
    if not (ck / "scaler.pt").is_file():
        print(ck, "has no scaler.pt"); continue
    s = torch.load(ck / "scaler.pt", weights_only=True)
    print(ck, "scale", s["scale"], "growth_tracker", s["_growth_tracker"])
for name in ("model.safetensors", "model_1.safetensors", "sampling.safetensors"):
    x, y = load_file(a / name), load_file(b / name)
    diff = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
    print(f"{name}: max |straight - resumed| = {diff:.3g} over {len(x)} tensors")
ra = [json.loads(l) for l in Path("/tmp/fp16-a/metrics.jsonl").read_text().splitlines()]
rb = [json.loads(l) for l in Path("/tmp/fp16-b/metrics.jsonl").read_text().splitlines()]
print("loss_d straight :", [round(r["train/loss_d"], 4) for r in ra])
print("loss_d resumed  :", [round(r["train/loss_d"], 4) for r in rb])
PY
grep -h "resumed from\|error" "$OUT"/fp16-b2.log | head -3
