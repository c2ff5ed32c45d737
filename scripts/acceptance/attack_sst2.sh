#!/bin/bash
# HackAttend on SST-2 dev (all 872) against the fine-tuned MiniLM: full scale, half scale, random baseline.
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
MODEL=runs/victims/minilm-sst2
COMMON="--model $MODEL --dataset sst2 --split dev --data-dir ../shared/data --alpha 0.01"
run() {
  name=$1; shift
  echo "== $name: start $(date -u +%FT%TZ)"
  start=$(date +%s)
  attend-robust attack $COMMON --output-dir runs/attacks/sst2-$name "$@"
  echo "== $name: exit $?, end $(date -u +%FT%TZ), wall $(( $(date +%s) - start )) s"
}
run full
run half --max-layers 3 --max-heads 6
run random --unit-ranking random --layer-ranking random --head-ranking random --seed 0
