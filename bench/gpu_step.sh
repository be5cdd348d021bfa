#!/usr/bin/env bash
# GPU check of the training step (issue: loop correct and fast on GPUs), run on a GPU machine
# from the repo root with the Pokémon zip at .gpu/ and wheels at .whl/ (machines without network):
#   bash bench/gpu_step.sh [OUT_DIR]          # PROFILE_ONLY=1: just the profiles (~5 min)
# 0. profile_step per preset (bf16) and fp32 with TF32 on/off: top kernels, launches per step, FLOPs,
#    TFLOP/s, loop vs bare reference step;
# 1. bench_step --matrix on the 819 Pokémon at 64 px: img/s for gan/vae x fp32/bf16/fp16
#    (+ channels_last, torch.compile with bf16), beside the loader's own img/s;
# 2. fp16 with its grad scaler: finite losses, scaler state in the checkpoint, resume k+k vs 2k.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu-out}}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 WANDB_MODE=disabled DEEPGEN_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -m data_prep folder .gpu/pokemon-819-128px.zip --out /tmp/poke64 --size 64 2>&1 | tail -1
# issue 24: the real loop profiled beside the bare reference step, each preset at its own batch and
# width, 64 px, bf16; then fp32 with TF32 on and off (bench/profile_step.py; JSON beside each log)
if [ -z "${SKIP_PROFILE:-}" ]; then
  for preset in gan-small-data gan vae; do
    python3 bench/profile_step.py --preset "$preset" --data /tmp/poke64 --precision bf16 --steps 120 --warmup 40 \
        --out "$OUT/profile-$preset.json" 2>&1 | grep -v "step/s" | tee "$OUT/profile-$preset.txt" | tail -4
  done
  for tf32 in on off; do
    python3 bench/profile_step.py --preset gan-small-data --data /tmp/poke64 --precision no --tf32 $tf32 \
        --steps 80 --warmup 30 --out "$OUT/profile-fp32-tf32-$tf32.json" 2>&1 | tail -1
  done
fi
[ -n "${PROFILE_ONLY:-}" ] && exit 0
if [ -z "${SKIP_MATRIX:-}" ]; then
  python3 bench/bench_step.py --matrix --data /tmp/poke64 --batch-size 128 --width 64 --steps 100 --workers 4 2>&1 | tee "$OUT/matrix.txt"
  # a 4x larger batch: the GPU share of the step grows (fp32 convolutions already run as TF32)
  python3 bench/bench_step.py --matrix --data /tmp/poke64 --batch-size 512 --width 64 --steps 60 --workers 6 \
      --presets gan --precision-only 2>&1 | tee "$OUT/matrix512.txt"
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
