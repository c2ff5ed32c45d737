#!/usr/bin/env bash
# Run the main job end to end on the SST-2 sample shipped in examples/data:
# fine-tune the pretrained all-MiniLM-L6-v2, attack the fine-tuned model with HackAttend and
# print the robustness report.
#
#   bash scripts/demo.sh
#
# VENV (default .venv) picks the environment folder, TORCH_SPEC (default torch==2.13.0) the
# PyTorch build installed first, and OUTPUT_DIR (default runs/demo) where the model and the
# attack records go. Rerunning resumes the attack where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

OUTPUT_DIR="${OUTPUT_DIR:-runs/demo}"
. scripts/setup_venv.sh
setup_venv demo

if [ ! -f "$OUTPUT_DIR/victim/config.json" ]; then
  "$VENV/bin/attend-robust" finetune --model minilm --dataset sst2 --data-dir examples/data \
    --epochs 2 --output-dir "$OUTPUT_DIR/victim"
fi
"$VENV/bin/attend-robust" attack --model "$OUTPUT_DIR/victim" --dataset sst2 --split dev \
  --data-dir examples/data --alpha 0.01 --max-layers 6 --max-heads 12 --output-dir "$OUTPUT_DIR/attack"
