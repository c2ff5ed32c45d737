#!/bin/bash
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
date -u +"start %FT%TZ"
start=$(date +%s)
attend-robust finetune --model runs/victims/minilm-dream --dataset dream --data-dir ../shared/data \
  --train-limit 1200 --epochs 1 --learning-rate 1e-4 --eval-limit 300 --seed 7 --logging-steps 10 \
  --output-dir runs/victims/minilm-dream-continued
rc=$?
date -u +"end %FT%TZ"
echo "exit $rc, wall $(( $(date +%s) - start )) s"
