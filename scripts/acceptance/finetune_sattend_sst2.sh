#!/bin/bash
# S-Attend grid on SST-2: all-MiniLM-L6-v2 fine-tuned on a seeded subset of 2,000 SST-2 training
# sentences for 2 epochs, plain and with S-Attend at alpha 0.1, 0.2 and 0.5 at unit and token
# granularity. Every model shares the data, seed and schedule; only the masking differs.
# A model whose folder already contains config.json is skipped, so the script can be rerun after a stop.
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
train() {
  name=$1; shift
  out=runs/sattend/sst2-$name
  if [ -f "$out/config.json" ]; then echo "== $name: already trained"; return; fi
  echo "== $name: start $(date -u +%FT%TZ)"
  start=$(date +%s)
  attend-robust finetune --model minilm --dataset sst2 --data-dir ../shared/data \
    --train-limit 2000 --epochs 2 --seed 42 --output-dir "$out" "$@"
  echo "== $name: exit $?, end $(date -u +%FT%TZ), wall $(( $(date +%s) - start )) s"
}
train plain
for granularity in unit token; do
  for alpha in 0.1 0.2 0.5; do
    train "$granularity-$alpha" --sattend-alpha "$alpha" --sattend-granularity "$granularity"
  done
done
