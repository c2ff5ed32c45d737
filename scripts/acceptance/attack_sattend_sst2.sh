#!/bin/bash
# HackAttend (alpha 1%, full scale) on all 872 SST-2 dev sentences against every model of the
# S-Attend grid (scripts/acceptance/finetune_sattend_sst2.sh). Pass model names to attack a subset,
# for example `attack_sattend_sst2.sh plain unit-0.1`. A finished attack is skipped; an interrupted
# one resumes from its records.
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(plain unit-0.1 unit-0.2 unit-0.5 token-0.1 token-0.2 token-0.5)
for name in "${names[@]}"; do
  out=runs/attacks/sattend-sst2-$name
  if [ -f "$out/report.json" ]; then echo "== $name: already attacked"; continue; fi
  echo "== $name: start $(date -u +%FT%TZ)"
  start=$(date +%s)
  attend-robust attack --model runs/sattend/sst2-$name --dataset sst2 --split dev --data-dir ../shared/data \
    --alpha 0.01 --output-dir "$out" --no-progress
  echo "== $name: exit $?, end $(date -u +%FT%TZ), wall $(( $(date +%s) - start )) s"
done
