#!/bin/bash
# HackAttend (full scale) on the 500 DREAM dev questions of scripts/acceptance/attack_dream.sh, at
# alpha 1% and 0.1% (the two mask rates of Table 8 of Liong et al., LREC-COLING 2024), against DREAM S-Attend models
# (scripts/acceptance/finetune_sattend_dream.sh) named as arguments. `plain` names the victim
# runs/victims/minilm-dream-continued, whose alpha 1% attack is runs/attacks/dream-full.
#   attack_sattend_dream.sh plain unit-0.1 token-0.2
#   ALPHAS=0.01 attack_sattend_dream.sh unit-0.1   # one alpha only
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
for name in "$@"; do
  model=runs/sattend/dream-$name
  [ "$name" = plain ] && model=runs/victims/minilm-dream-continued
  for alpha in ${ALPHAS:-0.01 0.001}; do
    out=runs/attacks/sattend-dream-$name-alpha$alpha
    [ "$name" = plain ] && [ "$alpha" = 0.01 ] && continue  # runs/attacks/dream-full
    if [ -f "$out/report.json" ]; then echo "== $name alpha $alpha: already attacked"; continue; fi
    echo "== $name alpha $alpha: start $(date -u +%FT%TZ)"
    start=$(date +%s)
    attend-robust attack --model "$model" --dataset dream --split dev --data-dir ../shared/data \
      --limit 500 --alpha "$alpha" --output-dir "$out" --no-progress
    echo "== $name alpha $alpha: exit $?, end $(date -u +%FT%TZ), wall $(( $(date +%s) - start )) s"
  done
done
