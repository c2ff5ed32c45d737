#!/bin/bash
# HackAttend on 500 DREAM dev questions (seeded sample) against the fine-tuned MiniLM:
# full scale, half scale, random baseline. A query batch of 4 wastes fewer forwards after an early
# success on CPU; batch sizes never change the search's decisions.
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
MODEL=runs/victims/minilm-dream
COMMON="--model $MODEL --dataset dream --split dev --data-dir ../shared/data --limit 500 --alpha 0.01 --query-batch-size 4"
run() {
  name=$1; shift
  echo "== $name: start $(date -u +%FT%TZ)"
  start=$(date +%s)
  attend-robust attack $COMMON --output-dir runs/attacks/dream-$name "$@"
  echo "== $name: exit $?, end $(date -u +%FT%TZ), wall $(( $(date +%s) - start )) s"
}
run full
run half --max-layers 3 --max-heads 6
run random --unit-ranking random --layer-ranking random --head-ranking random --seed 0
