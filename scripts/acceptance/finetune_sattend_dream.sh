#!/bin/bash
# S-Attend on DREAM: the second stage of the DREAM victim's recipe
# (scripts/acceptance/finetune_dream_continued.sh: 1,200 questions, 1 epoch, lr 1e-4, seed 7, from
# runs/victims/minilm-dream) with S-Attend at one granularity and alpha. The plain second stage is
# runs/victims/minilm-dream-continued, so the two differ only in the masking.
#   finetune_sattend_dream.sh unit 0.1
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
granularity=$1 alpha=$2
out=runs/sattend/dream-$granularity-$alpha
if [ -f "$out/config.json" ]; then echo "== $granularity-$alpha: already trained"; exit 0; fi
echo "== $granularity-$alpha: start $(date -u +%FT%TZ)"
start=$(date +%s)
attend-robust finetune --model runs/victims/minilm-dream --dataset dream --data-dir ../shared/data \
  --train-limit 1200 --epochs 1 --learning-rate 1e-4 --eval-limit 300 --seed 7 --logging-steps 10 \
  --sattend-alpha "$alpha" --sattend-granularity "$granularity" --output-dir "$out"
echo "== $granularity-$alpha: exit $?, end $(date -u +%FT%TZ), wall $(( $(date +%s) - start )) s"
