#!/usr/bin/env bash
# Screen of the unconditional `gan` preset (issue 21) on a GPU machine: several variants of the CPU
# settings (width 16, batch 128, MNIST digits) trained side by side as separate processes on one GPU
# to the notebook's 775k images, each with its FID curve every 200k images and, at the end,
# `jobs.evaluate --n 2000 --space domain --seeds 3` of the 200k and the final checkpoint. The recipe
# does not depend on the device, so the scores stand for the CPU runs (the preset itself is the control).
# From the repo root, with MNIST shards at .gpu/mnist, the domain net's cache at .gpu/cache and wheels
# at .whl/ (see bench/gpu_step.sh):   bash bench/gpu_gan_screen.sh OUT_DIR
# SET=2: the second screen. STEPS=20 EVERY=10 ONLY="preset lr4x" runs it as a smoke test (on a CPU too).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu-out}}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import tyro, webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 WANDB_MODE=disabled DEEPGEN_OFFLINE=1 OMP_NUM_THREADS=1
export DEEPGEN_CACHE=$PWD/.gpu/cache
STEPS=${STEPS:-6055}; EVERY=${EVERY:-1563}; RUNS=${RUNS:-/tmp/screen}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>/dev/null
declare -A VARIANTS
if [ "${SET:-1}" = 1 ]; then  # first screen: rates, self-conditioning, R1, D depth, latent size
  VARIANTS=(
    [preset]=""
    [lr4x]="--optim.lr 2e-3 --optim.lr_d 4e-3"
    [lr6x]="--optim.lr 3e-3 --optim.lr_d 6e-3"
    [sc10]="--model.self_condition 10"
    [lr4x-sc10]="--optim.lr 2e-3 --optim.lr_d 4e-3 --model.self_condition 10"
    [r1-0.3]="--model.r1_gamma 0.3"
    [r1-0.03]="--model.r1_gamma 0.03"
    [lrg-eq-d]="--optim.lr 3e-3 --optim.lr_d 3e-3"
    [dconv2]="--model.d_convs_per_level 2"
    [z64]="--model.latent_dim 64"
  )
elif [ "$SET" = 3 ]; then  # third: G = D rates with R1 0.3 (the second's best), seed replicates
  VARIANTS=(
    [lr8x-eq-r1-s1]="--optim.lr 4e-3 --optim.lr_d 4e-3 --model.r1_gamma 0.3 --train.seed 1"
    [lr8x-eq-r1-s2]="--optim.lr 4e-3 --optim.lr_d 4e-3 --model.r1_gamma 0.3 --train.seed 2"
    [lr6x-s3]="--optim.lr 3e-3 --optim.lr_d 6e-3 --train.seed 3"
    [lr10x-eq-r1]="--optim.lr 5e-3 --optim.lr_d 5e-3 --model.r1_gamma 0.3"
    [lr8x-eq-r1-1]="--optim.lr 4e-3 --optim.lr_d 4e-3 --model.r1_gamma 1.0"
    [lr6x-eq-r1]="--optim.lr 3e-3 --optim.lr_d 3e-3 --model.r1_gamma 0.3"
    [lr8x-12x-r1]="--optim.lr 4e-3 --optim.lr_d 6e-3 --model.r1_gamma 0.3"
    [lr8x-eq-r1-b999]="--optim.lr 4e-3 --optim.lr_d 4e-3 --model.r1_gamma 0.3 --optim.betas 0.0 0.999"
    [lr8x-eq-r1-sc30]="--optim.lr 4e-3 --optim.lr_d 4e-3 --model.r1_gamma 0.3 --model.self_condition 30"
    [lr8x-eq-r1-ema998]="--optim.lr 4e-3 --optim.lr_d 4e-3 --model.r1_gamma 0.3 --model.ema_decay 0.998"
    [lr6x-r1-1]="--optim.lr 3e-3 --optim.lr_d 6e-3 --model.r1_gamma 1.0"
    [lr8x-eq-r1-s3]="--optim.lr 4e-3 --optim.lr_d 4e-3 --model.r1_gamma 0.3 --train.seed 3"
  )
else  # second: higher rates, R1 with them, training-seed replicates of the preset and of lr6x
  VARIANTS=(
    [preset-s1]="--train.seed 1"
    [lr6x-s1]="--optim.lr 3e-3 --optim.lr_d 6e-3 --train.seed 1"
    [lr6x-s2]="--optim.lr 3e-3 --optim.lr_d 6e-3 --train.seed 2"
    [lr8x]="--optim.lr 4e-3 --optim.lr_d 8e-3"
    [lr10x]="--optim.lr 5e-3 --optim.lr_d 1e-2"
    [lr6x-r1-0.3]="--optim.lr 3e-3 --optim.lr_d 6e-3 --model.r1_gamma 0.3"
    [lr8x-r1-0.3]="--optim.lr 4e-3 --optim.lr_d 8e-3 --model.r1_gamma 0.3"
    [lr4e-3-eq]="--optim.lr 4e-3 --optim.lr_d 4e-3"
    [lr6e-3-eq]="--optim.lr 6e-3 --optim.lr_d 6e-3"
    [lr6x-warm]="--optim.lr 3e-3 --optim.lr_d 6e-3 --optim.warmup_steps 300"
    [lr6x-ema9995]="--optim.lr 3e-3 --optim.lr_d 6e-3 --model.ema_decay 0.9995"
    [lr8x-eq-r1]="--optim.lr 4e-3 --optim.lr_d 4e-3 --model.r1_gamma 0.3"
  )
fi
one() {  # NAME ARGS...: train, then score the 200k and the final checkpoint
  local name=$1; shift; local run=$RUNS/$name; local o=$OUT/$name; mkdir -p "$o"
  python3 -m jobs.train --preset gan --model.width 16 --data .gpu/mnist --train.run_dir "$run" --log.wandb off \
      --train.steps "$STEPS" --eval.every "$EVERY" --train.ckpt_every "$EVERY" --train.keep_last 8 \
      --train.sample_every 100000 --train.log_every 500 --train.resume none "$@" > "$o/train.log" 2>&1
  for c in "$run"/checkpoints/checkpoint-$(printf %07d "$EVERY") "$run"; do
    python3 -m jobs.evaluate "$c" --n 2000 --space domain --seeds 3 --no-wandb > "$o/eval-$(basename "$c").log" 2>&1
    cp "$run/eval/metrics.json" "$o/eval-$(basename "$c").json" 2>/dev/null
  done
  cp "$run/config.json" "$run/metrics.jsonl" "$o"/ 2>/dev/null
  echo "$name done $(date +%T)" | tee -a "$OUT/done.txt"
}
names=(${ONLY:-${!VARIANTS[@]}})  # ONLY="preset lr4x": a subset
start=$(date +%s)
for name in "${names[@]}"; do one "$name" ${VARIANTS[$name]} & done
# the curves so far, in case the call's limit comes first
while [ "$(jobs -r | wc -l)" -gt 0 ]; do
  sleep 15
  for name in "${names[@]}"; do cp "$RUNS/$name/metrics.jsonl" "$OUT/$name/" 2>/dev/null; done
  (cd "$OUT" && tar czf partial.tgz "${names[@]}" 2>/dev/null)
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> "$OUT/gpu-util.txt" 2>/dev/null
done
echo "all done in $(( $(date +%s) - start )) s" | tee -a "$OUT/done.txt"
# one file back (a call returns a limited number of files)
(cd "$OUT" && tar czf screen.tgz "${names[@]}" && rm -rf "${names[@]}")
