#!/usr/bin/env bash
# Create a virtual environment from this repository's own files and run the whole test suite.
#
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh -k saliency  # extra arguments go to pytest
#
# VENV (default .venv) picks the environment folder; TORCH_SPEC (default torch==2.13.0, a CPU
# build) is installed first so that the package's torch range does not pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
"$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests; treating that as a failure" >&2
  exit 1
fi
exit "$status"
