#!/usr/bin/env bash
# GPU run of the quality bench's Pokémon pair (issue 12): gan-small-data at its own width and batch
# for MINUTES of training, then the widened seed GAN to the same images seen; domain-feature scores
# and the grid. On a GPU machine without network, from the repo root, with the Pokémon zip at .gpu/
# and wheels at .whl/ (see bench/gpu_step.sh):   MINUTES=4 bash bench/gpu_quality.sh OUT_DIR
# Optional, to score in the very feature space of a CPU run: the bench's Pokémon shards at
# .gpu/pokemon-shards and its domain net's cache at .gpu/cache (DEEPGEN_CACHE).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu-out}}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 WANDB_MODE=disabled DEEPGEN_OFFLINE=1
[ -d .gpu/cache ] && export DEEPGEN_CACHE=$PWD/.gpu/cache
data=(); [ -d .gpu/pokemon-shards ] && data=(--pokemon-data .gpu/pokemon-shards)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 bench/quality.py --only pokemon --gpu --minutes "${MINUTES:-4}" --pokemon-zip .gpu/pokemon-819-128px.zip "${data[@]}" \
    --out /tmp/gq 2>&1 | tee "$OUT/bench.log"
cp /tmp/gq/quality.md /tmp/gq/quality.json /tmp/gq/grid-pokemon.png "$OUT"/ 2>/dev/null
for r in /tmp/gq/runs/*; do tail -n 3 "$r/metrics.jsonl" > "$OUT/$(basename "$r")-tail.jsonl" 2>/dev/null; done
cp /tmp/gq/runs/pokemon-gan-small-data/bench-samples.pt "$OUT/gan-small-data-samples.pt" 2>/dev/null  # to rescore here
