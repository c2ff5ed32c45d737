#!/bin/bash
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
date -u +"start %FT%TZ"
start=$(date +%s)
attend-robust finetune --model minilm --dataset dream --data-dir ../shared/data \
  --train-limit 640 --epochs 1 --eval-limit 200 --logging-steps 5 --output-dir runs/victims/minilm-dream
rc=$?
date -u +"end %FT%TZ"
echo "exit $rc, wall $(( $(date +%s) - start )) s"
