#!/bin/bash
# HackAttend (alpha 1%, full scale) on the 500 DREAM dev questions of scripts/acceptance/attack_dream.sh
# against DREAM S-Attend models (scripts/acceptance/finetune_sattend_dream.sh), named as arguments:
#   attack_sattend_dream.sh unit-0.1 token-0.2
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
for name in "$@"; do
  out=runs/attacks/sattend-dream-$name
  if [ -f "$out/report.json" ]; then echo "== $name: already attacked"; continue; fi
  echo "== $name: start $(date -u +%FT%TZ)"
  start=$(date +%s)
  attend-robust attack --model runs/sattend/dream-$name --dataset dream --split dev --data-dir ../shared/data \
    --limit 500 --alpha 0.01 --output-dir "$out" --no-progress
  echo "== $name: exit $?, end $(date -u +%FT%TZ), wall $(( $(date +%s) - start )) s"
done
